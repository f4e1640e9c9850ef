"""`jsonl`: a generic, documented format in STGR's own units, for datasets without an adapter.

Format: JSON Lines, one example per line:

    {"video": "clips/a.mp4", "task": "spatio_temporal", "id": "a-1",
     "question": "When does the man pick up the cup, and where is it?", "options": null, "answer": "[2.0, 4.5]",
     "answer_span": [2.0, 4.5], "clip": {"start_s": 0.0, "end_s": 30.0},
     "key_frames": [{"t_s": 2.0, "objects": [{"name": "cup", "box": [0.41, 0.52, 0.48, 0.63]}]}],
     "objects": [{"name": "cup", "track": [{"t_s": 2.0, "box": [0.41, 0.52, 0.48, 0.63]}]}],
     "spans": [{"label": "the man picks up the cup", "start_s": 2.0, "end_s": 4.5}],
     "meta": {"anything": "kept as JSON"}}

Required: `video` (relative to `video_dir`, or absolute) and `task` (one of STGR's tasks). Optional:
`id` (the source's id; default: the line number), everything else. Units are canonical: seconds on
the video's own timeline, boxes `[x1, y1, x2, y2]` normalised to [0, 1]; no conversion is applied.
Options are strings (`"A. text"` by convention), the answer of a multiple-choice task a letter.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from pydantic import ConfigDict, Field, field_validator

from pipeline.errors import InputError
from pipeline.stage import UnitContext
from stages.lib.schema import TASKS, meta_dump
from stages.sources.base import Adapter, Entry, make_record, media, register_adapter
from stages.sources.layout import Lines, Unreadable

Box = tuple[float, float, float, float]


class Strict(Entry):
    """Unknown keys are errors here (a typo such as `answer_spam` must not vanish); put extras in `meta`."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectBox(Strict):
    name: str
    box: Box


class KeyFrame(Strict):
    t_s: float
    objects: list[ObjectBox] = []


class TrackPoint(Strict):
    t_s: float
    box: Box


class GTObject(Strict):
    name: str
    track: list[TrackPoint]


class Span(Strict):
    label: str
    start_s: float
    end_s: float


class Clip(Strict):
    start_s: float = Field(ge=0)
    end_s: float


class JsonlEntry(Strict):
    video: str = Field(min_length=1)
    task: str
    id: str | int | None = None
    question: str | None = None
    options: list[str] | None = None
    answer: str | None = None
    answer_span: tuple[float, float] | None = None
    clip: Clip | None = None
    key_frames: list[KeyFrame] = []
    objects: list[GTObject] = []
    spans: list[Span] = []
    meta: dict[str, Any] = {}

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; expected one of {list(TASKS)}")
        return value


@register_adapter
class JsonlAdapter(Adapter):
    name = "jsonl"
    layout = Lines()

    def check_head(self, head: Sequence[Any]) -> None:
        """The first line decides the format: a file that does not start with a JSON object is not JSON Lines."""
        first = head[0]
        if isinstance(first, Unreadable) or not first[1].lstrip().startswith("{"):
            raise InputError(f"{self.annotations}: line {first[0]}, column 1: expected one JSON object per line")

    def entry_label(self, entry: Any, position: int) -> str:
        return f"line {entry[0]}"

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        number, line = entry
        label = self.entry_label(entry, position)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise self.reject(position, label, f"not valid JSON at column {exc.colno}: {exc.msg}") from None
        e: JsonlEntry = self.validate(JsonlEntry, value, position, label)
        if e.answer_span is not None and e.answer_span[1] < e.answer_span[0]:
            raise self.reject(position, label, f"{list(e.answer_span)} ends before it starts", "answer_span")
        uri = e.video if os.path.isabs(e.video) or "://" in e.video else os.path.join(str(self.config["video_dir"]), e.video)
        source_id = str(e.id) if e.id is not None else f"line{number}"
        return [make_record(
            source="jsonl", source_id=source_id, task=e.task, media=media(uri), question=e.question,
            options=e.options, answer=e.answer, answer_span=list(e.answer_span) if e.answer_span else None,
            clip_window=e.clip.model_dump() if e.clip else None,
            key_frames=[kf.model_dump() for kf in e.key_frames],
            ground_truth={"objects": [o.model_dump() for o in e.objects], "spans": [s.model_dump() for s in e.spans]},
            meta=meta_dump({"line": number, **e.meta}))]
