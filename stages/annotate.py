"""The `annotate` stage: a vision-language model writes question, grounded reasoning and answer.

Each record becomes one `ChatRequest`: its sampled frames (JPEG, labelled `Frame k at t s:`, read by
`stages.lib.media.FrameReader`), the task's prompt template from the versioned prompt set
(`conf/prompts/`, `stages.lib.prompts.PromptSet`), rendered with the record's ground truth
(`stages.lib.prompts.record_context`). The backend (`annotator.backend`: template, transformers,
vllm, openai, ...) is built once per actor in `setup()`. Responses are looked up in, and written to, the run's response cache
(`stages/lib/response_cache.py`) one batch at a time, so a unit killed halfway has paid once for
what it got, and its retry or a resumed build pays only for the rest.

What the stage writes:
- `response`: the backend's raw text, always (align/filter judge it; garbage passes through as text).
- `reasoning`: the `<think>` part of the response (boxes normalised to [0, 1], as the prompt asks:
  the canonical frame); None when there is none.
- `question`, `answer`, `answer_span`: the *ground truth*, never model text. The seed's own values
  are kept; where the seed has none they are written from its ground truth (the question by
  `stages.lib.prompts.write_question`, the answer as the target span or box), before any model is asked, so every
  backend reasons about the same question and align can compare the model's answer (which stays in
  `response`) with the truth. Multiple-choice and open questions need the source's question,
  options and answer.
- `provenance`: annotator (backend name), model (name@revision), tier (a cascade's tier; null
  outside a cascade), prompt_sha, build_id, and this stage's fingerprint added to `stage_fingerprints`.

Frames reach the backend as `sample` embedded them: its default size is the annotators'
`image_max_side`, so none is re-encoded, and a backend that never looks at pixels (the template
backend, `Backend.needs_pixels = False`) gets requests without images, so no frame is decoded at all.

A record without frames, or whose frames cannot be read, or whose request the backend can never
complete (HTTP 400, a template task without the ground truth it needs), goes to the ledger;
transient backend trouble that outlasts the backend's retries fails the unit after every other
response of the unit has been sent and cached, and the engine retries the unit (cached calls are free).

What the unit's calls cost (tokens, images, seconds, dollars at `annotator.price`; cache hits as
saved) is its `StageResult.cost` (`stages.lib.cost`), kept in its commit record.

The cascade (`annotator=cascade`, `annotator.tiers`: docs/annotators.md): a cheap annotator first, and
only the records the filter rejects go to the next. It is expanded at plan time (`expand_dag`, the
engine's hook) into ordinary nodes, one annotate -> align -> filter chain per tier, each tier's
`escalate_t<k>` node (a filter node with `output: rejected`, stages/filter.py) passing the next tier
the records that tier's filter rejected, and the filter's readers reading every tier's kept records.
So each tier's units have their own fingerprints, commits and cache entries: a resumed cascade pays
for no call twice. A tier's node writes its number to `provenance.tier` and to its cost (`tier`).
"""
from __future__ import annotations

import copy
import functools
from functools import cached_property
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

from omegaconf import OmegaConf

from pipeline.config import CONF_DIR
from pipeline.errors import ConfigError
from pipeline.registry import register_stage
from pipeline.settings import Settings, setting
from pipeline.stage import ActorConfig, Rejection, Stage, StageResult, UnitContext, record_error
from stages.backends import (Backend, BackendChoice, RequestFailed, RequestSettings, backend_parts,
                             make_backend)
from stages.lib import evidence
from stages.lib.chat import ChatRequest
from stages.lib.cost import DEFAULT_TIER, CostMeter, cache_paid, read_cached, unit_cost
from stages.lib.media import FrameReader, require_frames
from stages.lib.prompts import PromptSet, record_context, target_answer, write_question
from stages.lib.response_cache import ResponseCache
from stages.lib.schema import to_table


# --- reading a response back ------------------------------------------------------------------------


def fields_from_response(response: str) -> dict[str, Any]:
    """The columns a response fills: the raw text, and its `<think>` part as `reasoning` (None when
    the model wrote none; align and the ledger read the raw `response`). Never raises on text."""
    return {"response": response, "reasoning": evidence.split_sections(response).think}


# --- the cascade -----------------------------------------------------------------------------------------

#: The stage that judges a tier's records; its `output: rejected` nodes pass the rejections on.
FILTER_STAGE = "filter"
#: The name of the node (`escalate_t<k>`) that hands tier k's rejections to tier k+1.
ESCALATE = "escalate"
#: Keys of a cascade's block that are the cascade's own, not settings every tier shares.
CASCADE_KEYS = ("tiers", "backend")


