"""Metrics against hand-computed values and the published V-STaR aggregates."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.metrics import (
    recall_at,
    temporal_iou,
    viou,
    vstar_chain_summary,
    vstar_scores,
    vstar_spatial_miou,
)


@pytest.mark.parametrize(
    ("gt", "pred", "expected"),
    [
        ((2, 6), (4, 8), 2 / 6),  # overlap: 2 s of a 6 s hull
        ((2, 6), (2, 6), 1.0),
        ((2, 6), (3, 4), 1 / 4),  # inside
        ((2, 6), (6, 9), 0.0),  # touching
        ((2, 6), (8, 9), 0.0),  # apart: the hull is 7 s but nothing intersects
        ((2, 6), (4, 4), 0.0),  # zero-length prediction inside
        ((5, 5), (5, 5), 0.0),  # zero hull: 0, as the official script
        ((5, 5), (4, 6), 0.0),  # zero-length ground truth
        ((0, 10), (-5, 5), 5 / 15),  # prediction partly before the video: not clipped
        ((0, 10), (100, 120), 0.0),  # prediction after the video
        ((2, 6), (6, 2), 0.0),  # reversed prediction is malformed
        ((2, 6), None, 0.0),
        ((2, 6), [], 0.0),
        ((2, 6), (1, 2, 3), 0.0),
        ((2, 6), "2, 6", 0.0),
        ((2, 6), (float("nan"), 3), 0.0),
        ((2, 6), ("a", 3), 0.0),
    ],
)
def test_temporal_iou(gt: tuple, pred: object, expected: float) -> None:
    assert temporal_iou(gt, pred) == pytest.approx(expected)


def test_temporal_iou_rejects_bad_ground_truth() -> None:
    with pytest.raises(ValueError, match="ground-truth span"):
        temporal_iou((6, 2), (2, 6))
    with pytest.raises(ValueError, match="ground-truth span"):
        temporal_iou(None, (2, 6))  # type: ignore[arg-type]


def test_viou_by_hand() -> None:
    box, half = (0, 0, 1, 1), (0, 0, 0.5, 1)
    gt = {f: box for f in range(10, 20)}  # frames 10..19
    pred = {f: half for f in range(15, 25)}  # frames 15..24, IoU 0.5 on each shared frame
    # S_i = 15..19 (5 frames x 0.5), S_u = 10..24 (15 frames).
    assert viou(gt, pred) == pytest.approx(2.5 / 15)
    assert viou(gt, gt) == pytest.approx(1.0)
    assert viou(gt, {}) == 0.0
    assert viou(gt, {f: box for f in range(30, 40)}) == 0.0  # disjoint in time
    assert viou(gt, {f: (5, 5, 6, 6) for f in range(10, 20)}) == 0.0  # right time, wrong place
    # Evaluated frames every other frame: S_u = 10, 12, ..., 24 (8), S_i = 16, 18 (2 x 0.5).
    assert viou(gt, pred, frame_ids=range(0, 40, 2)) == pytest.approx(1.0 / 8)
    # A hole in the prediction counts in the union and adds nothing.
    holed = {f: box for f in range(10, 20) if f != 12}
    assert viou(gt, holed) == pytest.approx(9 / 10)
    # Malformed predicted boxes are dropped (the frame then adds 0).
    assert viou(gt, {**holed, 12: (0, 1)}) == pytest.approx(9 / 10)
    with pytest.raises(ValueError, match="empty"):
        viou({}, pred)


def test_vstar_spatial_miou_by_hand() -> None:
    gt = {"1.0": (0, 0, 0.5, 0.5), 2: (0, 0, 1, 1), 3.0: (0.5, 0.5, 1, 1)}
    pred = {
        1: [(0, 0, 0.25, 0.5), (0, 0, 0.5, 0.5)],  # the best of the two counts: 1.0
        "2": (0, 0, 0.5, 1),  # a single box: 0.5
        4: (0.5, 0.5, 1, 1),  # a timestamp with no ground truth: ignored; t=3 gets 0
    }
    assert vstar_spatial_miou(gt, pred) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert vstar_spatial_miou(gt, {}) == 0.0
    assert vstar_spatial_miou(gt, None) == 0.0
    assert vstar_spatial_miou({}, pred) == 0.0
    assert vstar_spatial_miou(gt, {1: "garbage", 2: [(0, 1), (0, 0, 1, 1)], "x": (0, 0, 1, 1)}) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not a number"):
        vstar_spatial_miou({"frame one": (0, 0, 1, 1)}, pred)


def test_recall_at() -> None:
    assert recall_at([0.1, 0.3, 0.5, 0.69, 0.7]) == {0.3: 0.8, 0.5: 0.6, 0.7: 0.2}
    assert recall_at([], (0.5,)) == {0.5: 0.0}


def test_vstar_scores_by_hand() -> None:
    s = vstar_scores(0.5, 0.5, 0.5)
    assert s["AM"] == pytest.approx(0.5)
    assert s["LGM"] == pytest.approx(math.log(2))
    assert vstar_scores(0, 0, 0) == {"AM": 0.0, "LGM": 0.0}
    with pytest.raises(ValueError, match="not a percentage"):
        vstar_scores(33.5, 0.1, 0.1)
    with pytest.raises(ValueError, match="n_samples"):
        vstar_scores(0.5, 0.5, 0.5, n_samples=0)


def test_lgm_at_one_is_finite_and_documented() -> None:
    # The official script: -(log(1 - acc) + ...) raises at acc = 1.
    with pytest.raises(ValueError):
        math.log(1 - 1.0)
    # With n questions, 1 - x is floored at 1 / (2n).
    s = vstar_scores(1.0, 0.0, 0.0, n_samples=500)
    assert s["LGM"] == pytest.approx(math.log(1000) / 3)
    assert s["AM"] == pytest.approx(1 / 3)
    assert vstar_scores(1.0, 0.0, 0.0)["LGM"] == pytest.approx(-math.log(1e-6) / 3)
    # Below the floor nothing changes: 499/500 correct is 1 - x = 1/500 > 1/1000.
    assert vstar_scores(0.998, 0.0, 0.0, n_samples=500)["LGM"] == pytest.approx(-math.log(0.002) / 3)
    # And LGM stays monotone up to 1.
    values = [vstar_scores(x, 0.2, 0.2, n_samples=500)["LGM"] for x in (0.99, 0.998, 0.999, 1.0)]
    assert values == sorted(values)


def _rounded_interval(fn, components: list[float]) -> tuple[float, float]:
    """min and max of `fn` over every corner of the box of inputs that round to `components`
    (AM and LGM are monotone in each input, so the corners bound them)."""
    corners = [fn([c + d for c, d in zip(components, signs)]) for signs in itertools.product((-0.05, 0.05), repeat=len(components))]
    return min(corners), max(corners)


@pytest.mark.parametrize(
    ("model", "acc", "tiou", "viou_", "m_am", "m_lgm"),
    [
        ("Qwen2.5-VL-7B", 33.5, (15.4, 13.8), (17.0, 2.5), 19.3, 22.4),
        ("Open-o3 Video", 61.0, (24.5, 24.0), (25.4, 6.0), 33.7, 46.6),
    ],
)
def test_vstar_aggregates_reproduce_the_paper(model: str, acc: float, tiou: tuple, viou_: tuple, m_am: float, m_lgm: float) -> None:
    summary = vstar_chain_summary(acc / 100, [(tiou[0] / 100, viou_[0] / 100), (tiou[1] / 100, viou_[1] / 100)])
    # From the published (rounded) components, to one decimal.
    assert abs(summary["mAM"] * 100 - m_am) <= 0.05 + 1e-9, (model, summary)
    assert abs(summary["mLGM"] * 100 - m_lgm) <= 0.05 + 1e-9, (model, summary)

    # And the published aggregate lies inside what components rounding to the published ones allow.
    def aggregate(key: str):
        def fn(c: list[float]) -> float:
            return 100 * vstar_chain_summary(c[0] / 100, [(c[1] / 100, c[3] / 100), (c[2] / 100, c[4] / 100)])[key]

        return fn

    components = [acc, tiou[0], tiou[1], viou_[0], viou_[1]]
    for key, published in (("mAM", m_am), ("mLGM", m_lgm)):
        low, high = _rounded_interval(aggregate(key), components)
        assert low - 0.05 <= published <= high + 0.05, (model, key, low, high)


@settings(max_examples=200, deadline=None)
@given(
    gs=st.floats(0, 100),
    gl=st.floats(0, 50),
    ps=st.floats(-50, 150),
    pl=st.floats(0, 50),
)
def test_temporal_iou_properties(gs: float, gl: float, ps: float, pl: float) -> None:
    gt, pred = (gs, gs + gl), (ps, ps + pl)
    value = temporal_iou(gt, pred)
    assert 0.0 <= value <= 1.0
    if gl > 0 and pl > 0:
        assert value == pytest.approx(temporal_iou(pred, gt))
