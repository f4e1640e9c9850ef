"""Moving the boxes of a text from one frame to another, keeping every other character."""
from __future__ import annotations

import re

import numpy as np

from stages.lib.evidence._grammar import _BARE_BOX, _BOX4, _BOX_IN
from stages.lib.geometry import BoxFrame

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
