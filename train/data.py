"""STGR shards -> chat examples a vision-language model trains on.

One record becomes one single-turn chat: the user turn holds a total-length line, the chosen frames
as images each preceded by its label `Frame k at t s:` (times on the source video's own timeline,
the same timeline the trace cites; laid out by `stages.lib.chat`, as the annotation backends lay
them out), the question, the options and the output instruction; the assistant turn is
`<think>reasoning</think><answer>answer</answer>` with every box rewritten from the canonical
normalised frame into the model's own frame (Qwen2.5-VL: integer pixels of the resized input) by
`stages.lib.evidence.reframe_text`, never by hand.

Why frames as labelled images rather than the processor's video path: the labels give the model
the exact timestamp of each frame (the video path only gives it a frame rate, and the sampled
frames are not uniform: key frames are added at ground-truth times), the processor's video reader
needs torchcodec, and TRL's GRPOTrainer has no video column. This is also the reference's
multi-image form.

`render_example` is the one place that decides what the model sees; evaluation reuses it so a
model is tested on exactly the prompt it was trained on.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import InputError
from stages.lib import evidence, geometry
from stages.lib.chat import frames_content
from stages.lib.answers import record_answer_kind
from stages.lib.schema import TASKS
from stages.lib.targets import (  # noqa: F401 - frame_*: for train.eval
    frame_from_dict,
    frame_to_dict,
    reward_target,
)

log = logging.getLogger("stgr.train.data")

#: Columns a record needs to be rendered (others are carried along or ignored).
REQUIRED = ("id", "task", "frames", "question", "answer")

#: Part of the rendered-dataset cache key: bump it whenever rendering changes what the model sees
#: for the same shards and options (2: `stages.lib.chat` separators, boxes moved by `reframe_text`).
RENDER_VERSION = 2


@dataclass(frozen=True)
class FramePolicy:
    """Which frames the model sees and in which coordinate frame boxes are written.

    `min_pixels`/`max_pixels` must be what the processor uses: together with the frame's size they
    fix Qwen2.5-VL's resized input, hence the pixel grid its boxes live on.
    """

    max_frames: int = 16
    box_frame: str = "qwen2.5-vl"
    min_pixels: int = geometry.QWEN25VL_MIN_PIXELS
    max_pixels: int = geometry.QWEN25VL_MAX_PIXELS

    @classmethod
    def from_config(cls, model: Mapping[str, Any], data: Mapping[str, Any]) -> "FramePolicy":
        return cls(
            max_frames=int(data.get("max_frames", cls.max_frames)),
            box_frame=str(model.get("box_frame", cls.box_frame)),
            min_pixels=int(model.get("min_pixels", cls.min_pixels)),
            max_pixels=int(model.get("max_pixels", cls.max_pixels)),
        )

    def frame_for(self, width: int, height: int) -> geometry.BoxFrame:
        """The model's box frame for source images of `width` x `height` pixels."""
        if self.box_frame not in geometry.FRAMES:
            raise ValueError(f"model.box_frame: unknown frame {self.box_frame!r}; known: {sorted(geometry.FRAMES)}")
        offered = {"width": width, "height": height, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        accepted = inspect.signature(geometry.FRAMES[self.box_frame]).parameters
        return geometry.make_frame(self.box_frame, **{k: v for k, v in offered.items() if k in accepted})


@dataclass
class RenderedExample:
    """A record as the model sees it. `messages` ends with the assistant target; `prompt()` omits it."""

    id: str
    task: str
    messages: list[dict[str, Any]]
    images: list[Any]
    target: str
    frame: geometry.BoxFrame
    reward_target: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["role"] != "assistant"]


# --- reading shards ---------------------------------------------------------------------------------


def split_dir(data_dir: str | Path, split: str) -> Path:
    """`data.dir` may be a run directory (`RUN/dataset/<split>`) or the dataset folder itself."""
    root = Path(data_dir)
    for candidate in (root / "dataset" / split, root / split):
        if candidate.is_dir():
            return candidate
    raise InputError(f"data.dir: no '{split}' folder under {root} (expected {root}/dataset/{split} from `stgr build`)")


def shard_files(data_dir: str | Path, split: str) -> list[Path]:
    files = sorted(split_dir(data_dir, split).glob("*.parquet"))
    if not files:
        raise InputError(f"data.dir: {split_dir(data_dir, split)} holds no .parquet shards")
    return files


