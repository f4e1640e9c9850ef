"""`vllm`: vLLM's offline engine (`vllm.LLM`) inside each annotate actor.

The engine is built once per actor (the stage's `setup`), and each batch goes to `LLM.generate` in
one call, so vLLM's continuous batching schedules it. Frames reach the model in one of two ways
(`input`):

- `video` (default): the frames as one video *with their metadata* (source fps, frame count, the
  source frame indices), so Qwen2.5-VL's time encoding (mRoPE with absolute time) sees when each
  frame really is; the prompt lists each frame's time in seconds, which is what the model cites.
- `images`: one image per frame, each after its `Frame k at t s:` label, in `stages.lib.chat`'s
  layout, as the other backends do.

A request without record context (e.g. a verify crop) always goes as images. Requires the `vllm`
extra; on a CPU-only machine use the environment made by ../shared/tools/vllm-cpu/setup.

Token counts for the cost ledger are the engine's own: each output's `prompt_token_ids` (text and
multi-modal tokens) and generated `token_ids`. On CUDA the engine computes on `tensor_parallel_size`
GPUs (`gpus`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from pipeline.settings import setting
from stages.backends import Backend, ModelConfig, register_backend
from stages.lib.chat import ChatRequest, frames_content
from stages.lib.cost import Usage


def _frame_list(request: ChatRequest) -> str:
    return "Frames of the video: " + "; ".join(image.label.rstrip(":") for image in request.images) + "."


def video_metadata(request: ChatRequest) -> dict[str, Any]:
    """vLLM's video metadata for the request's frames: where they sit in the source video.

    With the source's fps and the frames' source indices, vLLM computes each frame's real time
    (`do_sample_frames=False`: these are the frames, take them as they are). Records without
    indices fall back to times and an fps estimated from them.
    """
    context = request.context
    times = [float(t) for t in context.get("frame_times") or []]
    indices = context.get("frame_indices") or []
    fps = context.get("fps")
    n = len(request.images)
    if not fps or len(indices) != n or any(i is None for i in indices):
        span = (times[-1] - times[0]) if len(times) > 1 else 0.0
        fps = (n - 1) / span if span > 0 else 1.0
        indices = [round(t * fps) for t in times] if len(times) == n else list(range(n))
    total = context.get("num_frames") or (max(indices) + 1 if indices else n)
    return {"total_num_frames": int(total), "fps": float(fps), "duration": float(total) / float(fps),
            "video_backend": "opencv", "frames_indices": [int(i) for i in indices], "do_sample_frames": False}


@register_backend
class VLLMBackend(Backend):
    """vllm.LLM in this process (see the module docstring)."""

    name = "vllm"

    @dataclass(kw_only=True)
    class Config(ModelConfig):
        dtype: str = setting("auto", "the engine's dtype: auto, bfloat16, float16, float32")
        input: Literal["video", "images"] = setting(
            "video", "how frames reach the model: video (one video with its frame times as metadata, so "
            "Qwen2.5-VL's time encoding sees real seconds) or images (one image per frame, each after its label)")
        tensor_parallel_size: int = setting(1, "GPUs the engine shards the model over", ge=1)
        gpu_memory_utilization: float | None = setting(0.85, "share of GPU memory the engine takes (null: "
                                                             "vLLM's default)", gt=0, le=1)
        max_model_len: int = setting(16384, "the longest prompt plus completion, in tokens", ge=1)
        max_images_per_prompt: int = setting(64, "the most images one request may hold", ge=1)
        engine_kwargs: dict[str, Any] = setting({}, "extra keyword arguments for vllm.LLM (e.g. {enforce_eager: true})")

    cfg: Config

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        import torch
        from transformers import AutoProcessor
        from vllm import LLM

        cfg = self.cfg
        self.input = cfg.input
        engine: dict[str, Any] = {
            "model": cfg.model, "revision": cfg.revision, "dtype": cfg.dtype,
            "tensor_parallel_size": cfg.tensor_parallel_size, "max_model_len": cfg.max_model_len,
            # each request carries its own seed (SamplingParams), so the engine's seeds nothing of ours
            "seed": 0,
            "limit_mm_per_prompt": {"image": cfg.max_images_per_prompt, "video": 1},
        }
        if cfg.gpu_memory_utilization is not None:
            engine["gpu_memory_utilization"] = float(cfg.gpu_memory_utilization)
        engine.update(cfg.engine_kwargs)
        self.llm = LLM(**engine)
        self.gpus = float(cfg.tensor_parallel_size) if torch.cuda.is_available() else 0.0
        self.processor = AutoProcessor.from_pretrained(cfg.model, revision=cfg.revision)

    def _messages(self, request: ChatRequest, as_video: bool) -> list[dict[str, Any]]:
        """Chat messages for one request: as images, `stages.lib.chat`'s layout (the one training
        renders and the other backends send); as video, the video then the list of frame times."""
        if as_video:
            content: list[dict[str, Any]] = [{"type": "video"},
                                             {"type": "text", "text": "\n" + _frame_list(request) + "\n"},
                                             {"type": "text", "text": request.prompt}]
        else:
            content = frames_content([image.label for image in request.images], request.prompt)
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
        messages.append({"role": "user", "content": content})
        return messages

    def engine_input(self, request: ChatRequest) -> dict[str, Any]:
        """The prompt (chat template applied) and multi-modal data vLLM gets for one request."""
        import numpy as np
        from PIL import Image

        as_video = self.input == "video" and bool(request.context) and len(request.images) > 0
        prompt = self.processor.apply_chat_template(self._messages(request, as_video), tokenize=False,
                                                    add_generation_prompt=True)
        images = [Image.open(io.BytesIO(image.jpeg)).convert("RGB") for image in request.images]
        if not images:
            return {"prompt": prompt}
        if as_video:
            frames = np.stack([np.asarray(image) for image in images])
            return {"prompt": prompt, "multi_modal_data": {"video": (frames, video_metadata(request))}}
        return {"prompt": prompt, "multi_modal_data": {"image": images}}

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                 seed=r.seed, **dict(r.extra)) for r in requests]
        outputs = self.llm.generate([self.engine_input(r) for r in requests], params, use_tqdm=False)
        self.last_usage = [Usage(input_tokens=len(output.prompt_token_ids or []),
                                 output_tokens=len(output.outputs[0].token_ids or []), images=len(r.images))
                           for output, r in zip(outputs, requests)]
        return [output.outputs[0].text for output in outputs]

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
