"""The grammar proper: claims, traces and problems; the general parse (every problem named with its
offset); rendering claims. The package docstring (`stages.lib.evidence`) states what is accepted."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

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
_BOX_IN = re.compile(r"<box>([^<>]*)</box>")
_TIME_TAG = re.compile(r"<t>([^<>]*)</t>")
_EVIDENCE_TAGS = frozenset(("obj", "box", "t"))
_SECTION_TAGS = {tag: (f"<{tag}>", f"</{tag}>") for tag in ("think", "answer")}
_BARE_BOX = re.compile(rf"([\[(]\s*{_NUM}(?:{_SEP}{_NUM}){{3}}\s*[\])])")


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



def claims_by_time(claims: Sequence[Claim]) -> dict[float, list[Box]]:
    """Boxes of timed claims grouped by their time (V-STaR's spatial answers are keyed this way)."""
    grouped: dict[float, list[Box]] = {}
    for claim in claims:
        if claim.t is not None and claim.boxes:
            grouped.setdefault(claim.t, []).extend(claim.boxes)
    return grouped
