"""`align`: parse, snap to sampled frames, one-to-one matching against ground truth, answer scores."""
from __future__ import annotations

import pytest

from pipeline.testing import unit_context
from stages.align import AlignStage, align_record
from stages.lib.schema import RECORD_SCHEMA, SCORES, to_table
from stages.lib.truth import name_agrees, snap
from tests.record_factory import SQUARE_BOX, circle_box, make_record

import numpy as np


def _box(b):
    return "[" + ",".join(f"{v:.3f}" for v in b) + "]"


def _response(think: str, answer: str = "[0.0, 5.0]") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def test_snap_picks_the_nearest_sampled_frame():
    frames = np.array([0.0, 0.5, 1.0, 1.5])
    assert snap([0.2, 0.26, 0.75, 9.0, -1.0], frames).tolist() == [0.0, 0.5, 0.5, 1.5, 0.0]
    assert np.isnan(snap([1.0], np.array([]))).all()


def test_exact_claims_score_one_and_times_snap():
    think = (f"The <obj>red circle</obj><box>{_box(circle_box(2.0))}</box>at<t>2.1</t>s moves right while "
             f"the <obj>blue square</obj><box>{_box(SQUARE_BOX)}</box> at <t>2</t>s stays.")
    rec = make_record(task="spatio_temporal", answer=None, answer_span=[0.0, 5.0], response=_response(think, "[0.0, 5.9]"))
    s = align_record(rec)
    assert s["format_ok"] and s["problems"] == []
    assert s["num_claims"] == 2 and s["num_matched"] == 2
    circle, square = s["claims"]
    assert circle["t_snapped"] == 2.0 and circle["dt"] == pytest.approx(-0.1)
    assert circle["gt_name"] == "red circle" and circle["iou"] == pytest.approx(1.0, abs=1e-3)
    assert square["gt_name"] == "blue square" and square["iou"] == pytest.approx(1.0)
    assert s["min_iou"] == pytest.approx(1.0, abs=1e-3)
    assert s["times"] == [2.1, 2.0]
    assert s["answer_pred"] == "[0.0, 5.9]"
    assert s["answer_score"] == pytest.approx(5.0 / 5.9) and s["answer_ok"] is True


def test_ground_truth_is_taken_at_the_snapped_time():
    # the circle moves 0.1 per second: a box drawn where it is at 3.0 s, claimed at 3.2 s (snaps to 3.0)
    think = f"<obj>red circle</obj><box>{_box(circle_box(3.0))}</box>at<t>3.2</t>s"
    s = align_record(make_record(response=_response(think)))
    assert s["claims"][0]["t_snapped"] == 3.0 and s["claims"][0]["iou"] == pytest.approx(1.0, abs=1e-3)
    # the same box claimed at 1.0 s overlaps the circle's position there by one third of the union
    think = f"<obj>red circle</obj><box>{_box(circle_box(3.0))}</box>at<t>1.0</t>s"
    s = align_record(make_record(response=_response(think)))
    assert s["claims"][0]["iou"] == pytest.approx(0.0, abs=1e-9)  # moved 0.2: boxes only touch


def test_matching_is_one_to_one_but_a_repeated_claim_keeps_its_score():
    shifted = circle_box(2.0)
    shifted = [shifted[0] + 0.05, shifted[1], shifted[2] + 0.05, shifted[3]]
    think = (f"<obj>red circle</obj><box>{_box(circle_box(2.0))}</box>at<t>2</t>s and again "
             f"<obj>red circle</obj><box>{_box(circle_box(2.0))}</box>at<t>2</t>s, then a second "
             f"<obj>red circle</obj><box>{_box(shifted)}</box>at<t>2</t>s")
    s = align_record(make_record(response=_response(think)))
    first, again, second = s["claims"]
    assert first["iou"] == again["iou"] == pytest.approx(1.0, abs=1e-3)
    # only one red circle exists: the shifted box cannot take it too, and it does not touch the square
    assert second["gt_name"] is None and second["iou"] == 0.0
    assert s["num_matched"] == 2 and s["min_iou"] == 0.0


def test_names_break_ties_between_overlapping_objects():
    # two objects at the same place: the names decide which ground truth each claim is matched to
    kf = [{"t_s": 1.0, "objects": [{"name": "dog", "box": [0.1, 0.1, 0.5, 0.5]},
                                   {"name": "cat", "box": [0.1, 0.1, 0.5, 0.52]}]}]
    think = "<obj>the cat</obj><box>[0.1,0.1,0.5,0.5]</box>at<t>1</t>s near <obj>a dog</obj><box>[0.1,0.1,0.5,0.52]</box>at<t>1</t>s"
    s = align_record(make_record(ground_truth=None, key_frames=kf, response=_response(think)))
    assert [c["gt_name"] for c in s["claims"]] == ["cat", "dog"]
    s = align_record(make_record(ground_truth=None, key_frames=kf, response=_response(think)), AlignStage.Config(name_weight=0.0))
    assert [c["gt_name"] for c in s["claims"]] == ["dog", "cat"]
    assert name_agrees("the big red circle", "red circle") and not name_agrees("circle", "red circle")


