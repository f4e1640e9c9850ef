"""The evidence grammar: parse and render grounded reasoning traces, parse answers, check format.

A grounded trace names *what*, *where* and *when*:

    <think>The <obj>man in black</obj><box>[0.412,0.205,0.587,0.931]</box>at<t>12.5</t>s lifts ...</think>
    <answer>B</answer>

This is the only module that reads or writes these tags; the annotator, align, filter, the RL rewards
and evaluation all import it. docs/evidence.md gives the grammar in EBNF; what is accepted, exactly:

* Tags are lower-case and written without spaces: `<think> </think> <answer> </answer> <obj> </obj>
  <box> </box> <t> </t>`. Evidence tags (obj, box, t) must not nest in each other; think/answer must
  not nest and appear at most once each.
* A claim is `<obj>NAME</obj>`, then zero or more `<box>…</box>` (separated by nothing, white space or
  commas), then optionally `at <t>…</t>` (the word `at`, or `@`, and the white space are optional; the
  trailing `s` is optional too). A claim needs at least one box or a time. NAME is any text without
  `<` or `>`; white space is collapsed. A time that is separated from the boxes by other words is not
  bound to the claim (it stays in `Trace.times`).
* A box holds four numbers, optionally inside `[...]` or `(...)`, separated by commas, semicolons or
  white space: ints, decimals or exponents (`12`, `0.41`, `.5`, `1e-3`), signs allowed. The numbers
  are read in the given `BoxFrame` and converted to canonical normalised xyxy.
* A time holds seconds (`12`, `12.5`, with an optional `s`/`sec`/`seconds` unit inside the tag) or a
  clock `m:ss(.f)` / `h:mm:ss(.f)`.
* Claims and times are read from the `<think>` section when there is one, otherwise from the whole
  text minus any `<answer>` section. Tag balance is checked over the whole text.

Nothing here raises on any input string: what is wrong is reported as named `Problem`s (see
`PROBLEMS`) and the parse goes on. Rendering (`render_claims`) does raise on bad claims: that is our
own output and must be valid.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from stages.lib.geometry import CANONICAL, BoxFrame, is_finite, is_inside

PROBLEMS: dict[str, str] = {
    "not_text": "the trace is not a string (e.g. a null in the column)",
    "unbalanced_tag": "an opening tag without its closing tag, or a closing tag without an opening one",
    "nested_tag": "an evidence tag inside another evidence tag, or think/answer inside another tag",
    "duplicate_section": "more than one <think> or <answer> section",
    "empty_object_name": "<obj></obj> with no name",
    "ungrounded_object": "<obj>…</obj> followed by neither a box nor a time",
    "box_without_object": "a <box> in the reasoning that does not follow an <obj>",
    "box_arity": "a box with a number of values other than 4",
    "box_not_numeric": "a box with something other than numbers in it",
    "box_not_finite": "a box whose values overflow to infinity",
    "box_out_of_range": "a box outside the image (outside [0, 1] once converted to the canonical frame)",
    "time_not_numeric": "a <t> that holds no number of seconds or clock time",
    "time_out_of_range": "a negative or non-finite time",
}
"""Every problem code `parse_trace` may report, with what it means."""

Box = tuple[float, float, float, float]

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"(?:\s*[,;]\s*|\s+)"
_BOX4 = re.compile(rf"\s*[\[(]?\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*[\])]?\s*")
_NUM_TOKEN = re.compile(_NUM)
# Only characters for which float() accepts exactly what _NUM accepts (no letters: no "nan", "inf").
_BOX_PLAIN = re.compile(r"\[[-+0-9.eE,]*\]")
_BOX_SPLIT = re.compile(r"[\s,;\[\]()]+")
_SECONDS = re.compile(rf"\s*({_NUM})\s*(?:s|secs?|seconds?)?\s*")
_CLOCK = re.compile(r"\s*(?:(\d+):)?(\d+):(\d{1,2}(?:\.\d*)?)\s*(?:s|secs?|seconds?)?\s*")
_TAG = re.compile(r"<(/?)(think|answer|obj|box|t)>")
_TAG_TEXT = re.compile(r"</?(?:think|answer|obj|box|t)>")
_TAG_TOKEN = {
    "<obj>": "o", "</obj>": "O", "<box>": "b", "</box>": "B", "<t>": "t", "</t>": "T",
    "<think>": "k", "</think>": "K", "<answer>": "a", "</answer>": "A",
}
_PAIR = r"(?:oO|bB|tT)"
# Well-formed tag sequences: evidence pairs, inside or outside at most one think and one answer.
_WELL_FORMED_TAGS = re.compile(rf"{_PAIR}*(?:k{_PAIR}*K{_PAIR}*)?(?:a{_PAIR}*A{_PAIR}*)?|{_PAIR}*a{_PAIR}*A{_PAIR}*k{_PAIR}*K{_PAIR}*")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_CLAIM = re.compile(
    r"<obj>(?P<name>[^<>]*)</obj>"
    r"(?P<boxes>(?:[\s,]*<box>[^<>]*</box>)*)"
    r"(?:[\s,]*(?:(?:at|@)\s*)?(?P<t_tag><t>(?P<t>[^<>]*)</t>))?"
)
# The fast path's one pass over the reasoning: a claim (as _CLAIM; `t_tag` tells an absent time from
# an empty one), a lone `<t>`, or any other tag (no group: a stray tag leaves every group empty). Match
# boundaries are those of _CLAIM and _TIME_TAG, so it finds exactly the general path's claims and times.
_FAST = re.compile(rf"{_CLAIM.pattern}|<t>([^<>]*)</t>|</?(?:think|answer|obj|box|t)>")
_PLAIN_BOX = re.compile(r"<box>\[([-+0-9.eE]+),([-+0-9.eE]+),([-+0-9.eE]+),([-+0-9.eE]+)\]</box>")
# Times separated by single spaces, each ASCII digits with at most one point: `float` reads these
# exactly as parse_seconds does.
_PLAIN_TIMES = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?: (?:[0-9]+\.?[0-9]*|\.[0-9]+))*")
_BOX_IN = re.compile(r"<box>([^<>]*)</box>")
_TIME_TAG = re.compile(r"<t>([^<>]*)</t>")
_EVIDENCE_TAGS = frozenset(("obj", "box", "t"))
_SECTION_TAGS = {tag: (f"<{tag}>", f"</{tag}>") for tag in ("think", "answer")}


@dataclass(frozen=True, slots=True)
class Claim:
    """One piece of evidence: an object name, its boxes (canonical xyxy) and when (seconds, or None).

    Construction normalises: white space in the name is collapsed, boxes become tuples of 4 floats.
    It raises ValueError on an empty name, a name with `<`/`>`, a box without 4 finite numbers or a
    non-finite time, so a Claim can always be rendered.
    """

    name: str
    boxes: tuple[Box, ...] = ()
    t: float | None = None

    def __post_init__(self) -> None:
        name = " ".join(str(self.name).split())
        if not name or "<" in name or ">" in name:
            raise ValueError(f"claim name must be non-empty text without '<' or '>', got {self.name!r}")
        boxes = []
        for box in self.boxes:
            values = tuple(float(v) for v in box)
            if len(values) != 4 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"claim {name!r}: a box needs 4 finite numbers, got {box!r}")
            boxes.append(values)
        t = None if self.t is None else float(self.t)
        if t is not None and not math.isfinite(t):
            raise ValueError(f"claim {name!r}: time must be finite, got {self.t!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "boxes", tuple(boxes))
        object.__setattr__(self, "t", t)

    @classmethod
    def _parsed(cls, name: str, boxes: tuple[Box, ...], t: float | None) -> "Claim":
        """A claim from values the parser has already normalised and checked (skips validation,
        which would otherwise be a fifth of the parse time). The slots are set through their
        descriptors: half the cost of `object.__setattr__`, which looks each one up by name."""
        claim = object.__new__(cls)
        _SET_NAME(claim, name)
        _SET_BOXES(claim, boxes)
        _SET_T(claim, t)
        return claim


_SET_NAME, _SET_BOXES, _SET_T = Claim.name.__set__, Claim.boxes.__set__, Claim.t.__set__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Problem:
    """Something wrong in a trace: a code from PROBLEMS, a human-readable detail, a char offset."""

    code: str
    detail: str
    offset: int = -1


@dataclass(frozen=True)
class Trace:
    """The parse of one response: claims in order, every time mentioned, and the problems found.

    `think`/`answer` are the contents of those sections (None when absent); `times` holds every
    well-formed `<t>` of the reasoning, bound to a claim or not, in order of appearance.
    """

    claims: tuple[Claim, ...] = ()
    problems: tuple[Problem, ...] = ()
    times: tuple[float, ...] = ()
    think: str | None = None
    answer: str | None = None

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def problem_codes(self) -> set[str]:
        """The set of problem codes, for filter rules that reject on some codes only."""
        return {p.code for p in self.problems}


class Sections(NamedTuple):
    """The contents of the first `<think>` and `<answer>` sections (stripped), None when absent."""

    think: str | None
    answer: str | None


def _section(text: str, tag: str) -> tuple[int, int] | None:
    """(start, end) of the content of the first `<tag>…</tag>`, found with str.find (a lazy regex
    over the whole response costs several times more)."""
    opening, closing = _SECTION_TAGS[tag]
    start = text.find(opening)
    if start < 0:
        return None
    start += len(opening)
    end = text.find(closing, start)
    return (start, end) if end >= 0 else None


def split_sections(text: str) -> Sections:
    """Extract the `<think>` and `<answer>` parts of a response (the first of each)."""
    if not isinstance(text, str):
        return Sections(None, None)
    think, answer = _section(text, "think"), _section(text, "answer")
    return Sections(
        text[think[0] : think[1]].strip() if think else None, text[answer[0] : answer[1]].strip() if answer else None
    )


def parse_seconds(text: str) -> float | None:
    """The seconds written inside a `<t>` (or a span end): `12`, `12.5s`, `1:02.5`, `1:00:02`; else None."""
    m = _SECONDS.fullmatch(text)
    if m:
        return float(m.group(1))
    m = _CLOCK.fullmatch(text)
    if m:
        hours = float(m.group(1) or 0)
        return hours * 3600.0 + float(m.group(2)) * 60.0 + float(m.group(3))
    return None


def _check_tags(text: str, problems: list[Problem]) -> None:
    """Balance and nesting of all tags. The common, well-formed case is decided by one regex over a
    string of one-letter tag tokens; only a malformed sequence is walked with a stack to name what
    is wrong and where."""
    tokens = "".join(map(_TAG_TOKEN.__getitem__, _TAG_TEXT.findall(text)))
    if _WELL_FORMED_TAGS.fullmatch(tokens):
        return
    stack: list[tuple[str, int]] = []
    sections: set[str] = set()
    for m in _TAG.finditer(text):
        closing, tag, pos = m.group(1), m.group(2), m.start()
        if not closing:
            if tag in _EVIDENCE_TAGS:
                if stack and stack[-1][0] in _EVIDENCE_TAGS:
                    problems.append(Problem("nested_tag", f"<{tag}> inside <{stack[-1][0]}>", pos))
            else:
                if stack:
                    problems.append(Problem("nested_tag", f"<{tag}> inside <{stack[-1][0]}>", pos))
                if tag in sections:
                    problems.append(Problem("duplicate_section", f"a second <{tag}> section", pos))
                sections.add(tag)
            stack.append((tag, pos))
        elif stack and stack[-1][0] == tag:
            stack.pop()
        elif any(open_tag == tag for open_tag, _ in stack):
            while stack[-1][0] != tag:
                open_tag, open_pos = stack.pop()
                problems.append(Problem("unbalanced_tag", f"<{open_tag}> is never closed", open_pos))
            stack.pop()
        else:
            problems.append(Problem("unbalanced_tag", f"</{tag}> closes nothing", pos))
    for open_tag, open_pos in stack:
        problems.append(Problem("unbalanced_tag", f"<{open_tag}> is never closed", open_pos))


def _box_values(content: str, offset: int, problems: list[Problem]) -> list[float] | None:
    if _BOX_PLAIN.fullmatch(content):  # `[0.412,0.205,0.587,0.931]`: split and float() is 2x a full regex
        parts = content[1:-1].split(",")
        if len(parts) == 4:
            try:
                return [float(p) for p in parts]
            except ValueError:
                pass
    m = _BOX4.fullmatch(content)
    if m:
        return [float(v) for v in m.groups()]
    tokens = [tok for tok in _BOX_SPLIT.split(content) if tok]
    bad = [tok for tok in tokens if not _NUM_TOKEN.fullmatch(tok)]
    if bad:
        problems.append(Problem("box_not_numeric", f"<box>{content}</box>: {bad[0]!r} is not a number", offset))
    else:
        problems.append(Problem("box_arity", f"<box>{content}</box> has {len(tokens)} values, not 4", offset))
    return None


def _reasoning_part(text: str) -> tuple[str, int, Sections]:
    """The text claims are read from, its offset in `text` (for problem offsets), and the sections."""
    think, answer = _section(text, "think"), _section(text, "answer")
    sections = Sections(
        text[think[0] : think[1]].strip() if think else None, text[answer[0] : answer[1]].strip() if answer else None
    )
    if think is not None:
        return text[think[0] : think[1]], think[0], sections
    if answer is not None:
        return _ANSWER.sub(lambda a: " " * len(a.group(0)), text), 0, sections
    return text, 0, sections


@dataclass
class _Scan:
    """What the regex pass finds in one text, before its boxes are converted (in a batch)."""

    sections: Sections
    problems: list[Problem] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    pending: list[tuple[str, list[int], float | None]] = field(default_factory=list)  # name, raw indices, t
    raw: list[list[float]] = field(default_factory=list)
    raw_offsets: list[int] = field(default_factory=list)


def _scan(text: str) -> _Scan:
    problems: list[Problem] = []
    _check_tags(text, problems)
    body, base, sections = _reasoning_part(text)
    scan = _Scan(sections, problems)

    time_at: dict[int, float] = {}
    for m in _TIME_TAG.finditer(body):
        value = parse_seconds(m.group(1))
        if value is None:
            problems.append(Problem("time_not_numeric", f"<t>{m.group(1)}</t>", base + m.start()))
        elif not math.isfinite(value) or value < 0:
            problems.append(Problem("time_out_of_range", f"<t>{m.group(1)}</t> is {value} s", base + m.start()))
        else:
            scan.times.append(value)
            time_at[m.start(1)] = value

    claimed_boxes: set[int] = set()
    for m in _CLAIM.finditer(body):
        pos = base + m.start()
        name = " ".join(m.group("name").split())
        t = time_at.get(m.start("t")) if m.group("t") is not None else None
        boxes_at = m.start("boxes")
        box_matches = list(_BOX_IN.finditer(m.group("boxes")))
        claimed_boxes.update(boxes_at + bm.start() for bm in box_matches)
        if not name:
            problems.append(Problem("empty_object_name", m.group(0)[:80], pos))
            continue
        if not box_matches and m.group("t") is None:
            problems.append(Problem("ungrounded_object", f"<obj>{name}</obj>", pos))
            continue
        indices = []
        for bm in box_matches:
            offset = base + boxes_at + bm.start()
            values = _box_values(bm.group(1), offset, problems)
            if values is not None:
                indices.append(len(scan.raw))
                scan.raw.append(values)
                scan.raw_offsets.append(offset)
        scan.pending.append((name, indices, t))

    if body.count("<box>") > len(claimed_boxes):
        for bm in _BOX_IN.finditer(body):
            if bm.start() not in claimed_boxes:
                problems.append(Problem("box_without_object", bm.group(0), base + bm.start()))
    return scan


def _finish(scan: _Scan, values: list[list[float]], inside: list[bool], finite: list[bool], frame: BoxFrame) -> Trace:
    problems = scan.problems
    all_finite = False not in finite
    if not all_finite or False in inside:
        for i, (ok_finite, ok_inside) in enumerate(zip(finite, inside)):
            if not ok_finite:
                problems.append(Problem("box_not_finite", f"{scan.raw[i]} in frame {frame.name}", scan.raw_offsets[i]))
            elif not ok_inside:
                detail = f"{scan.raw[i]} in frame {frame.name} is {values[i]} canonical"
                problems.append(Problem("box_out_of_range", detail, scan.raw_offsets[i]))
    claims = []
    for name, indices, t in scan.pending:
        boxes = tuple(tuple(values[i]) for i in indices if all_finite or finite[i])
        if boxes or t is not None:
            claims.append(Claim._parsed(name, boxes, t))  # type: ignore[arg-type]
    if problems:
        problems.sort(key=lambda p: p.offset)
    return Trace(tuple(claims), tuple(problems), tuple(scan.times), scan.sections.think, scan.sections.answer)


def _parse_general(texts: Sequence[Any], frame: BoxFrame) -> list[Trace]:
    """The general path: any text, every problem named with its offset; all boxes of `texts` are
    converted in one numpy call (the per-call cost of numpy dominates a single trace's few boxes)."""
    scans = []
    for text in texts:
        if isinstance(text, str):
            scans.append(_scan(text))
        else:
            scans.append(_Scan(Sections(None, None), [Problem("not_text", f"got {type(text).__name__}")]))
    raw = [box for scan in scans for box in scan.raw]
    canonical = frame.to_canonical(np.asarray(raw, dtype=np.float64).reshape(-1, 4))
    values = canonical.tolist()
    inside = is_inside(canonical).tolist()
    finite = is_finite(canonical).tolist()
    traces, k = [], 0
    for scan in scans:
        n = len(scan.raw)
        traces.append(_finish(scan, values[k : k + n], inside[k : k + n], finite[k : k + n], frame))
        k += n
    return traces


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


def render_claim(claim: Claim, frame: BoxFrame = CANONICAL) -> str:
    """One claim as text: `<obj>name</obj><box>[…]</box>…at<t>12.5</t>s` with boxes written in `frame`."""
    parts = [f"<obj>{claim.name}</obj>"]
    if claim.boxes:
        written = frame.from_canonical(np.asarray(claim.boxes, dtype=np.float64))
        parts.extend(f"<box>{frame.format_box(box)}</box>" for box in written)
    if claim.t is not None:
        parts.append(f"at<t>{frame.format_time(claim.t)}</t>s")
    return "".join(parts)


def render_claims(claims: Iterable[Claim], frame: BoxFrame = CANONICAL, sep: str = " ") -> str:
    """Claims as text in `frame` (the model's frame for training targets), joined by `sep`.

    `parse_trace(render_claims(cs, f), f).claims == cs` up to `f.tolerance()` on boxes and
    `0.5 * 10**-f.time_decimals` on times.
    """
    return sep.join(render_claim(c, frame) for c in claims)


# --- answers -----------------------------------------------------------------------------------------


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


_BARE_BOX = re.compile(rf"([\[(]\s*{_NUM}(?:{_SEP}{_NUM}){{3}}\s*[\])])")
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


# --- moving text between frames ---------------------------------------------------------------------

# A `<box>` element (group 1: its content) or, outside any, a bracketed list of 4 numbers (group 2).
_REFRAMABLE = re.compile(f"{_BOX_IN.pattern}|{_BARE_BOX.pattern}")


def reframe_text(text: str, src: BoxFrame, dst: BoxFrame) -> str:
    """`text` with every box moved from frame `src` to frame `dst`; all else kept verbatim.

    Rewritten, with `dst.format_box`: the content of every well-formed `<box>…</box>` (4 numbers, in
    the reasoning or the answer) and every bracketed list of exactly 4 numbers outside a `<box>`
    element (`[0.1, 0.2, 0.3, 0.4]` or `(…)`: the bare box `parse_box_answer` reads, which also
    covers the boxes of V-STaR's JSON answers). Left untouched: malformed boxes (≠ 4 numbers,
    non-numeric, non-finite before or after conversion, or anything beside the numbers inside
    `<box>`), lists inside a malformed `<box>` element, 2-number spans such as `[3.5, 7.0]`, and
    `<t>` times (seconds do not depend on the frame). So a trace written in one frame is parsed in
    the other with the same claims, up to `dst.tolerance()`. Training renders canonical targets in
    the model's frame with it; align reads traces of models that ground in pixels or 0-1000.

    With `src == dst` the text is returned as it is (no re-rounding); a non-string (a null in a
    column) is returned as it is too. Never raises on any text.
    """
    if not isinstance(text, str) or src == dst:
        return text
    spans: list[tuple[int, int]] = []
    raw: list[list[float]] = []
    for m in _REFRAMABLE.finditer(text):
        group = 1 if m.group(1) is not None else 2
        inner = _BOX4.fullmatch(m.group(group))
        if inner:
            spans.append(m.span(group))
            raw.append([float(v) for v in inner.groups()])
    if not raw:
        return text
    with np.errstate(all="ignore"):  # overflowing values become inf and are left as written
        moved = dst.from_canonical(src.to_canonical(np.asarray(raw, dtype=np.float64)))
    finite = np.isfinite(moved).all(axis=1) & np.isfinite(np.asarray(raw)).all(axis=1)
    pieces: list[str] = []
    last = 0
    for (start, end), box, ok in zip(spans, moved, finite.tolist()):
        if ok:
            pieces += [text[last:start], dst.format_box(box)]
            last = end
    pieces.append(text[last:])
    return "".join(pieces)


# --- format ------------------------------------------------------------------------------------------

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


def claims_by_time(claims: Sequence[Claim]) -> dict[float, list[Box]]:
    """Boxes of timed claims grouped by their time (V-STaR's spatial answers are keyed this way)."""
    grouped: dict[float, list[Box]] = {}
    for claim in claims:
        if claim.t is not None and claim.boxes:
            grouped.setdefault(claim.t, []).extend(claim.boxes)
    return grouped
