"""The paper's rewards on hand-made completions: values, ranges, the sigma schedule, the gate, and
malformed/adversarial inputs that must never raise."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stages import geometry
from train.data import frame_to_dict
from train.rewards import (
    COMPONENTS,
    RewardConfig,
    compute_score,
    make_reward_funcs,
    score_all,
    sigma_at,
)

CANON = frame_to_dict(geometry.CANONICAL)
PIX = geometry.qwen25vl_frame(640, 360, min_pixels=3136, max_pixels=50176)  # 280 x 168 grid


def target(task="spatio_temporal", answer="B", options=("A. x", "B. y"), span=None, key_frames=None, frame=CANON):
    kfs = key_frames if key_frames is not None else [
        {"t_s": 2.0, "objects": [{"name": "red circle", "box": [0.1, 0.1, 0.3, 0.3]}]},
        {"t_s": 6.0, "objects": [{"name": "red circle", "box": [0.5, 0.5, 0.7, 0.7]},
                                 {"name": "blue square", "box": [0.0, 0.0, 0.2, 0.2]}]},
    ]
    return json.dumps({"id": "r", "task": task, "answer": answer, "options": list(options), "answer_span": span,
                       "key_frames": kfs, "frame": frame})


def funcs(**cfg):
    return {f.__name__: f for f in make_reward_funcs(RewardConfig(**cfg))}


def test_perfect_and_empty_completion():
    good = "<think>The <obj>red circle</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2</t>s moves.</think><answer>B</answer>"
    scores = score_all([good, ""], [target(), target()], progress=1.0)
    assert scores["accuracy"] == [1.0, 0.0]
    assert scores["format"] == [1.0, 0.0]
    assert scores["temporal"] == [1.0, 0.0]
    assert scores["spatial"][0] == pytest.approx(1.0) and scores["spatial"][1] == 0.0
    assert scores["total"][0] == pytest.approx(4.0)


def test_format_half_credit_without_evidence():
    text = "<think>I think it is the second one.</think><answer>B</answer>"
    assert funcs()["format"]([text], [target()]) == [0.5]
    assert funcs()["format"]([text], [target(task="general_mcq")]) == [1.0]


@pytest.mark.parametrize("answer,expected", [("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("[B]", 1.0),
                                             ("B. y", 1.0), ("A", 0.0), ("b", 0.0), ("", 0.0)])
def test_accuracy_option_spellings(answer, expected):
    assert funcs()["accuracy"]([f"<think>x</think><answer>{answer}</answer>"], [target()]) == [expected]


def test_accuracy_span_box_and_free_form():
    t_span = target(task="temporal", answer="[2.0, 6.0]", options=(), span=[2.0, 6.0])
    t_box = target(task="spatial", answer="[0.1, 0.1, 0.3, 0.3]", options=(), frame=frame_to_dict(PIX))
    t_free = target(task="general_free", answer="the red circle stops", options=())
    acc = funcs()["accuracy"]
    assert acc(["<answer><t>4</t>s to <t>6</t>s</answer>"], [t_span]) == [pytest.approx(0.5)]
    # The box answer is written in the model's pixel frame (280 x 168) and scored in canonical units.
    px = PIX.format_box(PIX.from_canonical([[0.1, 0.1, 0.3, 0.3]]))
    assert acc([f"<answer>{px}</answer>"], [t_box])[0] == pytest.approx(1.0, abs=0.02)
    assert acc(["<answer>[0.1, 0.1, 0.3, 0.3]</answer>"], [t_box])[0] < 0.05  # canonical numbers read as pixels
    assert acc(["<answer>the red circle stops</answer>"], [t_free]) == [pytest.approx(1.0)]
    assert 0.0 < acc(["<answer>a red circle</answer>"], [t_free])[0] < 1.0


def test_sigma_schedule_matches_formula():
    cfg = RewardConfig()
    for p in np.linspace(0, 1, 41):
        expected = 4 * (1 - p) if p < 0.75 else 1.0
        assert sigma_at(p, cfg) == pytest.approx(expected)
    assert sigma_at(float("nan"), cfg) == 4.0


def test_temporal_reward_is_the_gaussian_of_the_nearest_key_time():
    temporal = funcs()["temporal"]
    for p, dt in ((0.0, 1.5), (0.5, 0.7), (0.9, 2.0)):
        sigma = sigma_at(p)
        text = f"<think><obj>red circle</obj><box>[0,0,1,1]</box>at<t>{6.0 + dt}</t>s</think><answer>B</answer>"
        assert temporal([text], [target()], progress=p)[0] == pytest.approx(math.exp(-dt**2 / (2 * sigma**2)))
    # Mean over every cited time: 2.0 is exact (1.0), 4.0 is 2 s from both keys.
    text = "<think>at <t>2</t>s and at <t>4</t>s</think><answer>B</answer>"
    assert temporal([text], [target()], progress=0.9)[0] == pytest.approx((1 + math.exp(-2)) / 2)
    # No key frames: distance to the answer span (0 inside it).
    t_span = target(task="temporal", answer="[2, 6]", options=(), span=[2.0, 6.0], key_frames=[])
    assert temporal(["<think>from <t>3</t>s to <t>7</t>s</think>"], [t_span], progress=0.9)[0] == pytest.approx(
        (1 + math.exp(-0.5)) / 2)


def test_spatial_gate_is_symmetric():
    spatial = funcs(tau=1.0)["spatial"]
    box = "<box>[0.5,0.5,0.7,0.7]</box>"
    before = f"<think><obj>red circle</obj>{box}at<t>5.5</t>s</think><answer>B</answer>"
    after = f"<think><obj>red circle</obj>{box}at<t>6.5</t>s</think><answer>B</answer>"
    far_after = f"<think><obj>red circle</obj>{box}at<t>8.0</t>s</think><answer>B</answer>"
    far_before = f"<think><obj>red circle</obj>{box}at<t>4.1</t>s</think><answer>B</answer>"
    # The reference's one-sided test (gt - pred < tau) would pass far_after and fail nothing on that side.
    assert spatial([before, after, far_after, far_before], [target()] * 4) == [
        pytest.approx(1.0), pytest.approx(1.0), 0.0, 0.0]


def test_spatial_takes_best_box_and_averages_claims():
    spatial = funcs(tau=1.0)["spatial"]
    text = ("<think><obj>a</obj><box>[0.9,0.9,1,1]</box><box>[0,0,0.2,0.2]</box>at<t>6</t>s then "
            "<obj>b</obj><box>[0.1,0.1,0.2,0.3]</box>at<t>2</t>s</think><answer>B</answer>")
    # claim a: best of its two boxes against both objects at 6 s = 1.0; claim b: IoU 0.5 with the 2 s box.
    assert spatial([text], [target()]) == [pytest.approx(0.75)]


def test_boxes_are_read_in_the_models_frame():
    spatial = funcs()["spatial"]
    px = PIX.format_box(PIX.from_canonical([[0.1, 0.1, 0.3, 0.3]]))
    text = f"<think><obj>red circle</obj><box>{px}</box>at<t>2</t>s</think><answer>B</answer>"
    assert spatial([text], [target(frame=frame_to_dict(PIX))])[0] == pytest.approx(1.0, abs=0.02)


ADVERSARIAL = [
    "",
    "no tags at all",
    "<think>unbalanced <obj>x</obj><box>[1,2,3]</box>at<t>two</t>s",
    "<think><think></think></answer>B<answer>",
    "<think><obj>x</obj><box>[0.1,0.2,0.3]</box>at<t>1</t>s</think><answer>A</answer>",
    "<think><obj>x</obj><box>[nan,inf,1,1]</box>at<t>1e308</t>s</think><answer>Z</answer>",
    "<think><obj>x</obj><box>[1e400,0,1,1]</box>at<t>-5</t>s at <t>twelve</t>s</think><answer>[1, 0]</answer>",
    "<answer>" + "A" * 10000 + "</answer>",
    "<think>" + "<obj>o</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2</t>s " * 10000 + "</think><answer>B</answer>",
    None,
    12345,
    [{"role": "assistant", "content": [{"type": "text", "text": "<answer>B</answer>"}]}],
]
TARGETS = [target(), target(task="temporal", answer="[2, 6]", options=(), span=[2.0, 6.0]),
           target(task="spatial", answer="[0.1, 0.1, 0.3, 0.3]", options=()),
           target(task="general_free", answer="words", options=()), "not json", json.dumps({"task": "x"}), None]


def test_adversarial_inputs_never_raise_and_stay_in_range():
    completions = [c for c in ADVERSARIAL for _ in TARGETS]
    targets = TARGETS * len(ADVERSARIAL)
    scores = score_all(completions, targets, progress=0.3)
    for name in COMPONENTS:
        assert len(scores[name]) == len(completions)
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in scores[name]), name
    ten_k = ADVERSARIAL[8]
    assert score_all([ten_k], [target()], progress=1.0)["spatial"] == [pytest.approx(1.0)]
    # Mismatched lengths and missing targets score 0 instead of raising.
    assert funcs()["format"](["<think>a</think><answer>B</answer>"] * 2, [target()]) == [0.5, 0.0]
    assert funcs()["accuracy"](["<answer>B</answer>"]) == [0.0]


def test_verl_compute_score():
    good = "<think>The <obj>red circle</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2</t>s</think><answer>B</answer>"
    out = compute_score("stgr", good, json.loads(target()), extra_info={"progress": 0.8})
    assert out["score"] == pytest.approx(4.0) and set(COMPONENTS) <= set(out)
    weighted = compute_score("stgr", good, target(), rewards={"weights": {"spatial": 0.0, "format": 2.0}})
    assert weighted["score"] == pytest.approx(1 + 2 + 1)
    assert compute_score("stgr", None, "garbage")["score"] == 0.0
