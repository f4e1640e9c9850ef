"""The one answer scorer: the filter's `answer_agrees`, the RL accuracy reward and evaluation all
score a predicted answer against a record's ground truth here, so the three can never disagree.

The *kind* of answer is decided from what the record's answer is, not from its task: a VidSTG
question answered by a caption is free text even though the task is spatio-temporal, and the
released Open-o3 Video data writes a temporal multiple-choice answer as the letter plus the span
(`"B\\n[3.2, 5.0]"`). Kinds and their scores, each in [0, 1]:

| kind | the record's answer | score of a prediction |
| --- | --- | --- |
| `option_span` | a letter, then a span (`"B\\n[3.2, 5.0]"`) | (letter correct + tIoU of the span) / 2 |
| `option` | a letter (`"B"`, `"(B)"`, `"B. text"`) | 1 if the same letter, else 0 |
| `span` | only a span (`"[3.2, 5.0]"`, `"<t>3.2</t>s to <t>5</t>s"`), or no answer but an `answer_span` | V-STaR tIoU |
| `box` | only a box | IoU |
| `text` | anything else | mean of ROUGE-1, ROUGE-2 and ROUGE-L F1 (stemmed), as the released reward |

The released code keeps letter and tIoU as two reward functions that are summed; STGR folds them
into one accuracy in [0, 1] (their mean) so that one threshold and one reward weight apply. That is
listed among the departures in docs/training.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

from stages.lib import evidence
from stages.lib.geometry import CANONICAL, BoxFrame, paired_iou
from stages.lib.metrics import temporal_iou
from stages.lib.schema import ANSWER_KINDS

KINDS = ("option_span", "option", "span", "box", "text")

# what may remain of an answer around a span or a box for the answer to be "only" that
# (a released box answer names its object: `<obj>dog</obj><box>[…]</box>`)
_FILLER = re.compile(r"(?i)<obj>[^<>]*</obj>|\b(?:s|secs?|seconds?|to|and|from|until|between|start|end|the|span|is|box)\b"
                     r"|</?t>|[^A-Za-z0-9]")


def _only(body: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """True when `body` holds the first match of `patterns` and nothing else but filler words and
    punctuation: the answer *is* a span (or a box), not a sentence that mentions one."""
    for pattern in patterns:
        m = pattern.search(body)
        if m:
            return not _FILLER.sub("", body.replace(m.group(0), " ", 1))
    return False


def option_letter(text: str, num_options: int | None = None) -> str | None:
    """The option letter of an answer, also when a span follows it on the next lines."""
    letter = evidence.parse_option_letter(text, num_options)
    if letter is None:
        first = evidence.answer_text(text).split("\n", 1)[0]
        letter = evidence.parse_option_letter(first, num_options)
    return letter


@dataclass(frozen=True)
class AnswerTruth:
    """A record's ground-truth answer, parsed once; `kind` says how predictions are scored."""

    kind: str
    text: str
    letter: str | None
    span: tuple[float, float] | None
    box: tuple[float, float, float, float] | None
    num_options: int | None

    @property
    def scorable(self) -> bool:
        """False when the record has no ground truth of its kind (nothing to compare with)."""
        return {"option_span": self.letter is not None and self.span is not None, "option": self.letter is not None,
                "span": self.span is not None, "box": self.box is not None, "text": bool(self.text)}[self.kind]


def _span_tuple(span: Any) -> tuple[float, float] | None:
    if span is None or len(span) != 2:
        return None
    return float(span[0]), float(span[1])


