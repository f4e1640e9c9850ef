"""The fast path: most responses (our renderer's output, a trained model's) are plainly well formed
and are read in one regex pass; the rest go to the general path of `_grammar`, which names problems.
`parse_traces` decides which path each text takes, so both give the same `Trace` for a clean text."""
from __future__ import annotations

import math
import re
from itertools import chain
from typing import Any, Iterable, NamedTuple

import numpy as np

from stages.lib.evidence._grammar import _CLAIM, Box, Claim, Sections, Trace, _parse_general, _section
from stages.lib.geometry import CANONICAL, BoxFrame, is_inside

# The fast path's one pass over the reasoning: a claim (as _CLAIM; `t_tag` tells an absent time from
# an empty one), a lone `<t>`, or any other tag (no group: a stray tag leaves every group empty). Match
# boundaries are those of _CLAIM and _TIME_TAG, so it finds exactly the general path's claims and times.
_FAST = re.compile(rf"{_CLAIM.pattern}|<t>([^<>]*)</t>|</?(?:think|answer|obj|box|t)>")
_PLAIN_BOX = re.compile(r"<box>\[([-+0-9.eE]+),([-+0-9.eE]+),([-+0-9.eE]+),([-+0-9.eE]+)\]</box>")
# Times separated by single spaces, each ASCII digits with at most one point: `float` reads these
# exactly as parse_seconds does.
_PLAIN_TIMES = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?: (?:[0-9]+\.?[0-9]*|\.[0-9]+))*")


class _Clean(NamedTuple):
    """A response the fast path read completely. Boxes are as written in the frame, in order; each
    claim is (name, number of its boxes, index of its time in `times` or -1)."""

    claims: list[tuple[str, int, int]]
    boxes: list[Box]
    times: list[float]
    sections: Sections


def _scan_clean(text: str) -> _Clean | None:
    """Read a response in one regex pass, or None when anything in it is not plainly well formed.

    Most responses (our renderer's output, a trained model's) are clean: one think (and at most one
    answer) or neither, no tag outside them but the claims and times of the reasoning, each claim
    named and grounded, boxes `[a,b,c,d]`, times plain seconds. For those this finds what the general
    path finds, with no offsets and no problems to track, in a third of the time. Anything else - a
    stray or unbalanced tag, a `<` outside the reasoning, an answer without a think, a box or time in
    another spelling, an empty name, an ungrounded object - returns None and goes to the general path,
    which names the problem. Whether the boxes lie inside the image is checked later, over the batch.
    """
    think, answer = _section(text, "think"), _section(text, "answer")
    if think is None:
        if answer is not None:
            return None  # the body is the text minus the answer: left to the general path
        body = text  # a stray section tag in it is caught by _FAST below
    else:
        body = text[think[0] : think[1]]
        # Outside the reasoning, only the section tags (a `<` in the answer's prose goes the long way),
        # and an answer that is not around the think (which _FAST cannot see from inside it).
        if text.count("<") - body.count("<") != (2 if answer is None else 4):
            return None
        if answer is not None and not (answer[1] < think[0] or answer[0] > think[1]):
            return None
    claims: list[tuple[str, int, int]] = []
    box_text: list[str] = []
    time_text: list[str] = []
    for name, boxes, t_tag, t, lone_t in _FAST.findall(body):
        if name:
            name = " ".join(name.split())
            if not name or not (boxes or t_tag):
                return None
            claims.append((name, boxes.count("<box>"), len(time_text) if t_tag else -1))
            box_text.append(boxes)
            if t_tag:
                time_text.append(t)
        elif lone_t:
            time_text.append(lone_t)
        else:
            return None  # a stray tag, `<obj></obj>` or `<t></t>`: a problem to name
    boxes = "".join(box_text)
    plain = _PLAIN_BOX.findall(boxes)
    if len(plain) != boxes.count("<box>"):
        return None
    if time_text and not _PLAIN_TIMES.fullmatch(" ".join(time_text)):
        return None
    times = list(map(float, time_text))
    if math.inf in times:
        return None  # a time too long for a float
    try:
        numbers = map(float, chain.from_iterable(plain))
        parsed = list(zip(numbers, numbers, numbers, numbers))
    except ValueError:
        return None  # `[1-,2,3,4]`: characters of numbers that do not make one
    sections = Sections(
        text[think[0] : think[1]].strip() if think else None, text[answer[0] : answer[1]].strip() if answer else None
    )
    return _Clean(claims, parsed, times, sections)


def _clean_trace(scan: _Clean, boxes: list[Box]) -> Trace:
    """The Trace of a clean response, given its boxes in canonical coordinates."""
    claims, k = [], 0
    for name, n, t in scan.claims:
        claims.append(Claim._parsed(name, tuple(boxes[k : k + n]), scan.times[t] if t >= 0 else None))
        k += n
    return Trace(tuple(claims), (), tuple(scan.times), scan.sections.think, scan.sections.answer)


def _is_identity(frame: BoxFrame) -> bool:
    """True when `frame.to_canonical` returns its input (xyxy over a 1 x 1 image: a division by 1 is
    exact), so parsed boxes are used as they are, without converting them and back to lists."""
    return frame.layout == "xyxy" and frame.width == 1.0 and frame.height == 1.0


def parse_traces(texts: Iterable[str], frame: BoxFrame = CANONICAL) -> list[Trace]:
    """`parse_trace` over many texts; the result equals `[parse_trace(t, frame) for t in texts]`.

    Clean responses (see `_scan_clean`) take a fast path; all their boxes are converted and checked
    against the image in one numpy call. The rest, and clean ones with a box outside the image, take
    the general path, which reports problems.
    """
    texts = list(texts)
    clean = [_scan_clean(text) if isinstance(text, str) else None for text in texts]
    raw = [box for scan in clean if scan is not None for box in scan.boxes]
    identity = _is_identity(frame)
    values: list[Any] = raw
    box_ok: list[bool] | None = None
    if raw:
        written = np.asarray(raw, dtype=np.float64)
        canonical = written if identity else frame.to_canonical(written)
        inside = is_inside(canonical)  # also False for a non-finite box
        if not identity:
            values = list(map(tuple, canonical.tolist()))
        if not inside.all():
            box_ok = inside.tolist()
    traces: list[Trace | None] = []
    k = 0
    for scan in clean:
        if scan is None:
            traces.append(None)
            continue
        n = len(scan.boxes)
        if box_ok is not None and False in box_ok[k : k + n]:
            traces.append(None)  # a box outside the image: the general path reports it
        else:
            traces.append(_clean_trace(scan, values[k : k + n]))
        k += n
    rest = [text for text, trace in zip(texts, traces) if trace is None]
    if rest:
        general = iter(_parse_general(rest, frame))
        traces = [trace if trace is not None else next(general) for trace in traces]
    return traces  # type: ignore[return-value]


def parse_trace(text: str, frame: BoxFrame = CANONICAL) -> Trace:
    """Parse a response or a bare trace; boxes are read in `frame` and returned canonical.

    Never raises: anything malformed becomes a Problem and is left out of the claims (a box outside
    the image is kept in its claim, and reported, so that filters can decide). For many texts at
    once, `parse_traces` is faster.
    """
    return parse_traces((text,), frame)[0]
