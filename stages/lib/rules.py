"""The filter rules: named, vectorised checks of a partition's aligned records.

Each rule is a small named object in `RULES` with a threshold from config (`filter.rules.<name>`)
and a reason string, and can be switched off (`enabled: false`). Rules read `scores` (written by
`align`, and `verify` where it ran) and are vectorised over the partition with pyarrow/numpy:
thresholds change often, so re-filtering a large build must stay cheap. The `filter` stage runs
them; `stgr list rules` lists them; a project adds one with `@register_rule`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.lib.geometry import CANONICAL, area_fraction, has_positive_area
from stages.lib.schema import TASKS


def _floats(array: pa.Array) -> np.ndarray:
    """A numeric Arrow array as float64 numpy, nulls as NaN."""
    return pc.fill_null(array.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)


class Batch:
    """The columns the rules read, extracted once per partition (numpy where a rule computes)."""

    def __init__(self, table: pa.Table) -> None:
        self.num_rows = table.num_rows
        self.ids: list[str] = table.column("id").to_pylist()
        self.source_ids: list[str | None] = table.column("source_id").to_pylist()
        self.tasks = np.array(table.column("task").to_pylist(), dtype=object)
        self.scores = table.column("scores").combine_chunks()
        clip = table.column("clip_window").combine_chunks()
        self.clip_start = _floats(pc.struct_field(clip, "start_s"))
        self.clip_end = _floats(pc.struct_field(clip, "end_s"))

    def field(self, name: str) -> pa.Array:
        return pc.struct_field(self.scores, name)

    def floats(self, name: str) -> np.ndarray:
        return _floats(self.field(name))

    @cached_property
    def aligned(self) -> np.ndarray:
        """True where `align` wrote scores for the record."""
        return self.scores.is_valid().to_numpy(zero_copy_only=False)

    @cached_property
    def problems(self) -> list[list[str]]:
        return [p or [] for p in self.field("problems").to_pylist()]

    @cached_property
    def times(self) -> tuple[np.ndarray, np.ndarray]:
        """Every `<t>` of every trace, flat, with the row each belongs to."""
        times = self.field("times")
        return _floats(pc.list_flatten(times)), pc.list_parent_indices(times).to_numpy(zero_copy_only=False)

    @cached_property
    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Every claimed box, flat (M, 4), with the row each belongs to."""
        claims = self.field("claims")
        flat = pc.list_flatten(claims)
        parents = pc.list_parent_indices(claims).to_numpy(zero_copy_only=False)
        box = pc.struct_field(flat, "box")
        has_box = box.is_valid().to_numpy(zero_copy_only=False)
        values = _floats(pc.list_flatten(box)).reshape(-1, 4)
        return values, parents[has_box]


@dataclass
class Outcome:
    """Per row: failed or not; for failed rows, the measured value and the reason."""

    failed: np.ndarray
    values: dict[int, Any]
    reasons: dict[int, str]


class Rule(ABC):
    """One consistency rule. `threshold` is the default; config overrides it per build."""

    name: ClassVar[str]
    description: ClassVar[str]
    threshold: ClassVar[Any]
    enabled: ClassVar[bool] = True

    def __init__(self, threshold: Any) -> None:
        self.threshold_value = threshold

    @abstractmethod
    def check(self, batch: Batch) -> Outcome:
        """Which records of the batch fail this rule, with their values."""

    def threshold_for(self, task: str) -> Any:
        return self.threshold_value

    @classmethod
    def validate_threshold(cls, value: Any) -> str | None:
        """A problem with a configured threshold, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {type(value).__name__} {value!r}"
        return None


RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Class decorator: make a rule available to `filter` under its `name`."""
    if cls.name in RULES:
        raise ValueError(f"filter rule {cls.name!r} is already registered by {RULES[cls.name].__qualname__}")
    RULES[cls.name] = cls
    return cls


def _worst_per_row(values: np.ndarray, parents: np.ndarray, bad: np.ndarray, pick: Any) -> dict[int, float]:
    """Per row with a bad box, the worst value among its bad boxes (`pick`: np.min or np.max)."""
    out: dict[int, float] = {}
    for row in np.unique(parents[bad]):
        out[int(row)] = float(pick(values[bad & (parents == row)]))
    return out


@register_rule
class FormatValid(Rule):
    name = "format_valid"
    description = "the trace parses without problems (tags, boxes, times, required sections and evidence)"
    threshold = 0  # the most problems a trace may have

    def check(self, batch: Batch) -> Outcome:
        counts = np.array([len(p) for p in batch.problems])
        failed = ~batch.aligned | (counts > self.threshold_value)
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            if not batch.aligned[i]:
                values[i], reasons[i] = None, "record has no alignment scores (was align skipped?)"
                continue
            problems = batch.problems[i]
            values[i] = problems
            reasons[i] = f"{len(problems)} format problem(s): " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        return Outcome(failed, values, reasons)


@register_rule
class TimeInClip(Rule):
    """`threshold` is extra slack in seconds; on top of it, a time may miss the clip by the rounding of
    its written digits (`CANONICAL.time_tolerance()`, 0.005 s): the clip end 18.018 s written as
    18.02 is the clip end, not a time outside it. That one tolerance is defined next to the code that
    writes times (stages/lib/geometry.py), so writing and checking cannot disagree."""

    name = "time_in_clip"
    description = ("every <t> of the trace lies inside the clip, within the rounding of its written digits "
                   "plus a slack in seconds")
    threshold = 0.0

    def check(self, batch: Batch) -> Outcome:
        times, parents = batch.times
        tol = float(self.threshold_value) + CANONICAL.time_tolerance()
        start, end = batch.clip_start[parents], batch.clip_end[parents]
        outside = (times < start - tol) | (times > end + tol)
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[parents[outside]] = True
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            bad = times[outside & (parents == i)].tolist()
            values[i] = bad
            reasons[i] = (f"{len(bad)} time(s) outside the clip [{batch.clip_start[i]:g}, {batch.clip_end[i]:g}] s: "
                          + ", ".join(f"{t:g} s" for t in bad[:5]))
        return Outcome(failed, values, reasons)


