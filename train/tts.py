"""Confidence-aware test-time scaling: N sampled answers, each vote weighted by its evidence.

A grounded reasoner cites where and when it saw something (`<obj>cup</obj><box>…</box>at<t>3</t>s`).
Sampling N answers and taking the majority ignores that; here each sample's cited boxes are cropped
from the video at their cited times and shown back to the model, which rates whether the crop shows
the named object: 0 (no) / 1 (partly, unsure) / 2 (yes), mapped to 0.2 / 0.6 / 1.0. A sample's
confidence is the mean over its crops (0.2 when it cites nothing that can be cropped), and each
distinct answer collects the sum of its samples' confidences. An answer that many samples give with
evidence the model itself cannot confirm then loses to one given with confirmed evidence, while
where the evidence is equally good (or equally absent) the vote reduces to the majority.

The functions here are pure (votes in, decision out); `train/eval/crops.py` builds the crop checks
and `train/evaluate.py` drives the model calls (the crop prompt is `tts.crop_prompt` in conf/eval).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

#: Confidence of a crop by the model's rating 0 / 1 / 2.
RATING_CONFIDENCE: tuple[float, float, float] = (0.2, 0.6, 1.0)
#: Confidence of a sample that cites no box at a time (nothing to check).
NO_EVIDENCE_CONFIDENCE = 0.2

_RATING = re.compile(r"(?<![\d.])([012])(?!\.?\d)")


def parse_rating(text: str) -> int | None:
    """The model's 0/1/2 rating of a crop: the first standalone digit 0, 1 or 2 in its reply
    (models add words or `<answer>` tags around it); None when there is none."""
    match = _RATING.search(text or "")
    return int(match.group(1)) if match else None


def rating_confidence(rating: int | None) -> float:
    """0 / 1 / 2 -> 0.2 / 0.6 / 1.0; an unreadable rating counts as 0 (the crop was not confirmed)."""
    return RATING_CONFIDENCE[rating] if rating in (0, 1, 2) else RATING_CONFIDENCE[0]


def sample_confidence(ratings: Sequence[int | None]) -> float:
    """Mean crop confidence of one sample; NO_EVIDENCE_CONFIDENCE when it had no crop."""
    if not ratings:
        return NO_EVIDENCE_CONFIDENCE
    return sum(rating_confidence(r) for r in ratings) / len(ratings)


@dataclass(frozen=True)
class Vote:
    """One sample's answer (already normalised to a voting key; None = no answer) and confidence."""

    answer: str | None
    confidence: float = NO_EVIDENCE_CONFIDENCE


@dataclass(frozen=True)
class Decision:
    """The winning answer (None when no sample answered), its total weight, and every answer's."""

    answer: str | None
    weight: float
    tally: dict[str, float] = field(default_factory=dict)


def _decide(votes: Iterable[Vote], weight_of) -> Decision:
    tally: dict[str, float] = {}
    for vote in votes:
        if vote.answer is None:
            continue
        tally[vote.answer] = tally.get(vote.answer, 0.0) + weight_of(vote)
    if not tally:
        return Decision(None, 0.0, {})
    # Ties go to the answer sampled first (dicts keep insertion order; max keeps the first maximum),
    # so the decision is a pure function of the samples in order. Weights are compared rounded so
    # that float noise (0.6 + 0.2 vs 0.8) cannot break a tie one way or the other.
    best = max(tally, key=lambda a: round(tally[a], 9))
    return Decision(best, tally[best], tally)


def majority_vote(votes: Iterable[Vote]) -> Decision:
    """Each answered sample counts 1."""
    return _decide(votes, lambda v: 1.0)


def confidence_vote(votes: Iterable[Vote]) -> Decision:
    """Each answered sample counts its evidence confidence."""
    return _decide(votes, lambda v: v.confidence)


def voting_key(answer_kind: str, answer: str | None, num_options: int | None = None) -> str | None:
    """What two samples must share to vote for the same answer: the option letter for multiple
    choice, the lower-cased text with white space collapsed and end punctuation dropped for free
    form. Spans and boxes are continuous (no two samples agree exactly), so they do not vote: None."""
    from stages.lib import evidence
    from stages.lib.answers import option_letter

    if not answer:
        return None
    if answer_kind in ("option", "option_span"):  # a letter-plus-span answer votes by its letter
        return option_letter(answer, num_options)
    if answer_kind == "text":
        text = " ".join(evidence.answer_text(answer).lower().split()).strip(" .,;:!?\"'")
        return text or None
    return None
