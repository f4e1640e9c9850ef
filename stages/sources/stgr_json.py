"""`stgr_json`: the released Open-o3 Video STGR data (`STGR-SFT.json`, `STGR-RL.json`).

Format: a JSON list; each entry has `task` (one of Open-o3's task names), `question`, `answer`,
`video_path` (relative to `video_dir`), `source`, and for grounded tasks `key_frames [{idx, time,
path}]` (time in seconds, `path` an extracted key-frame image) with `key_items {"<idx>": {"<object
name>": [[x1, y1, x2, y2], ...]}}`: boxes normalised to [0, 1] of the frame. SFT entries carry the
trace in `reasoning_process` (boxes normalised too).

Tasks and answers, mapped to STGR's:
| Open-o3 `task` | STGR task | answer |
| --- | --- | --- |
| `temporal-spatial free-form QA` | `spatio_temporal` | free text |
| `temporal QA` | `temporal` | `"[s, e]"` -> `answer_span` |
| `temporal QA (MCQ)` | `temporal_mcq` | `"B\\n[s, e]"` -> answer `B`, `answer_span` |
| `General video QA MCQ` | `general_mcq` | the letter |
| `General video QA Free-form` | `general_free` | free text |
| `visual QA` (images) | none: ledgered as `unsupported_task` | |
Multiple-choice options are read from the question's lines `A. ...`, `(B) ...`, `C: ...` after its
first line; the released trace goes to `reasoning` unchanged (it is already canonical).
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

from pydantic import Field

from pipeline.stage import Reject, Rejection, UnitContext
from stages import evidence
from stages.schema import meta_dump
from stages.sources.base import Adapter, Entry, expect_shape, make_record, media, read_json, register_adapter

TASKS = {
    "temporal-spatial free-form QA": "spatio_temporal",
    "temporal QA": "temporal",
    "temporal QA (MCQ)": "temporal_mcq",
    "General video QA MCQ": "general_mcq",
    "General video QA Free-form": "general_free",
}
OPTION_LINE = re.compile(r"^\s*[(\[]?([A-H])[)\].:]\s*(.+?)\s*$")


class KeyFrame(Entry):
    idx: int | str
    time: float = Field(ge=0)
    path: str | None = None


class STGREntry(Entry):
    task: str
    question: str
    answer: str
    video_path: str | None = None
    source: str | None = None
    key_frames: list[KeyFrame] = []
    key_items: dict[str, dict[str, list[list[float]]]] = {}
    reasoning_process: str | None = None


def options_of(question: str) -> list[str]:
    """The lettered option lines of a multiple-choice question, as `"A. text"` strings."""
    options = []
    for line in question.splitlines()[1:]:
        match = OPTION_LINE.match(line)
        if match:
            options.append(f"{match[1]}. {match[2]}")
    return options


@register_adapter
class STGRJsonAdapter(Adapter):
    name = "stgr_json"
    required_keys = ("annotations", "video_dir")

    def load_entries(self) -> Sequence[Any]:
        data = read_json(self.annotations)
        expect_shape(self.annotations, data, list, "a JSON list of STGR entries")
        return data

    def entry_label(self, entry: Any, position: int) -> str:
        path = entry.get("video_path") if isinstance(entry, dict) else None
        return f"entry {position} ({path})" if path else f"entry {position}"

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        label = self.entry_label(entry, position)
        e: STGREntry = self.validate(STGREntry, entry, position, label)
        task = TASKS.get(e.task)
        if task is None:
            known = ", ".join(sorted(TASKS))
            raise Reject(Rejection(None, "unsupported_task", f"{self.annotations}: {label}: task {e.task!r} is not a "
                                   f"video task STGR builds (video tasks: {known})", value=e.task,
                                   file=self.annotations, record=label))
        if not e.video_path:
            raise self.reject(position, label, "a video task needs the video file", "video_path")
        answer, span = e.answer.strip(), None
        if task in ("temporal", "temporal_mcq"):
            head, _, rest = answer.partition("\n") if task == "temporal_mcq" else ("", "", answer)
            span = evidence.parse_time_span(rest)
            if span is None:
                raise self.reject(position, label, f"expected a time span '[s, e]' in {answer!r}", "answer")
            answer = head.strip() if task == "temporal_mcq" else f"[{span[0]}, {span[1]}]"
        options = options_of(e.question) if task in ("temporal_mcq", "general_mcq") else None
        if options is not None and not options:
            raise self.reject(position, label, "a multiple-choice question needs option lines like 'A. ...'", "question")
        key_frames = []
        for k, kf in enumerate(e.key_frames):
            items = e.key_items.get(str(kf.idx), {})
            objects = [{"name": name, "box": [float(v) for v in box]} for name, boxes in items.items() for box in boxes]
            bad = next((o for o in objects if len(o["box"]) != 4), None)
            if bad is not None:
                raise self.reject(position, label, f"box of {bad['name']!r} has {len(bad['box'])} numbers",
                                  f"key_items.{kf.idx}")
            key_frames.append({"t_s": kf.time, "objects": objects})
        tracks: dict[str, list[dict[str, Any]]] = {}
        for kf in key_frames:
            for obj in kf["objects"]:
                tracks.setdefault(obj["name"], []).append({"t_s": kf["t_s"], "box": obj["box"]})
        question = e.question.splitlines()[0] if options else e.question
        return [make_record(
            source="stgr_json", source_id=f"{e.video_path}#{position}", task=task,
            media=media(os.path.join(str(self.config["video_dir"]), e.video_path)),
            question=question, options=options, answer=answer, answer_span=list(span) if span else None,
            reasoning=e.reasoning_process, key_frames=key_frames,
            gt={"objects": [{"name": n, "track": t} for n, t in tracks.items()],
                "spans": [{"label": question, "start_s": span[0], "end_s": span[1]}] if span else []},
            meta=meta_dump({"task": e.task, "source": e.source, "entry": position, "video_path": e.video_path,
                            "key_frame_paths": [kf.path for kf in e.key_frames]}))]
