"""Benchmark: batched vs one-by-one generation of annotate requests with the `transformers` backend.

    .venv/bin/python tests/bench/bench_generate.py                      # tiny random Qwen2.5-VL, CPU
    .venv/bin/python tests/bench/bench_generate.py --model DIR --device cuda --requests 64

The requests are the real ones the annotate stage builds (v1 prompt with ground truth, frames
labelled with their times), for synthetic records with random 320x240 frames. Every request is
forced to write exactly `--max-new-tokens` tokens (`min_new_tokens`), so each batch size does the
same work; the baseline is batch size 1, measured in the same run. Prints requests/s and the ratio.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import compose  # noqa: E402
from stages.annotate import AnnotateStage  # noqa: E402
from stages.lib.media import FrameReader  # noqa: E402


def annotator_config(extra: dict) -> dict:
    """conf/annotator/transformers.yaml as a build composes it (the v1 prompt set, every default)."""
    config = OmegaConf.to_container(compose(config_name="annotator/transformers"), resolve=True)["annotator"]
    config.update(extra)
    return config


def make_records(n: int, frames: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    tasks = ["spatio_temporal", "temporal", "spatial"]
    records = []
    for i in range(n):
        jpegs = []
        for _ in range(frames):
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out, format="JPEG")
            jpegs.append(out.getvalue())
        times = [0.5 * (k + 1) for k in range(frames)]
        track = [{"t_s": t, "box": [0.1 + 0.01 * t, 0.2, 0.3 + 0.01 * t, 0.5]} for t in times]
        records.append({
            "id": f"bench{i}", "task": tasks[i % 3], "source_id": f"v{i}",
            "media": {"uri": "unused.mp4", "fps": 10.0, "num_frames": 100, "duration_s": 10.0},
            "clip_window": {"start_s": 0.0, "end_s": 10.0},
            "frames": [{"t_s": t, "index": int(t * 10), "image": {"bytes": j, "path": None}} for t, j in zip(times, jpegs)],
            "ground_truth": {"objects": [{"name": "red circle", "track": track}],
                   "spans": [{"label": "the red circle moves", "start_s": times[0], "end_s": times[-1]}]},
        })
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: build the tiny random Qwen2.5-VL)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many passes per batch size")
    args = parser.parse_args()

    import torch

    model = args.model
    if model is None:
        from stages.testing.tiny_model import build_tiny_qwen25vl

        model = str(build_tiny_qwen25vl(Path(tempfile.mkdtemp(prefix="bench-tiny-")), seed=0))
    stage = AnnotateStage(annotator_config({
        "model": model, "device": args.device, "max_new_tokens": args.max_new_tokens,
        "extra": {"min_new_tokens": args.max_new_tokens}}))
    from stages.backends import make_backend

    backend = make_backend(stage.config)
    frames = FrameReader(int(stage.config.get("image_max_side") or 448))
    requests = [stage.request_for(r, frames) for r in make_records(args.requests, args.frames)]
    prompt_tokens = [len(backend.tokenizer(r.prompt)["input_ids"]) for r in requests]
    print(f"model {model} on {backend.device} (torch threads {torch.get_num_threads()}); {len(requests)} requests, "
          f"{args.frames} frames each, prompt text ~{int(np.mean(prompt_tokens))} tokens, "
          f"{args.max_new_tokens} new tokens each")
    backend.generate(requests[:2])  # warm-up

    def sync() -> None:
        if backend.device.startswith("cuda"):
            torch.cuda.synchronize()

    results = {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        best = float("inf")
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            for i in range(0, len(requests), bs):
                backend.generate(requests[i:i + bs])
            sync()
            best = min(best, time.perf_counter() - start)
        results[bs] = len(requests) / best
    base = results[min(results)]
    print(f"{'batch size':>10} {'requests/s':>11} {'new tokens/s':>13} {'ratio':>6}")
    for bs, rate in results.items():
        print(f"{bs:>10} {rate:>11.2f} {rate * args.max_new_tokens:>13.1f} {rate / base:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
