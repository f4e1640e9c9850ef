"""The filter rules: named, vectorised checks of a partition's aligned records.

Each rule is a small named object in `RULES` with a reason string and its settings (`Rule.Config`:
`enabled` and a `threshold`, each with its one default), which a build overrides as
`filter.rules.<name>.threshold=...` or switches off with `filter.rules.<name>.enabled=false`. Rules
read `scores` (written by `align`, and `verify` where it ran) and are vectorised over the partition
with pyarrow/numpy: thresholds change often, so re-filtering a large build must stay cheap. The
`filter` stage runs them; `stgr list rules` lists them; a project adds one with `@register_rule`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import Registry
from pipeline.settings import Settings, setting, unknown_keys
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


@dataclass(kw_only=True)
class RuleConfig(Settings):
    """A rule's settings: a rule redeclares `threshold` with its own type, default and help."""

    enabled: bool = setting(True, "run the rule")
    threshold: float = setting(0.0, "the rule's threshold")


class Rule(ABC):
    """One consistency rule, with its settings (`Config`) as `filter.rules.<name>` gives them."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[RuleConfig]] = RuleConfig

    def __init__(self, cfg: RuleConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def check(self, batch: Batch) -> Outcome:
        """Which records of the batch fail this rule, with their values."""

    def threshold_for(self, task: str) -> Any:
        return self.cfg.threshold


RULES: Registry[type[Rule]] = Registry("filter rule")
register_rule = RULES.register


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

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: int = setting(0, "the most parse problems a trace may have (tags, boxes, times, missing "
                                    "<think>/<answer>, missing evidence)")

    def check(self, batch: Batch) -> Outcome:
        counts = np.array([len(p) for p in batch.problems])
        failed = ~batch.aligned | (counts > self.cfg.threshold)
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

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: float = setting(0.0, "seconds of slack around the clip for every <t> in the trace")

    def check(self, batch: Batch) -> Outcome:
        times, parents = batch.times
        tol = float(self.cfg.threshold) + CANONICAL.time_tolerance()
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

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: float = setting(0.5, "lowest IoU allowed for a claimed box against the ground truth at its "
                                        "(snapped) time")

    def check(self, batch: Batch) -> Outcome:
        min_iou = batch.floats("min_iou")
        failed = ~np.isnan(min_iou) & (min_iou < float(self.cfg.threshold))
        claims = batch.field("claims")
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            worst = min((c for c in claims[int(i)].as_py() if c["iou"] is not None), key=lambda c: c["iou"])
            values[i] = round(float(min_iou[i]), 4)
            matched = f"matched to {worst['gt_name']!r}" if worst["gt_name"] else "matched to nothing"
            when = f" at {worst['t_snapped']:g} s" if worst["t_snapped"] is not None else ""
            reasons[i] = f"claim {worst['name']!r}{when} {matched}: IoU {worst['iou']:.3f} < {self.cfg.threshold}"
        return Outcome(failed, values, reasons)


@register_rule
class BoxDegenerate(Rule):
    name = "box_degenerate"
    description = "every claimed box has positive width and height and covers at least this fraction of the frame"

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: float = setting(1e-4, "smallest box allowed, as a fraction of the frame (also rejects x2 <= x1 "
                                         "or y2 <= y1)")

    def check(self, batch: Batch) -> Outcome:
        boxes, parents = batch.boxes
        area = area_fraction(boxes)
        bad = ~has_positive_area(boxes) | (area < float(self.cfg.threshold))
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[parents[bad]] = True
        worst = _worst_per_row(area, parents, bad, np.min)
        reasons = {i: f"a box covers {v:.2e} of the frame (x2 <= x1, y2 <= y1, or below {self.cfg.threshold})"
                   for i, v in worst.items()}
        return Outcome(failed, {i: round(v, 6) for i, v in worst.items()}, reasons)


@register_rule
class BoxTooLarge(Rule):
    name = "box_too_large"
    description = "no claimed box covers more than this fraction of the frame (a box around everything grounds nothing)"

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: float = setting(0.8, "largest box allowed, as a fraction of the frame")

    def check(self, batch: Batch) -> Outcome:
        boxes, parents = batch.boxes
        area = area_fraction(boxes)
        bad = area > float(self.cfg.threshold)
        failed = np.zeros(batch.num_rows, dtype=bool)
        failed[parents[bad]] = True
        worst = _worst_per_row(area, parents, bad, np.max)
        reasons = {i: f"a box covers {v:.0%} of the frame > {self.cfg.threshold:.0%}" for i, v in worst.items()}
        return Outcome(failed, {i: round(v, 4) for i, v in worst.items()}, reasons)


@register_rule
class AnswerAgrees(Rule):
    """Thresholds per task (a mapping with an optional `default`), or one number for all tasks."""

    name = "answer_agrees"
    description = "the response's answer agrees with the ground truth (stages.lib.answers: letter, letter+span, span tIoU, box IoU or ROUGE)"

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        threshold: float | dict[str, float] = setting(
            {"temporal_mcq": 0.75, "general_mcq": 1.0, "default": 0.5},
            "lowest answer agreement, one number or per task (with an optional default), scored by "
            "stages/lib/answers.py from what the record's answer is: option letter (0/1), letter + span "
            "((letter + tIoU) / 2: 0.75 = right letter and tIoU >= 0.5), span tIoU, box IoU or free text "
            "(mean ROUGE-1/2/L F1)")

        def check(self) -> list[str]:
            unknown = sorted(set(self.threshold) - set(TASKS) - {"default"}) if isinstance(self.threshold, Mapping) else []
            return [f"threshold: unknown task(s) {unknown}; known: {list(TASKS)} and 'default'"] if unknown else []

    def threshold_for(self, task: str) -> float:
        value = self.cfg.threshold
        if isinstance(value, Mapping):
            return float(value.get(task, value.get("default", 0.0)))
        return float(value)

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

    @dataclass(kw_only=True)
    class Config(RuleConfig):
        enabled: bool = setting(False, "run the rule; needs the optional verify stage in the DAG")
        threshold: float = setting(0.5, "fraction of claimed boxes a VLM must confirm")

    def check(self, batch: Batch) -> Outcome:
        score = batch.floats("verify")
        missing = np.isnan(score)
        failed = missing | (score < float(self.cfg.threshold))
        values, reasons = {}, {}
        for i in np.flatnonzero(failed):
            if missing[i]:
                values[i], reasons[i] = None, "no verification score: add the verify stage before filter, or disable this rule"
            else:
                values[i] = round(float(score[i]), 4)
                reasons[i] = f"the verifier confirmed {score[i]:.0%} of the claimed boxes < {self.cfg.threshold:.0%}"
        return Outcome(failed, values, reasons)


def rule_defaults() -> dict[str, dict[str, Any]]:
    """Every registered rule's settings at their defaults: the default of `filter.rules`."""
    return {name: cls.Config.defaults() for name, cls in RULES.items()}


def rule_problems(rules: Mapping[str, Any]) -> list[str]:
    """What is wrong with a `filter.rules` mapping, as `rules.<name>...: message` lines."""
    problems = []
    for name, entry in rules.items():
        if name not in RULES:
            problems.append(f"rules.{name}: unknown rule; known: {sorted(RULES)}")
        elif not isinstance(entry, Mapping):
            problems.append(f"rules.{name}: expected a mapping with enabled/threshold, got {entry!r}")
        else:
            settings = RULES[name].Config
            owner = f"filter rule '{name}'"
            problems += [f"rules.{name}.{p}" for p in settings.problems(entry, owner)]
            problems += [f"rules.{name}.{p}" for p in unknown_keys(entry, settings.names(), owner)]
    return problems


def configured_rules(rules: Mapping[str, Any]) -> list[Rule]:
    """The enabled rules, each with its settings: its defaults, overridden by `rules[<name>]`."""
    out = []
    for name, cls in RULES.items():
        cfg = cls.Config.build(rules.get(name) or {})
        if cfg.enabled:
            out.append(cls(cfg))
    return out
