"""`template`: questions, grounded reasoning and answers written from the ground truth alone.

No model runs: the response is assembled from phrase tables with the record's exact boxes and
times, in the same `<think>…</think><answer>…</answer>` format a model is asked for, so it goes
through the same parsing, alignment and filtering. It makes offline builds, CI and demos possible,
and gives a dataset whose evidence is exact by construction (but whose prose is formulaic): that is
why records say `provenance.annotator = "template"` and `provenance.prompt_sha` names the phrase
tables, not a prompt.

Several phrasings per task; which one a record gets is a pure function of its id (`sha256(id)`),
so a rebuild writes the same text, and records of one video do not all read alike.

What a trace claims is true of the frame it cites, because SFT learns it as written and RL rewards
it: a claim's name is the name the evidence gives the object at that frame (a source may name an
object as it looks there), its box is the evidence box, its time is the evidence frame's time
written inside the clip (`written_time`); "first appears" / "last seen" are said only of the first
/ last time of the object's ground-truth track, and everything else is said without "first",
"still" or "it" across objects. The answer is the record's own answer verbatim (letter, letter +
span, span, box or text), so it scores full through the one answer scorer (stages/lib/answers.py).

The question of a seed that has none is written before any backend is asked, by
`stages.lib.prompts.write_question`, so every backend reasons about a question that follows from the
ground truth.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.settings import setting
from stages.backends import BackendConfig, PerRequestBackend, RequestFailed, register_backend
from stages.lib.answers import answer_truth
from stages.lib.chat import ChatRequest
from stages.lib.cost import Usage
from stages.lib.evidence import Claim, render_claim
from stages.lib.geometry import CANONICAL
from stages.lib.prompts import QUESTIONS, event_label, record_rng, subject_of
from stages.lib.truth import name_agrees

#: Phrase tables. Placeholders: {obj} object name, {cite} a rendered claim, {label} an event,
#: {t}/{s}/{e} times as written in `<t>`, {answer} the answer text, {n} a count. The questions a seed
#: without one is asked are `stages.lib.prompts.QUESTIONS`, written for every backend.
PHRASES: dict[str, Any] = {
    "version": "template-v2",
    "openers": {
        "spatio_temporal": [
            "I look for the {obj} frame by frame.",
            "To answer, I track the {obj} through the clip.",
            "The question is about the {obj}, so I follow it across the frames.",
        ],
        "temporal": [
            "I look for the frames where this starts and where it ends: {label}.",
            "To find the span, I check when this begins and when it is over: {label}.",
            "I scan the clip for the beginning and the end of this: {label}.",
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
    # Only where the cited frame is the first / last time the object is in its ground truth.
    "first": [
        "It first appears as {cite}.",
        "The first sighting is {cite}.",
        "It comes into view as {cite}.",
    ],
    "last": [
        "The last frame showing it is {cite}.",
        "It is last seen as {cite}.",
        "Its last appearance is {cite}.",
    ],
    # Everywhere else: no claim about what came before or after.
    "see": [
        "I can see {cite}.",
        "There is {cite}.",
        "I find {cite}.",
    ],
    "then": [
        "Then {cite}.",
        "Later, {cite}.",
        "After that, {cite}.",
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
            "This matches option {letter}.",
            "So the correct option is {letter}.",
            "Therefore the answer is {letter}.",
        ],
        "option_span": [
            "This matches option {letter}, from {s} s to {e} s.",
            "So the correct option is {letter}: {s} s to {e} s.",
            "Therefore the answer is {letter}, the span from {s} s to {e} s.",
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

#: The template's version in provenance: its phrase tables and the questions it answers (the value is the
#: one these tables had when the questions were part of them).
PHRASES_SHA = hashlib.sha256(json.dumps({**PHRASES, "questions": QUESTIONS}, sort_keys=True).encode()).hexdigest()


def _time(seconds: float) -> str:
    return CANONICAL.format_time(seconds)


def written_time(seconds: float, context: Mapping[str, Any]) -> float:
    """`seconds` as a `<t>` writes it, never outside the record's clip: rounded to the written digits,
    and rounded towards the inside where rounding would cross a clip bound (the clip end 18.018 s is
    written 18.01, not 18.02). Frame times move by at most half a digit, far less than the gap
    between two sampled frames, so a written claim still snaps to the frame it cites."""
    lo = float(context.get("clip_start_s", -math.inf))
    hi = float(context.get("clip_end_s", math.inf))
    t = min(max(float(seconds), lo), hi)
    value = float(_time(t))
    scale = 10 ** CANONICAL.time_decimals
    if value > hi:
        value = math.floor(t * scale) / scale
    elif value < lo:
        value = math.ceil(t * scale) / scale
    return value


def _sentence(template: str, **words: Any) -> str:
    """A phrase filled in; a filled-in text that ends a sentence itself ("... a camera.") is not
    followed by a second full stop."""
    text = template.format(**words)
    return text[:-1] if text.endswith(("..", "?.", "!.")) else text


def _identity(name: str, context: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The one ground-truth object (with a track) a cited name refers to, or None where it is not
    one: the object of that name, else the only object the name names in align's sense (a key
    frame names an object as it looks there: "blue circle that was yellow" names "yellow circle")."""
    objects = context.get("objects") or []
    exact = [o for o in objects if o["name"] == name]
    if exact:
        return exact[0] if len(exact) == 1 else None
    named = [o for o in objects if name_agrees(name, o["name"])]
    return named[0] if len(named) == 1 else None


