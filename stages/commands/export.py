"""`stgr export PATH --format open-o3|verl --out OUT`: STGR records in formats other tools read.

- `open-o3`: the JSON of the released Open-o3 Video STGR sets (`STGR-SFT.json` for the stgr-cot set,
  `STGR-RL.json` for stgr-rl, `STGR.json` for records without a set) in the folder OUT, with every key
  frame written as a JPEG under `OUT/kfs/<id>/<k>.jpg`, trainable by the released SFT and RL scripts.
  Each entry: `id`, `task` (upstream task names, see OPEN_O3_TASKS), `source` (the name that routes
  the entry to the right branch of the released trainers, see OPEN_O3_SOURCES), `video_path`
  (relative to OUT, so the folder can be moved with its media or the trainers' video root set to
  it; `--media copy|link` puts each video under `OUT/videos/` and points there; see MediaPlacer),
  `question` (options appended as `A. ...` lines), `answer` (as upstream writes it, see
  `open_o3_answer`), `reasoning_process` (the trace without `<think>` tags), `key_frames [{idx, time,
  path}]` (sorted by time, path relative to `kfs/`), `key_items {idx: {name: [[x1, y1, x2, y2], ...]}}`
  in normalised coordinates, as upstream's Gemini-annotated sets, and `stgr {source, task, answer,
  answer_span}`: the record's own ground truth, which the `stgr_json` adapter reads back.
- `verl`: one Parquet file OUT in verl's RL layout: `data_source`, `prompt` (chat messages, each
  content one string with `<image>` where each frame goes), `images` ([{bytes}], one per `<image>`),
  `ability` (the task), `reward_model {style: rule, ground_truth}` and `extra_info` (id, split,
  index, task, question, answer_span, key frames as JSON). The prompt is what `stgr train rl` shows
  the model: the record rendered by `stages.lib.render.render_example` with the model and data
  settings of `conf/train/rl.yaml` (the frames chosen, their `Frame k at t s:` labels, the box grid,
  the instruction and system prompt), which `--train` takes Hydra overrides of, as training does
  (`--train model=qwen3_vl data.max_frames=32`). `ground_truth` is the rendered example's reward target
  (`stages.lib.targets.reward_target`, JSON text, boxes in the model's frame that the prompt names),
  so `train/rewards.py`'s `compute_score` scores verl's rollouts with the paper's rewards unchanged.
  A record whose boxes cannot be written in the model's frame is left out with a warning, as in
  training.

PATH is anything `stgr inspect` takes; `--split` keeps one set, `--tasks` only the tasks named (the
released SFT script has no `temporal QA (MCQ)` branch and raises on such entries: export its file
without `temporal_mcq`).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import operator
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import compose
from pipeline.errors import ConfigError, InputError
from stages.commands._records import locate
from stages.lib import evidence
from stages.lib.chat import LabelledImage, content_text
from stages.lib.media import FrameReader, jpeg_bytes, time_order
from stages.lib.render import FramePolicy, RenderError, render_example
from stages.lib.schema import LEGACY_SETS, SETS, TASKS

OPEN_O3_TASKS: dict[str, str] = {
    "spatio_temporal": "temporal-spatial free-form QA",
    "spatial": "temporal-spatial free-form QA",  # upstream's "visual QA" is for still images
    "temporal": "temporal QA",
    "temporal_mcq": "temporal QA (MCQ)",
    "general_mcq": "General video QA MCQ",
    "general_free": "General video QA Free-form",
}
"""Our task -> the `task` string of the released STGR json."""

OPEN_O3_SOURCES: dict[str, str] = {
    "temporal-spatial free-form QA": "STR_stgr",
    "temporal QA": "TVG_stgr",
    "temporal QA (MCQ)": "TVG_stgr",
    "General video QA MCQ": "videor1_stgr",
    "General video QA Free-form": "videor1_stgr",
}
"""Upstream task -> the `source` written. The released RL trainer (`src/r1-v/src/open_r1/trainer/
grpo_trainer.py`, `compute_loss`) picks a video root by source and raises on any source that is not
`videoespresso_train_video`, `timerft` or `gqa` and contains none of `STR`, `TVG`, `videor1`; for the
spatio-temporal task it also reads key frames from the STR root (the STR_plm root for sources with
`STR_plm`). These names take the branch whose roots the released SFT script (`sft_multi_task.py`)
uses for the same task: STR (stgr/temporal_grounding videos and kfs), TVG (tvg_r1), videor1. Both
join the root and `video_path`, which is relative to the export folder: set the roots to it."""

OPEN_O3_FILES = {"stgr-cot": "STGR-SFT.json", "stgr-rl": "STGR-RL.json", None: "STGR.json"}

VERL_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
    ("extra_info", pa.struct([("id", pa.string()), ("split", pa.string()), ("index", pa.int64()),
                              ("task", pa.string()), ("question", pa.string()),
                              ("answer_span", pa.list_(pa.float64())), ("key_frames", pa.string())])),
])
"""The verl RL layout (as its multimodal examples write it)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write upstream Open-o3 STGR json (+ key-frame JPEGs) or verl RL Parquet",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, dataset/, split folder, stage output folder or Parquet file")
    p.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="output format")
    p.add_argument("--out", required=True, help="open-o3: output folder; verl: output .parquet file")
    p.add_argument("--split", choices=SETS, default=None, help="export only this set")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, metavar="TASK",
                   help=f"export only records of these tasks ({', '.join(TASKS)})")
    p.add_argument("--media", choices=MEDIA_MODES, default="relative",
                   help="open-o3: `relative` (default) points video_path at each video where it is, relative to OUT; "
                   "`copy` or `link` (a symbolic link) puts each video under OUT/videos/ and points there")
    p.add_argument("--train", nargs="+", default=[], metavar="OVERRIDE",
                   help="verl: Hydra overrides of conf/train/rl.yaml, the training config whose model and data "
                   "settings render the prompts (--train model=qwen3_vl data.max_frames=32)")
    p.set_defaults(func=handler)


