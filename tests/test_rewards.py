"""The paper's rewards on hand-made completions: values, ranges, the sigma schedule, the gate, and
malformed/adversarial inputs that must never raise. Tests named `test_released_*` pin a behaviour of
the released Open-o3 Video rewards (`src/r1-v/src/open_r1/reward_func.py`, `trainer/grpo_trainer.py`);
`test_departure_*` pin one listed under "Differences from the reference code" in docs/training.md."""
from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from stages.lib import geometry
from stages.lib.targets import frame_to_dict
from train.rewards import (
    COMPONENTS,
    RewardConfig,
    compute_score,
    make_reward_funcs,
    progress_of,
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


def test_reward_funcs_pickle_and_score_the_same():
    """Ray Train pickles the trainer's reward functions to every worker: each must survive the round
    trip with its name (TRL's log key) and its config."""
    good = "<think>The <obj>red circle</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2.5</t>s moves.</think><answer>B</answer>"
    for func in make_reward_funcs(RewardConfig(tau=0.6)):
        again = pickle.loads(pickle.dumps(func))
        assert again.__name__ == func.__name__ and again.cfg == func.cfg
        assert again([good], [target()], progress=0.5) == func([good], [target()], progress=0.5)
    assert [f.__name__ for f in make_reward_funcs()] == list(COMPONENTS)


def test_format_half_credit_without_evidence():
    text = "<think>I think it is the second one.</think><answer>B</answer>"
    assert funcs()["format"]([text], [target()]) == [0.5]
    assert funcs()["format"]([text], [target(task="general_mcq")]) == [1.0]


def test_departure_format_scores_the_whole_structure():
    """Released `format_reward` looks for one think and one answer by regex and compares open/close
    counts, reading evidence tags in the first think only: the first three texts below score 1 there.
    Here any structural problem anywhere scores 0 (the filter's `format_valid` uses the same check),
    so RL cannot gain by padding around a good section. Order is free in both."""
    good = "<think><obj>red circle</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2</t>s</think><answer>B</answer>"
    two_thinks = good.replace("<answer>", "<think>the red circle, surely</think><answer>")
    stray_after = good + " <obj>red circle</obj> <t>"
    nested = good.replace("<answer>B", "<answer><think>B</think>B")
    answer_first = "<answer>B</answer>" + good.split("<answer>")[0]
    assert funcs()["format"]([two_thinks, stray_after, nested, answer_first, good], [target()] * 5) == [
        0.0, 0.0, 0.0, 1.0, 1.0]


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
    assert acc(["<think>x</think>B"], [target()]) == [0.0]  # no <answer> section
    # The box answer is written in the model's pixel frame (280 x 168) and scored in canonical units.
    px = PIX.format_box(PIX.from_canonical([[0.1, 0.1, 0.3, 0.3]]))
    assert acc([f"<answer>{px}</answer>"], [t_box])[0] == pytest.approx(1.0, abs=0.02)
    assert acc(["<answer>[0.1, 0.1, 0.3, 0.3]</answer>"], [t_box])[0] < 0.05  # canonical numbers read as pixels
    assert acc(["<answer>the red circle stops</answer>"], [t_free]) == [pytest.approx(1.0)]
    assert 0.0 < acc(["<answer>a red circle</answer>"], [t_free])[0] < 1.0


def test_accuracy_is_the_one_answer_scorer():
    """The kind comes from the record's answer (stages.lib.answers), not its task: a spatio-temporal record
    answered by a caption is free text, a released temporal MCQ answer is the letter plus the span."""
    from stages.lib.answers import score_answer

    acc = funcs()["accuracy"]
    caption = "an adult wearing a black hat uses a camera."
    t_caption = target(task="spatio_temporal", answer=caption, options=(), span=[3.47, 12.98])
    mcq = dict(task="temporal_mcq", answer="B\n[2.0, 6.0]", options=("A. before", "B. during"))
    assert acc([f"<think>x</think><answer>{caption}</answer>"], [t_caption]) == [pytest.approx(1.0)]
    assert acc(["<think>x</think><answer>B\n[4.0, 6.0]</answer>"], [target(**mcq)]) == [pytest.approx(0.75)]
    for answer in ("B\n[4.0, 6.0]", "A", "a camera", "[2, 6]"):
        for t in (t_caption, target(**mcq)):
            data = json.loads(t)
            expected = score_answer(answer, task=data["task"], answer=data["answer"], options=data["options"],
                                    answer_span=data["answer_span"])
            assert acc([f"<think>x</think><answer>{answer}</answer>"], [t]) == [pytest.approx(expected)]
    # No ground truth to compare with (an MCQ without its answer) scores 0, never raises.
    assert acc(["<think>x</think><answer>B</answer>"], [target(task="general_mcq", answer="")]) == [0.0]


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
    # A record with key frames and an answer span scores against the key frames.
    t_both = target(task="spatio_temporal", answer="[2, 6]", options=(), span=[2.0, 6.0])
    assert temporal(["<think>at <t>4</t>s</think>"], [t_both], progress=0.9) == [pytest.approx(math.exp(-2))]


def test_released_segment_reward_is_the_fraction_of_times_inside_the_span():
    """A record with an answer span and no key frames (released: temporal QA and temporal MCQ, whose
    records carry no key frames) gets `thk_temporal_segment_reward`: the share of cited times inside
    the span, ends included; sigma plays no part."""
    temporal = funcs()["temporal"]
    t_span = target(task="temporal", answer="[2, 6]", options=(), span=[2.0, 6.0], key_frames=[])
    for p in (0.0, 0.9):
        assert temporal(["<think>from <t>3</t>s to <t>7</t>s</think>"], [t_span], progress=p) == [0.5]
    assert temporal(["<think>from <t>2</t>s to <t>6</t>s</think><answer>[2, 6]</answer>"], [t_span]) == [1.0]
    assert temporal(["<think>at <t>6.01</t>s, <t>1.99</t>s and <t>9</t>s</think>"], [t_span]) == [0.0]
    mcq = target(task="temporal_mcq", answer="B\n[2.0, 6.0]", options=("A. x", "B. y"), span=[2.0, 6.0], key_frames=[])
    assert temporal(["<think><t>1</t>s, <t>3</t>s, <t>4</t>s, <t>5</t>s</think><answer>B</answer>"], [mcq]) == [0.75]


def test_released_progress_is_the_next_step_over_max_steps():
    """The released trainer sets step_percent = (global_step + 1) / max_steps before scoring; TRL
    passes its TrainerState to reward functions as `trainer_state`."""
    from transformers import TrainerState

    assert progress_of(TrainerState(global_step=0, max_steps=4)) == 0.25
    assert progress_of(TrainerState(global_step=3, max_steps=4)) == 1.0
    assert progress_of(SimpleNamespace(global_step=5, max_steps=0)) == 0.0 and progress_of(None) == 0.0
    temporal = funcs()["temporal"]
    text = "<think><obj>red circle</obj><box>[0,0,1,1]</box>at<t>7</t>s</think><answer>B</answer>"
    # step 1 of 4 -> p = 0.5 -> sigma 2; step 2 of 4 -> p = 0.75 -> sigma_end 1.
    assert temporal([text], [target()], trainer_state=TrainerState(global_step=1, max_steps=4)) == [
        pytest.approx(math.exp(-1 / 8))]
    assert temporal([text], [target()], trainer_state=TrainerState(global_step=2, max_steps=4)) == [
        pytest.approx(math.exp(-1 / 2))]


def test_released_temporal_and_spatial_need_their_sections():
    """Released: the temporal rewards read times from `<think>` and give 0 without it; the spatial
    reward gives 0 unless both `<think>` and `<answer>` are there. Bare claims earn nothing."""
    claim = "<obj>red circle</obj><box>[0.1,0.1,0.3,0.3]</box>at<t>2</t>s"
    bare, no_answer, no_think = claim, f"<think>{claim}</think>", f"{claim}<answer>B</answer>"
    unclosed = f"<think>{claim}<answer>B</answer>"
    full = f"<think>{claim}</think><answer>B</answer>"
    scores = score_all([bare, no_answer, no_think, unclosed, full], [target()] * 5, progress=1.0)
    assert scores["temporal"] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert scores["spatial"] == [0.0, 0.0, 0.0, 0.0, pytest.approx(1.0)]
    t_span = target(task="temporal", answer="[2, 6]", options=(), span=[2.0, 6.0], key_frames=[])
    assert funcs()["temporal"](["from <t>3</t>s to <t>5</t>s<answer>[3, 5]</answer>"], [t_span]) == [0.0]


def test_departure_spatial_gate_is_symmetric():
    spatial = funcs(tau=1.0)["spatial"]
    box = "<box>[0.5,0.5,0.7,0.7]</box>"
    before = f"<think><obj>red circle</obj>{box}at<t>5.5</t>s</think><answer>B</answer>"
    after = f"<think><obj>red circle</obj>{box}at<t>6.5</t>s</think><answer>B</answer>"
    far_after = f"<think><obj>red circle</obj>{box}at<t>8.0</t>s</think><answer>B</answer>"
    far_before = f"<think><obj>red circle</obj>{box}at<t>4.1</t>s</think><answer>B</answer>"
    # The reference's one-sided test (gt - pred < tau) would pass far_after and fail nothing on that side.
    assert spatial([before, after, far_after, far_before], [target()] * 4) == [
        pytest.approx(1.0), pytest.approx(1.0), 0.0, 0.0]


def test_released_spatial_averages_an_objects_boxes_and_takes_the_best_object():
    """At the key frame, per ground-truth object: the mean over its boxes of the best IoU with the
    claim's boxes; the claim scores the best object. Boxes with one name are one object (the
    released `key_items` maps a name to its boxes)."""
    kfs = [{"t_s": 2.0, "objects": [{"name": "man", "box": [0.0, 0.0, 0.2, 0.2]},
                                    {"name": "man", "box": [0.0, 0.0, 0.2, 0.1]},
                                    {"name": "cup", "box": [0.0, 0.0, 0.1, 0.2]}]}]
    spatial = funcs()["spatial"]
    one = "<think><obj>man</obj><box>[0,0,0.2,0.2]</box>at<t>2</t>s</think><answer>B</answer>"
    both = "<think><obj>man</obj><box>[0,0,0.2,0.2]</box><box>[0,0,0.2,0.1]</box>at<t>2</t>s</think><answer>B</answer>"
    # man: (IoU 1 + IoU 0.5) / 2 = 0.75 beats cup (0.5); STGR's old max over boxes gave 1.0.
    assert spatial([one, both], [target(key_frames=kfs)] * 2) == [pytest.approx(0.75), pytest.approx(1.0)]
    # Unnamed boxes are separate objects.
    unnamed = [{"t_s": 2.0, "objects": [{"box": [0.0, 0.0, 0.2, 0.2]}, {"box": [0.0, 0.0, 0.2, 0.1]}]}]
    assert spatial([one], [target(key_frames=unnamed)]) == [pytest.approx(1.0)]


def test_released_first_key_frame_wins_a_tie():
    """Two key frames at one time: the first in the list is scored (released: the first key frame
    whose time equals the closest time). Two equally near times: the one listed first."""
    spatial = funcs(tau=1.5)["spatial"]
    a, b = {"name": "o", "box": [0.0, 0.0, 0.2, 0.2]}, {"name": "o", "box": [0.5, 0.5, 0.7, 0.7]}
    same_time = [{"t_s": 2.0, "objects": [a]}, {"t_s": 2.0, "objects": [b]}]
    claim = "<think><obj>o</obj><box>{}</box>at<t>{}</t>s</think><answer>B</answer>"
    on_a, on_b = claim.format("[0,0,0.2,0.2]", 2), claim.format("[0.5,0.5,0.7,0.7]", 2)
    assert spatial([on_a, on_b], [target(key_frames=same_time)] * 2) == [pytest.approx(1.0), 0.0]
    assert spatial([on_b, on_a], [target(key_frames=same_time[::-1])] * 2) == [pytest.approx(1.0), 0.0]
    # Cited at 3 s, keys at 4 s (listed first) and 2 s: the 4 s frame counts.
    equidistant = [{"t_s": 4.0, "objects": [b]}, {"t_s": 2.0, "objects": [a]}]
    assert spatial([claim.format("[0.5,0.5,0.7,0.7]", 3), claim.format("[0,0,0.2,0.2]", 3)],
                   [target(key_frames=equidistant)] * 2) == [pytest.approx(1.0), 0.0]


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


def _iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _spatial_by_loop(claims, key_frames, tau):
    """The spatial definition written as the released loop does it (with the symmetric gate)."""
    total = 0.0
    for t, boxes in claims:
        best_dt, frame = math.inf, None
        for kf in key_frames:
            if abs(kf["t_s"] - t) <= tau and abs(kf["t_s"] - t) < best_dt:
                best_dt, frame = abs(kf["t_s"] - t), kf
        if frame is None:
            continue
        by_name = {}
        for o in frame["objects"]:
            by_name.setdefault(o["name"], []).append(o["box"])
        total += max(np.mean([max(_iou(g, b) for b in boxes) for g in gts]) for gts in by_name.values())
    return total / len(claims)


def test_vectorised_spatial_matches_a_plain_loop():
    rng = np.random.default_rng(7)
    texts, targets, expected = [], [], []
    for _ in range(60):
        def box():
            x, y, w, h = np.r_[rng.uniform(0, 0.6, 2), rng.uniform(0.1, 0.4, 2)].round(2).tolist()
            return [x, y, round(x + w, 2), round(y + h, 2)]
        times = rng.choice([1.0, 2.0, 2.0, 3.5, 5.0], size=rng.integers(1, 4)).tolist()
        kfs = [{"t_s": t, "objects": [{"name": str(rng.choice(["a", "b"])), "box": box()}
                                      for _ in range(rng.integers(1, 4))]} for t in times]
        claims = [(float(rng.choice([0.5, 1.0, 2.2, 3.0, 4.2, 6.0])), [box() for _ in range(rng.integers(1, 3))])
                  for _ in range(rng.integers(1, 5))]
        body = " ".join("<obj>x</obj>" + "".join(f"<box>{b}</box>" for b in bs) + f"at<t>{t}</t>s" for t, bs in claims)
        texts.append(f"<think>{body}</think><answer>B</answer>")
        targets.append(target(key_frames=kfs))
        expected.append(_spatial_by_loop(claims, kfs, 1.0))
    assert funcs(tau=1.0)["spatial"](texts, targets) == pytest.approx(expected)
