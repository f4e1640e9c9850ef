"""The evidence grammar: what models really write, every named problem, answers, format, round trips."""
from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib import geometry as g
from stages.lib.evidence import (
    EVIDENCE_REQUIREMENTS,
    PROBLEMS,
    Claim,
    check_format,
    claims_by_time,
    format_score,
    parse_box_answer,
    parse_boxes_by_time,
    parse_option_letter,
    parse_seconds,
    parse_time_span,
    parse_trace,
    parse_traces,
    reframe_text,
    render_claims,
    split_sections,
)
from stages.lib.evidence._fast import _scan_clean
from stages.lib.evidence._grammar import _parse_general

PAPER = (
    "<think>The <obj>man in black</obj><box>[0.412,0.205,0.587,0.931]</box>at<t>12.5</t>s lifts a camera"
    "</think>\n<answer>B</answer>"
)


def test_paper_example() -> None:
    trace = parse_trace(PAPER)
    assert trace.ok
    assert trace.claims == (Claim("man in black", ((0.412, 0.205, 0.587, 0.931),), 12.5),)
    assert trace.times == (12.5,)
    assert trace.answer == "B" and trace.think.startswith("The <obj>")


@pytest.mark.parametrize(
    "text",
    [
        "<obj>dog</obj><box>[0.1,0.2,0.3,0.4]</box>at<t>3</t>s",
        "<obj> dog </obj> <box>[ 0.1 , 0.2 , 0.3 , 0.4 ]</box> at <t>3</t> s",
        "<obj>dog</obj><box>(0.1, 0.2, 0.3, 0.4)</box>at <t>3.0</t>",
        "<obj>dog</obj><box>0.1 0.2 0.3 0.4</box> @ <t>3s</t>",
        "<obj>dog</obj>, <box>[1e-1;0.2;.3;0.4]</box>,<t>0:03</t>s",
        "Here: <think>see <obj>dog</obj><box>[0.1,0.2,0.3,0.4]</box>at<t>3</t>s.</think><answer>A</answer>",
    ],
)
def test_tolerant_forms(text: str) -> None:
    trace = parse_trace(text)
    assert trace.claims == (Claim("dog", ((0.1, 0.2, 0.3, 0.4),), 3.0),), trace
    assert trace.ok, trace.problems


def test_several_boxes_ints_and_frames() -> None:
    text = "<obj>two people</obj><box>[64,36,320,180]</box><box>[0,0,640,360]</box>at<t>1:02.5</t>s"
    trace = parse_trace(text, g.pixel_frame(640, 360))
    assert trace.ok
    (claim,) = trace.claims
    assert claim.boxes == ((0.1, 0.1, 0.5, 0.5), (0.0, 0.0, 1.0, 1.0))
    assert claim.t == 62.5
    # The same numbers read as canonical are out of range: kept, and reported.
    trace = parse_trace(text)
    assert [p.code for p in trace.problems] == ["box_out_of_range", "box_out_of_range"]
    assert len(trace.claims[0].boxes) == 2


def test_claims_without_box_or_time() -> None:
    trace = parse_trace("the <obj>cup</obj><box>[0,0,0.5,0.5]</box> falls; <obj>door</obj> at <t>4</t>s opens")
    assert trace.claims == (Claim("cup", ((0, 0, 0.5, 0.5),)), Claim("door", (), 4.0))
    # A time separated from the boxes by other words is not bound to the claim.
    trace = parse_trace("<obj>cup</obj><box>[0,0,0.5,0.5]</box> falls at <t>2</t>s")
    assert trace.claims == (Claim("cup", ((0, 0, 0.5, 0.5),)),) and trace.times == (2.0,)