def question_text(record: Mapping[str, Any]) -> str:
    """The question with its options as `A. ...` lines (as upstream's MCQ prompts carry them)."""
    question = record.get("question") or ""
    options = record.get("options") or []
    if not options:
        return question
    lines = []
    for k, option in enumerate(options):
        letter = chr(ord("A") + k)
        lines.append(option if option.lstrip().startswith((f"{letter}.", f"({letter})", f"{letter})")) else f"{letter}. {option}")
    return question + "\n" + "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{round(float(value), 3):.15g}"


def _span_of(record: Mapping[str, Any], text: str) -> tuple[float, float]:
    span = record.get("answer_span")
    span = span if span is not None else evidence.parse_time_span(text)
    if span is None:
        raise InputError(f"record {record.get('id')}: task {record.get('task')!r} needs a time span: field "
                         f"'answer_span' is empty and field 'answer' ({text!r}) holds none")
    return float(span[0]), float(span[1])


def open_o3_answer(record: Mapping[str, Any]) -> str:
    """The answer as the released trainers read it: `temporal QA` a span `"[s, e]"` (they
    `ast.literal_eval` it), `temporal QA (MCQ)` the letter, a newline and the span (`"B\\n[3.2, 5.6]"`),
    `General video QA MCQ` the bare letter (their accuracy compares it with the completion's letter);
    every other answer as it is. Raises InputError naming the record when the record lacks the span
    or letter its task needs."""
    answer = (record.get("answer") or "").strip()
    task = record.get("task")
    if task == "temporal":
        s, e = _span_of(record, answer)
        return f"[{_seconds(s)}, {_seconds(e)}]"
    if task in ("temporal_mcq", "general_mcq"):
        num_options = len(record.get("options") or []) or None
        letter = evidence.parse_option_letter(answer.split("\n", 1)[0], num_options)
        if letter is None:
            raise InputError(f"record {record.get('id')}: field 'answer' ({answer!r}) holds no option letter "
                             f"of its {num_options or 0} options")
        if task == "general_mcq":
            return letter
        s, e = _span_of(record, answer)
        return f"{letter}\n[{_seconds(s)}, {_seconds(e)}]"
    return answer


def _nearest(images: list[tuple[float, LabelledImage]], t: float) -> LabelledImage:
    return min(images, key=lambda item: abs(item[0] - t))[1]


def _timed_images(record: Mapping[str, Any], reader: FrameReader) -> list[tuple[float, LabelledImage]]:
    return list(zip([f["t_s"] for f in time_order(record)], reader.images(record)))


