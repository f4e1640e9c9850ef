"""What the model sees of a record: the one renderer of a record into chat messages and images.

One record becomes one single-turn chat: the user turn holds a total-length line, the chosen frames
as images each preceded by its label `Frame k at t s:` (times on the source video's own timeline,
the same timeline the trace cites; laid out by `stages.lib.chat`, as the annotation backends lay
them out), the question, the options, a line naming the box grid and the output instruction; the
assistant turn is `<think>reasoning</think><answer>answer</answer>` with every box rewritten from the
canonical normalised frame into the model's own frame (Qwen2.5-VL: integer pixels of the resized
input) by `stages.lib.evidence.reframe_text`, never by hand.

Why frames as labelled images rather than the processor's video path: the labels give the model
the exact timestamp of each frame (the video path only gives it a frame rate, and the sampled
frames are not uniform: key frames are added at ground-truth times), the processor's video reader
needs torchcodec, and TRL's GRPOTrainer has no video column. This is also the reference's
multi-image form.

`render_example` is the one place that decides what the model sees: training (`train/data.py`),
`stgr export --format verl` and evaluation all call it, so a model is trained, exported and tested
on exactly one prompt. `request_from_messages` turns its prompt part into a backend's `ChatRequest`.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from stages.lib import evidence, geometry
from stages.lib.answers import record_answer_kind
from stages.lib.chat import ChatRequest, LabelledImage, frame_label, frames_content
from stages.lib.geometry import CANONICAL
from stages.lib.media import FrameReader, jpeg_bytes
from stages.lib.targets import reward_target

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


class RenderError(InputError):
    """A record whose trace cannot be written in the model's frame (see `render_target`)."""


def _same_claim(a: evidence.Claim, b: evidence.Claim, frame: geometry.BoxFrame) -> bool:
    """Equal up to what writing in `frame` may round away."""
    if a.name != b.name or len(a.boxes) != len(b.boxes) or (a.t is None) != (b.t is None):
        return False
    if a.t is not None and abs(a.t - b.t) > frame.time_tolerance() + 1e-9:
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
    reader: FrameReader | None = None,
) -> RenderedExample:
    """One record -> messages (system?, user with labelled frames, assistant target) and images.

    `base_dir` resolves a relative `media.uri` (the shard's folder); `reader` keeps videos open
    across the records of one video (a new one per call otherwise)."""
    frames = record["frames"]
    positions = select_frames([f["t_s"] for f in frames], key_times(record), policy.max_frames)
    images = (reader or FrameReader()).pil_images(record, positions, base_dir)
    width, height = images[0].size
    frame = policy.frame_for(width, height)
    media = record.get("media") or {}
    duration = media.get("duration_s")
    length = (f"The video is {CANONICAL.format_time(duration)} s long. " if duration else "") + (
        f"You see {len(positions)} frames of it, each labelled with its time."
    )
    labels = [frame_label(k, frames[pos]["t_s"]) for k, pos in enumerate(positions, start=1)]
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


def request_from_messages(messages: list[dict[str, Any]], images: list[Any], *, max_new_tokens: int,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                          context: Mapping[str, Any] | None = None) -> ChatRequest:
    """A chat rendered by `render_example` (its prompt part) as a `ChatRequest`: the text
    before each image becomes that image's label, the text after the last image the prompt."""
    system = None
    labelled: list[LabelledImage] = []
    texts: list[str] = []
    remaining = iter(images)
    for message in messages:
        parts = message["content"]
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        if message["role"] == "system":
            system = "".join(p.get("text", "") for p in parts)
            continue
        if message["role"] != "user":
            continue
        for part in parts:
            if part.get("type") == "image":
                labelled.append(LabelledImage(jpeg=jpeg_bytes(next(remaining)), label="".join(texts).strip()))
                texts = []
            else:
                texts.append(part.get("text", ""))
    return ChatRequest(prompt="".join(texts).strip(), images=tuple(labelled), system=system,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       context=dict(context or {}))
