"""`stgr_json`: the released Open-o3 Video STGR data (`STGR-SFT.json`, `STGR-RL.json`), and what
`stgr export --format open-o3` writes.

Format: a JSON list; each entry has `task` (one of Open-o3's task names), `question`, `answer`,
`video_path` (relative to `video_dir`, or absolute), `source`, and for grounded tasks `key_frames
[{idx, time, path}]` (time in seconds, `path` an extracted key-frame image) with `key_items
{"<idx>": {"<object name>": [[x1, y1, x2, y2], ...]}}`: boxes normalised to [0, 1] of the frame.
SFT entries carry the trace in `reasoning_process` (boxes normalised too). `null` stands for
"none" anywhere in `key_frames`/`key_items`: the released trainers load the files with
`datasets.Dataset.from_json`, which fills every key missing from an entry with `None` (and the RL
trainer then deletes those keys again), so files re-saved from such a dataset carry them.

Each entry gets the STGR task its ground truth supports, not only the one its name suggests:
| Open-o3 `task` | ground truth in the entry | STGR task | answer |
| --- | --- | --- | --- |
| `temporal-spatial free-form QA` | boxes at key frames | `spatio_temporal` | free text, as written |
| `temporal-spatial free-form QA` | no boxes, the answer a span | `temporal` | the span |
| `temporal-spatial free-form QA` | no boxes | `general_free` | free text |
| `temporal QA` | the answer a span `"[s, e]"` | `temporal` | as written; `answer_span` [s, e] |
| `temporal QA (MCQ)` | options, `"B\\n[s, e]"` | `temporal_mcq` | as written (letter and span, both scored); `answer_span` |
| `temporal QA (MCQ)` | options, a letter, no span | `general_mcq` | the letter |
| `General video QA MCQ` | options, a letter | `general_mcq` | the letter |
| `General video QA Free-form` | | `general_free` | free text |
| `visual QA` | an image, not a video | none: ledgered as `unsupported_task` | |
A temporal answer without a span, or a multiple-choice entry without option lines or letter, is
ledgered as `malformed_record` naming the field. Options are read from the question's lines
`A. ...`, `(B) ...`, `C: ...` after its first line; the other lines are the question.

An entry written by `stgr export` also carries `stgr {source, task, answer, answer_span}`: what the
released layout cannot hold (the task `spatial` next to `spatio_temporal`, the span of a
spatio-temporal answer, an MCQ answer without the span the released layout appends to it). Where
present it is read back as it is, so an exported record reads back with the same ground truth.
"""
from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field

from pipeline.stage import Reject, Rejection, UnitContext
from stages.lib import evidence
from stages.lib.answers import answer_kind
from stages.lib.schema import TASKS as STGR_TASKS
from stages.lib.schema import meta_dump
from stages.sources.base import Adapter, Entry, make_record, media, register_adapter
from stages.sources.layout import JsonEntries

TASKS = {
    "temporal-spatial free-form QA": "spatio_temporal",
    "temporal QA": "temporal",
    "temporal QA (MCQ)": "temporal_mcq",
    "General video QA MCQ": "general_mcq",
    "General video QA Free-form": "general_free",
}
"""The released video tasks -> the STGR task an entry gets when its ground truth supports it."""
IMAGE_TASKS = ("visual QA",)
OPTION_LINE = re.compile(r"^\s*[(\[]?([A-H])[)\].:]\s*(.+?)\s*$")
Box = list[float]


class KeyFrame(Entry):
    idx: int | str
    time: float = Field(ge=0)
    path: str | None = None


class STGRFields(Entry):
    """The `stgr` block `stgr export` adds: the record's own ground truth."""

    source: str | None = None
    task: str
    answer: str | None = None
    answer_span: list[float] | None = Field(default=None, min_length=2, max_length=2)


class STGREntry(Entry):
    task: str
    question: str
    answer: str
    video_path: str | None = None
    source: str | None = None
    key_frames: list[KeyFrame | None] | None = None
    key_items: dict[str, dict[str, list[Box | None] | None] | None] | None = None
    reasoning_process: str | None = None
    stgr: STGRFields | None = None


def options_of(question: str) -> list[str]:
    """The lettered option lines of a multiple-choice question, as `"A. text"` strings."""
    return [f"{m[1]}. {m[2]}" for m in map(OPTION_LINE.match, question.splitlines()[1:]) if m]


def question_of(question: str) -> str:
    """The question without its option lines."""
    lines = question.splitlines()
    return "\n".join(lines[:1] + [line for line in lines[1:] if not OPTION_LINE.match(line)]).strip()