@lru_cache(maxsize=65536)
def _truth(task: str, answer: str, options: tuple[str, ...], answer_span: tuple[float, float] | None) -> AnswerTruth:
    body = evidence.answer_text(answer)
    num_options = len(options) or None
    if body and (options or ANSWER_KINDS.get(task) == "option"):
        letter = option_letter(body, num_options)
        if letter is not None:
            rest = body.split("\n", 1)[1] if "\n" in body else ""
            span = evidence.parse_time_span(rest) if rest.strip() else None
            if span is not None:
                return AnswerTruth("option_span", body, letter, span, None, num_options)
            return AnswerTruth("option", body, letter, None, None, num_options)
    if not body:
        kind = "span" if answer_span is not None else ANSWER_KINDS.get(task, "text")
        return AnswerTruth(kind, "", None, answer_span, None, num_options)
    if _only(body, evidence.SPAN_PATTERNS):
        return AnswerTruth("span", body, None, evidence.parse_time_span(body) or answer_span, None, num_options)
    if _only(body, evidence.BOX_ANSWER_PATTERNS):
        box = evidence.parse_box_answer(body)
        if box is not None:
            return AnswerTruth("box", body, None, None, box, num_options)
    return AnswerTruth("text", body, None, answer_span, None, num_options)


def answer_truth(task: str | None, answer: str | None, options: Sequence[str] | None = None,
                 answer_span: Sequence[float] | None = None) -> AnswerTruth:
    """The parsed ground truth of one record (cached: rewards score the same targets many times)."""
    return _truth(str(task or ""), str(answer or ""), tuple(str(o) for o in options or ()), _span_tuple(answer_span))


def answer_kind(task: str | None, answer: str | None, options: Sequence[str] | None = None,
                answer_span: Sequence[float] | None = None) -> str:
    """How the record's answer is scored (one of KINDS), decided from the answer itself; a record
    with no answer falls back to its span, then to its task's default kind (what annotators are asked for)."""
    return answer_truth(task, answer, options, answer_span).kind


def record_answer_kind(record: Mapping[str, Any]) -> str:
    """`answer_kind` of a record (or reward target) dict."""
    return answer_kind(record.get("task"), record.get("answer"), record.get("options"), record.get("answer_span"))


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_score(reference: str, prediction: str) -> float:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L (stemmed): the released free-form answer reward."""
    if not reference.strip() or not prediction.strip():
        return 0.0
    scores = _rouge().score(reference, prediction)
    return min(1.0, max(0.0, (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3))


def _tiou(truth: tuple[float, float], predicted: str) -> float:
    span = evidence.parse_time_span(predicted)
    return float(temporal_iou(truth, span)) if span is not None else 0.0


def score_truth(predicted: str | None, truth: AnswerTruth, frame: BoxFrame = CANONICAL) -> float | None:
    """Score `predicted` (an `<answer>` content, or a whole completion) against a parsed truth; None
    when the truth has nothing to compare with. A missing prediction scores 0."""
    if not truth.scorable:
        return None
    text = evidence.answer_text(predicted or "")
    if not text:
        return 0.0
    if truth.kind == "option":
        return float(option_letter(text, truth.num_options) == truth.letter)
    if truth.kind == "option_span":
        return (float(option_letter(text, truth.num_options) == truth.letter) + _tiou(truth.span, text)) / 2.0
    if truth.kind == "span":
        return _tiou(truth.span, text)
    if truth.kind == "box":
        box = evidence.parse_box_answer(text, frame)
        return float(paired_iou([truth.box], [box])[0]) if box is not None else 0.0
    return rouge_score(truth.text, text)


def score_answer(predicted: str | None, *, task: str | None, answer: str | None, options: Sequence[str] | None = None,
                 answer_span: Sequence[float] | None = None, frame: BoxFrame = CANONICAL) -> float | None:
    """Agreement of a predicted answer with a record's ground truth, in [0, 1] (see the module table);
    None when the record has no ground truth to compare with. `frame` is the frame predicted boxes
    are written in (ground truth is canonical)."""
    return score_truth(predicted, answer_truth(task, answer, options, answer_span), frame)


def score_record_answer(predicted: str | None, record: Mapping[str, Any], frame: BoxFrame = CANONICAL) -> float | None:
    """`score_answer` with the ground truth read from a record (or reward target) dict."""
    return score_answer(predicted, task=record.get("task"), answer=record.get("answer"), options=record.get("options"),
                        answer_span=record.get("answer_span"), frame=frame)
