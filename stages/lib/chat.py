"""The one layout of a user turn that shows a model labelled frames: label, image, label, image, ..., text.

Training (`train.data.render_example`), annotation and evaluation (the `transformers` backend's
`chat_messages`) and the verl export all show a model frames this way. A model is sensitive to the
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

from collections.abc import Sequence
from importlib import resources
from typing import Any

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


def frames_text(labels: Sequence[str], prompt: str, image_token: str, preamble: str = "") -> str:
    """The same layout as one string, with `image_token` where each image goes (verl's `<image>`)."""
    return "".join(part["text"] if part["type"] == "text" else image_token
                   for part in frames_content(labels, prompt, preamble))


def chat_template() -> str:
    """The Qwen2-VL chat template with assistant content inside `{% generation %}` blocks.

    Qwen's own template has no generation markers, so `return_assistant_tokens_mask` (and with it
    TRL's `assistant_only_loss`) cannot tell prompt from answer; `train/` applies this template to
    real Qwen2.5-VL checkpoints and the tiny test model alike. It renders the same text as Qwen's template.
    """
    return resources.files("stages.lib").joinpath("templates/qwen2_vl_chat.jinja").read_text()
