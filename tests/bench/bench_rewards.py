"""Reward throughput: 10,000 completions through train.rewards (vectorised over the batch) against a
naive loop that scores one completion at a time, in the same run.

Run by hand: `.venv/bin/python tests/bench/bench_rewards.py [N]`. The completions mix well-formed
traces (1-6 claims, some in pixels of the model's frame), malformed ones and empty ones, against
spatio-temporal, temporal, spatial and MCQ targets. Both paths parse with the same cached grammar,
so the ratio measures the numeric part plus per-call overhead, which is what vectorising changes.
"""
from __future__ import annotations

import json
import random
import sys
import time

from stages.lib import geometry
from stages.lib.targets import frame_to_dict
from train.rewards import RewardConfig, _parse, make_reward_funcs


def make_batch(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    frame = geometry.qwen25vl_frame(640, 360, min_pixels=3136, max_pixels=401408)
    targets, texts = [], []
    for i in range(n):
        key_frames = [{"t_s": round(rng.uniform(0, 30), 2),
                       "objects": [{"name": "o", "box": sorted(rng.sample([0.1, 0.2, 0.4, 0.6, 0.8], 2)) * 2}]}
                      for _ in range(rng.randint(1, 4))]
        task = rng.choice(["spatio_temporal", "temporal", "spatial", "general_mcq"])
        targets.append(json.dumps({"task": task, "answer": "B" if task == "general_mcq" else "[1.0, 4.0]",
                                   "options": ["A. a", "B. b"] if task == "general_mcq" else [],
                                   "answer_span": [1.0, 4.0], "key_frames": key_frames, "frame": frame_to_dict(frame)}))
        kind = rng.random()
        if kind < 0.1:
            texts.append("")
        elif kind < 0.2:
            texts.append("<think><obj>x</obj><box>[1,2,3]</box>at<t>two</t>s")
        else:
            claims = " then ".join(
                f"<obj>o{j}</obj><box>[{rng.randint(0, 300)},{rng.randint(0, 150)},{rng.randint(300, 600)},"
                f"{rng.randint(150, 300)}]</box>at<t>{rng.uniform(0, 30):.1f}</t>s" for j in range(rng.randint(1, 6)))
            texts.append(f"<think>{claims}</think><answer>{rng.choice('AB')}</answer>")
        texts[-1] += f" #{i}"  # distinct texts: no cache hits across completions
    return texts, targets


def main(n: int = 10_000) -> None:
    texts, targets = make_batch(n)
    funcs = make_reward_funcs(RewardConfig())
    # Warm the parse cache for both paths alike (TRL calls every reward on the same completions).
    _parse.cache_clear()
    for f in funcs:
        f(texts, targets, progress=0.5)
    t0 = time.perf_counter()
    batched = [f(texts, targets, progress=0.5) for f in funcs]
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    looped = [[f([c], [t], progress=0.5)[0] for c, t in zip(texts, targets)] for f in funcs]
    t_loop = time.perf_counter() - t0
    assert all(abs(a - b) < 1e-9 for fa, fb in zip(batched, looped) for a, b in zip(fa, fb)), "paths disagree"
    print(f"{n} completions x {len(funcs)} rewards (parse cached)")
    print(f"  vectorised batch : {n / t_vec:10.0f} completions/s ({t_vec:.2f} s)")
    print(f"  one at a time    : {n / t_loop:10.0f} completions/s ({t_loop:.2f} s)")
    print(f"  ratio            : {t_loop / t_vec:.1f}x")
    _parse.cache_clear()
    t0 = time.perf_counter()
    for f in funcs:
        f(texts, targets, progress=0.5)
    t_cold = time.perf_counter() - t0
    print(f"  cold (parsing included, batch): {n / t_cold:10.0f} completions/s ({t_cold:.2f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