@pytest.mark.parametrize(
    ("text", "codes"),
    [
        ("<obj>a</obj><box>[0,0,1,1]</box>at<t>1</t>s <obj>b", ["unbalanced_tag"]),
        ("<obj>a</obj><box>[0,0,1,1]</box></t>", ["unbalanced_tag"]),
        ("<obj>a<box>[0,0,1,1]</box></obj>", ["nested_tag", "box_without_object"]),
        ("<think>x</think><think>y</think><answer>A</answer>", ["duplicate_section"]),
        ("<answer><think>x</think></answer>", ["nested_tag"]),
        ("<obj></obj><box>[0,0,1,1]</box>", ["empty_object_name"]),
        ("<obj>a</obj> is here", ["ungrounded_object"]),
        ("a <box>[0,0,1,1]</box> here", ["box_without_object"]),
        ("<obj>a</obj><box>[0,0,1]</box>at<t>1</t>s", ["box_arity"]),
        ("<obj>a</obj><box>[0,0,1,1,1]</box>", ["box_arity"]),
        ("<obj>a</obj><box>[x1,0,1,1]</box>", ["box_not_numeric"]),
        ("<obj>a</obj><box>[0,0,1e400,1]</box>", ["box_not_finite"]),
        ("<obj>a</obj><box>[0,0,1.2,1]</box>", ["box_out_of_range"]),
        ("<obj>a</obj><box>[0,0,1,1]</box>at<t>soon</t>s", ["time_not_numeric"]),
        ("<obj>a</obj><box>[0,0,1,1]</box>at<t>-2</t>s", ["time_out_of_range"]),
    ],
)
def test_named_problems(text: str, codes: list[str]) -> None:
    trace = parse_trace(text)
    assert [p.code for p in trace.problems] == codes
    assert all(p.code in PROBLEMS for p in trace.problems)
    assert all(0 <= p.offset < len(text) for p in trace.problems)


def test_bad_parts_are_dropped_and_the_rest_kept() -> None:
    trace = parse_trace("<obj>a</obj><box>[0,0,1]</box><box>[0,0,0.5,0.5]</box>at<t>soon</t>s")
    assert trace.claims == (Claim("a", ((0, 0, 0.5, 0.5),)),)
    trace = parse_trace("<obj>a</obj><box>[0,0,1]</box>at<t>2</t>s")
    assert trace.claims == (Claim("a", (), 2.0),)
    trace = parse_trace("<obj>a</obj><box>[0,0,1]</box>")
    assert trace.claims == () and trace.problem_codes() == {"box_arity"}


def test_claims_come_from_think_only_when_there_is_one() -> None:
    text = "<think><obj>a</obj>at<t>1</t>s</think><answer><obj>b</obj><box>[0,0,1,1]</box></answer>"
    assert [c.name for c in parse_trace(text).claims] == ["a"]
    text = "<obj>a</obj>at<t>1</t>s <answer><obj>b</obj><box>[0,0,1,1]</box></answer>"
    assert [c.name for c in parse_trace(text).claims] == ["a"]


def test_batch_equals_one_by_one() -> None:
    texts = [PAPER, None, "", "<obj>a</obj><box>[0,0,2,1]</box>", "<obj>b</obj><box>[0,0,1e400,1]</box>at<t>1</t>s", PAPER]
    assert parse_traces(texts) == [parse_trace(t) for t in texts]  # type: ignore[arg-type]
    frame = g.pixel_frame(640, 360)
    assert parse_traces(texts, frame) == [parse_trace(t, frame) for t in texts]  # type: ignore[arg-type]
    assert parse_traces([]) == []


def test_out_of_range_is_judged_in_the_callers_frame() -> None:
    text = "<obj>a</obj><box>[0,0,650,360]</box>"
    assert parse_trace(text, g.pixel_frame(640, 360)).problem_codes() == {"box_out_of_range"}
    assert parse_trace(text, g.pixel_frame(700, 360)).ok


def test_not_text() -> None:
    assert parse_trace(None).problem_codes() == {"not_text"}  # type: ignore[arg-type]
    assert split_sections(None) == (None, None)  # type: ignore[arg-type]


def test_claim_validation() -> None:
    assert Claim("  man \n in  black ", [[0, 0, 1, 1]], 3).name == "man in black"
    with pytest.raises(ValueError, match="non-empty"):
        Claim(" ", [])
    with pytest.raises(ValueError, match="non-empty"):
        Claim("a<b", [])
    with pytest.raises(ValueError, match="4 finite"):
        Claim("a", [[0, 0, 1]])
    with pytest.raises(ValueError, match="4 finite"):
        Claim("a", [[0, 0, 1, float("nan")]])
    with pytest.raises(ValueError, match="finite"):
        Claim("a", [], float("inf"))


