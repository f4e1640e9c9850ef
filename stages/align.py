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
import re
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register_stage
from pipeline.stage import Stage, StageResult, UnitContext, record_error
from stages.lib import evidence
from stages.lib.answers import score_record_answer
from stages.lib.geometry import assign_max, box_iou
from stages.lib.schema import SCORES, conform

#: Columns align reads; the rest of a partition (frame JPEGs above all) is never converted to Python.
INPUT_COLUMNS = ("id", "task", "frames", "options", "answer", "answer_span", "key_frames", "gt",
                 "response", "reasoning")


def _frame_times(frames: Sequence[Mapping[str, Any]] | None) -> np.ndarray:
    return np.sort(np.array([f["t_s"] for f in frames or () if f.get("t_s") is not None], dtype=np.float64))


def snap(times: Sequence[float], frame_times: np.ndarray) -> np.ndarray:
    """Each time replaced by the nearest sampled frame time (ties go to the earlier frame); NaN if no frames."""
    t = np.asarray(times, dtype=np.float64)
    if frame_times.size == 0:
        return np.full(t.shape, np.nan)
    right = np.clip(np.searchsorted(frame_times, t), 0, frame_times.size - 1)
    left = np.clip(right - 1, 0, frame_times.size - 1)
    use_left = np.abs(t - frame_times[left]) <= np.abs(frame_times[right] - t)
    return np.where(use_left, frame_times[left], frame_times[right])


class GroundTruth:
    """The ground-truth boxes of one record, looked up by time.

    Tracks give a box per annotated time; a track point counts at time T when it is the nearest point
    of its track and lies within `tolerance` seconds (an object outside its track's span is absent).
    Key-frame objects count at their key frame's time, within the same tolerance, unless a track of
    the same name already gave a box there.
    """

    def __init__(self, tracks: list[tuple[str, np.ndarray, np.ndarray]],
                 key_frames: list[tuple[float, list[tuple[str, Sequence[float]]]]], tolerance: float) -> None:
        """`tracks`: (name, sorted times (T,), boxes (T, 4)); `key_frames`: (time, [(name, box)])."""
        self.tracks = tracks
        self.key_frames = key_frames
        self.tolerance = tolerance

    @staticmethod
    def _key_frames(key_frames: Sequence[Mapping[str, Any]] | None) -> list[tuple[float, list[tuple[str, Sequence[float]]]]]:
        return [(float(kf["t_s"]), [(o.get("name") or "", o["box"]) for o in kf.get("objects") or () if o.get("box") is not None])
                for kf in key_frames or () if kf.get("t_s") is not None]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], tolerance: float) -> "GroundTruth":
        """From one record as Python values (`gt` and `key_frames`)."""
        tracks = []
        for obj in ((record.get("gt") or {}).get("objects") or ()):
            points = [p for p in obj.get("track") or () if p.get("box") is not None and p.get("t_s") is not None]
            if points:
                order = np.argsort([p["t_s"] for p in points], kind="stable")
                times = np.array([points[i]["t_s"] for i in order], dtype=np.float64)
                boxes = np.array([points[i]["box"] for i in order], dtype=np.float64)
                tracks.append((obj.get("name") or "", times, boxes))
        return cls(tracks, cls._key_frames(record.get("key_frames")), tolerance)

    @classmethod
    def for_table(cls, table: pa.Table, tolerance: float) -> list["GroundTruth"]:
        """One per row, with the tracks taken straight from Arrow buffers: per-frame tracks are most
        of a partition's values, and turning them into Python dicts would dominate align's time."""
        objects = pc.struct_field(table.column("gt").combine_chunks(), "objects")
        flat_objects = pc.list_flatten(objects)
        object_row = pc.list_parent_indices(objects).to_numpy(zero_copy_only=False)
        names = pc.fill_null(pc.struct_field(flat_objects, "name"), "").to_pylist()
        tracks = pc.struct_field(flat_objects, "track")
        points = pc.list_flatten(tracks)
        point_object = pc.list_parent_indices(tracks).to_numpy(zero_copy_only=False)
        times = pc.fill_null(pc.struct_field(points, "t_s"), np.nan).to_numpy(zero_copy_only=False)
        box = pc.struct_field(points, "box")
        has_box = box.is_valid().to_numpy(zero_copy_only=False)
        boxes = np.full((len(points), 4), np.nan)
        boxes[has_box] = pc.fill_null(pc.list_flatten(box), np.nan).to_numpy(zero_copy_only=False).reshape(-1, 4)
        keep = has_box & ~np.isnan(times)
        order = np.lexsort((times[keep], point_object[keep]))
        point_object, times, boxes = point_object[keep][order], times[keep][order], boxes[keep][order]
        bounds = np.searchsorted(point_object, np.arange(len(names) + 1))
        per_row: list[list[tuple[str, np.ndarray, np.ndarray]]] = [[] for _ in range(table.num_rows)]
        for k, name in enumerate(names):
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                per_row[object_row[k]].append((name, times[lo:hi], boxes[lo:hi]))
        key_frames = table.column("key_frames").to_pylist()
        return [cls(per_row[i], cls._key_frames(key_frames[i]), tolerance) for i in range(table.num_rows)]

    @property
    def key_times(self) -> list[float]:
        return sorted({t for t, objs in self.key_frames if objs})

    def at(self, t: float) -> tuple[list[str], np.ndarray]:
        """Names and (N, 4) boxes of the objects present at time `t`."""
        names: list[str] = []
        boxes: list[Sequence[float]] = []
        for name, times, track_boxes in self.tracks:
            i = int(np.argmin(np.abs(times - t)))
            if abs(times[i] - t) <= self.tolerance:
                names.append(name)
                boxes.append(track_boxes[i])
        for kt, objects in self.key_frames:
            if abs(kt - t) <= self.tolerance:
                for name, box in objects:
                    if name not in names:
                        names.append(name)
                        boxes.append(box)
        return names, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _words(name: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", name.lower()))


def name_agrees(claimed: str, gt_name: str) -> bool:
    """True when every word of the ground-truth name appears in the claimed name ("the red circle"
    names "red circle"); free-text names that share no such words are matched on IoU alone."""
    gt_words = _words(gt_name)
    return bool(gt_words) and gt_words <= _words(claimed)


def check_time(claim: Mapping[str, Any], key_times: Sequence[float]) -> float | None:
    """When a claimed box is checked: its snapped time, or for an untimed claim (a spatial question
    about one moment) the record's single key frame; None when there is no such moment."""
    if claim.get("t_s") is not None:
        return claim.get("t_snapped")
    return key_times[0] if len(key_times) == 1 else None


# --- one record ----------------------------------------------------------------------------------------


def align_record(record: Mapping[str, Any], *, gt_tolerance_s: float = 0.25, name_weight: float = 0.5,
                 answer_ok_at: float = 0.5, gt: GroundTruth | None = None) -> dict[str, Any]:
    """The `scores` struct of one record (see docs/schema.md for every field); `gt` saves rebuilding
    the record's ground truth where the caller has it (read from `record` otherwise)."""
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
    gt = gt if gt is not None else GroundTruth.from_record(record, gt_tolerance_s)
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
        matching = assign_max(ious + name_weight * bonus * (ious > 0))
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
        "answer_ok": None if answer_score is None else answer_score >= answer_ok_at,
        "claims": rows,
        "verify": None,
        "problems": problems,
        "num_matched": sum(1 for r in rows if r["gt_name"] is not None),
        "answer_pred": answer_pred,
        "answer_score": answer_score,
        "times": list(trace.times),
    }


