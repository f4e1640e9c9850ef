"""Peak resident memory of the processes that write the dataset (`shard` units and the `publish`
unit), for a real build of N and of 4N records, and the ratio (target <= 2: flat in the dataset size).

How: per size, a default build (synthetic source, template annotator) in a fresh run directory; then
a second `stgr build` of the same run with `shard.salt` changed, so only the shard units and the
publish unit run, in fresh Ray worker processes (the build starts its own Ray). While it runs, the
peak resident set (`VmHWM` in /proc/<pid>/status, the kernel's high-water mark, so no sampling gap
hides a peak) of every Ray worker process of the build's session is read every 20 ms; the figure is
the highest over those workers, i.e. the process that held the most while writing dataset files or
publishing. The driver's own peak is printed beside it.

    python tests/bench/bench_shard_memory.py [--videos 16] [--per-partition 2] [--baseline-rev REV]

`--videos` V gives about 6 V records (one per task); the second size is 4 V. `--baseline-rev` also
measures a revision checked out in a temporary git worktree, the same way, in the same run (a
revision before the streaming shard: its single `shard` barrier is the process writing the dataset).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _session_workers(sid: int) -> list[int]:
    """The Ray worker processes of session `sid`: `default_worker.py` until Ray retitles them
    `ray::IDLE`, `ray::run_unit`, ... (raylet, GCS and the driver are left out)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != sid:
                continue
            cmdline = (entry / "cmdline").read_bytes()
            if cmdline.startswith(b"ray::") or b"default_worker.py" in cmdline:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _stgr(repo: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=repo, env={**ENV, "PYTHONPATH": str(repo)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def measure(repo: Path, videos: int, per_partition: int, tmp: Path) -> dict[str, float]:
    run = tmp / f"run-{repo.name}-{videos}"
    common = [f"source.num_videos={videos}", f"source.records_per_partition={per_partition}", "cluster.num_cpus=2",
              f"cluster.temp_dir={tmp}/ray"]
    proc = _stgr(repo, ["build", "--run", str(run), *common])
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    proc = _stgr(repo, ["build", "--run", str(run), *common, "shard.salt=bench"])
    peaks: dict[int, int] = {}
    driver = 0
    while proc.poll() is None:
        for pid in _session_workers(proc.pid):
            peaks[pid] = max(peaks.get(pid, 0), _hwm_kib(pid))
        driver = max(driver, _hwm_kib(proc.pid))
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-3000:]
    done = re.search(r"(\d+) unit\(s\) committed, (\d+) reused", out)
    assert done and int(done.group(2)) == 5 * -(-videos // per_partition), f"only the dataset nodes must run:\n{out[-2000:]}"
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    files = sum(len(info["shards"]) for info in manifest["splits"].values())
    arrow = sum(info["arrow_bytes"] for info in manifest["splits"].values())
    return {"records": manifest["rows"], "files": files, "arrow_mib": arrow / 2**20, "workers": len(peaks),
            "peak_mib": max(peaks.values(), default=0) / 1024, "driver_mib": driver / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--per-partition", type=int, default=2)
    parser.add_argument("--baseline-rev", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stgr-bench-", dir="/tmp") as tmp:
        trees = [("this tree", REPO)]
        if args.baseline_rev:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline_rev], cwd=REPO, check=True,
                           capture_output=True)
            trees.append((f"baseline {args.baseline_rev}", base))
        try:
            for label, repo in trees:
                results = [measure(repo, v, args.per_partition, Path(tmp)) for v in (args.videos, 4 * args.videos)]
                for r in results:
                    print(f"{label}: {r['records']} records ({r['arrow_mib']:.1f} MiB of Arrow, {r['files']} files): "
                          f"peak RSS of the dataset writers {r['peak_mib']:.0f} MiB (max over {r['workers']} Ray "
                          f"workers), driver {r['driver_mib']:.0f} MiB")
                print(f"{label}: ratio 4N / N: {results[1]['peak_mib'] / results[0]['peak_mib']:.2f} (target <= 2)",
                      flush=True)
        finally:
            if args.baseline_rev:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