def test_render_in_model_frames() -> None:
    claims = [Claim("man", [(0.5, 0.5, 1.0, 1.0)], 12.5), Claim("door", [], 3.0)]
    assert render_claims(claims) == "<obj>man</obj><box>[0.500,0.500,1.000,1.000]</box>at<t>12.5</t>s <obj>door</obj>at<t>3</t>s"
    qwen = g.qwen25vl_frame(640, 360)
    text = render_claims(claims, qwen)
    assert text.startswith("<obj>man</obj><box>[322,182,644,364]</box>at<t>12.5</t>s")
    assert parse_trace(text, qwen).claims == tuple(claims)


def test_seconds() -> None:
    assert parse_seconds("12") == 12.0 and parse_seconds(" 12.5 s") == 12.5 and parse_seconds("3 seconds") == 3.0
    assert parse_seconds("1:02") == 62.0 and parse_seconds("1:00:02.5") == 3602.5
    assert parse_seconds("soon") is None and parse_seconds("") is None


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("[B]", "B"), ("B)", "B"), (" B: ", "B"),
        ("B. The red car", "B"), ("(C) the man", "C"), ("<think>…</think><answer>(D)</answer>", "D"),
        ("Correct Option: C", "C"), ("<t>1</t>s to <t>2</t>s\nCorrect Option: A", "A"), ("The answer is B.", "B"),
        ("A man walks", None), ("b", None), ("", None), ("none of them", None),
    ],
)
def test_option_letter(text: str, letter: str | None) -> None:
    assert parse_option_letter(text) == letter


def test_option_letter_range() -> None:
    assert parse_option_letter("D", num_options=4) == "D"
    assert parse_option_letter("E", num_options=4) is None


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("<t>3.5</t>s to <t>7</t>s", (3.5, 7.0)),
        ("<answer>From <t>3.5</t> - <t>7</t>s.</answer>", (3.5, 7.0)),
        ("[3.5, 7]", (3.5, 7.0)),
        ("(3.5s, 7s)", (3.5, 7.0)),
        ("between 3.5s to 7s", (3.5, 7.0)),
        ("[0:03, 1:02.5]", (3.0, 62.5)),
        ("[7, 3]", (7.0, 3.0)),  # reversed is returned as written
        ("at 3 seconds", None),
        ("", None),
    ],
)
def test_time_span(text: str, span: tuple[float, float] | None) -> None:
    assert parse_time_span(text) == span


def test_box_answer() -> None:
    assert parse_box_answer("<answer><box>[0.1,0.2,0.3,0.4]</box></answer>") == (0.1, 0.2, 0.3, 0.4)
    assert parse_box_answer("It is at [64, 36, 320, 180].", g.pixel_frame(640, 360)) == (0.1, 0.1, 0.5, 0.5)
    assert parse_box_answer("<box>[1,2]</box> then [0, 0, 1, 1]") == (0.0, 0.0, 1.0, 1.0)
    assert parse_box_answer("no box") is None


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        ('{"2": [0, 0, 500, 500], "3": [500, 500, 1000, 750]}', {2.0: [(0, 0, 0.5, 0.5)], 3.0: [(0.5, 0.5, 1, 0.75)]}),
        ("<answer>{'2': [0, 0, 500, 500]}</answer>", {2.0: [(0, 0, 0.5, 0.5)]}),  # single quotes
        ('```json\n{"2": [[0,0,250,500],[0,0,500,500]], "3": [0, 0, 500, 500]\n```',  # unclosed brace
         {2.0: [(0, 0, 0.25, 0.5), (0, 0, 0.5, 0.5)], 3.0: [(0, 0, 0.5, 0.5)]}),
        ('{"2": [0, 0, 500, 500], "3": [0, 0, 1000', {2.0: [(0, 0, 0.5, 0.5)]}),  # cut short: partial box dropped
        ('[{"2": [0, 0, 500, 500]}, {"4.5": [0, 0, 1000, 1000]}]', {2.0: [(0, 0, 0.5, 0.5)], 4.5: [(0, 0, 1, 1)]}),
        ("[[2, [0, 0, 500, 500]], [3, [1, 2]]]", {2.0: [(0, 0, 0.5, 0.5)]}),  # [seconds, box] pairs
        ('{"0:03": [0, 0, 500, 500], "later": [0, 0, 1, 1], "4": [true, 0, 1, 1]}', {3.0: [(0, 0, 0.5, 0.5)]}),
        ("<answer><obj>ball</obj><box>[0,0,500,250]</box>at<t>2</t>s</answer>", {2.0: [(0, 0, 0.5, 0.25)]}),
        ('{"2": [1e400, 0, 1, 1]}', None),
        ("<answer>{}</answer>", None),
        ("the ball is in the top left", None),
        ("", None),
        (None, None),
    ],
)
def test_boxes_by_time_from_vstar_answers(text: str | None, boxes: dict[float, list] | None) -> None:
    got = parse_boxes_by_time(text, g.THOUSAND)
    if boxes is None:
        assert got is None
        return
    assert got is not None and sorted(got) == sorted(boxes)
    for t, want in boxes.items():
        assert len(got[t]) == len(want)
        assert [v for box in got[t] for v in box] == pytest.approx([float(v) for box in want for v in box])


