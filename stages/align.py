"""`align`: measure how well a grounded trace agrees with the ground truth, claim by claim.

For every record: parse the annotator's `response` (or, for sources that ship a finished trace, the
`reasoning`) with the evidence grammar; snap each claimed time to the nearest sampled frame (a model
only saw those frames, so a claim can only be checked against what was shown); look up the ground
truth at that time (`gt` tracks, and `key_frames`); match the claimed boxes to it one-to-one
(Hungarian on IoU, with a bonus for a matching name, so two claims never take credit for the same
object); and score the answer against the ground-truth answer. Everything lands in `scores`; no
record is dropped here: judging is `filter`'s job, so that its thresholds can change without
re-aligning.

Boxes are read in the canonical frame (normalised xyxy), which is what the annotate prompts ask for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import setting
from pipeline.stage import Stage, StageConfig, StageResult, UnitContext, record_error
from stages.lib import evidence
from stages.lib.answers import score_record_answer
from stages.lib.geometry import assign_max, box_iou
from stages.lib.schema import SCORES, conform
from stages.lib.truth import GroundTruth, TruthSettings, check_time, name_agrees, snap

#: Columns align reads; the rest of a partition (frame JPEGs above all) is never converted to Python.
INPUT_COLUMNS = ("id", "task", "frames", "options", "answer", "answer_span", "key_frames", "ground_truth",
                 "response", "reasoning")


def _frame_times(frames: Sequence[Mapping[str, Any]] | None) -> np.ndarray:
    return np.sort(np.array([f["t_s"] for f in frames or () if f.get("t_s") is not None], dtype=np.float64))


# --- one record ----------------------------------------------------------------------------------------


def align_record(record: Mapping[str, Any], cfg: AlignStage.Config | None = None, *,
                 gt: GroundTruth | None = None) -> dict[str, Any]:
    """The `scores` struct of one record (see docs/schema.md for every field) under the settings `cfg`
    (align's defaults when None); `gt` saves rebuilding the record's ground truth where the caller has
    it (read from `record` otherwise)."""
    cfg = cfg or AlignStage.Config()
    response = record.get("response")
    text = response if response is not None else record.get("reasoning")
    trace = evidence.parse_trace(text)
    problems = [f"{p.code}: {p.detail}" for p in trace.problems]
    task = record.get("task")
    if response is not None:
        check = evidence.check_format(response)
        if not check.well_formed:
            missing = [s for s, present in (("<think>", check.has_think), ("<answer>", check.has_answer)) if not present]
            if missing:
                problems.append(f"missing_section: no {' and no '.join(missing)}")
        elif task in evidence.EVIDENCE_REQUIREMENTS and evidence.format_score(check, task) < 1.0:
            problems.append(f"missing_evidence: a {task} trace needs grounded evidence the response lacks")

    frame_times = _frame_times(record.get("frames"))
    gt = gt if gt is not None else GroundTruth.from_record(record, cfg.gt_tolerance_s)
    key_times = gt.key_times
    # flatten to one row per claimed box (a time-only claim is one row without a box)
    rows: list[dict[str, Any]] = []
    for claim in trace.claims:
        for box in claim.boxes or (None,):
            rows.append({"name": claim.name, "t_s": claim.t, "box": list(box) if box is not None else None,
                         "t_snapped": None, "gt_name": None, "iou": None, "dt": None, "verified": None})
    timed = [r for r in rows if r["t_s"] is not None]
    if timed:
        snapped = snap([r["t_s"] for r in timed], frame_times)
        for row, ts in zip(timed, snapped):
            if not math.isnan(ts):
                row["t_snapped"] = float(ts)
                row["dt"] = float(ts - row["t_s"])
    groups: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        if row["box"] is None:
            continue
        when = check_time(row, key_times)
        if when is not None:
            groups.setdefault(when, []).append(row)
    for when, group in groups.items():
        names, gt_boxes = gt.at(when)
        if not names:
            continue
        for row in group:
            row["iou"] = 0.0
        # the same object claimed twice at one time is one claim for matching: both get its score
        unique: dict[tuple[str, tuple[float, ...]], list[dict[str, Any]]] = {}
        for row in group:
            unique.setdefault((row["name"], tuple(np.round(row["box"], 4))), []).append(row)
        keys = list(unique)
        ious = box_iou([unique[k][0]["box"] for k in keys], gt_boxes)
        bonus = np.array([[name_agrees(k[0], n) for n in names] for k in keys], dtype=np.float64)
        matching = assign_max(ious + cfg.name_weight * bonus * (ious > 0))
        for r, c in zip(matching.rows, matching.cols):
            for row in unique[keys[r]]:
                row["gt_name"] = names[c]
                row["iou"] = float(ious[r, c])

    ious = [r["iou"] for r in rows if r["iou"] is not None]
    answer_pred = trace.answer if response is not None else None
    # a response with no answer at all scores 0 wherever there is a ground truth to miss
    answer_score = score_record_answer(answer_pred or "", record) if response is not None else None
    return {
        "format_ok": not problems,
        "num_claims": len(trace.claims),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "min_iou": float(np.min(ious)) if ious else None,
        "answer_ok": None if answer_score is None else answer_score >= cfg.answer_ok_at,
        "claims": rows,
        "verify": None,
        "problems": problems,
        "num_matched": sum(1 for r in rows if r["gt_name"] is not None),
        "answer_pred": answer_pred,
        "answer_score": answer_score,
        "times": list(trace.times),
    }


@register_stage
class AlignStage(Stage):
    """Parse, snap, match and score every record; writes `scores`, keeps every row."""

    name = "align"
    version = "1"

    @dataclass(kw_only=True)
    class Config(TruthSettings, StageConfig):
        name_weight: float = setting(0.5, "matching maximises IoU plus this bonus for a pair whose names agree "
                                     "(the ground-truth name's words all appear in the claimed name); 0 matches "
                                     "on IoU alone. The stored score is always the plain IoU", ge=0)
        answer_ok_at: float = setting(0.5, "scores.answer_ok is answer_score >= this (filter applies its own "
                                      "per-task thresholds)", ge=0, le=1)

    cfg: Config

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table)
        # only what align reads is turned into Python: not the frame JPEGs, not the per-frame tracks
        times_only = pa.list_(pa.struct([("t_s", pa.float64())]))
        view = table.select([c for c in INPUT_COLUMNS if c != "ground_truth"])
        view = view.set_column(view.schema.get_field_index("frames"), "frames", view.column("frames").cast(times_only))
        truths = GroundTruth.for_table(table, self.cfg.gt_tolerance_s)
        scores, keep, rejections = [], [], []
        for i, record in enumerate(view.to_pylist()):
            try:
                scores.append(align_record(record, self.cfg, gt=truths[i]))
                keep.append(i)
            except Exception as exc:  # noqa: BLE001 - malformed ground truth: that record goes to the ledger
                rejections.append(record_error(record, exc))
        kept = table.take(pa.array(keep, pa.int64())) if len(keep) < table.num_rows else table
        column = pa.array(scores, type=SCORES)
        return StageResult(kept.set_column(kept.schema.get_field_index("scores"), "scores", column), rejections)
