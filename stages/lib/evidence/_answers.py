"""Reading answers: the `<answer>` text, an option letter, a time span, a box, boxes by second."""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from stages.lib.evidence._fast import parse_trace
from stages.lib.evidence._grammar import _BARE_BOX, _BOX4, _BOX_IN, Box, claims_by_time, parse_seconds, split_sections
from stages.lib.geometry import CANONICAL, BoxFrame, is_finite

def answer_text(text: str) -> str:
    """The content of `<answer>` when the text has one, else the whole text, stripped."""
    if not isinstance(text, str):
        return ""
    answer = split_sections(text).answer
    return (answer if answer is not None else text).strip()


_OPTION_PATTERNS = (
    re.compile(r"[(\[]?([A-Z])[)\]]?[.:]?"),  # the whole answer: B  (B)  [B]  B.  B)
    re.compile(r"[(\[]([A-Z])[)\]](?:\s|[.:]|$).*", re.S),  # (B) the red car
    re.compile(r"([A-Z])[.:)](?:\s.*)?", re.S),  # B. the red car
)
_OPTION_KEYWORD = re.compile(r"(?i:correct\s+option|option|answer)(?:\s+(?i:is))?\s*[:：]?\s*[(\[]?([A-Z])(?![A-Za-z])")


def parse_option_letter(text: str, num_options: int | None = None) -> str | None:
    """The option letter an answer picks, or None.

    Accepts (after taking `<answer>` content if present): `B`, `(B)`, `[B]`, `B.`, `B)`, `B:`,
    `B. text`, `(B) text`, and `Option B` / `Answer: B` / `Correct Option: B` anywhere. Letters are
    upper-case only, so that the article in "A man …" is not read as option A. With `num_options`,
    a letter past the last option gives None.
    """
    body = answer_text(text)
    letter = None
    for pattern in _OPTION_PATTERNS:
        m = pattern.fullmatch(body)
        if m:
            letter = m.group(1)
            break
    if letter is None:
        found = _OPTION_KEYWORD.findall(body)
        letter = found[-1] if found else None
    if letter is not None and num_options is not None and ord(letter) - ord("A") >= num_options:
        return None
    return letter


_TIME_VALUE = r"(\d+(?::\d{1,2}){1,2}(?:\.\d*)?|[-+]?(?:\d+\.?\d*|\.\d+))"
_UNIT = r"\s*(?:s|secs?|seconds?)?"
SPAN_PATTERNS = (
    re.compile(rf"<t>([^<>]*)</t>{_UNIT}\s*(?:to|-|–|~|and|until)\s*<t>([^<>]*)</t>"),
    re.compile(rf"[\[(]\s*{_TIME_VALUE}{_UNIT}\s*[,;]\s*{_TIME_VALUE}{_UNIT}\s*[\])]"),
    re.compile(rf"{_TIME_VALUE}{_UNIT}\s*(?:to|-|–|~|until)\s*{_TIME_VALUE}"),
)


def parse_time_span(text: str) -> tuple[float, float] | None:
    """The time span an answer gives, in seconds, or None.

    Accepts (in the `<answer>` content when present, first match wins): `<t>3.5</t>s to <t>7</t>s`
    (also `-`, `–`, `~`, `and`, `until`), `[3.5, 7]` / `(3.5s, 7s)`, and `3.5s to 7s` / `3.5 - 7`.
    Values may be clock times (`1:02.5`). The span is returned as written, even reversed: metrics
    decide what a reversed span is worth.
    """
    body = answer_text(text)
    for pattern in SPAN_PATTERNS:
        for m in pattern.finditer(body):
            start, end = parse_seconds(m.group(1)), parse_seconds(m.group(2))
            if start is not None and end is not None and math.isfinite(start) and math.isfinite(end):
                return start, end
    return None

BOX_ANSWER_PATTERNS = (_BOX_IN, _BARE_BOX)


def parse_box_answer(text: str, frame: BoxFrame = CANONICAL) -> Box | None:
    """The box an answer gives, read in `frame` and returned canonical xyxy, or None.

    Accepts (in the `<answer>` content when present) the first `<box>…</box>` holding 4 numbers, or
    else the first bracketed list of exactly 4 numbers. Out-of-range boxes are returned as they are.
    """
    body = answer_text(text)
    for pattern in BOX_ANSWER_PATTERNS:
        for m in pattern.finditer(body):
            inner = _BOX4.fullmatch(m.group(1))
            if inner:
                box = frame.to_canonical([float(v) for v in inner.groups()])[0]
                if np.isfinite(box).all():
                    return tuple(float(v) for v in box)  # type: ignore[return-value]
    return None


_JSON_BLOCK = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _balance_brackets(text: str) -> str:
    """Close brackets a truncated answer left open (V-STaR's `fix_incomplete_json`)."""
    for open_, close in (("[", "]"), ("{", "}")):
        missing = text.count(open_) - text.count(close)
        if missing > 0:
            text += close * missing
        elif missing < 0:
            text = open_ * -missing + text
    return text


def _load_json_answer(body: str) -> Any:
    """The JSON value an answer holds, repaired as V-STaR's `extract_bounding_boxes` does, or None."""
    block = _JSON_BLOCK.search(body)
    body = block.group(1) if block else body
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    end = max(body.rfind("}"), body.rfind("]"))
    # From the first bracket to the last closing one, or to the end when the answer was cut short.
    text = (body[start : end + 1] if end > start else body[start:]).strip().replace("'", '"')
    for candidate in (text, _balance_brackets(text)):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _box_list(value: Any) -> list[list[float]]:
    """A box `[x1,y1,x2,y2]` or any nesting of lists of boxes -> a flat list of 4-number boxes."""
    if isinstance(value, (list, tuple)):
        if len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [[float(v) for v in value]]
        return [box for inner in value for box in _box_list(inner)]
    return []


def parse_boxes_by_time(text: str | None, frame: BoxFrame = CANONICAL) -> dict[float, list[Box]] | None:
    """A spatial answer as {seconds: [canonical boxes]}, or None when it holds no usable box.

    Accepts (in the `<answer>` content when present) the grounded grammar
    (`<obj>…</obj><box>…</box>at<t>3</t>s`, grouped by `claims_by_time`) and V-STaR's JSON answers:
    `{"3": [x1,y1,x2,y2], …}` (a value may hold several boxes), a list of such objects, or a list of
    `[seconds, box]` pairs, optionally inside a ```json block, with single quotes or unclosed brackets
    repaired as V-STaR's `extract_bounding_boxes` does. Keys are read with `parse_seconds`; keys that
    are not times, values that hold no 4-number box and non-finite boxes are skipped. Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    body = answer_text(text)
    grounded = claims_by_time(parse_trace(body, frame).claims)
    if grounded:
        return {float(t): [tuple(b) for b in boxes] for t, boxes in grounded.items()}  # type: ignore[misc]
    data = _load_json_answer(body)
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        merged: dict[str, Any] = {}
        for d in data:
            merged.update(d)
        data = merged
    elif isinstance(data, list):
        data = {str(p[0]): p[1] for p in data if isinstance(p, (list, tuple)) and len(p) == 2}
    if not isinstance(data, dict):
        return None
    out: dict[float, list[Box]] = {}
    for key, value in data.items():
        seconds = parse_seconds(str(key))
        boxes = _box_list(value)
        if seconds is None or not boxes:
            continue
        canonical = frame.to_canonical(np.asarray(boxes, dtype=np.float64))
        canonical = canonical[is_finite(canonical)]
        if len(canonical):
            out.setdefault(float(seconds), []).extend(tuple(b) for b in canonical.tolist())
    return out or None
