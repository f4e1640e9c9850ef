"""Benchmark: bytes under `DIR/stages` for the stages after `sample`, divided by the bytes of
`DIR/dataset`, with frames stored once, against the layout it replaced, measured in the same run.

    .venv/bin/python tests/bench/bench_frames_once.py [--videos 32] [--per-partition 4]

One real `stgr build` of the default DAG (synthetic source, template annotator, local Ray) into a
scratch run directory. Then, per unit of each stage after `sample`:
- stored once: the bytes of its committed files (data, ledger, commit record), as built;
- baseline: what the same unit committed before, when every stage rewrote the JPEGs: its table with
  the frames put back from the sample unit (`pipeline.stored.read_input`), encoded as the engine
  encodes a unit (`table_bytes`), plus its ledger and record.
It also reads each filter unit's input both ways (light as now, whole as before), CPU seconds,
best of 3: the I/O the filter no longer pays. Target: stored once <= 1.5 x the dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.rundir import RunDir, Unit, table_bytes  # noqa: E402
from pipeline.stored import read_input  # noqa: E402

AFTER_SAMPLE = ("annotate", "align", "filter", "shard", "publish")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _tree(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _best_cpu(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--per-partition", type=int, default=4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    run_dir = scratch / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--run", str(run_dir),
                    f"source.num_videos={args.videos}", f"source.records_per_partition={args.per_partition}",
                    f"cluster.temp_dir={tempfile.mkdtemp(prefix='ray-', dir='/tmp')}"],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plan = json.loads((run_dir / "plan.json").read_text())["nodes"]
    run = RunDir.open(str(run_dir))
    dataset = _tree(run_dir / "dataset")
    now = before = 0
    light_cpu = full_cpu = 0.0
    rows = 0
    records = sum(json.loads((run_dir / Unit("sample", plan["sample"]["fingerprint"], p).record).read_text())["rows_out"]
                  for p in range(plan["sample"]["partitions"]))
    print(f"{'stage':<10} {'units':>5} {'stored once':>12} {'baseline':>12} {'per record':>11}")
    for node in ("source", "sample"):
        size = _tree(run_dir / "stages" / node) + _tree(run_dir / "ledger" / node)
        print(f"{node:<10} {plan[node]['partitions']:>5} {size:>12,} {size:>12,} {size / records:>11,.0f}")
    for node in AFTER_SAMPLE:
        info = plan.get(node)
        if info is None:
            continue
        node_now = node_before = 0
        for partition in range(info["partitions"]):
            unit = Unit(node, info["fingerprint"], partition)
            extra = _size(run_dir / unit.record) + _size(run_dir / unit.ledger)
            node_now += _size(run_dir / unit.data) + extra
            node_before += len(table_bytes(read_input(run, unit, ("frames",)).table)) + extra
            if node == "filter":
                upstream = Unit(info["after"][0], plan[info["after"][0]]["fingerprint"], partition)
                rows += read_input(run, upstream, ()).table.num_rows
                light_cpu += _best_cpu(lambda: read_input(run, upstream, ()))
                full_cpu += _best_cpu(lambda: read_input(run, upstream, ("frames",)))
        print(f"{node:<10} {info['partitions']:>5} {node_now:>12,} {node_before:>12,} {node_now / records:>11,.0f}")
        now, before = now + node_now, before + node_before
    print(f"dataset {dataset:,} bytes ({dataset / records:,.0f} per record); {args.videos} videos, {records} records "
          f"sampled, {rows} after align")
    print(f"stages after sample / dataset: stored once {now / dataset:.2f}, baseline {before / dataset:.2f} "
          f"(ratio baseline / stored once {before / now:.1f})")
    print(f"filter input read, CPU per record: light {1e3 * light_cpu / max(rows, 1):.3f} ms, "
          f"whole {1e3 * full_cpu / max(rows, 1):.3f} ms (ratio {full_cpu / max(light_cpu, 1e-9):.1f})")


if __name__ == "__main__":
    main()