Q = g.qwen25vl_frame(640, 360)  # 644 x 364 model input


def test_reframe_moves_every_box_and_keeps_the_prose() -> None:
    text = (
        "<think>The <obj>two people</obj><box>[0.1,0.2,0.3,0.4]</box>, <box>[ 0.5 , 0.5 , 1 , 1 ]</box> at <t>3</t>s"
        " stand from [3.5, 7.0] and <obj>dog</obj><box>0 0 1 1</box>at<t>4.5</t>s</think>"
        "<answer><box>(0, 0, 0.5, 0.5)</box></answer>"
    )
    want = (
        "<think>The <obj>two people</obj><box>[64,73,193,146]</box>, <box>[322,182,644,364]</box> at <t>3</t>s"
        " stand from [3.5, 7.0] and <obj>dog</obj><box>[0,0,644,364]</box>at<t>4.5</t>s</think>"
        "<answer><box>[0,0,322,182]</box></answer>"
    )
    assert reframe_text(text, g.CANONICAL, Q) == want
    assert parse_box_answer(want, Q) == pytest.approx((0, 0, 0.5, 0.5))


def test_reframe_bare_boxes_ints_and_json_answers() -> None:
    assert reframe_text("It is at [64, 36, 320, 180].", g.pixel_frame(640, 360), g.CANONICAL) == (
        "It is at [0.100,0.100,0.500,0.500]."
    )
    assert reframe_text('{"2": [0, 0, 500, 500], "3": [[0,0,250,500],[0,0,500,500]]}', g.THOUSAND, g.CANONICAL) == (
        '{"2": [0.000,0.000,0.500,0.500], "3": [[0.000,0.000,0.250,0.500],[0.000,0.000,0.500,0.500]]}'
    )
    # xywh source, out-of-range values moved as they are (filters judge them, not the rewriting).
    assert reframe_text("<box>[320,180,640,360]</box>", g.pixel_frame(640, 360, "xywh"), g.THOUSAND) == (
        "<box>[500,500,1500,1500]</box>"
    )


@pytest.mark.parametrize(
    "text",
    [
        "<obj>a</obj><box>[0.1,0.2]</box>",  # 2 numbers
        "<obj>a</obj><box>[0.1,0.2,0.3,0.4,0.5]</box>",  # 5 numbers
        "<obj>a</obj><box>[0.1,0.2,0.3,0.4] the left one</box>",  # words beside the numbers (list inside too)
        "<obj>a</obj><box>[x,0.2,0.3,0.4]</box> <box></box>",
        "<obj>a</obj><box>[1e400,0,1,1]</box> and [1e400, 0, 1, 1]",  # non-finite before conversion
        "<answer>[1e306, 0, 1, 1]</answer>",  # overflows in the 0-1000 frame
        "from [3.5, 7.0] to (1, 2) or [1, 2, 3] or [1, 2, 3, 4, 5]; <t>3</t>s",
        "no boxes at all",
        "",
    ],
)
def test_reframe_leaves_malformed_boxes_spans_and_prose_alone(text: str) -> None:
    assert reframe_text(text, g.CANONICAL, g.THOUSAND) == text


def test_reframe_same_frame_and_non_text_are_returned_as_they_are() -> None:
    text = "<obj>a</obj><box>[0.41234, 0.2, 0.3, 0.4]</box>"
    assert reframe_text(text, g.CANONICAL, g.make_frame("normalised")) == text
    assert reframe_text(None, g.CANONICAL, Q) is None  # type: ignore[arg-type]


