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
annotator tier (with each tier's yield and, for a cascade, the estimate of a strong-only build), for
`manifest.json` and the card (`stgr status` sums the same records with
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
#: The annotator tier of a unit that names none (an annotate node outside a cascade).
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


def _commit_records(fs: pafs.FileSystem, run_path: str, node: str, info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The commit record of each committed unit of one plan node."""
    records = []
    for partition in range(int(info.get("partitions") or 0)):
        path = posixpath.join(run_path, Unit(node, info["fingerprint"], partition).record)
        try:
            with fs.open_input_stream(path) as stream:
                records.append(json.loads(stream.read()))
        except FileNotFoundError:
            continue
    return records


def _judge_of(node: str, plan_nodes: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The filter node whose kept rows are annotate node `node`'s yield: the first filter node after
    it, following each node's one reader (the default DAG's `filter`, a cascade tier's `filter_t<k>`).
    A reader that an annotate node reads is a cascade's escalate node (the rejected rows): not followed."""
    def readers(of: str) -> list[str]:
        return [n for n, info in plan_nodes.items() if of in (info.get("after") or ())]

    current: str | None = node
    while current is not None and plan_nodes[current].get("stage") != "filter":
        onward = [n for n in readers(current)
                  if not any(plan_nodes[r].get("stage") == "annotate" for r in readers(n))]
        current = onward[0] if len(onward) == 1 else None
    return current


def _tier_entry(costs: list[dict[str, Any]], records: int, kept: int) -> dict[str, Any]:
    """One tier's cost, what it annotated (`records`: rows in), what its filter kept, and its yield."""
    return {**add_costs(costs), "backend": costs[0].get("backend"), "model": costs[0].get("model"),
            "price": costs[0].get("price"), "records": records, "kept": kept,
            "yield": round(kept / records, 6) if records else None}


def strong_only(tiers: Mapping[str, Mapping[str, Any]], kept_rows: int) -> dict[str, Any] | None:
    """What the build would have cost with its last (strongest) tier alone, for a cascade (None for
    one tier): that tier's dollars per request, times the records tier 1 annotated (all of them).

    Per request is the last tier's dollars per call, counting its cached requests at what they saved;
    where it answered none (tier 1 kept every record), tier 1's mean tokens per call at the last
    tier's token price (`basis`: calls or tokens). Per kept row divides by this build's kept rows:
    the rows a strong-only build would keep are not known without running it.
    """
    if len(tiers) < 2:
        return None
    order = sorted(tiers, key=int)
    first, last = tiers[order[0]], tiers[order[-1]]
    asked = last["calls"] + last["cached"]
    if asked:
        per_request, basis = (last["usd"] + last["saved_usd"]) / asked, "calls"
    else:
        calls = max(1, first["calls"])
        per_request = Price.of(last.get("price")).usd(first["input_tokens"] / calls, first["output_tokens"] / calls,
                                                       0.0)
        basis = "tokens"
    usd = round(per_request * first["records"], 9)
    return {"tier": order[-1], "usd": usd, "per_kept_row_usd": per_row(usd, kept_rows), "basis": basis}


def cost_summary(fs: pafs.FileSystem, run_path: str, plan_nodes: Mapping[str, Mapping[str, Any]],
                 kept_rows: int) -> dict[str, Any]:
    """The build's cost for `manifest.json`: totals, per kept row, what the cache saved, per stage
    (each node whose units made model calls) and per annotator tier (the annotate nodes' units, by
    their `tier`, with the records each tier annotated, how many its filter kept and the yield),
    summed from the commit records of the plan's fingerprints only; for a cascade, `strong_only`:
    the estimate of the same build with its last tier alone (see `strong_only`)."""
    records = {node: _commit_records(fs, run_path, node, info) for node, info in plan_nodes.items()}
    stages: dict[str, dict[str, Any]] = {}
    tiers: dict[str, list[dict[str, Any]]] = {}
    flow: dict[str, list[int]] = {}
    for node, info in plan_nodes.items():
        costs = [r["cost"] for r in records[node] if r.get("cost")]
        if not costs:
            continue
        stages[node] = {**add_costs(costs), "units": len(costs)}
        if info.get("stage") == "annotate":
            tier = str(costs[0].get("tier") or DEFAULT_TIER)
            tiers.setdefault(tier, []).extend(costs)
            judge = _judge_of(node, plan_nodes)
            counts = flow.setdefault(tier, [0, 0])
            counts[0] += sum(int(r.get("rows_in") or 0) for r in records[node])
            counts[1] += sum(int(r.get("rows_out") or 0) for r in records.get(judge, [])) if judge else 0
    total = add_costs(stages.values())
    per_tier = {tier: _tier_entry(costs, *flow[tier]) for tier, costs in sorted(tiers.items(), key=lambda t: int(t[0]))}
    summary = {
        "total_usd": total["usd"],
        "per_kept_row_usd": per_row(total["usd"], kept_rows),
        "saved_usd": total["saved_usd"],
        "kept_rows": kept_rows,
        **{key: total[key] for key in COUNTS if key not in ("usd", "saved_usd")},
        "stages": stages,
        "tiers": per_tier,
    }
    estimate = strong_only(per_tier, kept_rows)
    if estimate is not None:
        summary["strong_only"] = estimate
    return summary