def data_fingerprint(files: Sequence[Path], *parts: Any) -> str:
    """Changes whenever a shard changes (name, size, mtime) or a rendering option does."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1e".encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load_records(
    data_dir: str | Path, split: str, max_records: int | None = None, tasks: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The split's records as plain dicts, sorted by id (stable across machines), checked for the
    columns rendering needs; a bad record raises InputError naming the file, the record and the field."""
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise InputError(f"data.tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
    records = []
    for path in shard_files(data_dir, split):
        table = pq.read_table(path)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}")
        for row in table.to_pylist():
            for name in REQUIRED:
                if row.get(name) in (None, [], ""):
                    raise InputError(f"{path}: record {row.get('id')!r}: field '{name}' is empty")
            if tasks is None or row["task"] in tasks:
                row["_file"] = str(path)
                records.append(row)
    records.sort(key=lambda r: r["id"])
    return records[:max_records] if max_records is not None else records


# --- frames -----------------------------------------------------------------------------------------


def key_times(record: Mapping[str, Any]) -> list[float]:
    return [float(kf["t_s"]) for kf in record.get("key_frames") or [] if kf.get("t_s") is not None]


def select_frames(times: Sequence[float], keys: Sequence[float], max_frames: int) -> list[int]:
    """Positions (in time order) of at most `max_frames` frames: the frame nearest each key time
    first (the evidence must be visible), then frames spread uniformly over the rest."""
    n = len(times)
    if n <= max_frames:
        return list(range(n))
    t = np.asarray(times, dtype=float)
    chosen: list[int] = []
    for k in keys:
        pos = int(np.argmin(np.abs(t - k)))
        if pos not in chosen:
            chosen.append(pos)
    chosen = chosen[:max_frames]
    rest = [i for i in range(n) if i not in set(chosen)]
    need = max_frames - len(chosen)
    if need > 0 and rest:
        picks = np.linspace(0, len(rest) - 1, num=min(need, len(rest)))
        chosen.extend(rest[int(round(p))] for p in picks)
    return sorted(set(chosen))


def load_images(record: Mapping[str, Any], positions: Sequence[int], base_dir: Path | None = None) -> list[Any]:
    """PIL images of the chosen frames: the embedded JPEG bytes when the shard has them (self-contained
    shards), else decoded from `media.uri` with decord at the recorded frame indices."""
    from PIL import Image

    frames = record["frames"]
    if all(frames[p].get("jpeg") for p in positions):
        return [Image.open(io.BytesIO(frames[p]["jpeg"])).convert("RGB") for p in positions]
    media = record.get("media") or {}
    uri = media.get("uri")
    if not uri:
        raise InputError(f"{record.get('_file')}: record {record['id']!r}: frames carry no JPEG and 'media.uri' is empty")
    path = Path(uri.removeprefix("file://"))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        batch = reader.get_batch([int(frames[p]["index"]) for p in positions]).asnumpy()
    except Exception as exc:  # decord raises its own DECORDError and RuntimeError types
        raise InputError(f"{record.get('_file')}: record {record['id']!r}: cannot decode 'media.uri' {path}: {exc}") from exc
    return [Image.fromarray(frame) for frame in batch]


# --- rendering --------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """Times in labels: up to two decimals, trailing zeros dropped (the grammar's `<t>` spelling)."""
    return geometry.CANONICAL.format_time(seconds)


class RenderError(InputError):
    """A record whose trace cannot be written in the model's frame (see `render_target`)."""


def _same_claim(a: evidence.Claim, b: evidence.Claim, frame: geometry.BoxFrame) -> bool:
    """Equal up to what writing in `frame` may round away."""
    if a.name != b.name or len(a.boxes) != len(b.boxes) or (a.t is None) != (b.t is None):
        return False
    if a.t is not None and abs(a.t - b.t) > 0.5 * 10.0 ** -frame.time_decimals + 1e-9:
        return False
    return not a.boxes or bool(np.allclose(a.boxes, b.boxes, atol=frame.tolerance() + 1e-9, rtol=0))