def test_format_scores_follow_the_paper() -> None:
    grounded = check_format(PAPER)
    assert grounded.well_formed and grounded.num_claims_with_box_and_time == 1
    assert format_score(grounded, "spatio_temporal") == 1.0
    assert format_score(grounded, "spatial") == 1.0
    assert format_score(grounded, "temporal") == 0.5  # one time is not a span
    plain = check_format("<think>I think so</think><answer>B</answer>")
    assert format_score(plain, "spatio_temporal") == 0.5
    assert format_score(plain, "general_mcq") == 1.0
    span = check_format("<think>from <t>1</t>s to <t>4</t>s</think><answer>[1, 4]</answer>")
    assert format_score(span, "temporal") == 1.0
    for broken in ["<think>x</think>B", "<think>x<answer>B</answer>", "B", "<think><obj>a</think><answer>A</answer>"]:
        assert format_score(check_format(broken), "general_mcq") == 0.0, broken
    assert set(EVIDENCE_REQUIREMENTS) == {"spatio_temporal", "temporal", "temporal_mcq", "spatial", "general_mcq", "general_free"}
    with pytest.raises(ValueError, match="unknown task"):
        format_score(plain, "nope")


def test_claims_by_time() -> None:
    claims = [Claim("a", [(0, 0, 1, 1)], 2.0), Claim("b", [(0, 0, 0.5, 0.5)], 2.0), Claim("c", [(0, 0, 1, 1)]), Claim("d", [], 3.0)]
    assert claims_by_time(claims) == {2.0: [(0, 0, 1, 1), (0, 0, 0.5, 0.5)]}


# --- properties -----------------------------------------------------------------------------------------

names = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: bool(s.split())
)
unit = st.floats(0, 1, allow_nan=False)
boxes = st.lists(st.tuples(unit, unit, unit, unit), max_size=3)
times = st.none() | st.floats(0, 10_000, allow_nan=False)
claims_strategy = st.lists(
    st.builds(Claim, names, boxes, times).filter(lambda c: c.boxes or c.t is not None), max_size=5
)
frames = st.sampled_from(
    [g.CANONICAL, g.THOUSAND, g.pixel_frame(640, 360), g.pixel_frame(1280, 720, "xywh"), g.qwen25vl_frame(640, 480), g.normalised_cxcywh_frame()]
)


@settings(max_examples=300, deadline=None)
@given(claims=claims_strategy, frame=frames)
def test_render_then_parse_round_trips(claims: list[Claim], frame: g.BoxFrame) -> None:
    text = render_claims(claims, frame)
    trace = parse_trace(text, frame)
    assert len(trace.claims) == len(claims), (text, trace)
    box_tol = frame.tolerance() + 1e-9
    time_tol = 0.5 * 10.0 ** -frame.time_decimals + 1e-9
    for got, want in zip(trace.claims, claims):
        assert got.name == want.name
        assert len(got.boxes) == len(want.boxes)
        for gb, wb in zip(got.boxes, want.boxes):
            assert all(abs(a - b) <= box_tol for a, b in zip(gb, wb)), (gb, wb)
        assert (got.t is None) == (want.t is None)
        if want.t is not None:
            assert abs(got.t - want.t) <= time_tol
    # Only rounding can push a box a hair outside the image: nothing else may be reported.
    assert trace.problem_codes() <= {"box_out_of_range"}


