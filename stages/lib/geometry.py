"""Box geometry: coordinate frames, IoU, validity checks, region unions and matching.

The whole project keeps boxes in one canonical frame: `[x1, y1, x2, y2]` normalised to [0, 1] of the
source frame, x to the right, y down (see docs/evidence.md). Everything else (pixels of the source,
HC-STVG/COCO `[x, y, w, h]`, the resized input of Qwen2.5-VL, Qwen3-VL's 0-1000 integers) is a
`BoxFrame`: a layout of the four numbers plus a scale per axis. A frame converts (N, 4) arrays to and
from canonical coordinates and knows how many decimals to write, so the code that renders a training
target and the code that parses a model's answer go through the same object and cannot disagree.

Everything here is vectorised with numpy over (N, 4) arrays. Conversions are pure and exact up to
float rounding (rounding to a frame's decimals happens only in `BoxFrame.quantise`/rendering).
Shapely and scipy are imported lazily: this module is imported by every stage and should stay light.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# Qwen2.5-VL image processor defaults (transformers `Qwen2VLImageProcessor`): patch 14 x merge 2.
QWEN25VL_FACTOR = 28
QWEN25VL_MIN_PIXELS = 56 * 56
QWEN25VL_MAX_PIXELS = 28 * 28 * 1280


def as_boxes(boxes: ArrayLike) -> FloatArray:
    """Any (4,) or (N, 4) array-like -> a float64 (N, 4) array; raises ValueError naming the shape."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        return arr.reshape(1, 4)
    if arr.ndim == 1 and arr.shape[0] == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) or (4,), got {arr.shape}")
    return arr


# --- layouts: the order and meaning of the four numbers -------------------------------------------


def xywh_to_xyxy(boxes: ArrayLike) -> FloatArray:
    """`[x, y, w, h]` (top-left corner + size: HC-STVG, COCO) -> `[x1, y1, x2, y2]`."""
    b = as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: ArrayLike) -> FloatArray:
    """`[x1, y1, x2, y2]` -> `[x, y, w, h]` (top-left corner + size)."""
    b = as_boxes(boxes)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def cxcywh_to_xyxy(boxes: ArrayLike) -> FloatArray:
    """`[cx, cy, w, h]` (centre + size: DETR, VideoEspresso) -> `[x1, y1, x2, y2]`."""
    b = as_boxes(boxes)
    half = b[:, 2:] / 2.0
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def xyxy_to_cxcywh(boxes: ArrayLike) -> FloatArray:
    """`[x1, y1, x2, y2]` -> `[cx, cy, w, h]` (centre + size)."""
    b = as_boxes(boxes)
    return np.concatenate([(b[:, :2] + b[:, 2:]) / 2.0, b[:, 2:] - b[:, :2]], axis=1)


class Layout(NamedTuple):
    """How to go from a layout to xyxy and back (same units on both sides). `error_gain` bounds how
    much a rounding error of e on each written number can move an xyxy corner: e for xyxy, 2e for
    xywh (x2 = x + w), 1.5e for cxcywh (x1 = cx - w / 2)."""

    to_xyxy: Callable[[ArrayLike], FloatArray]
    from_xyxy: Callable[[ArrayLike], FloatArray]
    error_gain: float


LAYOUTS: dict[str, Layout] = {
    "xyxy": Layout(as_boxes, as_boxes, 1.0),
    "xywh": Layout(xywh_to_xyxy, xyxy_to_xywh, 2.0),
    "cxcywh": Layout(cxcywh_to_xyxy, xyxy_to_cxcywh, 1.5),
}


# --- scales -----------------------------------------------------------------------------------------


def _scale(width: float, height: float) -> FloatArray:
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"frame size must be positive and finite, got width={width}, height={height}")
    return np.array([width, height, width, height], dtype=np.float64)


def normalised_to_pixels(boxes: ArrayLike, width: float, height: float) -> FloatArray:
    """Canonical normalised xyxy -> xyxy in pixels of a `width` x `height` image (floats, unrounded)."""
    return as_boxes(boxes) * _scale(width, height)


