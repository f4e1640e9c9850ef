"""What a model is shown: the chat request, the frame label, the layout of labelled frames, the chat template.

A request (`ChatRequest`) is a single turn: optional system text, labelled images, the prompt. Every
frame a model sees is labelled `Frame k at t s:` (`frame_label`: k from 1, t on the video's own
timeline as the evidence grammar writes times), and a user turn lays the frames out as label, image,
label, image, ..., text.

Training, the verl export and evaluation (`stages.lib.render.render_example`) and annotation (the
backends' `chat_messages`) all show a model frames this way. A model is sensitive to the
exact text around its images, so a prompt at evaluation that differed from the training prompt even
by whitespace would measure the model on inputs it never saw; the separators are therefore defined
here, once:

    [preamble]Frame 1 at 0.5 s: <image>
    Frame 2 at 1 s: <image>
    question ...

Each label is followed by `LABEL_END`, each image by `IMAGE_END`. Evaluation turns a rendered
training chat back into a request by taking the text before each image as its label (stripped),
and this layout writes it again identically (the preamble becomes part of the first label).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

from stages.lib.geometry import CANONICAL


@dataclass(frozen=True)
class LabelledImage:
    """One frame as JPEG bytes, with the text shown just before it (e.g. `Frame 3 at 1.5 s:`)."""

    jpeg: bytes
    label: str = ""


@dataclass(frozen=True)
class ChatRequest:
    """A single-turn chat: optional system text, the labelled images, then the user prompt."""

    prompt: str
    images: tuple[LabelledImage, ...] = ()
    system: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The structured facts the prompt was rendered from (task, ground truth, record id). Model
    #: backends never read it (the prompt already carries it, so it stays out of the cache key);
    #: the `template` backend writes its answer from it alone.
    context: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def sampling(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, **dict(self.extra)}

    def frames_digest(self) -> str:
        h = hashlib.sha256()
        for image in self.images:
            h.update(hashlib.sha256(image.jpeg).digest())
            h.update(image.label.encode())
        return h.hexdigest()

    def cache_key(self, model_id: str) -> str:
        """hash(model + revision, prompt, frames digest, sampling params): what a response depends on."""
        payload = json.dumps(
            {"model": model_id, "system": self.system, "prompt": self.prompt,
             "frames": self.frames_digest(), "sampling": self.sampling()},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def frame_label(k: int, t_s: float) -> str:
    """The label shown before the k-th frame (from 1) at `t_s` seconds: `Frame 3 at 1.5 s:`."""
    return f"Frame {k} at {CANONICAL.format_time(t_s)} s:"


LABEL_END = " "
"""Between a frame's label (`Frame k at t s:`) and its image."""

IMAGE_END = "\n"
"""After each image, so the next label (or the prompt) starts a new line."""


def frames_content(labels: Sequence[str], prompt: str, preamble: str = "") -> list[dict[str, Any]]:
    """Structured chat content (`{"type": "text"}` parts and `{"type": "image"}` placeholders, one per
    label, in order): the preamble, each label with its image, then the prompt. An empty label
    writes no text before its image. Chat templates put each image placeholder where it stands, so
    every image follows its own label rather than all images coming first."""
    content: list[dict[str, Any]] = [{"type": "text", "text": preamble}] if preamble else []
    for label in labels:
        if label:
            content.append({"type": "text", "text": label + LABEL_END})
        content.append({"type": "image"})
        content.append({"type": "text", "text": IMAGE_END})
    content.append({"type": "text", "text": prompt})
    return content


def content_text(content: Sequence[Mapping[str, Any]], image_token: str) -> str:
    """Structured chat content as one string, with `image_token` where each image goes (verl's `<image>`)."""
    return "".join(part["text"] if part["type"] == "text" else image_token for part in content)


def chat_template() -> str:
    """The Qwen2-VL chat template with assistant content inside `{% generation %}` blocks.

    Qwen's own template has no generation markers, so `return_assistant_tokens_mask` (and with it
    TRL's `assistant_only_loss`) cannot tell prompt from answer; `train/` applies this template to
    real Qwen2.5-VL checkpoints and the tiny test model alike. It renders the same text as Qwen's template.
    """
    return resources.files("stages.lib").joinpath("templates/qwen2_vl_chat.jinja").read_text()