@register_stage
class Align(Stage):
    """Parse, snap, match and score every record; writes `scores`, keeps every row."""

    name = "align"
    version = "1"
    key_types = {"gt_tolerance_s": (float, int), "name_weight": (float, int), "answer_ok_at": (float, int)}

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        problems = super().validate_config(config)
        for key in ("gt_tolerance_s", "name_weight"):
            value = config.get(key)
            if isinstance(value, (int, float)) and value < 0:
                problems.append(f"{key}: must be >= 0, got {value}")
        value = config.get("answer_ok_at")
        if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
            problems.append(f"answer_ok_at: must lie in [0, 1], got {value}")
        return problems

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table)
        options = {"gt_tolerance_s": float(self.config.get("gt_tolerance_s", 0.25)),
                   "name_weight": float(self.config.get("name_weight", 0.5)),
                   "answer_ok_at": float(self.config.get("answer_ok_at", 0.5))}
        # only what align reads is turned into Python: not the frame JPEGs, not the per-frame tracks
        times_only = pa.list_(pa.struct([("t_s", pa.float64())]))
        view = table.select([c for c in INPUT_COLUMNS if c != "gt"])
        view = view.set_column(view.schema.get_field_index("frames"), "frames", view.column("frames").cast(times_only))
        truths = GroundTruth.for_table(table, options["gt_tolerance_s"])
        scores, keep, rejections = [], [], []
        for i, record in enumerate(view.to_pylist()):
            try:
                scores.append(align_record(record, gt=truths[i], **options))
                keep.append(i)
            except Exception as exc:  # noqa: BLE001 - malformed ground truth: that record goes to the ledger
                rejections.append(record_error(record, exc))
        kept = table.take(pa.array(keep, pa.int64())) if len(keep) < table.num_rows else table
        column = pa.array(scores, type=SCORES)
        return StageResult(kept.set_column(kept.schema.get_field_index("scores"), "scores", column), rejections)