def pixels_to_normalised(boxes: ArrayLike, width: float, height: float) -> FloatArray:
    """xyxy in pixels of a `width` x `height` image -> canonical normalised xyxy."""
    return as_boxes(boxes) / _scale(width, height)


def smart_resize(
    height: int,
    width: int,
    factor: int = QWEN25VL_FACTOR,
    min_pixels: int = QWEN25VL_MIN_PIXELS,
    max_pixels: int = QWEN25VL_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2.5-VL's input size for a `height` x `width` image: (resized_height, resized_width).

    The same arithmetic as `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`
    (each side a multiple of `factor`, area within [min_pixels, max_pixels], aspect ratio kept as well
    as possible); tests/test_geometry.py checks it against transformers on many sizes. It is written
    out here because importing transformers costs seconds in every CPU worker that only parses boxes.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- frames -----------------------------------------------------------------------------------------


def _format_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    return "0" if decimals == 0 and text == "-0" else text


@dataclass(frozen=True)
class BoxFrame:
    """One way of writing boxes: a layout of the four numbers and the size of the full image in units.

    `width`/`height` are the units spanned by the whole image along x/y: 1 for the canonical frame,
    pixels for a pixel frame, 1000 for Qwen3-VL. `decimals` is how many digits `render` writes (0 gives
    integers); `time_decimals` the same for `<t>` seconds. Frames are small immutable values: pass them
    around, put them in configs (see `make_frame`), compare them.
    """

    name: str
    width: float = 1.0
    height: float = 1.0
    layout: str = "xyxy"
    decimals: int = 3
    time_decimals: int = 2

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown box layout {self.layout!r}; known: {sorted(LAYOUTS)}")
        _scale(self.width, self.height)
        if self.decimals < 0 or self.time_decimals < 0:
            raise ValueError("decimals must be >= 0")

    def to_canonical(self, boxes: ArrayLike) -> FloatArray:
        """(N, 4) boxes written in this frame -> canonical normalised xyxy (N, 4)."""
        return LAYOUTS[self.layout].to_xyxy(boxes) / _scale(self.width, self.height)

    def from_canonical(self, boxes: ArrayLike) -> FloatArray:
        """Canonical normalised xyxy (N, 4) -> boxes in this frame (N, 4), unrounded."""
        return LAYOUTS[self.layout].from_xyxy(as_boxes(boxes) * _scale(self.width, self.height))

    def quantise(self, boxes: ArrayLike) -> FloatArray:
        """Round boxes of this frame to the digits it writes (what a model sees in its targets)."""
        return np.round(as_boxes(boxes), self.decimals)

    def format_box(self, box: ArrayLike) -> str:
        """One box of this frame as the text inside `<box>`: `[x1,y1,x2,y2]` with `decimals` digits."""
        values = as_boxes(box)[0]
        return "[" + ",".join(_format_number(v, self.decimals) for v in values) + "]"

    def format_time(self, seconds: float) -> str:
        """Seconds as the text inside `<t>`: rounded to `time_decimals`, trailing zeros dropped."""
        text = f"{seconds:.{self.time_decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text == "-0" else text

    def time_tolerance(self) -> float:
        """Half a unit of the last written digit of a `<t>` time, in seconds: the most that writing a
        time (`format_time`) and reading it back may move it. Checks of written times allow exactly this."""
        return 0.5 * 10.0 ** (-self.time_decimals)

    def tolerance(self) -> float:
        """Half a unit of the last written digit in canonical units, on the axis where that is larger:
        the largest error that rendering and parsing back may add to a canonical coordinate."""
        half_unit = 0.5 * 10.0 ** (-self.decimals)
        return LAYOUTS[self.layout].error_gain * half_unit / min(self.width, self.height)


CANONICAL = BoxFrame("normalised", 1.0, 1.0, "xyxy", decimals=3)
"""The project's canonical frame: normalised xyxy written with 3 decimals, e.g. `[0.412,0.205,0.587,0.931]`."""

THOUSAND = BoxFrame("0-1000", 1000.0, 1000.0, "xyxy", decimals=0)
"""Integers 0-1000 of the image, xyxy (Qwen3-VL, and many grounding models)."""


def pixel_frame(width: float, height: float, layout: str = "xyxy", decimals: int = 0) -> BoxFrame:
    """Pixels of a `width` x `height` image (`layout` "xywh" for HC-STVG/COCO annotations)."""
    return BoxFrame(f"pixels-{layout}", float(width), float(height), layout, decimals)


def qwen25vl_frame(
    width: int,
    height: int,
    min_pixels: int = QWEN25VL_MIN_PIXELS,
    max_pixels: int = QWEN25VL_MAX_PIXELS,
    factor: int = QWEN25VL_FACTOR,
) -> BoxFrame:
    """Qwen2.5-VL's frame for a source image of `width` x `height`: integer pixels xyxy of the input
    after `smart_resize` (the model grounds in absolute coordinates of what it was fed).
    `min_pixels`/`max_pixels` must be those the processor uses for these frames."""
    resized_h, resized_w = smart_resize(int(height), int(width), factor, min_pixels, max_pixels)
    return BoxFrame("qwen2.5-vl", float(resized_w), float(resized_h), "xyxy", decimals=0)


def normalised_cxcywh_frame(scale: float = 1.0, decimals: int = 3) -> BoxFrame:
    """Centre + size normalised to `scale` (1 or 1000), as some datasets (VideoEspresso) write boxes."""
    return BoxFrame(f"cxcywh-{scale:g}", float(scale), float(scale), "cxcywh", decimals)


FRAMES: dict[str, Callable[..., BoxFrame]] = {
    "normalised": lambda: CANONICAL,
    "0-1000": lambda: THOUSAND,
    "pixels": pixel_frame,
    "qwen2.5-vl": qwen25vl_frame,
    "cxcywh": normalised_cxcywh_frame,
}
"""Frames by the name a config uses; values are factories taking that frame's parameters."""


def make_frame(name: str, **params: Any) -> BoxFrame:
    """Build a frame from config: `make_frame("qwen2.5-vl", width=640, height=360, max_pixels=...)`."""
    try:
        factory = FRAMES[name]
    except KeyError:
        raise ValueError(f"unknown box frame {name!r}; known: {sorted(FRAMES)}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"box frame {name!r}: bad parameters {sorted(params)}: {exc}") from None


# --- measures and validity -------------------------------------------------------------------------


def box_area(boxes: ArrayLike) -> FloatArray:
    """Area of each xyxy box; a box with x2 <= x1 or y2 <= y1 has area 0 (never negative)."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0.0, None) * np.clip(b[:, 3] - b[:, 1], 0.0, None)


def box_iou(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """IoU matrix (N, M) of xyxy boxes `a` (N, 4) and `b` (M, 4).

    Boxes that only touch have IoU 0; degenerate or non-finite boxes have IoU 0 with everything
    (a zero union gives 0, not NaN), so the result is always a number in [0, 1].
    """
    a = as_boxes(a)
    b = as_boxes(b)
    # Per axis and in place: (N, M) temporaries only, about half the time of (N, M, 2) broadcasting.
    inter = np.minimum(a[:, None, 2], b[None, :, 2])
    inter -= np.maximum(a[:, None, 0], b[None, :, 0])
    np.clip(inter, 0.0, None, out=inter)
    ih = np.minimum(a[:, None, 3], b[None, :, 3])
    ih -= np.maximum(a[:, None, 1], b[None, :, 1])
    np.clip(ih, 0.0, None, out=ih)
    inter *= ih
    union = np.add(box_area(a)[:, None], box_area(b)[None, :], out=ih)
    union -= inter
    np.divide(inter, union, out=inter, where=union > 0)
    inter[~(union > 0)] = 0.0
    return np.nan_to_num(inter, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def paired_iou(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """IoU of a[i] with b[i] for each i (the diagonal of `box_iou`, in O(N))."""
    a = as_boxes(a)
    b = as_boxes(b)
    if a.shape != b.shape:
        raise ValueError(f"paired_iou needs boxes of the same shape, got {a.shape} and {b.shape}")
    wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0.0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(a) + box_area(b) - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def is_finite(boxes: ArrayLike) -> NDArray[np.bool_]:
    """True where all four numbers of a box are finite."""
    return np.isfinite(as_boxes(boxes)).all(axis=1)


def has_positive_area(boxes: ArrayLike, min_side: float = 0.0) -> NDArray[np.bool_]:
    """True where x2 - x1 > min_side and y2 - y1 > min_side (so reversed and zero-size boxes fail)."""
    b = as_boxes(boxes)
    return ((b[:, 2] - b[:, 0]) > min_side) & ((b[:, 3] - b[:, 1]) > min_side)


def is_inside(boxes: ArrayLike, width: float = 1.0, height: float = 1.0, tol: float = 1e-6) -> NDArray[np.bool_]:
    """True where the box lies in [0, width] x [0, height] (canonical: the unit square), within `tol`."""
    b = as_boxes(boxes)
    hi = _scale(width, height) + tol
    return ((b >= -tol) & (b <= hi)).all(axis=1)


def area_fraction(boxes: ArrayLike, width: float = 1.0, height: float = 1.0) -> FloatArray:
    """Area of each box as a fraction of the image (of the part inside the image)."""
    return box_area(clip_boxes(boxes, width, height)) / (float(width) * float(height))


def clip_boxes(boxes: ArrayLike, width: float = 1.0, height: float = 1.0) -> FloatArray:
    """Clip xyxy boxes to the image [0, width] x [0, height]."""
    return np.clip(as_boxes(boxes), 0.0, _scale(width, height))


# --- regions: unions of several boxes (shapely) ------------------------------------------------------


def _region(boxes: ArrayLike, clip_to: tuple[float, float, float, float] | None) -> Any:
    import shapely

    b = as_boxes(boxes)
    b = b[is_finite(b) & has_positive_area(b)]
    region = shapely.union_all(shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]))
    if clip_to is not None:
        region = shapely.clip_by_rect(region, *clip_to)
    return region


def region_area(boxes: ArrayLike, clip_to: tuple[float, float, float, float] | None = (0.0, 0.0, 1.0, 1.0)) -> float:
    """Area of the union of several boxes (overlaps counted once), clipped to `clip_to` (xmin, ymin,
    xmax, ymax; the canonical unit square by default, None for no clipping). A claim that names a
    group ("two people") with one box each covers this region, which is not a rectangle."""
    return float(_region(boxes, clip_to).area)


def region_iou(
    a: ArrayLike, b: ArrayLike, clip_to: tuple[float, float, float, float] | None = (0.0, 0.0, 1.0, 1.0)
) -> float:
    """IoU of the region covered by boxes `a` with the region covered by boxes `b` (each a union,
    clipped to `clip_to`). 0 when both regions are empty."""
    ra, rb = _region(a, clip_to), _region(b, clip_to)
    union = ra.union(rb).area
    return float(ra.intersection(rb).area / union) if union > 0 else 0.0


# --- matching ----------------------------------------------------------------------------------------


class Matching(NamedTuple):
    """Pairs (rows[k], cols[k]) of a one-to-one assignment, with the score of each pair."""

    rows: NDArray[np.intp]
    cols: NDArray[np.intp]
    scores: FloatArray


def assign_max(scores: ArrayLike, min_score: float = 0.0) -> Matching:
    """One-to-one assignment of rows to columns maximising the total score (Hungarian algorithm,
    scipy's `linear_sum_assignment`); pairs scoring below `min_score`, or not above 0, are dropped.
    Use it directly when the score mixes IoU with something else (e.g. name similarity)."""
    from scipy.optimize import linear_sum_assignment

    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D matrix, got shape {s.shape}")
    s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    if s.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return Matching(empty, empty, np.zeros(0))
    rows, cols = linear_sum_assignment(s, maximize=True)
    kept = s[rows, cols]
    keep = (kept >= min_score) & (kept > 0)
    return Matching(rows[keep], cols[keep], kept[keep])


def hungarian_match(pred: ArrayLike, gt: ArrayLike, min_iou: float = 0.0) -> Matching:
    """Match predicted boxes (rows) to ground-truth boxes (cols) one-to-one, maximising total IoU.
    Pairs with IoU below `min_iou` (or with no overlap at all) are left unmatched."""
    return assign_max(box_iou(pred, gt), min_iou)