@register_adapter
class STGRJsonAdapter(Adapter):
    name = "stgr_json"
    layout = JsonEntries(list, "a JSON list of STGR entries")

    def entry_label(self, entry: Any, position: int) -> str:
        path = entry.get("video_path") if isinstance(entry, dict) else None
        return f"entry {position} ({path})" if path else f"entry {position}"

    def _key_frames(self, e: STGREntry, position: int, label: str) -> list[dict[str, Any]]:
        """Key frames with their boxes, `null`s dropped (a key frame without boxes is kept: its time
        is still ground truth for the temporal reward). A box that is not 4 numbers in [0, 1] with
        x1 <= x2 and y1 <= y2 rejects the entry: pixel or centre-size boxes would score as nonsense."""
        items = e.key_items or {}
        key_frames = []
        for kf in e.key_frames or []:
            if kf is None:
                continue
            objects = []
            for name, boxes in (items.get(str(kf.idx)) or {}).items():
                for box in boxes or []:
                    if box is None:
                        continue
                    if len(box) != 4 or not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
                        raise self.reject(position, label, f"box {box} of {name!r} is not [x1, y1, x2, y2] "
                                          f"normalised to [0, 1] with x1 <= x2, y1 <= y2", f"key_items.{kf.idx}")
                    objects.append({"name": name, "box": [float(v) for v in box]})
            key_frames.append({"t_s": kf.time, "objects": objects})
        return key_frames

    def _ground_truth(self, e: STGREntry, position: int,
                      label: str) -> tuple[str, str, list[str] | None, tuple[float, float] | None]:
        """(STGR task, answer, options, answer span) of a released entry (see the module table; a
        spatio-temporal entry without boxes is then re-tasked by `make_record`, as every adapter's)."""
        released = TASKS[e.task]
        answer = e.answer.strip()
        if released in ("temporal_mcq", "general_mcq"):
            options = options_of(e.question)
            if not options:
                raise self.reject(position, label, "a multiple-choice question needs option lines like 'A. ...'",
                                  "question")
            head, _, rest = answer.partition("\n")
            if evidence.parse_option_letter(head, len(options)) is None:
                raise self.reject(position, label, f"expected an option letter of {len(options)} options first "
                                  f"in {answer!r}", "answer")
            span = evidence.parse_time_span(rest) if released == "temporal_mcq" and rest.strip() else None
            return ("temporal_mcq", answer, options, span) if span else ("general_mcq", head.strip(), options, None)
        if released == "temporal":
            span = evidence.parse_time_span(answer)
            if span is None:
                raise self.reject(position, label, f"expected a time span '[s, e]' in {answer!r}", "answer")
            return released, answer, None, span
        if released == "spatio_temporal" and answer_kind(None, answer) == "span":
            return released, answer, None, evidence.parse_time_span(answer)
        return released, answer, None, None

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        label = self.entry_label(entry, position)
        e: STGREntry = self.validate(STGREntry, entry, position, label)
        if e.task not in TASKS:
            known = ", ".join(sorted(TASKS))
            what = "an image task; STGR builds video records" if e.task in IMAGE_TASKS else "not a task of the released data"
            raise Reject(Rejection(None, "unsupported_task", f"{self.annotations}: {label}: task {e.task!r} is {what} "
                                   f"(video tasks: {known})", value=e.task, file=self.annotations, record=label))
        if not e.video_path:
            raise self.reject(position, label, "a video task needs the video file", "video_path")
        key_frames = self._key_frames(e, position, label)
        if e.stgr is not None:
            if e.stgr.task not in STGR_TASKS:
                raise self.reject(position, label, f"{e.stgr.task!r} is not an STGR task {list(STGR_TASKS)}", "stgr.task")
            task, answer = e.stgr.task, e.stgr.answer
            options = options_of(e.question) or None
            span = tuple(e.stgr.answer_span) if e.stgr.answer_span else None
        else:
            task, answer, options, span = self._ground_truth(e, position, label)
        tracks: dict[str, list[dict[str, Any]]] = {}
        for kf in key_frames:
            for obj in kf["objects"]:
                tracks.setdefault(obj["name"], []).append({"t_s": kf["t_s"], "box": obj["box"]})
        question = question_of(e.question) if options else e.question
        return [make_record(
            source="stgr_json", source_id=f"{e.video_path}#{position}", task=task,
            media=media(os.path.join(str(self.config["video_dir"]), e.video_path)),
            question=question, options=options, answer=answer, answer_span=list(span) if span else None,
            reasoning=e.reasoning_process or None, key_frames=key_frames,
            ground_truth={"objects": [{"name": n, "track": t} for n, t in tracks.items()],
                "spans": [{"label": question, "start_s": span[0], "end_s": span[1]}] if span else []},
            meta=meta_dump({"task": e.task, "source": e.source, "entry": position, "video_path": e.video_path,
                            "stgr_source": e.stgr.source if e.stgr else None,
                            "key_frame_paths": [kf.path for kf in e.key_frames or [] if kf is not None]}))]
