"""Grounding metrics as published: temporal IoU, vIoU, V-STaR's spatial mIoU, recall, AM and LGM.

Every function states the definition it follows and where it comes from (docs/evidence.md has the
formulas). Boxes are canonical xyxy (IoU does not depend on the scale, so any common frame works);
times are seconds. Predictions are model output and may be anything: a malformed prediction scores 0,
it never raises. Ground truth is data we built: malformed ground truth raises ValueError.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from stages.lib.geometry import as_boxes, box_iou, paired_iou

LGM_EPS = 1e-6
"""Default floor on 1 - x in LGM when the number of samples is not given (see `vstar_scores`)."""


def _span(value: Any) -> tuple[float, float] | None:
    """A well-formed span (start <= end, both finite), else None."""
    try:
        if isinstance(value, (str, bytes)) or len(value) != 2:
            return None
        start, end = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        return None
    return start, end


def temporal_iou(gt: Sequence[float], pred: Any) -> float:
    """V-STaR temporal IoU: |gt ∩ pred| / (max(ends) - min(starts)), i.e. over the hull of the two.

    For overlapping spans the hull is the union; for disjoint ones the intersection is 0 anyway. A
    prediction that is None, not two finite numbers, or reversed (end < start) scores 0; so does a
    zero hull (both spans the same instant), as in the official script. Spans outside the video are
    not clipped (V-STaR does not clip). Source: V-STaR eval script `calculate_temporal_iou`.
    """
    g = _span(gt)
    if g is None:
        raise ValueError(f"ground-truth span must be [start, end] with start <= end, got {gt!r}")
    p = _span(pred)
    if p is None:
        return 0.0
    inter = max(0.0, min(g[1], p[1]) - max(g[0], p[0]))
    hull = max(g[1], p[1]) - min(g[0], p[0])
    return inter / hull if hull > 0 else 0.0


def _box_or_none(value: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (4,) else None


def viou(gt_tube: Mapping[int, ArrayLike], pred_tube: Mapping[int, ArrayLike], frame_ids: Iterable[int] | None = None) -> float:
    """vIoU of HC-STVG / VidSTG (as evaluated by TubeDETR): (1/|S_u|) * sum over t in S_i of IoU(b_t, b'_t).

    Tubes map a frame index to one box. S_u are the frames in the union span
    [min(starts), max(ends)], S_i those in the intersection span [max(starts), min(ends)]; both are
    taken from `frame_ids` (the frames the benchmark evaluates; default: every frame that has a box in
    either tube). A frame of S_i where one tube has no box (or a malformed one) adds 0. An empty or
    all-malformed prediction scores 0; an empty ground-truth tube raises.
    """
    if not gt_tube:
        raise ValueError("ground-truth tube is empty")
    pred = {int(f): b for f, v in pred_tube.items() if (b := _box_or_none(v)) is not None}
    if not pred:
        return 0.0
    gt = {int(f): as_boxes(v)[0] for f, v in gt_tube.items()}
    frames = np.fromiter(set(frame_ids) if frame_ids is not None else set(gt) | set(pred), dtype=np.int64)
    g0, g1, p0, p1 = min(gt), max(gt), min(pred), max(pred)
    union = frames[(frames >= min(g0, p0)) & (frames <= max(g1, p1))]
    inter = [int(f) for f in frames[(frames >= max(g0, p0)) & (frames <= min(g1, p1))] if f in gt and f in pred]
    if union.size == 0 or not inter:
        return 0.0
    ious = paired_iou(np.stack([gt[f] for f in inter]), np.stack([pred[f] for f in inter]))
    return float(ious.sum() / union.size)


def _time_key(value: Any) -> float | None:
    try:
        key = round(float(value), 6)
    except (TypeError, ValueError):
        return None
    return key if math.isfinite(key) else None


def _pred_boxes(value: Any) -> np.ndarray:
    """A prediction at one time: one box or a list of boxes; malformed boxes are dropped."""
    single = _box_or_none(value)
    if single is not None:
        return single.reshape(1, 4)
    if isinstance(value, (list, tuple)):
        boxes = [b for v in value if (b := _box_or_none(v)) is not None]
        if boxes:
            return np.stack(boxes)
    return np.zeros((0, 4))


def vstar_spatial_miou(
    gt_boxes_by_time: Mapping[Any, ArrayLike], pred_boxes_by_time: Mapping[Any, Any] | None
) -> float:
    """V-STaR spatial mIoU of one question: the mean over ground-truth timestamps of the best IoU of
    the boxes predicted at that timestamp (0 where nothing is predicted there).

    Keys are timestamps (numbers or numeric strings, compared after rounding to 1e-6 s, so "12" and
    12.0 match); a prediction value is one box or a list of boxes. No ground truth, or no
    prediction, gives 0 as in the official script. Source: V-STaR eval `calculate_spatial_metrics`.
    """
    if not gt_boxes_by_time or not pred_boxes_by_time:
        return 0.0
    preds: dict[float, np.ndarray] = {}
    if isinstance(pred_boxes_by_time, Mapping):
        for key, value in pred_boxes_by_time.items():
            k = _time_key(key)
            if k is not None:
                preds[k] = np.concatenate([preds.get(k, np.zeros((0, 4))), _pred_boxes(value)])
    ious = []
    for key, box in gt_boxes_by_time.items():
        k = _time_key(key)
        if k is None:
            raise ValueError(f"ground-truth timestamp {key!r} is not a number")
        candidates = preds.get(k)
        ious.append(float(box_iou(box, candidates).max()) if candidates is not None and len(candidates) else 0.0)
    return float(np.mean(ious))


def recall_at(values: ArrayLike, thresholds: Iterable[float] = (0.3, 0.5, 0.7)) -> dict[float, float]:
    """Fraction of `values` (IoUs) at or above each threshold: R1@IoU=θ (V-STaR, temporal) and its
    per-frame "mAP@θ" (spatial) are this. No values gives 0 for every threshold, as V-STaR does."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return {float(t): (float(np.mean(v >= t)) if v.size else 0.0) for t in thresholds}


def _fraction(name: str, value: float) -> float:
    x = float(value)
    if not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1] (not a percentage), got {value!r}")
    return x


