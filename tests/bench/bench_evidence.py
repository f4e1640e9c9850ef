"""Benchmark: box_iou on 1,000 x 1,000 boxes and parse_trace on 100,000 traces.

Run by hand: `.venv/bin/python tests/bench/bench_evidence.py [--traces N] [--boxes N]`. Each is timed
(CPU time of this process) against a baseline measured in the same run, and the ratio printed:
- box_iou: a plain-Python double loop over the pairs (what a per-pair `compute_iou` costs);
- parse_trace: the reference implementation's approach (one strict regex + `json.loads` per box, as in
  Open-o3 Video's reward code), which accepts far less and reports no problems. The point is that the
  tolerant grammar with problem reporting and frame conversion stays in the same cost class.
Both results are checked against each other before timing, so the numbers compare equal work.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.lib.evidence import Claim, parse_trace, parse_traces, render_claims  # noqa: E402
from stages.lib.geometry import box_iou  # noqa: E402


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Best CPU time (process_time: on a shared machine wall time measures the neighbours too)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def interleaved(chunks: list[list[str]], fns: dict[str, Callable[[list[str]], object]]) -> dict[str, float]:
    """CPU seconds of each fn over all chunks, alternating fns chunk by chunk so that a change of
    machine load during the run hits all of them alike."""
    total = dict.fromkeys(fns, 0.0)
    for chunk in chunks:
        for name, fn in fns.items():
            total[name] += best_of(1, lambda: fn(chunk))
    return total


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 0.8, size=(n, 2))
    wh = rng.uniform(0.01, 0.2, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def python_iou(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    out = []
    for ax1, ay1, ax2, ay2 in a:
        row = []
        area_a = (ax2 - ax1) * (ay2 - ay1)
        for bx1, by1, bx2, by2 in b:
            iw = min(ax2, bx2) - max(ax1, bx1)
            ih = min(ay2, by2) - max(ay1, by1)
            inter = iw * ih if iw > 0 and ih > 0 else 0.0
            union = area_a + (bx2 - bx1) * (by2 - by1) - inter
            row.append(inter / union if union > 0 else 0.0)
        out.append(row)
    return out


REFERENCE = re.compile(r"<obj>(.*?)</obj>((?:<box>\[.*?\]</box>)+)at<t>(.*?)</t>s", re.S)


def reference_parse(text: str) -> list[dict]:
    claims = []
    for m in REFERENCE.finditer(text):
        try:
            boxes = [json.loads(b) for b in re.findall(r"\[.*?\]", m.group(2))]
            claims.append({"name": m.group(1).strip(), "t": float(m.group(3).strip()), "boxes": boxes})
        except (json.JSONDecodeError, ValueError):
            continue
    return claims


WORDS = ["the", "man", "in", "black", "walks", "towards", "a", "red", "car", "and", "then", "opens", "door"]


def random_traces(rng: np.random.Generator, n: int) -> list[str]:
    traces = []
    for _ in range(n):
        k = int(rng.integers(1, 5))
        claims = [
            Claim(
                " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))),
                [tuple(b) for b in random_boxes(rng, int(rng.integers(1, 3)))],
                float(np.round(rng.uniform(0, 60), 1)),
            )
            for _ in range(k)
        ]
        filler = " ".join(rng.choice(WORDS, size=20))
        traces.append(f"<think>{filler} {render_claims(claims, sep=f' {filler} ')} {filler}</think><answer>B</answer>")
    return traces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--traces", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    a, b = random_boxes(rng, args.boxes), random_boxes(rng, args.boxes)
    al, bl = a.tolist(), b.tolist()
    np.testing.assert_allclose(box_iou(a, b), python_iou(al, bl), atol=1e-12)
    t_np = best_of(5, lambda: box_iou(a, b))
    t_py = best_of(1, lambda: python_iou(al, bl))
    pairs = args.boxes * args.boxes
    print(f"box_iou {args.boxes}x{args.boxes}: numpy {t_np * 1e3:.1f} ms ({pairs / t_np / 1e6:.1f} M pairs/s), "
          f"python loop {t_py * 1e3:.0f} ms ({pairs / t_py / 1e6:.2f} M pairs/s); speed-up x{t_py / t_np:.0f}")

    traces = random_traces(rng, args.traces)
    for text in traces[:1000]:
        ours = parse_trace(text)
        ref = reference_parse(text)
        assert ours.ok and len(ours.claims) == len(ref)
        assert all(c.name == r["name"] and c.t == r["t"] and len(c.boxes) == len(r["boxes"]) for c, r in zip(ours.claims, ref))
    claims = sum(len(parse_trace(t).claims) for t in traces[:1000]) / 1000
    assert parse_traces(traces[:1000]) == [parse_trace(t) for t in traces[:1000]]
    chunks = [traces[i : i + 5000] for i in range(0, len(traces), 5000)]
    t = interleaved(
        chunks,
        {
            "reference": lambda c: [reference_parse(x) for x in c],
            "one": lambda c: [parse_trace(x) for x in c],
            "batch": parse_traces,
        },
    )
    t_ref, t_one, t_batch = t["reference"], t["one"], t["batch"]
    n = args.traces
    print(f"parse {n} traces ({claims:.1f} claims each): reference regex+json {n / t_ref:,.0f} traces/s ({t_ref:.2f} s)")
    print(f"  parse_trace one by one {n / t_one:,.0f} traces/s ({t_one:.2f} s), throughput x{t_ref / t_one:.2f} of the reference")
    print(f"  parse_traces batch     {n / t_batch:,.0f} traces/s ({t_batch:.2f} s), throughput x{t_ref / t_batch:.2f} of the reference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
