"""The one answer scorer (stages.lib.answers): the kind comes from the record's answer, not its task."""
from __future__ import annotations

import pytest

from stages.lib.answers import answer_kind, rouge_score, score_answer
from stages.lib.geometry import BoxFrame

CAPTION = "an adult wearing a black hat uses a camera."


@pytest.mark.parametrize("task, answer, options, span, kind", [
    # a VidSTG question answered by a caption: free text, although the task is spatio-temporal
    ("spatio_temporal", CAPTION, None, [3.47, 12.98], "text"),
    # released spatio-temporal QA: free-form text, no span
    ("spatio_temporal", "The man puts the cup on the table.", None, None, "text"),
    # a declarative VidSTG sentence carries only the span
    ("spatio_temporal", None, None, [3.47, 12.98], "span"),
    ("temporal", "[3.47, 12.98]", None, None, "span"),
    ("temporal", "<t>3.2</t>s to <t>5.0</t>s", None, None, "span"),
    ("temporal", "From 3.2 s to 5 s.", None, None, "span"),
    # released temporal MCQ: the letter, then the span
    ("temporal_mcq", "B\n[3.2, 5.0]", ["A. before", "B. during"], None, "option_span"),
    ("temporal_mcq", "B", ["A. before", "B. during"], None, "option"),
    ("general_mcq", "(C)", ["A", "B", "C"], None, "option"),
    ("spatial", "[0.1, 0.2, 0.3, 0.4]", None, None, "box"),
    ("spatial", "<box>[0.1,0.2,0.3,0.4]</box>", None, None, "box"),
    ("spatial", "<obj>dog</obj><box>[0.1,0.2,0.3,0.4]</box>", None, None, "box"),  # the released visual QA
    # numbers inside a sentence do not make a span
    ("general_free", "There are 3 to 5 people at the table.", None, None, "text"),
    ("general_free", None, None, None, "text"),
])
def test_kind_is_read_from_the_answer(task, answer, options, span, kind):
    assert answer_kind(task, answer, options, span) == kind


@pytest.mark.parametrize("task, answer, options, span", [
    ("spatio_temporal", CAPTION, None, [3.47, 12.98]),
    ("spatio_temporal", None, None, [3.47, 12.98]),
    ("temporal", "[3.47, 12.98]", None, None),
    ("temporal_mcq", "B\n[3.2, 5.0]", ["A. before", "B. during"], None),
    ("general_mcq", "C", ["A", "B", "C"], None),
    ("spatial", "[0.1, 0.2, 0.3, 0.4]", None, None),
])
def test_a_records_own_answer_scores_full(task, answer, options, span):
    own = answer if answer is not None else f"[{span[0]}, {span[1]}]"
    assert score_answer(f"<think>x</think><answer>{own}</answer>", task=task, answer=answer, options=options,
                        answer_span=span) == pytest.approx(1.0)


def test_temporal_mcq_is_letter_and_tiou():
    truth = dict(task="temporal_mcq", answer="B\n[2.0, 4.0]", options=["A. x", "B. y"])
    # the released spelling: "Correct Option: B" and the span as <t> tags
    assert score_answer("Correct Option: B <t>2.0</t>s to <t>4.0</t>s", **truth) == 1.0
    assert score_answer("B\n[3.0, 4.0]", **truth) == pytest.approx((1.0 + 0.5) / 2)
    assert score_answer("A\n[2.0, 4.0]", **truth) == pytest.approx(0.5)
    assert score_answer("B", **truth) == pytest.approx(0.5)


def test_text_score_is_the_released_rouge_mean():
    # mean of ROUGE-1, ROUGE-2 and ROUGE-L F1: "a man runs" vs "a man walks" -> (2/3 + 1/2 + 2/3) / 3
    assert rouge_score("a man runs", "a man walks") == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert score_answer("", task="general_free", answer="a man runs") == 0.0


def test_box_answers_are_read_in_the_models_frame():
    frame = BoxFrame("pixels", 200.0, 100.0, "xyxy", decimals=0)
    assert score_answer("[20, 20, 60, 40]", task="spatial", answer="[0.1, 0.2, 0.3, 0.4]", frame=frame) == pytest.approx(1.0)


def test_no_ground_truth_is_none_and_a_missing_prediction_is_zero():
    assert score_answer("B", task="general_mcq", answer=None, options=["A", "B"]) is None
    assert score_answer(None, task="temporal", answer="[1, 2]") == 0.0