@register_rule
class ClaimIoU(Rule):
    name = "claim_iou"
    description = "every claimed box that has ground truth at its time matches it with at least this IoU"
    threshold = 0.5

    def check(self, batch: Batch) -> Outcome:
        min_iou = batch.floats("min_iou")
        failed = ~np.isnan(min_iou) & (min_iou < float(self.threshold_value))
        claims = batch.field("claims")
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            worst = min((c for c in claims[int(i)].as_py() if c["iou"] is not None), key=lambda c: c["iou"])
            values[i] = round(float(min_iou[i]), 4)
            matched = f"matched to {worst['gt_name']!r}" if worst["gt_name"] else "matched to nothing"
            when = f" at {worst['t_snapped']:g} s" if worst["t_snapped"] is not None else ""
            reasons[i] = f"claim {worst['name']!r}{when} {matched}: IoU {worst['iou']:.3f} < {self.threshold_value}"
        return Outcome(failed, values, reasons)


@register_rule
class BoxDegenerate(Rule):
    name = "box_degenerate"
    description = "every claimed box has positive width and height and covers at least this fraction of the frame"
    threshold = 1e-4

    def check(self, batch: Batch) -> Outcome:
        boxes, parents = batch.boxes
        area = area_fraction(boxes)
        bad = ~has_positive_area(boxes) | (area < float(self.threshold_value))
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[parents[bad]] = True
        worst = _worst_per_row(area, parents, bad, np.min)
        reasons = {i: f"a box covers {v:.2e} of the frame (x2 <= x1, y2 <= y1, or below {self.threshold_value})"
                   for i, v in worst.items()}
        return Outcome(failed, {i: round(v, 6) for i, v in worst.items()}, reasons)


@register_rule
class BoxTooLarge(Rule):
    name = "box_too_large"
    description = "no claimed box covers more than this fraction of the frame (a box around everything grounds nothing)"
    threshold = 0.8

    def check(self, batch: Batch) -> Outcome:
        boxes, parents = batch.boxes
        area = area_fraction(boxes)
        bad = area > float(self.threshold_value)
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[parents[bad]] = True
        worst = _worst_per_row(area, parents, bad, np.max)
        reasons = {i: f"a box covers {v:.0%} of the frame > {self.threshold_value:.0%}" for i, v in worst.items()}
        return Outcome(failed, {i: round(v, 4) for i, v in worst.items()}, reasons)


@register_rule
class AnswerAgrees(Rule):
    """Thresholds per task (a mapping with an optional `default`), or one number for all tasks."""

    name = "answer_agrees"
    description = "the response's answer agrees with the ground truth (stages.lib.answers: letter, letter+span, span tIoU, box IoU or ROUGE)"
    threshold = {"temporal_mcq": 0.75, "general_mcq": 1.0, "default": 0.5}

    def threshold_for(self, task: str) -> float:
        value = self.threshold_value
        if isinstance(value, Mapping):
            return float(value.get(task, value.get("default", 0.0)))
        return float(value)

    @classmethod
    def validate_threshold(cls, value: Any) -> str | None:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(TASKS) - {"default"})
            if unknown:
                return f"unknown task(s) {unknown}; known: {list(TASKS)} and 'default'"
            for task, v in value.items():
                problem = Rule.validate_threshold(v)
                if problem:
                    return f"{task}: {problem}"
            return None
        return Rule.validate_threshold(value)

    def check(self, batch: Batch) -> Outcome:
        score = batch.floats("answer_score")
        thresholds = np.array([self.threshold_for(t) for t in batch.tasks], dtype=np.float64)
        failed = ~np.isnan(score) & (score < thresholds)
        predicted = batch.field("answer_pred")
        values = {i: round(float(score[i]), 4) for i in np.flatnonzero(failed)}
        reasons = {i: f"answer {predicted[int(i)].as_py()!r} scores {score[i]:.3f} against the ground truth "
                      f"< {thresholds[i]:g} ({batch.tasks[i]})" for i in values}
        return Outcome(failed, values, reasons)


@register_rule
class Verified(Rule):
    name = "verified"
    description = "a VLM confirms at least this fraction of the claimed boxes (needs the verify stage)"
    threshold = 0.5
    enabled = False

    def check(self, batch: Batch) -> Outcome:
        score = batch.floats("verify")
        missing = np.isnan(score)
        failed = missing | (score < float(self.threshold_value))
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            if missing[i]:
                values[i], reasons[i] = None, "no verification score: add the verify stage before filter, or disable this rule"
            else:
                values[i] = round(float(score[i]), 4)
                reasons[i] = f"the verifier confirmed {score[i]:.0%} of the claimed boxes < {self.threshold_value:.0%}"
        return Outcome(failed, values, reasons)


def configured_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The enabled rules with their thresholds: registry defaults, overridden by `config['rules']`."""
    settings = dict(config.get("rules") or {})
    rules = []
    for name, cls in RULES.items():
        entry = dict(settings.get(name) or {})
        if entry.get("enabled", cls.enabled):
            rules.append(cls(entry.get("threshold", cls.threshold)))
    return rules