def vstar_scores(acc: float, m_tiou: float, m_viou: float, n_samples: int | None = None) -> dict[str, float]:
    """V-STaR's aggregates of one reasoning chain: AM = (acc + m_tIoU + m_vIoU) / 3 and
    LGM = -(ln(1 - acc) + ln(1 - m_tIoU) + ln(1 - m_vIoU)) / 3. Inputs and outputs are fractions.

    LGM is infinite where a component is exactly 1 (the official script raises there). Each 1 - x
    is floored at 1 / (2 * n_samples) when the number of evaluated questions is known, the usual
    half-count continuity correction: with n questions a perfect score means "fewer than one error in
    n", and half an error is the conventional estimate. That bounds each term by ln(2n) and changes
    nothing unless a component is within 1/(2n) of 1. Without n, the floor is LGM_EPS (1e-6).
    """
    values = [_fraction("acc", acc), _fraction("m_tiou", m_tiou), _fraction("m_viou", m_viou)]
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    floor = 1.0 / (2.0 * n_samples) if n_samples is not None else LGM_EPS
    lgm = -sum(math.log(max(1.0 - x, floor)) for x in values) / 3.0
    return {"AM": sum(values) / 3.0, "LGM": lgm}


def vstar_chain_summary(
    acc: float, chains: Sequence[tuple[float, float]], n_samples: int | None = None
) -> dict[str, float]:
    """AM and LGM of each chain and their means, mAM and mLGM (V-STaR reports two chains:
    what-when-where and what-where-when; `chains` is [(m_tIoU, m_vIoU) per chain]). Keys: `AM_1`,
    `LGM_1`, `AM_2`, … and `mAM`, `mLGM`; all fractions."""
    if not chains:
        raise ValueError("need at least one chain of (m_tiou, m_viou)")
    out: dict[str, float] = {}
    for i, (m_tiou, m_viou) in enumerate(chains, start=1):
        scores = vstar_scores(acc, m_tiou, m_viou, n_samples)
        out[f"AM_{i}"], out[f"LGM_{i}"] = scores["AM"], scores["LGM"]
    out["mAM"] = sum(out[f"AM_{i}"] for i in range(1, len(chains) + 1)) / len(chains)
    out["mLGM"] = sum(out[f"LGM_{i}"] for i in range(1, len(chains) + 1)) / len(chains)
    return out
