"""`verify` (optional): ask a vision-language model whether each claimed box shows what it names.

For records whose boxes have no ground truth to check (general video QA annotated by a model), IoU
cannot tell a good box from a hallucinated one; the paper checks such boxes by asking a VLM about
the crop. For every claimed box this stage crops the frame the claim was checked on (see
`stages.lib.truth.check_time`), asks `prompt` ("Is this a {object}? ...") through any backend of
`stages.backends` (`verify.backend`, same config keys as `annotator`), and reads yes/no. It writes
`scores.claims[].verified` and `scores.verify`, the fraction of boxes confirmed (1.0 when a trace
claims no box), which the `verified` filter rule thresholds.

Not in the default DAG. Add it between align and filter:

    stgr build --run runs/a +verify=default verify.backend=transformers verify.model=/models/qwen \\
        '+dag.verify={stage: verify, after: [align], config: verify}' 'dag.filter.after=[verify]' \\
        filter.rules.verified.enabled=true

Responses are cached under `<run>/cache/verify/` like annotate's, so a resumed build never pays twice,
and the unit's calls are priced at `verify.price` into its commit record's cost (`stages.lib.cost`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import Settings, setting
from pipeline.stage import ActorConfig, Rejection, Stage, StageResult, UnitContext, record_error
from stages.backends import Backend, BackendChoice, RequestFailed, backend_parts, make_backend
from stages.lib.chat import ChatRequest, LabelledImage
from stages.lib.cost import CostMeter, cache_paid, read_cached, unit_cost
from stages.lib.media import FrameReader, crop
from stages.lib.response_cache import ResponseCache
from stages.lib.schema import SCORES, conform
from stages.lib.truth import GroundTruth, TruthSettings, check_time

CACHE_SUBDIR = "cache/verify"
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)

#: Columns verify reads besides `scores`.
INPUT_COLUMNS = ("id", "source_id", "media", "frames", "key_frames", "ground_truth", "scores")


def read_yes_no(text: str) -> bool:
    """True when the first yes/no word of the answer is "yes"; anything else (no, or no verdict at
    all) is not a confirmation."""
    match = _YES_NO.search(text or "")
    return bool(match) and match.group(1).lower() == "yes"


@register_stage
class VerifyStage(Stage):
    """Crop every claimed box, ask the VLM about it, record the verdicts in `scores`."""

    name = "verify"
    version = "1"
    actor = True
    full_columns = ("frames",)  # the crops are cut from the stored JPEGs

    @dataclass(kw_only=True)
    class Config(TruthSettings, BackendChoice, ActorConfig):
        """The stage's settings; the backend's own (model, endpoint, ...) come from the same block."""

        prompt: str = setting("Is this a {object}? Answer yes or no.",
                              "the question about each crop; {object} is replaced by the claimed name, and the "
                              "first yes or no in the answer is the verdict")
        padding: float = setting(0.1, "the crop grows by this fraction of the box's size on each side", ge=0)
        min_side: int = setting(28, "a crop is upscaled to at least this many pixels on its shorter side", ge=1)
        max_new_tokens: int = setting(8, "the longest answer, in tokens", ge=1)
        batch_size: int = setting(16, "requests handed to the backend at once; each batch is cached before the "
                                      "next is sent", run=True, ge=1)

        def check(self) -> list[str]:
            if "{object}" not in self.prompt:
                return [f"prompt: must contain {{object}} (the claimed name), got {self.prompt!r}"]
            return []

    cfg: Config

    @classmethod
    def config_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
        return super().config_parts(config) + backend_parts(config)

    def setup(self, ctx: UnitContext) -> None:
        self.backend: Backend = make_backend(self.config)

    def _requests(self, record: Mapping[str, Any], reader: FrameReader) -> dict[int, ChatRequest]:
        """Claim index -> the request about its crop, for every claim with a box and a moment."""
        claims = (record.get("scores") or {}).get("claims") or []
        key_times = GroundTruth.from_record(record, self.cfg.gt_tolerance_s).key_times
        when = {j: check_time(c, key_times) for j, c in enumerate(claims) if c.get("box") is not None}
        when = {j: t for j, t in when.items() if t is not None}
        if not when:
            return {}
        frames = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
        times = np.array([f["t_s"] for f in frames], dtype=np.float64)
        images = reader.images(record)
        requests = {}
        for j, t in when.items():
            frame = images[int(np.argmin(np.abs(times - t)))]
            image = crop(frame.jpeg, claims[j]["box"], float(self.cfg.padding), self.cfg.min_side)
            requests[j] = ChatRequest(
                prompt=self.cfg.prompt.format(object=claims[j]["name"]),
                images=(LabelledImage(jpeg=image),),
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=0.0,
                context={"task": "verify", "object": claims[j]["name"], "id": record.get("id"), "claim": j},
            )
        return requests

    def _answers(self, ctx: UnitContext, by_key: Mapping[str, ChatRequest],
                 meter: CostMeter) -> tuple[dict[str, str], dict[str, RequestFailed]]:
        """Answers by cache key: cached ones read, the rest generated and cached batch by batch;
        `meter` counts the calls and the cache hits."""
        cache = ResponseCache.for_run(ctx.filesystem, ctx.run_path, CACHE_SUBDIR) if self.backend.cacheable else None
        answers = read_cached(cache, by_key, meter, ctx) if cache is not None else {}
        failed: dict[str, RequestFailed] = {}
        todo = [k for k in by_key if k not in answers]
        size = self.cfg.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            results, usages = meter.call(self.backend, [by_key[k] for k in chunk])
            for key, result, usage in zip(chunk, results, usages, strict=True):
                if isinstance(result, RequestFailed):
                    if result.retryable:
                        raise RuntimeError(f"verify: backend {self.backend.name!r} still failing after retries "
                                           f"(answers so far are cached; the unit will be retried): {result}")
                    failed[key] = result
                    continue
                if cache is not None:
                    cache_paid(cache, key, self.backend.model_id, result, usage, ctx)
                answers[key] = result
        return answers, failed

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        if not hasattr(self, "backend"):
            self.setup(ctx)
        table = conform(table)
        records = table.select(list(INPUT_COLUMNS)).to_pylist()
        reader = FrameReader()
        rejections: list[Rejection] = []
        asked: dict[int, dict[int, str]] = {}  # row -> claim -> cache key
        by_key: dict[str, ChatRequest] = {}
        for i, record in enumerate(records):
            try:
                requests = self._requests(record, reader)
            except Exception as exc:  # noqa: BLE001 - unreadable frames: that record goes to the ledger
                rejections.append(record_error(record, exc))
                continue
            keys = {j: request.cache_key(self.backend.model_id) for j, request in requests.items()}
            by_key.update({keys[j]: request for j, request in requests.items()})
            asked[i] = keys
        meter = CostMeter.for_backend(self.backend)
        answers, failed = self._answers(ctx, by_key, meter)
        keep, scores = [], []
        for i, keys in asked.items():
            record = records[i]
            bad = [failed[k] for k in keys.values() if k in failed]
            if bad:
                rejections.append(Rejection(id=record["id"], rule="verify_request_failed", record=record.get("source_id"),
                                            reason=f"backend {self.backend.name!r} cannot answer: {bad[0]}",
                                            error=f"RequestFailed: {bad[0]}"))
                continue
            score = dict(record["scores"] or {})
            claims = [dict(c) for c in score.get("claims") or []]
            for j, key in keys.items():
                claims[j]["verified"] = read_yes_no(answers[key])
            boxed = [c["verified"] for c in claims if c.get("box") is not None and c.get("verified") is not None]
            score["claims"] = claims
            score["verify"] = float(np.mean(boxed)) if boxed else 1.0
            keep.append(i)
            scores.append(score)
        kept = table.take(pa.array(keep, pa.int64()))
        column = pa.array(scores, type=SCORES)
        return StageResult(kept.set_column(kept.schema.get_field_index("scores"), "scores", column), rejections,
                           cost=unit_cost(meter, self.backend))