def test_untimed_claims_are_checked_at_the_single_key_frame():
    think = f"The <obj>blue square</obj><box>{_box(SQUARE_BOX)}</box> is in the corner."
    s = align_record(make_record(task="spatial", ground_truth=None, response=_response(think, _box(SQUARE_BOX)),
                                 answer=f"<box>{_box(SQUARE_BOX)}</box>"))
    claim = s["claims"][0]
    assert claim["t_s"] is None and claim["gt_name"] == "blue square" and claim["iou"] == pytest.approx(1.0)
    assert s["answer_score"] == pytest.approx(1.0)


def test_garbage_is_scored_not_dropped():
    s = align_record(make_record(answer_span=[1.0, 2.0], response="sure! <box>[1, 2]</box> <t>soon</t>"))
    assert not s["format_ok"]
    codes = {p.split(":")[0] for p in s["problems"]}
    assert {"box_without_object", "time_not_numeric", "missing_section"} <= codes
    assert s["num_claims"] == 0 and s["claims"] == [] and s["mean_iou"] is None
    assert s["answer_pred"] is None and s["answer_score"] == 0.0 and s["answer_ok"] is False


def test_option_answers_and_records_without_ground_truth():
    opts = ["A. it stops", "B. it turns blue"]
    think = "<obj>red circle</obj><box>[0.1,0.2,0.3,0.5]</box>at<t>0</t>s then <t>2</t>s to <t>4</t>s"
    for predicted, score in [("(B)", 1.0), ("A", 0.0), ("maybe", 0.0)]:
        rec = make_record(task="temporal_mcq", options=opts, answer="B", response=_response(think, predicted))
        assert align_record(rec)["answer_score"] == score
    # no ground truth objects at all: claims cannot be checked, which is not the same as wrong
    rec = make_record(task="general_free", ground_truth=None, key_frames=None, answer=None, response=_response(think, "it moves"))
    s = align_record(rec)
    assert s["claims"][0]["iou"] is None and s["num_matched"] == 0 and s["min_iou"] is None
    assert s["answer_score"] is None and s["answer_ok"] is None


def test_a_finished_trace_without_response_is_read_from_reasoning():
    rec = make_record(reasoning=f"<obj>red circle</obj><box>{_box(circle_box(0.5))}</box>at<t>0.5</t>s")
    s = align_record(rec)
    assert s["format_ok"] and s["claims"][0]["iou"] == pytest.approx(1.0, abs=1e-3)
    assert s["answer_pred"] is None and s["answer_score"] is None


def test_stage_fills_scores_and_keeps_everything_else(tmp_path):
    think = f"<obj>red circle</obj><box>{_box(circle_box(1.0))}</box>at<t>1</t>s"
    rows = [make_record(i, with_jpeg=True, response=_response(think)) for i in range(3)]
    rows.append(make_record(9, response="no tags at all"))
    table = to_table(rows)
    result = AlignStage({}).process(table, unit_context(tmp_path, stage="align"))
    out = result.table
    assert result.rejections == [] and out.schema == RECORD_SCHEMA and out.num_rows == 4
    assert out.schema.field("scores").type == SCORES
    assert out.drop_columns(["scores"]).equals(table.drop_columns(["scores"]))
    scores = out.column("scores").to_pylist()
    assert [s["format_ok"] for s in scores] == [True, True, True, False]
    assert scores[0]["claims"][0]["iou"] == pytest.approx(1.0, abs=1e-3)


def test_config_validation():
    assert AlignStage.validate_config({"gt_tolerance_s": 0.1}) == []
    assert [p.split(":")[0] for p in AlignStage.validate_config({"gt_tolerance_s": -1, "answer_ok_at": 2})] == [
        "gt_tolerance_s", "answer_ok_at"]


def test_ground_truth_from_arrow_equals_from_python():
    from stages.lib.truth import GroundTruth

    shuffled = make_record(1)
    shuffled["ground_truth"]["objects"][0]["track"] = shuffled["ground_truth"]["objects"][0]["track"][::-1]  # unsorted track
    shuffled["ground_truth"]["objects"].append({"name": "ghost", "track": []})
    records = [make_record(0), shuffled, make_record(2, ground_truth=None), make_record(3, key_frames=None)]
    from_arrow = GroundTruth.for_table(to_table(records), 0.25)
    for record, fast in zip(records, from_arrow):
        slow = GroundTruth.from_record(record, 0.25)
        assert fast.key_times == slow.key_times
        for t in (0.0, 1.0, 2.0, 2.3, 5.9, 7.0):
            (fast_names, fast_boxes), (slow_names, slow_boxes) = fast.at(t), slow.at(t)
            assert fast_names == slow_names and np.allclose(fast_boxes, slow_boxes)
