"""`transformers`: a local Hugging Face vision-language model, batched generation, CPU or GPU.

Loaded once per actor with `AutoModelForImageTextToText.from_pretrained` and its `AutoProcessor`
(Qwen2.5-VL and any other chat VLM whose processor takes images). Each frame is passed as an image
right after its `Frame k at t s:` label (structured chat content in `stages.lib.chat`'s layout,
so the chat template puts each image at its label rather than all images first). Requests are
generated in padded batches of the stage's `batch_size`, grouped by sampling parameters, with left
padding so every row's new tokens start at the same position.

Token counts for the cost ledger come from the processor: a request's input tokens are its row of
the attention mask (text and image tokens), its output tokens those generated up to and including
the first stop token (`generated_lengths`). On CUDA the backend computes on one GPU (`gpus`).
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.settings import setting
from stages.backends import Backend, ModelConfig, register_backend
from stages.lib.chat import ChatRequest, frames_content
from stages.lib.cost import Usage


def chat_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request as chat messages with structured content: label, image, label, image, ..., prompt,
    in `stages.lib.chat`'s layout (the one training renders, so prompts match token for token)."""
    content = frames_content([image.label for image in request.images], request.prompt)
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": content})
    return messages


def generated_lengths(new_tokens: Any, stop_ids: set[int]) -> list[int]:
    """Tokens each row generated: up to and including its first stop token (`generate` fills the rows
    that stopped early with padding), all of them for a row that never stopped."""
    lengths = []
    for row in new_tokens.tolist():
        stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
        lengths.append(len(row) if stop is None else stop + 1)
    return lengths


@register_backend
class TransformersBackend(Backend):
    """A local HF model in this process (see the module docstring)."""

    name = "transformers"

    @dataclass(kw_only=True)
    class Config(ModelConfig):
        dtype: str = setting("auto", "torch dtype: auto, bfloat16, float16, float32")
        device: str = setting("auto", "where the model runs: auto (the actor's GPU when there is one, else the CPU), "
                                      "cuda, cpu")
        attn_implementation: str | None = setting(None, "attention implementation (sdpa, flash_attention_2, eager); "
                                                        "null: the model's default")

    cfg: Config

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model, revision = self.cfg.model, self.cfg.revision
        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict[str, Any] = {"revision": revision, "dtype": self.cfg.dtype}
        if self.cfg.attn_implementation:
            kwargs["attn_implementation"] = self.cfg.attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(model, **kwargs).to(device).eval()
        self.device = device
        self.gpus = 1.0 if str(device).startswith("cuda") else 0.0
        self.tokenizer = tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.stop_ids = {t for t in (eos if isinstance(eos, list) else [eos]) + [tokenizer.pad_token_id] if t is not None}

    def _images(self, request: ChatRequest) -> list[Any]:
        from PIL import Image

        return [Image.open(io.BytesIO(image.jpeg)).convert("RGB") for image in request.images]

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        usage: list[Usage] = [Usage() for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.sampling().items())), []).append(i)
        for indices in groups.values():
            texts, counts = self._generate_batch([requests[i] for i in indices])
            for i, text, count in zip(indices, texts, counts):
                out[i], usage[i] = text, count
        self.last_usage = usage
        return [str(text) for text in out]

    def _generate_batch(self, requests: Sequence[ChatRequest]) -> tuple[list[str], list[Usage]]:
        import torch

        texts = [self.processor.apply_chat_template(chat_messages(r), tokenize=False, add_generation_prompt=True)
                 for r in requests]
        images = [self._images(r) for r in requests]
        has_images = any(images)
        inputs = self.processor(text=texts, images=images if has_images else None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        first = requests[0]
        sample = first.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": first.max_new_tokens, "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
            torch.manual_seed(first.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        kwargs.update(dict(first.extra))
        with torch.inference_mode():
            generated = self.model.generate(**inputs, **kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
        usage = [Usage(input_tokens=int(n), output_tokens=m, images=len(r.images))
                 for n, m, r in zip(prompt_lengths, generated_lengths(new_tokens, self.stop_ids), requests)]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), usage

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