Entry = tuple[float, list[tuple[str, str]]]
"""A cited evidence time (the ground truth's) and the claims at it: (name, rendered claim)."""


def _entries(context: Mapping[str, Any], subject: str | None) -> list[Entry]:
    """The evidence in time order, each time with the claims of the objects that are `subject` or
    name it (all objects when `subject` is None); claims are written with `written_time`."""
    out = []
    for entry in context.get("evidence") or []:
        t = written_time(entry["t_s"], context)
        claims = [(obj["name"], render_claim(Claim(obj["name"], (tuple(obj["box"]),), t), CANONICAL))
                  for obj in entry["objects"]
                  if subject is None or obj["name"] == subject or name_agrees(obj["name"], subject)]
        if claims:
            out.append((float(entry["t_s"]), claims))
    return out


def _spread(items: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` items: the first, the last and evenly spaced ones between."""
    if len(items) <= limit:
        return list(items)
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def _cite_sentences(context: Mapping[str, Any], entries: Sequence[Entry], rng: random.Random) -> list[str]:
    """One sentence per cited time. "first appears" / "last seen" are written only where they are
    true: every claim is of one ground-truth object and the cited time is the first / last time of
    its track; elsewhere a sentence says only what its frame shows."""
    cited = [_identity(name, context) for _, claims in entries for name, _ in claims]
    single = cited[0] if cited and cited[0] is not None and all(o is cited[0] for o in cited) else None
    out = []
    previous: float | None = None
    for t, claims in entries:
        if single is not None and abs(t - single["first_s"]) < 1e-6:
            slot = "first"
        elif single is not None and abs(t - single["last_s"]) < 1e-6:
            slot = "last"
        else:
            slot = "then" if previous is not None and t > previous else "see"
        out.append(_sentence(rng.choice(PHRASES[slot]), cite=" and ".join(text for _, text in claims)))
        previous = t
    return out


def write_response(context: Mapping[str, Any], max_cites: int) -> str:
    """The full `<think>…</think><answer>…</answer>` text for one record's context.

    The answer is the record's own answer, verbatim, so it scores full through `stages.lib.answers`;
    the reasoning restates it (letter, span, box or text), cites the ground-truth boxes at their
    sampled frames, and writes every time inside the clip. Raises RequestFailed (the record goes to
    the ledger) where the ground truth does not determine the answer: a multiple-choice or open
    question whose seed gives no answer.
    """
    task, rid, kind = context["task"], str(context.get("id")), context["answer_kind"]
    answer = context.get("answer")
    if answer is None:
        raise RequestFailed(f"record {rid}: no ground-truth answer (field 'answer' is empty and 'ground_truth' does not "
                            f"determine a {task} answer); the template annotator only restates the truth")
    rng = record_rng(rid, "response")
    evidence = context.get("evidence") or []
    subject = subject_of(context)
    if task == "spatial" and evidence:
        subject = evidence[0]["objects"][0]["name"]
    label = event_label(context)
    words: dict[str, Any] = {"obj": subject or "object", "label": label or "the event", "answer": answer}
    sentences = [_sentence(rng.choice(PHRASES["openers"][task]), **words)]

    entries = _entries(context, subject if kind in ("span", "box") and subject else None)
    entries = entries[:1] if task == "spatial" else _spread(entries, max_cites)
    sentences += _cite_sentences(context, entries, rng)

    truth = answer_truth(task, answer, context.get("options"), context.get("answer_span"))
    span = context.get("answer_span") if kind == "span" and context.get("answer_span") is not None else truth.span
    closer = kind
    if kind in ("span", "option_span") and span is not None:
        words.update(s=_time(written_time(span[0], context)), e=_time(written_time(span[1], context)))
        table = PHRASES["span"] if label else PHRASES["span_object"]
        sentences.append(_sentence(rng.choice(table), **words))
        if truth.span is not None:  # the closer restates the answer's own span, as the answer writes it
            words.update(s=_time(truth.span[0]), e=_time(truth.span[1]))
        if kind == "span" and answer != f"[{words['s']}, {words['e']}]":
            closer = "text"  # the answer is written otherwise than "[s, e]": restate it as written
    elif kind in ("span", "option_span"):
        closer = "text"
    if closer in ("option", "option_span"):
        words["letter"] = truth.letter
    sentences.append(_sentence(rng.choice(PHRASES["closers"][closer]), **words))
    return f"<think>{' '.join(sentences)}</think><answer>{answer}</answer>"


@register_backend
class TemplateBackend(PerRequestBackend):
    """Writes each response from `request.context` (see the module docstring); ignores the prompt."""

    name = "template"
    cacheable = False
    needs_pixels = False  # it writes from the ground truth alone

    @dataclass(kw_only=True)
    class Config(BackendConfig):
        max_cites: int = setting(3, "the most ground-truth boxes one trace cites", ge=0)

    cfg: Config

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
                out.append(write_response(request.context, self.cfg.max_cites))
            except RequestFailed as exc:
                out.append(exc)
        # No model runs: no token is used, so the cost ledger counts the calls at 0 tokens (not
        # unmetered), whatever the price. Counting the prompt's words would bill work nobody did.
        self.last_usage = [Usage() for _ in requests]
        return out

    def prompt_sha(self, template_sha: str) -> str:
        return PHRASES_SHA
