"""Records per second of the default build (synthetic source, template annotator) on an embedded
local Ray with 1 CPU and with 2 CPUs, same config, fresh run directories, in one run. Prints both
and the speed-up.

    python tests/bench/bench_build.py [--videos 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.build import run_build  # noqa: E402


def build(videos: int, cpus: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="stgr-bench-", dir="/tmp") as tmp:
        started = time.perf_counter()
        code = run_build(str(Path(tmp) / "run"), [f"source.num_videos={videos}", f"cluster.num_cpus={cpus}",
                                                  f"cluster.temp_dir={tmp}/ray"], interactive=False)
        seconds = time.perf_counter() - started
        assert code == 0
        manifest = json.loads((Path(tmp) / "run" / "dataset" / "manifest.json").read_text())
        rows = int(manifest["rows"])
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=32)
    args = parser.parse_args()
    results = {cpus: build(args.videos, cpus) for cpus in (1, 2)}
    for cpus, (seconds, rows) in results.items():
        print(f"{cpus} CPU: {rows} records in {seconds:.1f} s = {rows / seconds:.2f} records/s (incl. Ray start)")
    print(f"speed-up 2 vs 1 CPU: {results[1][0] / results[2][0]:.2f}x")


if __name__ == "__main__":
    main()
