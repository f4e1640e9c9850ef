"""`template`: questions, grounded reasoning and answers written from the ground truth alone.

No model runs: the response is assembled from phrase tables with the record's exact boxes and
times, in the same `<think>…</think><answer>…</answer>` format a model is asked for, so it goes
through the same parsing, alignment and filtering. It makes offline builds, CI and demos possible,
and gives a dataset whose evidence is exact by construction (but whose prose is formulaic): that is
why records say `provenance.annotator = "template"` and `provenance.prompt_sha` names the phrase
tables, not a prompt.

Several phrasings per task; which one a record gets is a pure function of its id (`sha256(id)`),
so a rebuild writes the same text, and records of one video do not all read alike.

The phrasebook also writes the question of a seed that has none (`write_question`): the annotate
stage asks it before prompting any model, so every backend reasons about a question that follows
from the ground truth.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Mapping, Sequence

from stages.backends import ChatRequest, PerRequestBackend, RequestFailed, register_backend
from stages.evidence import Claim, render_claim
from stages.geometry import CANONICAL

#: Phrase tables. Placeholders: {obj} object name, {cite} a rendered claim, {label} an event,
#: {t}/{s}/{e} times as written in `<t>`, {answer} the answer text, {n} a count.
PHRASES: dict[str, Any] = {
    "version": "template-v1",
    "questions": {
        "spatio_temporal": [
            "When is the {obj} visible in the video, and where is it?",
            "During which seconds does the {obj} appear, and where is it in the frame?",
            "Find the {obj}: in what time span is it on screen, and where?",
        ],
        "temporal": [
            "During which seconds does {label} happen?",
            "When does {label} take place? Give the start and end time.",
            "In what time span of the video does {label} occur?",
        ],
        "temporal_object": [
            "During which seconds is the {obj} visible?",
            "When is the {obj} on screen? Give the start and end time.",
            "In what time span of the video can the {obj} be seen?",
        ],
        "spatial": [
            "Where is the {obj} at {t} s?",
            "At {t} s, where in the frame is the {obj}?",
            "Give the box of the {obj} in the frame at {t} s.",
        ],
    },
    "openers": {
        "spatio_temporal": [
            "I look for the {obj} frame by frame.",
            "To answer, I track the {obj} through the clip.",
            "The question is about the {obj}, so I follow it across the frames.",
        ],
        "temporal": [
            "I look for the frames where {label} starts and ends.",
            "To find the span, I check when {label} begins and when it is over.",
            "I scan the clip for the beginning and the end of {label}.",
        ],
        "temporal_mcq": [
            "I check the order and timing of what happens in the clip.",
            "To choose, I look at when each thing happens in the frames.",
            "I go through the frames in time order to compare the options.",
        ],
        "spatial": [
            "I look at the frame the question names.",
            "The question fixes the time, so I inspect that frame.",
            "I find the frame at the requested time and locate the object there.",
        ],
        "general_mcq": [
            "I look at what the frames show before choosing an option.",
            "To choose, I check the visual evidence in the frames.",
            "I compare the options with what is visible in the clip.",
        ],
        "general_free": [
            "I look at what the frames show.",
            "To answer, I check the visual evidence in the clip.",
            "I go through the frames that matter for the question.",
        ],
    },
    "first": [
        "It first appears as {cite}.",
        "The first sighting is {cite}.",
        "I can see {cite}.",
    ],
    "middle": [
        "Then {cite}.",
        "It is still there: {cite}.",
        "Later, {cite}.",
    ],
    "last": [
        "The last frame showing it is {cite}.",
        "Finally, {cite}.",
        "It is last seen as {cite}.",
    ],
    "span": [
        "It begins at <t>{s}</t>s and ends at <t>{e}</t>s.",
        "From <t>{s}</t>s to <t>{e}</t>s: {label}.",
        "It starts around <t>{s}</t>s and is over by <t>{e}</t>s.",
    ],
    "span_object": [
        "The {obj} is visible from <t>{s}</t>s to <t>{e}</t>s.",
        "It is on screen from <t>{s}</t>s until <t>{e}</t>s.",
        "The {obj} can be seen between <t>{s}</t>s and <t>{e}</t>s.",
    ],
    "closers": {
        "span": [
            "So the answer is the span from {s} s to {e} s.",
            "Therefore it happens between {s} and {e} seconds.",
            "So the time span is {s} s to {e} s.",
        ],
        "option": [
            "This matches option {answer}.",
            "So the correct option is {answer}.",
            "Therefore the answer is {answer}.",
        ],
        "box": [
            "So the {obj} is at {answer}.",
            "Therefore its box is {answer}.",
            "That gives the location {answer}.",
        ],
        "text": [
            "So the answer is: {answer}.",
            "Therefore: {answer}.",
            "This gives the answer: {answer}.",
        ],
    },
}

PHRASES_SHA = hashlib.sha256(json.dumps(PHRASES, sort_keys=True).encode()).hexdigest()


def _rng(record_id: str, salt: str) -> random.Random:
    digest = hashlib.sha256(f"{record_id}\x1f{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _time(seconds: float) -> str:
    return CANONICAL.format_time(seconds)


def _subject(context: Mapping[str, Any]) -> str | None:
    """The object the question is about: the first ground-truth object with a track."""
    objects = context.get("objects") or []
    return objects[0]["name"] if objects else None


def _event_label(context: Mapping[str, Any]) -> str | None:
    """The first ground-truth event's label, when the source names one."""
    spans = context.get("spans") or []
    return str(spans[0]["label"]) if spans and spans[0].get("label") else None


