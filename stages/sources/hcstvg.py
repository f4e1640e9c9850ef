"""`hcstvg`: HC-STVG human-centric spatio-temporal grounding (tzhhhh123/HC-STVG), v1 and v2 key names.

Format: a JSON object keyed by video file name (e.g. `"14_wfEOx36N4jA.mp4"`); each value has
- v1: `bbox` (one `[x, y, w, h]` pixel box per frame, contiguous from `st_frame`), `st_frame` (counts
  from 1), `st_time`, `ed_time` (seconds), `img_num` (frames in the 20 s clip), `caption`, `width`, `height`;
- v2 names, mapped onto v1: `trajectory` -> `bbox`, `English` -> `caption`, `img_hw [h, w]` ->
  `height`, `width`; `ed_frame` is accepted; a v2 entry without `st_time`/`ed_time` takes them from
  `st_frame` / `ed_frame` (1-based, inclusive) at the clip's fps.

Units and conversion: every clip lasts `clip_seconds` (20 by default), so fps = `img_num` / 20. Box k
lies on frame `st_frame - 1 + k` (0-based), at t = (st_frame - 1 + k) / fps, and is converted from
`[x, y, w, h]` pixels to normalised `[x1, y1, x2, y2]` (stages/lib/geometry.py). The temporal ground
truth is `st_time`..`ed_time` as stated; the boxes need not cover it exactly (93 boxes at 30 fps =
3.10 s against a 3.34 s span in `65_xp67EC-Hvwk.mp4`), so the span is taken from the times and the
track from the boxes, each as the dataset gives it.

Records: one `spatio_temporal` record per video, the caption as the sentence to ground, key frames at
the start, middle and end of the track (`key_frames_per_track`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, PositiveInt, model_validator

from pipeline.settings import setting
from pipeline.stage import UnitContext
from stages.lib.geometry import pixels_to_normalised, xywh_to_xyxy
from stages.lib.schema import meta_dump
from stages.sources.base import Adapter, Entry, TrackSettings, make_record, media, register_adapter
from stages.sources.layout import JsonEntries

V2_KEYS = {"trajectory": "bbox", "English": "caption"}


class HCSTVGEntry(Entry):
    bbox: list[list[float]] = Field(min_length=1)
    st_frame: PositiveInt
    st_time: float = Field(ge=0)
    ed_time: float = Field(ge=0)
    img_num: PositiveInt
    caption: str
    width: PositiveInt
    height: PositiveInt

    @model_validator(mode="after")
    def _consistent(self) -> "HCSTVGEntry":
        if self.ed_time <= self.st_time:
            raise ValueError(f"ed_time ({self.ed_time}) must be greater than st_time ({self.st_time})")
        bad = next((k for k, box in enumerate(self.bbox) if len(box) != 4), None)
        if bad is not None:
            raise ValueError(f"bbox[{bad}] has {len(self.bbox[bad])} numbers, expected [x, y, w, h]")
        return self


@register_adapter
class HCSTVGAdapter(Adapter):
    name = "hcstvg"
    layout = JsonEntries(dict, "a JSON object keyed by video file name")

    @dataclass(kw_only=True)
    class Config(TrackSettings):
        clip_seconds: float = setting(20.0, "every HC-STVG clip lasts this long: fps = img_num / clip_seconds", gt=0)

    cfg: Config

    def entry_label(self, entry: Any, position: int) -> str:
        return f"entry {position} ({entry[0]})"

    def _v1(self, value: Any) -> Any:
        """Map v2 key names onto v1 ones (leaving v1 entries untouched)."""
        if not isinstance(value, dict):
            return value
        out = {V2_KEYS.get(k, k): v for k, v in value.items()}
        hw = out.get("img_hw")
        if isinstance(hw, (list, tuple)) and len(hw) == 2:
            out.setdefault("height", hw[0])
            out.setdefault("width", hw[1])
        if "st_time" not in out and isinstance(out.get("img_num"), int) and "ed_frame" in out and "st_frame" in out:
            fps = out["img_num"] / float(self.cfg.clip_seconds)
            out["st_time"] = (out["st_frame"] - 1) / fps
            out["ed_time"] = out["ed_frame"] / fps
        return out

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        video, value = entry
        label = self.entry_label(entry, position)
        e: HCSTVGEntry = self.validate(HCSTVGEntry, self._v1(value), position, label)
        fps = e.img_num / float(self.cfg.clip_seconds)
        frames = e.st_frame - 1 + np.arange(len(e.bbox))
        boxes = pixels_to_normalised(xywh_to_xyxy(np.array(e.bbox, dtype=np.float64)), e.width, e.height).round(6)
        times = np.round(frames / fps, 6)
        track = [{"t_s": float(t), "box": b} for t, b in zip(times.tolist(), boxes.tolist())]
        count = self.cfg.key_frames_per_track
        keys = sorted(set(np.linspace(0, len(track) - 1, max(1, count)).round().astype(int).tolist()))
        name = "person"
        key_frames = [{"t_s": track[k]["t_s"], "objects": [{"name": name, "box": track[k]["box"]}]} for k in keys]
        span = [round(e.st_time, 6), round(e.ed_time, 6)]
        declared = media(self.media_path(video), fps=fps, num_frames=e.img_num,
                         duration_s=round(e.img_num / fps, 6), width=e.width, height=e.height)
        return [make_record(
            source="hcstvg", source_id=video, task="spatio_temporal", media=declared,
            question=f'When and where does this happen: "{e.caption}"?', answer=None, answer_span=span,
            key_frames=key_frames,
            ground_truth={"objects": [{"name": name, "track": track}],
                "spans": [{"label": e.caption, "start_s": span[0], "end_s": span[1]}]},
            meta=meta_dump({"video": video, "caption": e.caption, "st_frame": e.st_frame, "img_num": e.img_num,
                            "fps": fps, "num_boxes": len(e.bbox)}))]
