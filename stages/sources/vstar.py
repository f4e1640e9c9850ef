"""`vstar`: the V-STaR benchmark annotations (V-STaR-Bench/V-STaR, `V_STaR_test.json`).

Format: a JSON list; each entry has `vid`, `domain`, `fps`, `width`, `height`, `frame_count`,
`question` / `answer` (the "what" question, free form), `temporal_question` with `timestamps
[start, end]` (seconds), `spatial_question` (and `spatial_question_2` of the second chain), `object`
(what the boxes show) and `bboxes`: pixel boxes of `object` at several frames, either flat
(`{"timestamp", "frame_index", "xmin", "ymin", "xmax", "ymax"}`, as the official evaluation reads
them) or keyed (`{"<timestamp>_<frame_index>": {"xmin", ...}}`, as the README shows); both are read.

Units and conversion: `timestamps` are seconds; a box's time is `frame_index / fps` (the video's own
timeline) where the frame index is given, else its `timestamp`; pixel xyxy boxes are normalised by
`width` x `height` (stages/lib/geometry.py).

Records, one per link of the chain: `general_free` (question, answer), `temporal` (temporal_question,
`answer_span`), `spatial` (spatial_question, the boxes as key frames and track); all share the
ground truth (the object's track and the span).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import PositiveFloat, PositiveInt

from pipeline.stage import UnitContext
from stages.lib.geometry import pixels_to_normalised
from stages.lib.schema import meta_dump
from stages.sources.base import Adapter, Entry, make_record, media, register_adapter
from stages.sources.layout import JsonEntries

CORNERS = ("xmin", "ymin", "xmax", "ymax")


class VStarEntry(Entry):
    vid: str
    fps: PositiveFloat
    width: PositiveInt
    height: PositiveInt
    frame_count: PositiveInt
    question: str
    answer: str
    temporal_question: str | None = None
    timestamps: tuple[float, float] | None = None
    spatial_question: str | None = None
    object: str | None = None
    domain: str | None = None
    bboxes: list[dict[str, Any]] = []


@register_adapter
class VStarAdapter(Adapter):
    name = "vstar"
    layout = JsonEntries(list, "a JSON list of V-STaR entries")

    def entry_label(self, entry: Any, position: int) -> str:
        vid = entry.get("vid") if isinstance(entry, dict) else None
        return f"entry {position} (vid {vid})" if vid else f"entry {position}"

    def _boxes(self, e: VStarEntry, position: int, label: str) -> list[tuple[float, list[float]]]:
        """(time, pixel xyxy) of every box, in time order, from either layout."""
        flat = []
        for k, item in enumerate(e.bboxes):
            if all(c in item for c in CORNERS):
                flat.append((k, item.get("timestamp"), item.get("frame_index"), item))
                continue
            if len(item) != 1 or not isinstance(next(iter(item.values())), dict):
                raise self.reject(position, label, "expected {xmin, ymin, xmax, ymax, timestamp, frame_index} or "
                                  "{'<timestamp>_<frame_index>': {xmin, ...}}", f"bboxes.{k}")
            key, inner = next(iter(item.items()))
            stamp, _, index = str(key).partition("_")
            flat.append((k, stamp, index or None, inner))
        out = []
        for k, stamp, index, box in flat:
            try:
                t = int(index) / e.fps if index not in (None, "") else float(stamp)
                corners = [float(box[c]) for c in CORNERS]
            except (KeyError, TypeError, ValueError):
                raise self.reject(position, label, "a box needs numbers xmin, ymin, xmax, ymax and a frame_index "
                                  "or timestamp", f"bboxes.{k}") from None
            out.append((round(t, 6), corners))
        return sorted(out, key=lambda pair: pair[0])

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        label = self.entry_label(entry, position)
        e: VStarEntry = self.validate(VStarEntry, entry, position, label)
        if e.timestamps is not None and not e.timestamps[0] <= e.timestamps[1]:
            raise self.reject(position, label, f"{list(e.timestamps)} ends before it starts", "timestamps")
        name = e.object or "target"
        pairs = self._boxes(e, position, label)
        track = []
        if pairs:
            boxes = pixels_to_normalised(np.array([b for _, b in pairs]), e.width, e.height).round(6).tolist()
            track = [{"t_s": t, "box": box} for (t, _), box in zip(pairs, boxes)]
        span = list(e.timestamps) if e.timestamps is not None else None
        gt = {"objects": [{"name": name, "track": track}] if track else [],
              "spans": [{"label": e.temporal_question or e.question, "start_s": span[0], "end_s": span[1]}] if span else []}
        declared = media(self.media_path(e.vid), fps=e.fps, num_frames=e.frame_count,
                         duration_s=round(e.frame_count / e.fps, 6), width=e.width, height=e.height)
        key_frames = [{"t_s": p["t_s"], "objects": [{"name": name, "box": p["box"]}]} for p in track]
        common = {"source": "vstar", "source_id": f"{e.vid}#{position}", "media": declared, "ground_truth": gt,
                  "meta": meta_dump({"vid": e.vid, "entry": position, "domain": e.domain, "object": e.object,
                                     "spatial_question_2": (entry or {}).get("spatial_question_2")})}
        records = [make_record(task="general_free", question=e.question, answer=e.answer, answer_span=span,
                               key_frames=key_frames, **common)]
        if e.temporal_question and span:
            records.append(make_record(task="temporal", question=e.temporal_question, answer_span=span,
                                       key_frames=key_frames, **common))
        if e.spatial_question and key_frames:
            records.append(make_record(task="spatial", question=e.spatial_question, answer_span=span,
                                       key_frames=key_frames, **common))
        return records
