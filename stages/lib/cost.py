"""The cost ledger: what every model call of a build costs, and what the response cache saved.

Annotation is where a build spends its money (tokens of an API, GPU-hours of a local model), so each
call made by annotate, verify or the evaluation judge is measured where it is made:

- tokens: the backend reports them per request (`Backend.last_usage`): the endpoint's `usage`
  (`prompt_tokens`, `completion_tokens`) for `openai`, the processor's token counts of prompt and
  output for `transformers` and `vllm`; the template backend runs no model and reports 0. A call
  whose backend reports nothing (an endpoint without `usage`, a plug-in backend) counts 0 tokens and
  1 `unmetered` call, so a total is never silently an estimate;
- images: the frames (or crops) the request carried;
- wall seconds: the backend call's, shared equally by the requests of the batch;
- accelerator seconds: those wall seconds times the GPUs the backend computes on (`Backend.gpus`:
  0 for an API or the CPU);
- dollars: `price` (a setting of every backend, USD): `input_per_mtok` and `output_per_mtok` per
  million tokens, `per_gpu_hour` per hour of one GPU. A price says what a call costs, not what it
  computes: it is marked `run`, so changing it keeps every committed unit (and its fingerprint).

A response read from the response cache costs nothing: it counts as `cached`, and the usage stored
with it when it was paid for (`stages.lib.response_cache`) counts as `saved_*` at today's price. One
exception keeps the bill true: a response the same unit paid for in an earlier attempt that died
before committing (a kill, a transient failure) was paid by this build, so it counts as a call
(`recovered`) at its stored usage, not as saved; only its second payment is avoided.

A `CostMeter` per unit gathers the calls; `unit_cost` is what the unit's `StageResult.cost` (and so
its commit record) holds; `cost_summary` sums the commit records of a build per stage and per
annotator tier, for `manifest.json` and the card (`stgr status` sums the same records with
`pipeline.cost`).
"""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import pyarrow.fs as pafs

from pipeline.cost import COUNTS, add_costs, empty_cost, per_row, rounded
from pipeline.rundir import Unit

#: A backend's `price` setting when none is given: every call free (a price is the user's to state).
PRICE_DEFAULT: dict[str, float] = {"input_per_mtok": 0.0, "output_per_mtok": 0.0, "per_gpu_hour": 0.0}
#: The annotator tier of a unit that names none (there is one tier until a cascade exists).
DEFAULT_TIER = "1"


@dataclass(frozen=True)
class Price:
    """USD per million input tokens, per million output tokens, and per hour of one GPU."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    per_gpu_hour: float = 0.0

    @classmethod
    def of(cls, price: Mapping[str, Any] | None) -> "Price":
        return cls(**{k: float(v) for k, v in (price or {}).items()})

    def usd(self, input_tokens: float, output_tokens: float, accelerator_s: float) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6 \
            + accelerator_s * self.per_gpu_hour / 3600.0


def price_problems(price: Mapping[str, Any]) -> list[str]:
    """`price.key: message` for a key no price has or a negative amount (the type is checked already)."""
    found = [f"price.{key}: unknown price (it takes {', '.join(PRICE_DEFAULT)})" for key in price if key not in PRICE_DEFAULT]
    return found + [f"price.{key}: must be >= 0, got {value}" for key, value in price.items()
                    if key in PRICE_DEFAULT and value < 0]


@dataclass
class Usage:
    """What one request used. Tokens as the backend reported them (`metered=False`: it reported
    none); `wall_s` and `accelerator_s` are the request's share of its batch's call."""

    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    metered: bool = True
    wall_s: float = 0.0
    accelerator_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "wall_s": round(self.wall_s, 6), "accelerator_s": round(self.accelerator_s, 6)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Usage":
        """A usage stored with a cached response; keys it lacks count 0."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class CostMeter:
    """The calls of one unit through one backend: made (`call`) and answered from the cache (`cached`)."""

    def __init__(self, price: Price, gpus: float = 0.0, tier: str = DEFAULT_TIER) -> None:
        self.price, self.gpus, self.tier = price, float(gpus), tier
        self.totals = empty_cost()

    @classmethod
    def for_backend(cls, backend: Any, tier: str = DEFAULT_TIER) -> "CostMeter":
        """A meter at the backend's `price` setting and its GPUs (`Backend.gpus`)."""
        return cls(Price.of(getattr(backend.cfg, "price", None)), getattr(backend, "gpus", 0.0), tier)

    def call(self, backend: Any, requests: Sequence[Any]) -> tuple[list[Any], list[Usage]]:
        """`backend.generate_each(requests)`, timed and counted; returns its results and each
        request's usage (stored with a cached response, so a later hit knows what it saved)."""
        backend.last_usage = None
        started = time.perf_counter()
        results = list(backend.generate_each(requests))
        wall = time.perf_counter() - started
        reported = getattr(backend, "last_usage", None)
        if reported is None or len(reported) != len(requests):
            reported = [Usage(images=len(r.images), metered=False) for r in requests]
        share = wall / max(1, len(requests))
        usages = []
        for usage in reported:
            usage = Usage(usage.input_tokens, usage.output_tokens, usage.images, usage.metered,
                          wall_s=share, accelerator_s=share * self.gpus)
            self._add(usage)
            usages.append(usage)
        return results, usages

    def _add(self, usage: Usage) -> None:
        t = self.totals
        t["calls"] += 1
        t["unmetered"] += 0 if usage.metered else 1
        for key in ("input_tokens", "output_tokens", "images", "wall_s", "accelerator_s"):
            t[key] += getattr(usage, key)
        t["usd"] += self.price.usd(usage.input_tokens, usage.output_tokens, usage.accelerator_s)

    def cached(self, stored: Mapping[str, Any] | None, recovered: bool = False) -> None:
        """A response read from the cache: free, and what it used when it was paid for counts as
        saved (an entry cached before the ledger existed has no usage and saves 0); with `recovered`
        (this unit's earlier attempt paid for it) a call at its stored usage instead."""
        usage = Usage.from_dict(stored or {})
        t = self.totals
        if recovered:
            self._add(usage)
            t["recovered"] += 1
            return
        t["cached"] += 1
        t["saved_input_tokens"] += usage.input_tokens
        t["saved_output_tokens"] += usage.output_tokens
        t["saved_usd"] += self.price.usd(usage.input_tokens, usage.output_tokens, usage.accelerator_s)