@dataclass(kw_only=True)
class CascadeSettings(Settings):
    """A cascade's block (conf/annotator/cascade.yaml) besides the annotate settings its tiers share."""

    tiers: list[dict[str, Any]] = setting(help="the annotators in order, each an annotator config: its backend and "
                                               "that backend's keys; a record the filter rejects goes to the next")


@dataclass(kw_only=True)
class TierSetting(Settings):
    """The tier of a cascade an annotate node is: set by the expansion in each tier's config block
    (so it is part of the node's fingerprint), never by hand."""

    tier: int = setting(help="this node's tier in the annotation cascade (1: the first); written to "
                             "provenance.tier and to the cost ledger", ge=1)


def tier_chain(node: str, dag: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The nodes one tier repeats: `node` (annotate) and each node after it, every one read by the
    next alone, down to the first filter node (`annotate, align, filter` in the default DAG)."""
    chain = [node]
    while dag[chain[-1]].get("stage") != FILTER_STAGE:
        readers = [n for n, spec in dag.items() if chain[-1] in (spec.get("after") or [])]
        if len(readers) != 1 or list(dag[readers[0]].get("after") or []) != [chain[-1]] or readers[0] in chain:
            raise ConfigError(f"dag.{node}: a cascade repeats the chain from {node} to a {FILTER_STAGE} node per "
                              f"tier, each node read by the next alone; {chain[-1]} is read by "
                              f"{', '.join(readers) or 'no node'}")
        chain.append(readers[0])
    return chain


@functools.lru_cache(maxsize=None)
def _backend_file(backend: str) -> tuple[tuple[str, Any], ...]:
    """The settings `conf/annotator/<backend>.yaml` itself sets (vllm: `num_gpus: 1`, `batch_size: 64`),
    beyond the typed defaults it composes; none for a backend without a file (a plugin's)."""
    path = CONF_DIR / "annotator" / f"{backend}.yaml"
    if not path.is_file():
        return ()
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return tuple((k, v) for k, v in own.items() if k not in ("defaults", "backend"))


def tier_block(shared: Mapping[str, Any], entry: Mapping[str, Any], tier: int) -> dict[str, Any]:
    """A tier's annotator block: the cascade's settings, then those its backend's file sets where the
    cascade leaves the annotate default, then the entry's own (its backend's other defaults are filled
    when the block is checked). So `{backend: vllm, model: m}` gets vllm's `num_gpus: 1`, and
    `annotator.batch_size=8` on the cascade is every tier's unless a tier says otherwise."""
    defaults = AnnotateStage.Config.defaults()
    from_file = {k: copy.deepcopy(v) for k, v in _backend_file(str(entry.get("backend")))
                 if k not in shared or (k in defaults and shared[k] == defaults[k])}
    return {**shared, **from_file, **entry, "tier": tier}


def cascade_dag(node: str, key: str, dag: Mapping[str, Mapping[str, Any]],
                config: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The DAG with `node`'s chain (`tier_chain`) repeated once per entry of `config[key]["tiers"]`,
    as `<name>_t<k>`, and each tier's config block (`<key>.tiers.<k-1>`: `tier_block`).

    Tier 1 reads what `node` read; tier k+1 reads `escalate_t<k>`, a filter node on the filter's input
    with the filter's settings and `output: rejected` (block `<filter key>@escalate`): the records that
    fail one of tier k's rules. Every node that read the filter reads the tiers' filters instead, in
    tier order (a map node reads their partitions one after another).
    """
    block = config[key]
    tiers = block.get("tiers")
    if tiers is None or tiers == "???":
        raise ConfigError(f"{key}.tiers: required by the cascade but missing; give the annotators in order, each "
                          "with its backend (e.g. [{backend: transformers, model: ...}, {backend: template}])")
    if not isinstance(tiers, list) or not tiers:
        raise ConfigError(f"{key}.tiers: expected a non-empty list of annotator configs, each with its backend "
                          f"(e.g. [{{backend: template}}]), got {tiers!r}")
    chain = tier_chain(node, dag)
    judged, filter_node = chain[-2], chain[-1]
    filter_key = dag[filter_node].get("config", filter_node)
    judging = config.get(filter_key) or {}
    shared = {k: v for k, v in block.items() if k not in CASCADE_KEYS}
    out = {n: dict(spec) for n, spec in dag.items() if n not in chain}
    escalating = f"{filter_key}@{ESCALATE}"
    blocks: dict[str, Any] = {escalating: {**judging, "output": "rejected"} if isinstance(judging, Mapping)
                              else judging}
    upstream, kept = list(dag[node].get("after") or []), []

    def add(name: str, spec: dict[str, Any]) -> None:
        if name in out or name in dag:
            raise ConfigError(f"dag.{name}: the cascade ({key}.tiers) names a node {name}, which the dag has already")
        out[name] = spec

    for k, entry in enumerate(tiers, start=1):
        tier_key = f"{key}.tiers.{k - 1}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{tier_key}: expected an annotator config with its backend, got {entry!r}")
        blocks[tier_key] = tier_block(shared, entry, k)
        for name in chain:
            add(f"{name}_t{k}", {"stage": dag[name]["stage"], "after": upstream,
                                 "config": tier_key if name == node else dag[name].get("config", name)})
            upstream = [f"{name}_t{k}"]
        kept.append(f"{filter_node}_t{k}")
        if k < len(tiers):
            add(f"{ESCALATE}_t{k}", {"stage": FILTER_STAGE, "after": [f"{judged}_t{k}"], "config": escalating})
            upstream = [f"{ESCALATE}_t{k}"]
    for spec in out.values():
        after = list(spec.get("after") or [])
        if filter_node in after:
            at = after.index(filter_node)
            spec["after"] = after[:at] + kept + after[at + 1:]
    return out, blocks


# --- the stage -----------------------------------------------------------------------------------------


@register_stage
class AnnotateStage(Stage):
    """Question, grounded reasoning and answer per record, from one backend per actor (see module doc)."""

    name = "annotate"
    version = "1"
    actor = True

    @dataclass(kw_only=True)
    class Config(BackendChoice, ActorConfig):
        """The stage's settings; the backend's own (model, endpoint, ...) come from the same block."""

        prompts: dict[str, Any] = setting(help="the prompt set (conf/prompts/), composed in by the annotator "
                                                "configs' defaults list: `prompts@annotator.prompts=v2` picks another")
        # How requests are sent, not what is asked (the cache key has the model, prompt, frames and
        # sampling): `run`, so changing it keeps committed units valid.
        batch_size: int = setting(8, "requests handed to the backend at once; each batch is cached before the "
                                     "next is sent", run=True, ge=1)
        max_evidence: int = setting(8, "ground-truth boxes shown per record (prompt) and available to the template, "
                                       "spread over the clip", ge=0)
        max_new_tokens: int = setting(512, "the longest response, in tokens", ge=1)
        temperature: float = setting(0.0, "sampling temperature (0: greedy)", ge=0)
        top_p: float = setting(1.0, "nucleus sampling's probability mass", gt=0, le=1)
        seed: int = setting(0, "sampling seed of every request")

        def check(self) -> list[str]:
            try:
                PromptSet(self.prompts).check()
            except ValueError as exc:
                return [f"prompts: {exc}"]
            return []

    cfg: Config

    @classmethod
    def config_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
        if "tiers" in config:  # a cascade's block: each tier's own is checked when the plan expands it
            return super().config_parts(config) + [("the annotation cascade", CascadeSettings)]
        tier = [("the annotation cascade", TierSetting)] if "tier" in config else []
        return super().config_parts(config) + backend_parts(config) + tier

    @classmethod
    def expand_dag(cls, node: str, dag: Mapping[str, Mapping[str, Any]],
                   config: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]] | None:
        """A block with `tiers` is a cascade, expanded by `cascade_dag`; any other block leaves the DAG
        as it is."""
        key = dag[node].get("config", node)
        block = config.get(key)
        if not isinstance(block, Mapping) or "tiers" not in block:
            return None
        return cascade_dag(node, key, dag, config)

    def setup(self, ctx: UnitContext) -> None:
        self.backend: Backend = make_backend(self.config)

    def wants_full(self) -> tuple[str, ...]:
        """The frames' stored JPEGs only for a backend that looks at pixels: the template reads none."""
        backend = getattr(self, "backend", None)
        return () if backend is not None and not backend.needs_pixels else ("frames",)

    @cached_property
    def prompts(self) -> PromptSet:
        return PromptSet(self.cfg.prompts)

    def _backend(self, ctx: UnitContext) -> Backend:
        if not hasattr(self, "backend"):
            self.setup(ctx)
        return self.backend

    @cached_property
    def asked(self) -> RequestSettings:
        """The backend's request settings (frame size, extra sampling fields): their defaults for a
        backend without them."""
        return RequestSettings.build(self.config)

    def request_for(self, record: Mapping[str, Any], frames: FrameReader | None) -> ChatRequest:
        """The one chat request of a record: frames, prompt, sampling parameters, structured context.
        Without a `frames` reader (a backend that needs no pixels) the request has no images and no
        frame is read; the record must still have frames."""
        context = record_context(record, self.cfg.max_evidence)
        if not context["question"]:
            context["question"] = write_question(context)
        context["answer"] = target_answer(context)
        if context["multiple_choice"] and not context["options"]:
            raise ValueError(f"record {record.get('id')}: field 'options' is empty; a {record['task']} record "
                             "needs the source's options")
        system, prompt = self.prompts.render(record["task"], context)
        if frames is None:
            require_frames(record)
        return ChatRequest(
            prompt=prompt,
            images=tuple(frames.images(record)) if frames is not None else (),
            system=system,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=float(self.cfg.temperature),
            top_p=float(self.cfg.top_p),
            seed=self.cfg.seed,
            extra=dict(self.asked.extra),
            context=context,
        )

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        backend = self._backend(ctx)
        records = table.to_pylist() if table is not None else []
        frames = FrameReader(self.asked.image_max_side, self.asked.jpeg_quality) if backend.needs_pixels else None
        rejections: list[Rejection] = []
        requests: dict[int, tuple[ChatRequest, str]] = {}
        for i, record in enumerate(records):
            try:
                request = self.request_for(record, frames)
            except Exception as exc:  # noqa: BLE001 - a record that cannot be asked goes to the ledger
                rejections.append(record_error(record, exc))
                continue
            # Non-cacheable backends write from each record's own context: never share a response.
            key = request.cache_key(backend.model_id) if backend.cacheable else f"record-{i}"
            requests[i] = (request, key)

        tier = self.config.get("tier")
        meter = CostMeter.for_backend(backend, str(tier or DEFAULT_TIER))
        responses, failed = self._responses(backend, ctx, {key: request for request, key in requests.values()}, meter)

        rows = []
        for i, (request, key) in requests.items():
            record = records[i]
            if key in failed:
                rejections.append(Rejection(
                    id=record.get("id"), rule="annotate_request_failed",
                    reason=f"backend {backend.name!r} cannot complete the request: {failed[key]}",
                    error=f"RequestFailed: {failed[key]}", record=record.get("source_id")))
                continue
            row = dict(record)
            row.update(question=request.context["question"], answer=request.context["answer"],
                       answer_span=request.context["answer_span"])
            row.update(fields_from_response(responses[key]))
            provenance = dict(record.get("provenance") or {})
            fingerprints = {p["stage"]: p["fingerprint"] for p in provenance.get("stage_fingerprints") or []}
            fingerprints.update(dict(ctx.fingerprints or {}))
            fingerprints[ctx.stage] = ctx.fingerprint
            provenance.update(
                annotator=backend.name, model=backend.model_id, tier=tier,
                prompt_sha=backend.prompt_sha(self.prompts.sha(record["task"])), build_id=ctx.build_id,
                stage_fingerprints=[{"stage": k, "fingerprint": v} for k, v in sorted(fingerprints.items())],
            )
            row["provenance"] = provenance
            rows.append(row)
        return StageResult(to_table(rows), rejections, cost=unit_cost(meter, backend))

    def _responses(self, backend: Backend, ctx: UnitContext, by_key: Mapping[str, ChatRequest],
                   meter: CostMeter) -> tuple[dict[str, str], dict[str, RequestFailed]]:
        """Responses by cache key, and the requests that can never succeed: cached ones are read, the
        rest generated `batch_size` at a time, each batch cached (with what it used) before the next
        is sent; `meter` counts the calls and the cache hits.

        Records with the same key (the same question on the same frames) cost one call.
        """
        cache = ResponseCache.for_run(ctx.filesystem, ctx.run_path) if backend.cacheable else None
        responses = read_cached(cache, by_key, meter, ctx) if cache is not None else {}
        failed: dict[str, RequestFailed] = {}
        todo = [k for k in by_key if k not in responses]
        batch_size = self.cfg.batch_size
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            results, usages = meter.call(backend, [by_key[k] for k in chunk])
            if len(results) != len(chunk):
                raise RuntimeError(f"backend {backend.name!r} returned {len(results)} completions for "
                                   f"{len(chunk)} requests")
            for key, result, usage in zip(chunk, results, usages):
                if isinstance(result, RequestFailed):
                    failed[key] = result
                    continue
                if not isinstance(result, str):
                    raise TypeError(f"backend {backend.name!r} returned {type(result).__name__}, expected str")
                if cache is not None:
                    cache_paid(cache, key, backend.model_id, result, usage, ctx)
                responses[key] = result
        transient = {k: f for k, f in failed.items() if f.retryable}
        if transient:
            first = next(iter(transient.values()))
            raise RuntimeError(f"backend {backend.name!r}: {len(transient)} request(s) still failing after retries "
                               f"(the {len(responses)} completed ones are cached; the unit will be retried): {first}")
        return responses, failed
