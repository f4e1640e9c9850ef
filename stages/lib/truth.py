"""The ground truth of a record, looked up by time, and how a claim is checked against it.

`align` scores claims against it, `verify` picks the moment a claimed box is checked at, the template
backend names objects the way align matches them, and `stgr show` draws it: one definition of what
"the ground truth at time T" and "a name that names this object" mean.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.settings import Settings, setting


@dataclass(kw_only=True)
class TruthSettings(Settings):
    """The one setting of "the ground truth at time T", shared by every stage that looks it up
    (`align` scores claims with it, `verify` picks the moment a box is checked at), so that both read
    the same tolerance with the same default."""

    gt_tolerance_s: float = setting(0.25, "a ground-truth track point (or key-frame object) counts at a "
                                    "claim's snapped time when it lies within this many seconds of it", ge=0)


def snap(times: Sequence[float], frame_times: np.ndarray) -> np.ndarray:
    """Each time replaced by the nearest sampled frame time (ties go to the earlier frame); NaN if no frames."""
    t = np.asarray(times, dtype=np.float64)
    if frame_times.size == 0:
        return np.full(t.shape, np.nan)
    right = np.clip(np.searchsorted(frame_times, t), 0, frame_times.size - 1)
    left = np.clip(right - 1, 0, frame_times.size - 1)
    use_left = np.abs(t - frame_times[left]) <= np.abs(frame_times[right] - t)
    return np.where(use_left, frame_times[left], frame_times[right])


class GroundTruth:
    """The ground-truth boxes of one record, looked up by time.

    Tracks give a box per annotated time; a track point counts at time T when it is the nearest point
    of its track and lies within `tolerance` seconds (an object outside its track's span is absent).
    Key-frame objects count at their key frame's time, within the same tolerance, unless a track of
    the same name already gave a box there.
    """

    def __init__(self, tracks: list[tuple[str, np.ndarray, np.ndarray]],
                 key_frames: list[tuple[float, list[tuple[str, Sequence[float]]]]], tolerance: float) -> None:
        """`tracks`: (name, sorted times (T,), boxes (T, 4)); `key_frames`: (time, [(name, box)])."""
        self.tracks = tracks
        self.key_frames = key_frames
        self.tolerance = tolerance

    @staticmethod
    def _key_frames(key_frames: Sequence[Mapping[str, Any]] | None) -> list[tuple[float, list[tuple[str, Sequence[float]]]]]:
        return [(float(kf["t_s"]), [(o.get("name") or "", o["box"]) for o in kf.get("objects") or () if o.get("box") is not None])
                for kf in key_frames or () if kf.get("t_s") is not None]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], tolerance: float) -> "GroundTruth":
        """From one record as Python values (`ground_truth` and `key_frames`)."""
        tracks = []
        for obj in ((record.get("ground_truth") or {}).get("objects") or ()):
            points = [p for p in obj.get("track") or () if p.get("box") is not None and p.get("t_s") is not None]
            if points:
                order = np.argsort([p["t_s"] for p in points], kind="stable")
                times = np.array([points[i]["t_s"] for i in order], dtype=np.float64)
                boxes = np.array([points[i]["box"] for i in order], dtype=np.float64)
                tracks.append((obj.get("name") or "", times, boxes))
        return cls(tracks, cls._key_frames(record.get("key_frames")), tolerance)

    @classmethod
    def for_table(cls, table: pa.Table, tolerance: float) -> list["GroundTruth"]:
        """One per row, with the tracks taken straight from Arrow buffers: per-frame tracks are most
        of a partition's values, and turning them into Python dicts would dominate align's time."""
        objects = pc.struct_field(table.column("ground_truth").combine_chunks(), "objects")
        flat_objects = pc.list_flatten(objects)
        object_row = pc.list_parent_indices(objects).to_numpy(zero_copy_only=False)
        names = pc.fill_null(pc.struct_field(flat_objects, "name"), "").to_pylist()
        tracks = pc.struct_field(flat_objects, "track")
        points = pc.list_flatten(tracks)
        point_object = pc.list_parent_indices(tracks).to_numpy(zero_copy_only=False)
        times = pc.fill_null(pc.struct_field(points, "t_s"), np.nan).to_numpy(zero_copy_only=False)
        box = pc.struct_field(points, "box")
        has_box = box.is_valid().to_numpy(zero_copy_only=False)
        boxes = np.full((len(points), 4), np.nan)
        boxes[has_box] = pc.fill_null(pc.list_flatten(box), np.nan).to_numpy(zero_copy_only=False).reshape(-1, 4)
        keep = has_box & ~np.isnan(times)
        order = np.lexsort((times[keep], point_object[keep]))
        point_object, times, boxes = point_object[keep][order], times[keep][order], boxes[keep][order]
        bounds = np.searchsorted(point_object, np.arange(len(names) + 1))
        per_row: list[list[tuple[str, np.ndarray, np.ndarray]]] = [[] for _ in range(table.num_rows)]
        for k, name in enumerate(names):
            lo, hi = bounds[k], bounds[k + 1]
            if hi > lo:
                per_row[object_row[k]].append((name, times[lo:hi], boxes[lo:hi]))
        key_frames = table.column("key_frames").to_pylist()
        return [cls(per_row[i], cls._key_frames(key_frames[i]), tolerance) for i in range(table.num_rows)]

    @property
    def key_times(self) -> list[float]:
        return sorted({t for t, objs in self.key_frames if objs})

    def at(self, t: float) -> tuple[list[str], np.ndarray]:
        """Names and (N, 4) boxes of the objects present at time `t`."""
        names: list[str] = []
        boxes: list[Sequence[float]] = []
        for name, times, track_boxes in self.tracks:
            i = int(np.argmin(np.abs(times - t)))
            if abs(times[i] - t) <= self.tolerance:
                names.append(name)
                boxes.append(track_boxes[i])
        for kt, objects in self.key_frames:
            if abs(kt - t) <= self.tolerance:
                for name, box in objects:
                    if name not in names:
                        names.append(name)
                        boxes.append(box)
        return names, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _words(name: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", name.lower()))


def name_agrees(claimed: str, gt_name: str) -> bool:
    """True when every word of the ground-truth name appears in the claimed name ("the red circle"
    names "red circle"); free-text names that share no such words are matched on IoU alone."""
    gt_words = _words(gt_name)
    return bool(gt_words) and gt_words <= _words(claimed)


def check_time(claim: Mapping[str, Any], key_times: Sequence[float]) -> float | None:
    """When a claimed box is checked: its snapped time, or for an untimed claim (a spatial question
    about one moment) the record's single key frame; None when there is no such moment."""
    if claim.get("t_s") is not None:
        return claim.get("t_snapped")
    return key_times[0] if len(key_times) == 1 else None