def unpriced(config: Mapping[str, Any]) -> dict[str, Any]:
    """A backend config less its `price`, for a key of what is computed (evaluation's completion
    stores): a price change must not make a stored completion look stale."""
    return {k: v for k, v in config.items() if k != "price"}


def paid_by(ctx: Any) -> dict[str, Any]:
    """The unit a response is paid by, stored with it in the cache: a later attempt of the same unit
    (node, fingerprint, partition) recognises its own earlier payment."""
    return {"node": ctx.stage, "fingerprint": ctx.fingerprint, "partition": ctx.partition}


def read_cached(cache: Any, keys: Iterable[str], meter: CostMeter, ctx: Any) -> dict[str, str]:
    """The responses of `keys` that `cache` (a `ResponseCache`) holds, each counted by `meter`:
    recovered when this unit paid for it in an earlier attempt, else cached (and saved)."""
    found = {}
    for key, entry in cache.get_many(keys).items():
        meter.cached(entry.usage, recovered=entry.paid_by == paid_by(ctx))
        found[key] = entry.response
    return found


def cache_paid(cache: Any, key: str, model: str, response: str, usage: Usage, ctx: Any) -> None:
    """Store a response paid for now with what it used and who paid (what `read_cached` counts)."""
    cache.put(key, model, response, extra={"usage": usage.as_dict(), "paid_by": paid_by(ctx)})


def unit_cost(meter: CostMeter, backend: Any) -> dict[str, Any]:
    """The unit's `StageResult.cost`: the meter's counts, the backend and model, its tier and the
    price the dollars were computed at (a later price change leaves what was paid as it was)."""
    return {**rounded(meter.totals), "backend": backend.name, "model": backend.model_id, "tier": meter.tier,
            "gpus": meter.gpus, "price": asdict(meter.price)}


def _commit_costs(fs: pafs.FileSystem, run_path: str, node: str, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `cost` of each committed unit of one plan node (units without one are left out)."""
    costs = []
    for partition in range(int(info.get("partitions") or 0)):
        path = posixpath.join(run_path, Unit(node, info["fingerprint"], partition).record)
        try:
            with fs.open_input_stream(path) as stream:
                record = json.loads(stream.read())
        except FileNotFoundError:
            continue
        if record.get("cost"):
            costs.append(record["cost"])
    return costs


def cost_summary(fs: pafs.FileSystem, run_path: str, plan_nodes: Mapping[str, Mapping[str, Any]],
                 kept_rows: int) -> dict[str, Any]:
    """The build's cost for `manifest.json`: totals, per kept row, what the cache saved, per stage
    (each node whose units made model calls) and per annotator tier (the annotate nodes' units, by
    their `tier`), summed from the commit records of the plan's fingerprints only."""
    stages: dict[str, dict[str, Any]] = {}
    tiers: dict[str, list[dict[str, Any]]] = {}
    for node, info in plan_nodes.items():
        costs = _commit_costs(fs, run_path, node, info)
        if not costs:
            continue
        stages[node] = {**add_costs(costs), "units": len(costs)}
        if info.get("stage") == "annotate":
            for cost in costs:
                tiers.setdefault(str(cost.get("tier") or DEFAULT_TIER), []).append(cost)
    total = add_costs(stages.values())
    return {
        "total_usd": total["usd"],
        "per_kept_row_usd": per_row(total["usd"], kept_rows),
        "saved_usd": total["saved_usd"],
        "kept_rows": kept_rows,
        **{key: total[key] for key in COUNTS if key not in ("usd", "saved_usd")},
        "stages": stages,
        "tiers": {tier: {**add_costs(costs), "backend": costs[0].get("backend"), "model": costs[0].get("model")}
                  for tier, costs in sorted(tiers.items())},
    }
