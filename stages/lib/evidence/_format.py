"""The format the paper's format reward looks at: sections present, tags balanced, evidence per task."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from stages.lib.evidence._fast import parse_trace
from stages.lib.evidence._grammar import Problem
from stages.lib.geometry import CANONICAL, BoxFrame

_STRUCTURE_PROBLEMS = frozenset(("unbalanced_tag", "nested_tag", "duplicate_section"))


@dataclass(frozen=True)
class FormatCheck:
    """What the paper's format reward looks at, measured once.

    `well_formed` (think and answer present, every tag paired and properly nested) is the condition
    for any format credit; the evidence counts decide between 0.5 and 1 (see `format_score`).
    """

    has_think: bool
    has_answer: bool
    tags_balanced: bool
    num_claims: int
    num_claims_with_box: int
    num_claims_with_box_and_time: int
    num_times: int
    problems: tuple[Problem, ...] = field(default=())

    @property
    def well_formed(self) -> bool:
        return self.has_think and self.has_answer and self.tags_balanced


def check_format(text: str, frame: BoxFrame = CANONICAL) -> FormatCheck:
    """Measure the format of a full response (`<think>…</think><answer>…</answer>`)."""
    trace = parse_trace(text, frame)
    return FormatCheck(
        has_think=trace.think is not None,
        has_answer=trace.answer is not None,
        tags_balanced=not any(p.code in _STRUCTURE_PROBLEMS or p.code == "not_text" for p in trace.problems),
        num_claims=len(trace.claims),
        num_claims_with_box=sum(1 for c in trace.claims if c.boxes),
        num_claims_with_box_and_time=sum(1 for c in trace.claims if c.boxes and c.t is not None),
        num_times=len(trace.times),
        problems=trace.problems,
    )


EVIDENCE_REQUIREMENTS: dict[str, Callable[[FormatCheck], bool]] = {
    "spatio_temporal": lambda f: f.num_claims_with_box_and_time > 0,
    "temporal": lambda f: f.num_times >= 2,
    "temporal_mcq": lambda f: f.num_times >= 2,
    "spatial": lambda f: f.num_claims_with_box > 0,
    "general_mcq": lambda f: True,
    "general_free": lambda f: True,
}
"""Per task, the evidence a well-formed response needs for full format credit (after the paper's
format reward: a grounded claim for spatio-temporal questions, a span (two times) for temporal ones,
a box for spatial ones, nothing for general QA)."""


def format_score(check: FormatCheck, task: str) -> float:
    """The paper's format score: 0 if not well formed, 1 if it carries the evidence `task` needs, else 0.5."""
    try:
        requirement = EVIDENCE_REQUIREMENTS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(EVIDENCE_REQUIREMENTS)}") from None
    if not check.well_formed:
        return 0.0
    return 1.0 if requirement(check) else 0.5
