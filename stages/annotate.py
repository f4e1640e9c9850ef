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
- `provenance`: annotator (backend name), model (name@revision), prompt_sha, build_id, and this
  stage's fingerprint added to `stage_fingerprints`.

A record whose frames cannot be read, or whose request the backend can never complete (HTTP 400,
a template task without the ground truth it needs), goes to the ledger; transient backend trouble
that outlasts the backend's retries fails the unit after every other response of the unit has been
sent and cached, and the engine retries the unit (cached calls are free).
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar, Mapping

import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.stage import Rejection, Stage, StageResult, UnitContext, record_error
from stages.backends import Backend, RequestFailed, load_backends, make_backend, run_keys
from stages.lib import evidence
from stages.lib.chat import ChatRequest
from stages.lib.media import FrameReader
from stages.lib.prompts import PromptSet, record_context, target_answer, write_question
from stages.lib.response_cache import ResponseCache
from stages.lib.schema import to_table


# --- reading a response back ------------------------------------------------------------------------


def fields_from_response(response: str) -> dict[str, Any]:
    """The columns a response fills: the raw text, and its `<think>` part as `reasoning` (None when
    the model wrote none; align and the ledger read the raw `response`). Never raises on text."""
    return {"response": response, "reasoning": evidence.split_sections(response).think}


# --- the stage -----------------------------------------------------------------------------------------


@register_stage
class AnnotateStage(Stage):
    """Question, grounded reasoning and answer per record, from one backend per actor (see module doc)."""

    name = "annotate"
    env_keys: ClassVar[tuple[str, ...]] = ("api_key_env",)
    version = "1"
    actor = True
    required_keys = ("backend", "prompts")
    key_types: ClassVar[Mapping[str, type | tuple[type, ...]]] = {
        "backend": str, "model": str, "revision": str, "batch_size": int, "max_new_tokens": int,
        "temperature": float, "top_p": float, "seed": int, "image_max_side": int, "max_evidence": int,
        "prompts": dict, "extra": dict,
    }
    # How requests are sent, not what is asked: changing these never changes a response (the cache
    # key has the model, prompt, frames and sampling), so committed units stay valid. The backend
    # adds its own such keys (`Backend.run_keys`).
    fingerprint_exclude = Stage.fingerprint_exclude + ("batch_size", "api_key_env")

    @classmethod
    def excluded_keys(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
        return super().excluded_keys(config) + run_keys(config)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        problems = super().validate_config(config)
        if problems:
            return problems
        if "api_key" in config:
            problems.append("api_key: never put a secret in the config (it is stored in the run directory); "
                            "name the environment variable that holds it in api_key_env")
        known = load_backends()
        if config["backend"] not in known:
            problems.append(f"backend: unknown backend {config['backend']!r}; known: {sorted(known)}")
        try:
            PromptSet(config["prompts"]).check()
        except ValueError as exc:
            problems.append(f"prompts: {exc}")
        batch_size = config.get("batch_size", 8)
        if batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {batch_size}")
        return problems

    def setup(self, ctx: UnitContext) -> None:
        self.backend: Backend = make_backend(self.config)

    @cached_property
    def prompts(self) -> PromptSet:
        return PromptSet(self.config["prompts"])

    def _backend(self, ctx: UnitContext) -> Backend:
        if not hasattr(self, "backend"):
            self.setup(ctx)
        return self.backend

    def request_for(self, record: Mapping[str, Any], frames: FrameReader) -> ChatRequest:
        """The one chat request of a record: frames, prompt, sampling parameters, structured context."""
        context = record_context(record, int(self.config.get("max_evidence", 8)))
        if not context["question"]:
            context["question"] = write_question(context)
        context["answer"] = target_answer(context)
        if context["multiple_choice"] and not context["options"]:
            raise ValueError(f"record {record.get('id')}: field 'options' is empty; a {record['task']} record "
                             "needs the source's options")
        system, prompt = self.prompts.render(record["task"], context)
        return ChatRequest(
            prompt=prompt,
            images=tuple(frames.images(record)),
            system=system,
            max_new_tokens=int(self.config.get("max_new_tokens", 512)),
            temperature=float(self.config.get("temperature", 0.0)),
            top_p=float(self.config.get("top_p", 1.0)),
            seed=int(self.config.get("seed", 0)),
            extra=dict(self.config.get("extra") or {}),
            context=context,
        )

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        backend = self._backend(ctx)
        records = table.to_pylist() if table is not None else []
        frames = FrameReader(self.config.get("image_max_side"), int(self.config.get("jpeg_quality", 90)))
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

        responses, failed = self._responses(backend, ctx, {key: request for request, key in requests.values()})

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
                annotator=backend.name, model=backend.model_id,
                prompt_sha=backend.prompt_sha(self.prompts.sha(record["task"])), build_id=ctx.build_id,
                stage_fingerprints=[{"stage": k, "fingerprint": v} for k, v in sorted(fingerprints.items())],
            )
            row["provenance"] = provenance
            rows.append(row)
        return StageResult(to_table(rows), rejections)

    def _responses(self, backend: Backend, ctx: UnitContext,
                   by_key: Mapping[str, ChatRequest]) -> tuple[dict[str, str], dict[str, RequestFailed]]:
        """Responses by cache key, and the requests that can never succeed: cached ones are read, the
        rest generated `batch_size` at a time, each batch cached before the next is sent.

        Records with the same key (the same question on the same frames) cost one call.
        """
        cache = ResponseCache.for_run(ctx.filesystem, ctx.run_path) if backend.cacheable else None
        responses: dict[str, str] = {}
        if cache is not None:
            responses = {k: entry.response for k, entry in cache.get_many(by_key).items()}
        failed: dict[str, RequestFailed] = {}
        todo = [k for k in by_key if k not in responses]
        batch_size = int(self.config.get("batch_size", 8))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            results = backend.generate_each([by_key[k] for k in chunk])
            if len(results) != len(chunk):
                raise RuntimeError(f"backend {backend.name!r} returned {len(results)} completions for "
                                   f"{len(chunk)} requests")
            for key, result in zip(chunk, results):
                if isinstance(result, RequestFailed):
                    failed[key] = result
                    continue
                if not isinstance(result, str):
                    raise TypeError(f"backend {backend.name!r} returned {type(result).__name__}, expected str")
                if cache is not None:
                    cache.put(key, backend.model_id, result)
                responses[key] = result
        transient = {k: f for k, f in failed.items() if f.retryable}
        if transient:
            first = next(iter(transient.values()))
            raise RuntimeError(f"backend {backend.name!r}: {len(transient)} request(s) still failing after retries "
                               f"(the {len(responses)} completed ones are cached; the unit will be retried): {first}")
        return responses, failed