def render_target(record: Mapping[str, Any], frame: geometry.BoxFrame) -> str:
    """`<think>…</think><answer>…</answer>` with every box moved from canonical to `frame`.

    `evidence.reframe_text` rewrites every box, in any spelling the grammar accepts, and keeps the
    prose verbatim. The result is parsed back in `frame` and must give the record's claims and answer
    box (within the frame's rounding); if it does not (a box that cannot be written in `frame`, such
    as one that overflows it), RenderError rather than train on boxes in two frames at once. Whether
    the answer is a box is read from the answer itself (`stages.lib.answers.record_answer_kind`).
    """
    reasoning, answer = str(record.get("reasoning") or "").strip(), str(record["answer"]).strip()
    canonical = f"<think>{reasoning}</think><answer>{answer}</answer>"
    where = f"{record.get('_file')}: record {record['id']!r}"
    box_answer = record_answer_kind(record) == "box"
    answer_box = evidence.parse_box_answer(canonical) if box_answer else None
    if frame == geometry.CANONICAL:
        return canonical
    target = evidence.reframe_text(canonical, geometry.CANONICAL, frame)
    before, after = evidence.parse_trace(canonical).claims, evidence.parse_trace(target, frame).claims
    if len(before) != len(after) or not all(_same_claim(a, b, frame) for a, b in zip(before, after)):
        raise RenderError(f"{where}: field 'reasoning': its boxes cannot be written in frame {frame.name} "
                          f"({frame.width:g} x {frame.height:g}); parsed back they differ")
    if box_answer:
        moved_box = evidence.parse_box_answer(target, frame)
        if moved_box is None or not np.allclose(answer_box, moved_box, atol=frame.tolerance() + 1e-9, rtol=0):
            raise RenderError(f"{where}: field 'answer': its box cannot be written in frame {frame.name} "
                              f"({frame.width:g} x {frame.height:g}); parsed back it differs")
    return target


def render_example(
    record: Mapping[str, Any],
    policy: FramePolicy,
    instruction: str = "",
    system_prompt: str | None = None,
    base_dir: Path | None = None,
) -> RenderedExample:
    """One record -> messages (system?, user with labelled frames, assistant target) and images."""
    frames = record["frames"]
    positions = select_frames([f["t_s"] for f in frames], key_times(record), policy.max_frames)
    images = load_images(record, positions, base_dir)
    width, height = images[0].size
    frame = policy.frame_for(width, height)
    media = record.get("media") or {}
    duration = media.get("duration_s")
    length = (f"The video is {format_seconds(duration)} s long. " if duration else "") + (
        f"You see {len(positions)} frames of it, each labelled with its time."
    )
    labels = [f"Frame {k} at {format_seconds(frames[pos]['t_s'])} s:" for k, pos in enumerate(positions, start=1)]
    question = record["question"].strip()
    options = [o for o in record.get("options") or [] if o]
    if options:
        question += "\nOptions:\n" + "\n".join(options)
    grid = f"Boxes are [x1,y1,x2,y2] on a {frame.width:g} x {frame.height:g} grid over each frame."
    prompt = "\n".join(p for p in (question, grid, instruction.strip()) if p)
    content = frames_content(labels, prompt, preamble=length + "\n")
    target = render_target(record, frame)
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    return RenderedExample(record["id"], record["task"], messages, images, target, frame, reward_target(record, frame))


def iter_examples(records: Sequence[Mapping[str, Any]], policy: FramePolicy, data: Mapping[str, Any]) -> Iterator[RenderedExample]:
    """Rendered examples; a record whose trace cannot be moved to the model's frame is left out
    with a warning naming it (and a count at the end), any other bad record raises."""
    skipped = 0
    for record in records:
        try:
            yield render_example(record, policy, data.get("instruction") or "", data.get("system_prompt"),
                                 Path(record["_file"]).parent if record.get("_file") else None)
        except RenderError as exc:
            skipped += 1
            log.warning("left out: %s", exc)
    if skipped:
        log.warning("left out %d of %d records whose boxes could not be rendered in the model's frame",
                    skipped, len(records))


def build_dataset(kind: str, data: Mapping[str, Any], model: Mapping[str, Any], cache_dir: Path):
    """A `datasets.Dataset` for TRL, written to `cache_dir` as it is rendered (not held in memory).

    sft: `messages` (with the assistant target) + `images`; rl: `prompt` (no target) + `images` +
    `reward_target` (JSON). Cached under a fingerprint of the shards and every rendering option.
    """
    import datasets

    records_args = (data["dir"], data["split"], data.get("max_records"), data.get("tasks"))
    files = shard_files(data["dir"], data["split"])
    policy = FramePolicy.from_config(model, data)
    fp = data_fingerprint(files, RENDER_VERSION, kind, records_args[1:], policy, data.get("instruction"),
                          data.get("system_prompt"))

    def generate() -> Iterator[dict[str, Any]]:
        for ex in iter_examples(load_records(*records_args), policy, data):
            if kind == "sft":
                yield {"messages": ex.messages, "images": ex.images}
            else:
                yield {"prompt": ex.prompt(), "images": ex.images, "reward_target": json.dumps(ex.reward_target)}

    ds = datasets.Dataset.from_generator(generate, cache_dir=str(cache_dir), fingerprint=fp)
    if len(ds) == 0:
        raise InputError(f"data.dir: no records in {split_dir(data['dir'], data['split'])} (tasks={data.get('tasks')})")
    return ds
