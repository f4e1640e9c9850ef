"""Driver CPU of a real `stgr build` against the number of units: does scheduling stay linear?

The engine's test DAG (`tests/engine_conf/engine.yaml`: a source, two maps, a barrier) with no-op
work, at P and 4P partitions (3P + 1 units). Each build runs as its own `stgr build` process (the
CLI's `main`, embedded local Ray), which reports its own CPU (`getrusage(RUSAGE_SELF)`: every thread
of the driver, none of Ray's worker processes). Work is zero, so the driver's CPU is the engine's
overhead; a linear driver gives a ratio near 4 (a little under, for the fixed cost of imports and
Ray's start), a quadratic one near 16. A build of `--base` partitions estimates that fixed cost, and
the ratio with it subtracted is printed too.

    python tests/bench/bench_driver.py [--partitions 256] [--factor 4] [--base 4]
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.engine_util import build_cmd  # noqa: E402

# Run in the child: `stgr build ...` exactly as the CLI does, then the process's own CPU seconds.
CHILD = """
import json, resource, sys
from pipeline.cli import main
code = main(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_SELF)
print("BENCH " + json.dumps({"code": code, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
"""


def driver_cpu(run: Path, partitions: int) -> tuple[float, float]:
    """(driver CPU seconds, wall seconds) of one fresh build of `partitions` no-op partitions."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *build_cmd(run, f"numbers.partitions={partitions}")],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise SystemExit(f"build of {partitions} partitions produced no result:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("BENCH "):])
    if result["code"] != 0:
        raise SystemExit(f"build of {partitions} partitions exited {result['code']}:\n{proc.stderr[-3000:]}")
    return result["cpu_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--partitions", type=int, default=256, help="P: the smaller build's partitions")
    parser.add_argument("--factor", type=int, default=4, help="the larger build has factor * P partitions")
    parser.add_argument("--base", type=int, default=4, help="partitions of the build that estimates the fixed cost")
    args = parser.parse_args()
    sizes = [args.base, args.partitions, args.factor * args.partitions]
    results = {}
    with tempfile.TemporaryDirectory(prefix="stgr-bench-driver-", dir="/tmp") as tmp:
        for partitions in sizes:
            results[partitions] = driver_cpu(Path(tmp) / f"run-{partitions}", partitions)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for partitions in sizes:
        cpu, wall = results[partitions]
        units = 3 * partitions + 1
        print(f"partitions={partitions:6d} units={units:6d}  driver CPU {cpu:7.2f} s  wall {wall:7.2f} s  "
              f"{1000 * cpu / units:6.2f} ms CPU/unit")
    base = results[args.base][0]
    small, large = results[args.partitions][0], results[args.factor * args.partitions][0]
    print(f"ratio driver CPU {args.factor}P/P:                 {large / small:.2f}")
    print(f"ratio with the fixed cost ({base:.2f} s) removed: {(large - base) / (small - base):.2f}")


if __name__ == "__main__":
    main()