MEDIA_MODES = ("relative", "copy", "link")


class MediaPlacer:
    """The `video_path` of an exported entry: relative to the export folder, never absolute, so the
    folder works on another machine (with `copy`) or wherever the trainers' video root points.

    `relative` points at the video where it is; `copy` and `link` put it under `OUT/videos/<name>`
    (a second video of the same name gets a digest of its path in its name) and point there. A video
    on an object store (`s3://...`) keeps its URI: no local path leads to it.
    """

    def __init__(self, out: str, mode: str = "relative") -> None:
        if mode not in MEDIA_MODES:
            raise ConfigError(f"--media {mode}: expected one of {list(MEDIA_MODES)}")
        self.out = os.path.abspath(out)
        self.mode = mode
        self.placed: dict[str, str] = {}

    def place(self, uri: str | None, record_id: str) -> str | None:
        if not uri or "://" in uri:
            return uri
        source = os.path.abspath(uri)
        if self.mode == "relative":
            return os.path.relpath(source, self.out)
        if source in self.placed:
            return self.placed[source]
        if not os.path.isfile(source):
            raise InputError(f"record {record_id}: field 'media.uri' names {uri}, which is not a file; "
                             f"--media {self.mode} needs the video")
        stem, ext = os.path.splitext(os.path.basename(source))
        rel = f"videos/{stem}{ext}"
        if rel in self.placed.values():
            rel = f"videos/{stem}-{hashlib.sha256(source.encode()).hexdigest()[:8]}{ext}"
        target = os.path.join(self.out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            os.remove(target)
        if self.mode == "copy":
            shutil.copyfile(source, target)
        else:
            os.symlink(source, target)
        self.placed[source] = rel
        return rel


def open_o3_entry(record: Mapping[str, Any], reader: FrameReader, kfs_dir: str,
                  media: MediaPlacer | None = None) -> dict[str, Any]:
    """One upstream STGR entry; writes the record's key-frame JPEGs under `kfs_dir/<id>/` and places
    its video with `media` (default: relative to the folder above `kfs_dir`)."""
    task = record.get("task")
    if task not in OPEN_O3_TASKS:
        raise InputError(f"record {record.get('id')}: field 'task' is {task!r}; known: {sorted(OPEN_O3_TASKS)}")
    answer = open_o3_answer(record)  # before any file is written: it names a record it cannot export
    key_frames, key_items = [], {}
    images = _timed_images(record, reader) if record.get("key_frames") else []
    for k, key_frame in enumerate(sorted(record.get("key_frames") or [], key=lambda kf: kf["t_s"])):
        rel = f"{record['id']}/{k}.jpg"
        os.makedirs(os.path.join(kfs_dir, record["id"]), exist_ok=True)
        with open(os.path.join(kfs_dir, rel), "wb") as out:
            out.write(_nearest(images, key_frame["t_s"]).jpeg)
        key_frames.append({"idx": k, "time": key_frame["t_s"], "path": rel})
        items: dict[str, list[list[float]]] = {}
        for obj in key_frame.get("objects") or []:
            items.setdefault(obj["name"], []).append([round(v, 4) for v in obj["box"]])
        key_items[str(k)] = items
    span = record.get("answer_span")
    media = media or MediaPlacer(os.path.dirname(os.path.abspath(kfs_dir)))
    return {
        "id": record["id"], "task": OPEN_O3_TASKS[task], "source": OPEN_O3_SOURCES[OPEN_O3_TASKS[task]],
        "video_path": media.place((record.get("media") or {}).get("uri"), record["id"]),
        "question": question_text(record),
        "answer": answer, "reasoning_process": record.get("reasoning") or "",
        "key_frames": key_frames, "key_items": key_items,
        "stgr": {"source": record.get("source"), "task": task, "answer": record.get("answer"),
                 "answer_span": [float(v) for v in span] if span is not None else None},
    }


def export_open_o3(records: Iterable[dict[str, Any]], out: str, media: str = "relative") -> dict[str, int]:
    """Write the STGR json files and key frames into folder `out` (videos placed by `media`, see
    MediaPlacer); returns entries per file."""
    kfs = os.path.join(out, "kfs")
    os.makedirs(kfs, exist_ok=True)
    reader = FrameReader()
    placer = MediaPlacer(out, media)
    by_file: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_file.setdefault(OPEN_O3_FILES[record.get("split")], []).append(open_o3_entry(record, reader, kfs, placer))
    for name, entries in by_file.items():
        with open(os.path.join(out, name), "w") as handle:
            json.dump(entries, handle, indent=1, ensure_ascii=False)
    return {name: len(entries) for name, entries in by_file.items()}


def training_view(overrides: Sequence[str] = ()) -> tuple[FramePolicy, dict[str, Any]]:
    """The model's frame policy and the data settings of `stgr train rl` (conf/train/rl.yaml with
    `overrides`): what decides the prompt of every exported verl row."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(overrides, config_name="train/rl"), resolve=True)
    return FramePolicy.from_config(cfg["model"], cfg["data"]), cfg["data"]


def verl_row(record: Mapping[str, Any], index: int, policy: FramePolicy, data: Mapping[str, Any],
             reader: FrameReader) -> dict[str, Any]:
    """One verl RL example: the record as training renders it (`render_example`), frames as `<image>`
    placeholders in the message text; the rendered reward target (boxes in the model's frame, which
    the prompt names) as the rule's ground truth. RenderError when the boxes cannot be written there."""
    example = render_example(record, policy, data.get("instruction") or "", data.get("system_prompt"), reader=reader)
    key_frames = [{"t_s": kf["t_s"], "objects": [{"name": o["name"], "box": list(o["box"])} for o in kf.get("objects") or []]}
                  for kf in record.get("key_frames") or []]
    return {
        "data_source": f"stgr/{record.get('source')}",
        "prompt": [{"role": m["role"], "content": content_text(m["content"], "<image>")} for m in example.prompt()],
        "images": [{"bytes": jpeg_bytes(image)} for image in example.images],
        "ability": record.get("task"),
        "reward_model": {"style": "rule", "ground_truth": json.dumps(example.reward_target)},
        "extra_info": {"id": record["id"], "split": record.get("split"), "index": index, "task": record.get("task"),
                       "question": record.get("question"), "answer_span": record.get("answer_span"),
                       "key_frames": json.dumps(key_frames)},
    }


def export_verl(records: Iterable[dict[str, Any]], out: str, overrides: Sequence[str] = (),
                rows_per_group: int = 64) -> dict[str, int]:
    """Write the verl Parquet file `out`, streaming row groups; returns its row count."""
    policy, data = training_view(overrides)
    reader = FrameReader()
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    count = skipped = 0
    pending: list[dict[str, Any]] = []
    with pq.ParquetWriter(out, VERL_SCHEMA) as writer:
        for record in records:
            try:
                pending.append(verl_row(record, count, policy, data, reader))
            except RenderError as exc:
                skipped += 1
                print(f"stgr export: left out: {exc}", file=sys.stderr)
                continue
            count += 1
            if len(pending) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(pending, schema=VERL_SCHEMA))
                pending = []
        writer.write_table(pa.Table.from_pylist(pending, schema=VERL_SCHEMA))
    if skipped:
        print(f"stgr export: left out {skipped} record(s) whose boxes cannot be written in the model's frame",
              file=sys.stderr)
    return {os.path.basename(out): count}


EXPORTERS = {"open-o3": export_open_o3, "verl": export_verl}


def handler(args: argparse.Namespace) -> int:
    if args.train and args.format != "verl":
        raise ConfigError(f"--train {' '.join(args.train)}: only --format verl renders prompts from the training config")
    if args.media != "relative" and args.format != "open-o3":
        raise ConfigError(f"--media {args.media}: only --format open-o3 writes video paths (verl embeds the frames)")
    located = locate(args.path)
    legacy = [old for old, new in LEGACY_SETS.items() if new == args.split]  # a schema 1.x dataset's value
    conditions = ([pc.field("split").isin([args.split, *legacy])] if args.split else []) + \
        ([pc.field("task").isin(args.tasks)] if args.tasks else [])
    where = functools.reduce(operator.and_, conditions) if conditions else None
    records = located.iter_records(where)
    counts = export_verl(records, args.out, args.train) if args.format == "verl" else \
        export_open_o3(records, args.out, args.media)
    for name, n in counts.items():
        print(f"{args.out}: {name}: {n} records")
    return 0