bare_boxes = st.lists(st.tuples(unit, unit, unit, unit), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(claims=claims_strategy.filter(bool), answer=bare_boxes, source=st.sampled_from([(640, 360), (1920, 1080), (480, 640), (50, 30)]))
def test_reframe_round_trips_through_the_qwen_frame(claims: list[Claim], answer: list[tuple], source: tuple[int, int]) -> None:
    frame = g.qwen25vl_frame(*source)
    bare = " or ".join(g.CANONICAL.format_box(b).replace(",", ", ") for b in answer)
    text = f"<think>We see {render_claims(claims, g.CANONICAL)} from [3.5, 7.0].</think><answer>{bare}</answer>"
    there = reframe_text(text, g.CANONICAL, frame)
    back = reframe_text(there, frame, g.CANONICAL)
    # Prose, times and the span are kept verbatim; only box contents change.
    assert _without_boxes(there) == _without_boxes(back) == _without_boxes(text)
    original = parse_trace(text)
    in_frame, returned = parse_trace(there, frame), parse_trace(back)
    assert in_frame.problem_codes() <= {"box_out_of_range"} and returned.problem_codes() <= {"box_out_of_range"}
    one_way = frame.tolerance() + 1e-9
    both_ways = one_way + g.CANONICAL.tolerance()
    for parsed, tol in ((in_frame, one_way), (returned, both_ways)):
        assert [(c.name, c.t, len(c.boxes)) for c in parsed.claims] == [(c.name, c.t, len(c.boxes)) for c in original.claims]
        got = [v for c in parsed.claims for box in c.boxes for v in box]
        want = [v for c in original.claims for box in c.boxes for v in box]
        assert got == pytest.approx(want, abs=tol, rel=0)
    assert parse_box_answer(back) == pytest.approx(parse_box_answer(text), abs=both_ways, rel=0)


def _without_boxes(text: str) -> str:
    """Text with every box's numbers blanked (`<box>[…]</box>` contents and bare 4-number lists)."""
    text = re.sub(r"<box>[^<>]*</box>", "<box></box>", text)
    return re.sub(r"\[[^\[\]]*(?:,[^\[\],]*){3}\]", "[]", text)


tag_soup = st.lists(
    st.sampled_from(["<obj>", "</obj>", "<box>", "</box>", "<t>", "</t>", "<think>", "</think>", "<answer>", "</answer>",
                     "[", "]", ",", "0.5", "1e999", "-3", "at", "s", " ", "man", "1:02", "nan", "(", ")"]),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=300) | tag_soup, frame=frames)
def test_parse_never_raises(text: str, frame: g.BoxFrame) -> None:
    trace = parse_trace(text, frame)
    assert all(p.code in PROBLEMS for p in trace.problems)
    for claim in trace.claims:
        assert all(math.isfinite(v) for box in claim.boxes for v in box)
    check_format(text, frame)
    parse_option_letter(text)
    parse_time_span(text)
    parse_box_answer(text, frame)
    parse_boxes_by_time(text, frame)
    assert reframe_text(reframe_text(text, frame, g.THOUSAND), g.THOUSAND, g.THOUSAND) is not None


# The fast path (`_scan_clean`) must agree with the general path on every text, clean or not. The pieces
# are chosen to sit on its edges: plain and non-plain boxes and times, stray and section tags, empty
# names, separators, out-of-range and overflowing boxes, Unicode digits.
edge_pieces = st.sampled_from([
    "<obj>", "</obj>", "<box>", "</box>", "<t>", "</t>", "<think>", "</think>", "<answer>", "</answer>",
    "<obj>man</obj>", "<obj> a  b </obj>", "<obj> </obj>", "<obj></obj>", "<box>[0.1,0.2,0.3,0.4]</box>",
    "<box>[0,0,1,1]</box>", "<box>[1,2,640,360]</box>", "<box>[0.1, 0.2, 0.3, 0.4]</box>", "<box>[1e999,0,1,1]</box>",
    "<box>[.5,+.5,1.,1e-1]</box>", "<box>[1,,2,3]</box>", "<box>[1-,2,3,4]</box>", "<box>[nan,0,1,1]</box>",
    "<box>(1,2,3,4)</box>", "<box>[1,2,3]</box>", "<box>[-0.0,2e0,3,4]</box>", "<t>12.5</t>", "<t>3</t>", "<t>.5</t>",
    "<t>12.</t>", "<t>1:02</t>", "<t>2s</t>", "<t>-1</t>", "<t></t>", "<t>١٢</t>", "<t>1e3</t>", "<t>" + "9" * 400 + "</t>",
    "at", "@", "s", " ", ",", "\n", "B", "man", "[0.1,0.2,0.3,0.4]",
])
edge_texts = st.lists(edge_pieces, max_size=30).map("".join)


@settings(max_examples=1000, deadline=None)
@given(texts=st.lists(edge_texts | st.text(max_size=80), max_size=6), frame=frames)
def test_fast_path_equals_general_path(texts: list[str], frame: g.BoxFrame) -> None:
    assert parse_traces(texts, frame) == _parse_general(texts, frame)


@settings(max_examples=100, deadline=None)
@given(claims=claims_strategy, frame=frames)
def test_rendered_responses_take_the_fast_path(claims: list[Claim], frame: g.BoxFrame) -> None:
    text = f"<think>So {render_claims(claims, frame)}.</think><answer>B</answer>"
    assert _scan_clean(text) is not None
    assert parse_traces([text], frame) == _parse_general([text], frame)
