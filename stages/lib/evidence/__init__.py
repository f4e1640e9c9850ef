"""The evidence grammar: parse and render grounded reasoning traces, parse answers, check format.

A grounded trace names *what*, *where* and *when*:

    <think>The <obj>man in black</obj><box>[0.412,0.205,0.587,0.931]</box>at<t>12.5</t>s lifts ...</think>
    <answer>B</answer>

This is the only package that reads or writes these tags; the annotator, align, filter, the RL rewards
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

The package splits the grammar (`_grammar`: claims, traces, the general parse that names every
problem, rendering), the fast path for clean responses (`_fast`), reading answers (`_answers`),
moving boxes between frames (`_reframe`) and the format checks of the format reward (`_format`);
callers import this package only.
"""
from __future__ import annotations

from stages.lib.evidence._answers import (
    BOX_ANSWER_PATTERNS,
    SPAN_PATTERNS,
    answer_text,
    parse_box_answer,
    parse_boxes_by_time,
    parse_option_letter,
    parse_time_span,
)
from stages.lib.evidence._fast import parse_trace, parse_traces
from stages.lib.evidence._format import EVIDENCE_REQUIREMENTS, FormatCheck, check_format, format_score
from stages.lib.evidence._grammar import (
    PROBLEMS,
    Box,
    Claim,
    Problem,
    Sections,
    Trace,
    claims_by_time,
    parse_seconds,
    render_claim,
    render_claims,
    split_sections,
)
from stages.lib.evidence._reframe import reframe_text

__all__ = [
    "BOX_ANSWER_PATTERNS", "EVIDENCE_REQUIREMENTS", "PROBLEMS", "SPAN_PATTERNS", "Box", "Claim", "FormatCheck",
    "Problem", "Sections", "Trace", "answer_text", "check_format", "claims_by_time", "format_score",
    "parse_box_answer", "parse_boxes_by_time", "parse_option_letter", "parse_seconds", "parse_time_span",
    "parse_trace", "parse_traces", "reframe_text", "render_claim", "render_claims", "split_sections",
]
