"""`vidstg`: VidSTG sentence annotations (Guaranteer/VidSTG-Dataset, `annotations/*_annotations.json`).

Format: a JSON list; each entry has `vid`, `fps`, `frame_count`, `width`, `height`,
`used_segment {begin_fid, end_fid}`, `subject/objects [{tid, category}]`, `used_relation {subject_tid,
object_tid, predicate, begin_fid, end_fid}`, `temporal_gt {begin_fid, end_fid}`,
`captions [{description, type, target_id}]` (declarative) and `questions [...]` (interrogative).

Units: frame indices at the native `fps`, `end_fid` exclusive. Conversion: `t = fid / fps`, so
`temporal_gt` frames [104, 389) at 29.97 fps become the span [3.470, 12.980] s; `used_segment`
becomes the record's `clip` bound (the part of the video the sentence is about).

Records: one record per caption and per question of an entry. With the target's boxes (see below)
it is `spatio_temporal`: a caption asks when and where (answer: the span), a question is answered by
the caption that describes the same target (`target_id`) where the entry has one. Without boxes the
file carries temporal ground truth only, so the record is `temporal` (answer: `answer_span`), which
the default filter can check; a spatio-temporal record without boxes could never pass it.
Boxes: VidSTG keeps them in VidOR trajectory files, not in this file. Set `trajectories_dir` to a
folder of VidOR per-video JSON files (`<vid>.json`, anywhere below it: `{"trajectories": [[{"tid",
"bbox": {"xmin", "ymin", "xmax", "ymax"}}, ...] per frame]}` in pixels) to get the target's track and
key frames; without it the records carry the temporal ground truth only.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from pipeline.settings import setting
from pipeline.stage import UnitContext
from stages.lib.geometry import pixels_to_normalised
from stages.sources.base import Adapter, Entry, TrackSettings, make_record, media, read_json, register_adapter
from stages.sources.layout import JsonEntries
from stages.lib.schema import meta_dump


class FrameRange(Entry):
    begin_fid: int = Field(ge=0)
    end_fid: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "FrameRange":
        if self.end_fid <= self.begin_fid:
            raise ValueError(f"end_fid ({self.end_fid}) must be greater than begin_fid ({self.begin_fid})")
        return self


class VidObject(Entry):
    tid: int
    category: str


class Sentence(Entry):
    description: str
    target_id: int
    type: str | None = None


class VidSTGEntry(Entry):
    vid: str
    fps: PositiveFloat
    frame_count: PositiveInt
    width: PositiveInt
    height: PositiveInt
    used_segment: FrameRange
    temporal_gt: FrameRange
    subject_objects: list[VidObject] = Field(alias="subject/objects")
    used_relation: dict[str, Any] | None = None
    captions: list[Sentence] = []
    questions: list[Sentence] = []


@register_adapter
class VidSTGAdapter(Adapter):
    name = "vidstg"
    layout = JsonEntries(list, "a JSON list of VidSTG entries")

    @dataclass(kw_only=True)
    class Config(TrackSettings):
        trajectories_dir: str | None = setting(None, "VidOR's per-video JSON files with the boxes (<vid>.json); "
                                                     "null: spans only", path=True)

    cfg: Config

    def entry_label(self, entry: Any, position: int) -> str:
        vid = entry.get("vid") if isinstance(entry, dict) else None
        return f"entry {position} (vid {vid})" if vid else f"entry {position}"

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        label = self.entry_label(entry, position)
        e: VidSTGEntry = self.validate(VidSTGEntry, entry, position, label)
        if not e.captions and not e.questions:
            raise self.reject(position, label, "the entry has neither captions nor questions", "captions")
        categories = {o.tid: o.category for o in e.subject_objects}
        span = [round(e.temporal_gt.begin_fid / e.fps, 6), round(e.temporal_gt.end_fid / e.fps, 6)]
        clip = {"start_s": round(e.used_segment.begin_fid / e.fps, 6), "end_s": round(e.used_segment.end_fid / e.fps, 6)}
        declared = media(self.media_path(e.vid), fps=e.fps, num_frames=e.frame_count,
                         duration_s=round(e.frame_count / e.fps, 6), width=e.width, height=e.height)
        relation = e.used_relation or {}
        subject = categories.get(relation.get("subject_tid"), "")
        obj = categories.get(relation.get("object_tid"), "")
        label_text = " ".join(p for p in (subject, str(relation.get("predicate", "")).replace("_", " "), obj) if p)
        describe = {s.target_id: s.description for s in e.captions}
        sentences = [("declarative", i, s) for i, s in enumerate(e.captions)] + \
                    [("interrogative", i, s) for i, s in enumerate(e.questions)]
        records = []
        for kind, index, sentence in sentences:
            if sentence.target_id not in categories:
                raise self.reject(position, label, f"target_id {sentence.target_id} is not among subject/objects "
                                  f"{sorted(categories)}", f"{'captions' if kind == 'declarative' else 'questions'}.{index}.target_id")
            name = categories[sentence.target_id]
            track, key_frames = self._track(e, sentence.target_id, name)
            question, answer = _question(kind, sentence.description, describe.get(sentence.target_id), bool(track))
            records.append(make_record(
                source="vidstg", source_id=f"{e.vid}#{position}", task="spatio_temporal", variant=f"{kind}{index}",
                media=declared, clip_window=clip, question=question, answer=answer, answer_span=span, key_frames=key_frames,
                ground_truth={"objects": [{"name": name, "track": track}] if track else [],
                    "spans": [{"label": _span_label(kind, sentence.description, describe.get(sentence.target_id), label_text),
                               "start_s": span[0], "end_s": span[1]}]},
                meta=meta_dump({"vid": e.vid, "entry": position, "sentence_type": kind, "sentence": sentence.description,
                                "target_id": sentence.target_id, "target_category": name,
                                "temporal_gt_fid": [e.temporal_gt.begin_fid, e.temporal_gt.end_fid],
                                "used_segment_fid": [e.used_segment.begin_fid, e.used_segment.end_fid],
                                "used_relation": relation})))
        return records

    def _track(self, e: VidSTGEntry, tid: int, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The target's boxes inside `temporal_gt` from its VidOR trajectory file, and
        `key_frames_per_track` key frames spread evenly over them (first and last included)."""
        folder = self.cfg.trajectories_dir
        if not folder:
            return [], []
        path = _trajectory_index(str(folder)).get(e.vid)
        if path is None:
            return [], []
        frames = read_json(path).get("trajectories") or []
        picked = [(fid, box["bbox"]) for fid in range(e.temporal_gt.begin_fid, min(e.temporal_gt.end_fid, len(frames)))
                  for box in frames[fid] if box.get("tid") == tid]
        if not picked:
            return [], []
        pixels = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for _, b in picked], dtype=np.float64)
        boxes = pixels_to_normalised(pixels, e.width, e.height).round(6).tolist()
        track = [{"t_s": round(fid / e.fps, 6), "box": box} for (fid, _), box in zip(picked, boxes)]
        count = self.cfg.key_frames_per_track
        keys = sorted(set(np.linspace(0, len(track) - 1, max(1, count)).round().astype(int).tolist()))
        return track, [{"t_s": track[k]["t_s"], "objects": [{"name": name, "box": track[k]["box"]}]} for k in keys]


@functools.lru_cache(maxsize=4)
def _trajectory_index(folder: str) -> dict[str, str]:
    return {p.stem: str(p) for p in sorted(Path(folder).rglob("*.json"))} if os.path.isdir(folder) else {}


def _question(kind: str, sentence: str, caption: str | None, has_boxes: bool) -> tuple[str, str | None]:
    """(question, answer) of one sentence; an answer of None is the span (filled from `answer_span`
    by annotate). A declarative sentence asks when (and, with boxes, where) it happens. A question is
    answered by the caption of the same target when the record is spatio-temporal and the entry has
    one (the trace grounds the target); otherwise it asks when the questioned event happens."""
    if kind == "declarative":
        return f'When {"and where " if has_boxes else ""}does this happen: "{sentence}"?', None
    if has_boxes and caption:
        return sentence, caption
    return f"{sentence} When does this happen in the video?", None


def _span_label(kind: str, sentence: str, caption: str | None, relation: str) -> str:
    """What happens in the span, as traces restate it: the declarative sentence itself, or for a
    question the caption of its target; the relation's lemmas ("adult use camera") only as a last resort."""
    if kind == "declarative":
        return sentence.rstrip(". ")
    return (caption or "").rstrip(". ") or relation or sentence
