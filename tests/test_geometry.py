"""Coordinate frames, IoU, validity, regions and matching, against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stages.lib import geometry as g


def test_as_boxes_shapes() -> None:
    assert g.as_boxes([1, 2, 3, 4]).shape == (1, 4)
    assert g.as_boxes([]).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        g.as_boxes([[1, 2, 3]])


def test_layout_conversions_by_hand() -> None:
    # HC-STVG style [x, y, w, h] in pixels.
    np.testing.assert_allclose(g.xywh_to_xyxy([10, 20, 30, 40]), [[10, 20, 40, 60]])
    np.testing.assert_allclose(g.xyxy_to_xywh([10, 20, 40, 60]), [[10, 20, 30, 40]])
    np.testing.assert_allclose(g.cxcywh_to_xyxy([0.5, 0.5, 0.2, 0.4]), [[0.4, 0.3, 0.6, 0.7]])
    np.testing.assert_allclose(g.xyxy_to_cxcywh([0.4, 0.3, 0.6, 0.7]), [[0.5, 0.5, 0.2, 0.4]])


def test_pixel_conversions_by_hand() -> None:
    np.testing.assert_allclose(g.normalised_to_pixels([0.25, 0.5, 0.75, 1.0], 640, 360), [[160, 180, 480, 360]])
    np.testing.assert_allclose(g.pixels_to_normalised([[160, 180, 480, 360]], 640, 360), [[0.25, 0.5, 0.75, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        g.pixels_to_normalised([0, 0, 1, 1], 0, 10)


def test_frames_by_hand() -> None:
    # A HC-STVG box [x, y, w, h] = [64, 36, 320, 180] on a 640x360 frame.
    hcstvg = g.pixel_frame(640, 360, layout="xywh")
    np.testing.assert_allclose(hcstvg.to_canonical([64, 36, 320, 180]), [[0.1, 0.1, 0.6, 0.6]])
    np.testing.assert_allclose(hcstvg.from_canonical([0.1, 0.1, 0.6, 0.6]), [[64, 36, 320, 180]])
    np.testing.assert_allclose(g.THOUSAND.from_canonical([0.1234, 0, 1, 0.5]), [[123.4, 0, 1000, 500]])
    assert g.THOUSAND.format_box(g.THOUSAND.from_canonical([0.1234, 0, 1, 0.5])) == "[123,0,1000,500]"
    assert g.CANONICAL.format_box([0.4124, 0.2, 0.5875, 1]) == "[0.412,0.200,0.588,1.000]"
    assert g.CANONICAL.format_time(12.5) == "12.5" and g.CANONICAL.format_time(3.0) == "3"
    assert g.CANONICAL.format_time(-0.001) == "0"
    cxcy = g.normalised_cxcywh_frame(1000, decimals=0)
    np.testing.assert_allclose(cxcy.to_canonical([500, 500, 200, 400]), [[0.4, 0.3, 0.6, 0.7]])


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (360, 640, (364, 644)),  # round each side to a multiple of 28
        (480, 640, (476, 644)),
        (10, 10, (56, 56)),  # below min_pixels: scaled up
        (2160, 3840, (728, 1316)),  # above max_pixels: beta = 2.875, floor(26.8) * 28, floor(47.7) * 28
    ],
)
def test_smart_resize_by_hand(height: int, width: int, expected: tuple[int, int]) -> None:
    assert g.smart_resize(height, width) == expected


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 4000, size=(300, 2)) if max(h, w) / min(h, w) <= 200]
    budgets = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (4 * 28 * 28, 16 * 28 * 28)]
    for min_pixels, max_pixels in budgets:
        for h, w in sizes:
            assert g.smart_resize(h, w, 28, min_pixels, max_pixels) == reference(h, w, 28, min_pixels, max_pixels)
    with pytest.raises(ValueError, match="aspect ratio"):
        g.smart_resize(10, 3000)


def test_qwen_frame_is_the_resized_input() -> None:
    frame = g.qwen25vl_frame(640, 360)
    assert (frame.width, frame.height, frame.decimals) == (644.0, 364.0, 0)
    np.testing.assert_allclose(frame.from_canonical([0.5, 0.5, 1, 1]), [[322, 182, 644, 364]])
    assert frame.format_box(frame.from_canonical([0.5, 0.5, 1, 1])) == "[322,182,644,364]"
    assert g.make_frame("qwen2.5-vl", width=640, height=360) == frame
    assert g.make_frame("normalised") is g.CANONICAL
    with pytest.raises(ValueError, match="unknown box frame"):
        g.make_frame("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        g.make_frame("pixels", w=3)
    with pytest.raises(ValueError, match="unknown box layout"):
        g.BoxFrame("x", layout="yxyx")


def test_box_iou_by_hand() -> None:
    a = [[0, 0, 2, 2], [0, 0, 1, 1]]
    b = [[1, 1, 3, 3], [2, 0, 4, 2], [0, 0, 2, 2], [5, 5, 5, 6]]
    iou = g.box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [1 / 7, 0.0, 1.0, 0.0])  # overlap, touching edge, equal, degenerate
    np.testing.assert_allclose(iou[1], [0.0, 0.0, 0.25, 0.0])  # touching corner, apart, inside
    assert g.box_iou(np.zeros((0, 4)), b).shape == (0, 4)
    # Reversed, zero-size and non-finite boxes: IoU 0, never NaN.
    weird = g.box_iou([[2, 2, 0, 0], [1, 1, 1, 1], [np.nan, 0, 1, 1], [0, 0, np.inf, 1]], [[0, 0, 2, 2]])
    np.testing.assert_array_equal(weird, np.zeros((4, 1)))
    np.testing.assert_allclose(g.paired_iou(a, b[:2]), [1 / 7, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        g.paired_iou(a, b)


def test_validity_checks() -> None:
    boxes = [[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.5, 0.9], [0.6, 0.1, 0.2, 0.3], [-0.1, 0, 1.2, 1], [0, 0, 1, 1]]
    np.testing.assert_array_equal(g.has_positive_area(boxes), [True, False, False, True, True])
    np.testing.assert_array_equal(g.is_inside(boxes), [True, True, True, False, True])
    np.testing.assert_array_equal(g.is_inside([[0, 0, 640, 360]], 640, 360), [True])
    np.testing.assert_allclose(g.area_fraction(boxes), [0.16, 0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(g.clip_boxes([[-0.1, 0.2, 1.2, 0.4]]), [[0, 0.2, 1, 0.4]])
    np.testing.assert_array_equal(g.is_finite([[0, 0, np.nan, 1], [0, 0, 1, 1]]), [False, True])


def test_regions_with_shapely() -> None:
    two = [[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]
    assert g.region_area(two) == pytest.approx(0.25 + 0.25 - 0.0625)
    assert g.region_area([[-0.5, -0.5, 0.5, 0.5]]) == pytest.approx(0.25)  # clipped to the unit square
    assert g.region_area([[-0.5, -0.5, 0.5, 0.5]], clip_to=None) == pytest.approx(1.0)
    assert g.region_area([]) == 0.0
    # A group claim of two boxes against ground truth of the same two boxes in one: IoU of the regions.
    assert g.region_iou(two, [[0, 0, 0.75, 0.75]]) == pytest.approx(0.4375 / 0.5625)
    assert g.region_iou([], []) == 0.0


def test_hungarian_match() -> None:
    gt = [[0, 0, 1, 1], [2, 2, 3, 3]]
    pred = [[2, 2, 3, 3.5], [0, 0, 1, 1.2], [10, 10, 11, 11]]
    m = g.hungarian_match(pred, gt)
    assert m.rows.tolist() == [0, 1] and m.cols.tolist() == [1, 0]
    np.testing.assert_allclose(m.scores, [1 / 1.5, 1 / 1.2])
    strict = g.hungarian_match(pred, gt, min_iou=0.7)
    assert strict.rows.tolist() == [1] and strict.cols.tolist() == [0]
    # Greedy would take the 0.9 pair and leave 0.0 for the other; Hungarian gets 0.8 + 0.8.
    m = g.assign_max([[0.9, 0.8], [0.8, 0.0]])
    assert m.rows.tolist() == [0, 1] and m.cols.tolist() == [1, 0]
    assert len(g.hungarian_match(np.zeros((0, 4)), gt).rows) == 0
    with pytest.raises(ValueError, match="2-D"):
        g.assign_max([1.0, 2.0])


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
boxes_strategy = arrays(np.float64, st.tuples(st.integers(0, 6), st.just(4)), elements=finite)
frames = st.sampled_from(
    [
        g.CANONICAL,
        g.THOUSAND,
        g.pixel_frame(640, 360),
        g.pixel_frame(1280, 720, layout="xywh"),
        g.qwen25vl_frame(640, 480),
        g.normalised_cxcywh_frame(),
    ]
)


@settings(max_examples=200, deadline=None)
@given(boxes=boxes_strategy, frame=frames)
def test_every_frame_round_trips(boxes: np.ndarray, frame: g.BoxFrame) -> None:
    np.testing.assert_allclose(frame.to_canonical(frame.from_canonical(boxes)), boxes, atol=1e-9, rtol=1e-9)
    np.testing.assert_allclose(frame.from_canonical(frame.to_canonical(boxes)), boxes, atol=1e-9, rtol=1e-9)


@settings(max_examples=200, deadline=None)
@given(boxes=boxes_strategy)
def test_layout_functions_round_trip(boxes: np.ndarray) -> None:
    np.testing.assert_allclose(g.xywh_to_xyxy(g.xyxy_to_xywh(boxes)), boxes, atol=1e-9)
    np.testing.assert_allclose(g.cxcywh_to_xyxy(g.xyxy_to_cxcywh(boxes)), boxes, atol=1e-9)
    np.testing.assert_allclose(g.pixels_to_normalised(g.normalised_to_pixels(boxes, 7, 3), 7, 3), boxes, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(a=boxes_strategy, b=boxes_strategy)
def test_box_iou_properties(a: np.ndarray, b: np.ndarray) -> None:
    iou = g.box_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
    np.testing.assert_allclose(iou, g.box_iou(b, a).T)
    valid = g.box_area(a) > 0
    np.testing.assert_allclose(np.diag(g.box_iou(a, a))[valid], 1.0)