def write_question(context: Mapping[str, Any]) -> str:
    """A question that follows from the ground truth, for a seed without one.

    The annotate stage calls it before prompting any backend. Raises ValueError naming the record and
    what is missing where the ground truth cannot support a question (multiple-choice and open
    questions need the source's own question and options).
    """
    task, rid = context["task"], str(context.get("id"))
    questions = PHRASES["questions"]
    if task not in questions:
        raise ValueError(f"record {rid}: field 'question' is empty and a {task} question cannot be written from "
                         "ground truth (it needs the source's question)")
    rng = _rng(rid, "question")
    evidence = context.get("evidence") or []
    subject = _subject(context) or (evidence[0]["objects"][0]["name"] if evidence else None)
    label = _event_label(context)
    if task == "temporal" and label is not None:
        return rng.choice(questions["temporal"]).format(label=label)
    if subject is None:
        raise ValueError(f"record {rid}: field 'question' is empty and 'gt' has no object or event to ask about")
    if task == "temporal":
        return rng.choice(questions["temporal_object"]).format(obj=subject)
    if task == "spatial":
        if not evidence:
            raise ValueError(f"record {rid}: a spatial question needs a ground-truth box at a sampled frame time")
        return rng.choice(questions["spatial"]).format(obj=evidence[0]["objects"][0]["name"],
                                                        t=_time(evidence[0]["t_s"]))
    return rng.choice(questions[task]).format(obj=subject)


def _cites(context: Mapping[str, Any], name: str | None) -> list[str]:
    """Rendered claims of `name` (all objects when None) at the evidence times, in time order."""
    out = []
    for entry in context.get("evidence") or []:
        for obj in entry["objects"]:
            if name is None or obj["name"] == name:
                out.append(render_claim(Claim(obj["name"], (tuple(obj["box"]),), entry["t_s"]), CANONICAL))
    return out


def _spread(items: Sequence[str], limit: int) -> list[str]:
    """At most `limit` items: the first, the last and evenly spaced ones between."""
    if len(items) <= limit:
        return list(items)
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def write_response(context: Mapping[str, Any], max_cites: int = 3) -> str:
    """The full `<think>…</think><answer>…</answer>` text for one record's context.

    Raises RequestFailed (the record goes to the ledger) where the ground truth does not determine
    the answer: a multiple-choice or open question whose seed gives no answer.
    """
    task, rid, kind = context["task"], str(context.get("id")), context["answer_kind"]
    rng = _rng(rid, "response")
    evidence = context.get("evidence") or []
    subject = _subject(context)
    if task == "spatial" and evidence:
        subject = evidence[0]["objects"][0]["name"]
    label = _event_label(context)
    words = {"obj": subject or "object", "label": label or "the event"}
    sentences = [rng.choice(PHRASES["openers"][task]).format(**words)]

    cites = _cites(context, subject if kind in ("span", "box") and subject else None)
    cites = cites[:1] if task == "spatial" else _spread(cites, max_cites)
    for i, cite in enumerate(cites):
        slot = "first" if i == 0 else ("last" if i == len(cites) - 1 else "middle")
        sentences.append(rng.choice(PHRASES[slot]).format(cite=cite))

    answer = context.get("answer")
    if answer is None:
        raise RequestFailed(f"record {rid}: no ground-truth answer (field 'answer' is empty and 'gt' does not "
                            f"determine a {task} answer); the template annotator only restates the truth")
    closer = kind
    span = context.get("answer_span")
    if kind == "span" and span is not None:
        words.update(s=_time(span[0]), e=_time(span[1]))
        table = PHRASES["span"] if label else PHRASES["span_object"]
        sentences.append(rng.choice(table).format(**words))
        closer = "span" if answer == f"[{words['s']}, {words['e']}]" else "text"
    elif kind == "span":
        closer = "text"
    sentences.append(rng.choice(PHRASES["closers"][closer]).format(answer=answer, **words))
    return f"<think>{' '.join(sentences)}</think><answer>{answer}</answer>"


@register_backend
class TemplateBackend(PerRequestBackend):
    """Writes each response from `request.context` (see the module docstring); ignores the prompt."""

    name = "template"
    cacheable = False

    @property
    def model_id(self) -> str:
        return str(PHRASES["version"])

    def generate_each(self, requests: Sequence[ChatRequest]) -> list[str | RequestFailed]:
        out: list[str | RequestFailed] = []
        for request in requests:
            if not request.context:
                raise ValueError("template backend: the request carries no ground-truth context; it can only "
                                 "answer requests built by the annotate stage")
            try:
                out.append(write_response(request.context, int(self.config.get("max_cites", 3))))
            except RequestFailed as exc:
                out.append(exc)
        return out

    def prompt_sha(self, template_sha: str) -> str:
        return PHRASES_SHA
