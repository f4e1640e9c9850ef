"""What planning a source and reading one partition cost, the old way and the new, in one run.

Files, generated in a temporary folder: JSON Lines of 10^4 and 10^5 lines (like the `jsonl` adapter's
documented example, ~560 bytes a line), and a VidSTG-format JSON array (the 13 real entries of
../shared/fixtures/vidstg, repeated with new `vid`s, indented as the fixture is) of `--vidstg`
entries (10^5 by default: VidSTG's full test set is about that size).

Each measurement runs in a fresh child process, so one cannot inherit another's heap:
- *plan*: the driver's `SourceStage.plan()` with `records_per_partition` = `--per-partition`;
- *task*: one source task's read of its entries (the middle partition), without seeding them.
The old way is what the source stage did before stages/sources/layout.py: parse the whole file
(`json.load`; every non-blank line as `(number, text)`) and keep it, then count it (plan) or slice
it (task). The new way is the stage's own code: one streaming pass keeping each partition's start,
then a seek to the task's start. Per measurement: CPU seconds of the call (`time.process_time`,
untraced), the growth of the process's peak RSS during it (`VmHWM`, reset after the imports via
/proc/self/clear_refs), and the peak of Python allocations in a second, traced run (tracemalloc).

    python tests/bench/bench_source_plan.py [--lines 10000,100000] [--vidstg 100000] [--per-partition 16]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
FIXTURE = REPO.parent / "shared" / "fixtures" / "vidstg" / "test_annotations_subset.json"


# -- the files -----------------------------------------------------------------------------------------
def write_jsonl(path: Path, lines: int) -> None:
    """Lines like the `jsonl` adapter's documented example (a box at a key frame, a track, a span)."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            t, box = float(i % 60), [0.41, 0.52, 0.48, 0.63]
            handle.write(json.dumps({
                "video": f"clips/{i % 997}.mp4", "task": "spatio_temporal", "id": f"r{i}",
                "question": f"When does the man pick up cup {i}, and where is it?", "answer": f"[{t}, {t + 2.5}]",
                "answer_span": [t, t + 2.5], "clip": {"start_s": 0.0, "end_s": 90.0},
                "key_frames": [{"t_s": t, "objects": [{"name": "cup", "box": box}]}],
                "objects": [{"name": "cup", "track": [{"t_s": t, "box": box}, {"t_s": t + 2.5, "box": box}]}],
                "spans": [{"label": "the man picks up the cup", "start_s": t, "end_s": t + 2.5}],
                "meta": {"row": i}}) + "\n")


def write_vidstg(path: Path, entries: int) -> None:
    base = json.loads(FIXTURE.read_text(encoding="utf-8"))
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for i in range(entries):
            entry = {**base[i % len(base)], "vid": f"{i:07d}"}
            handle.write(json.dumps(entry, indent=1) + (",\n" if i < entries - 1 else "\n]\n"))


# -- one measurement, in a child process -----------------------------------------------------------------
def old_entries(adapter: str, path: str) -> list[Any]:
    """The old way: the whole file parsed and held (the entries the old per-process cache kept)."""
    if adapter == "jsonl":
        with open(path, encoding="utf-8") as handle:
            return [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def action(way: str, what: str, adapter: str, path: str, per_partition: int) -> Callable[[], int]:
    from stages.source import SourceStage
    from stages.sources import base

    stage = SourceStage({"adapter": adapter, "annotations": path, "video_dir": str(Path(path).parent),
                         "records_per_partition": per_partition})
    kept: list[Any] = []
    middle = stage.adapter.num_partitions(per_partition) // 2 if (way, what) == ("new", "task") else 0

    def run() -> int:
        base._cached_starts.cache_clear()  # a task's process has not planned: it scans once itself
        kept.clear()
        if way == "old":
            kept.append(old_entries(adapter, path))  # kept, as the old cache kept it
            if what == "plan":
                return max(1, math.ceil(len(kept[0]) / per_partition))
            first = math.ceil(len(kept[0]) / per_partition) // 2 * per_partition
            return len(kept[0][first:first + per_partition])
        if what == "plan":
            return stage.plan()
        kept.append(list(stage.adapter.partition(middle, per_partition)))
        return len(kept[0])
    return run


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/self/status")


def child(way: str, what: str, adapter: str, path: str, per_partition: int) -> None:
    run = action(way, what, adapter, path, per_partition)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = rss_kb("VmRSS")
    started = time.process_time()
    result = run()
    cpu = time.process_time() - started
    rss = rss_kb("VmHWM") - before
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"result": result, "cpu": cpu, "rss_mb": rss / 1024, "peak_mb": peak / 2**20}))


def measure(way: str, what: str, adapter: str, path: Path, per_partition: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", way, what, adapter, str(path), str(per_partition)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="10000,100000", help="JSON Lines files of these many lines")
    parser.add_argument("--vidstg", type=int, default=100000, help="entries of the VidSTG-format array (0: none)")
    parser.add_argument("--per-partition", type=int, default=16)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, what, adapter, path, per_partition = args.child
        child(way, what, adapter, path, int(per_partition))
        return
    k = args.per_partition
    with tempfile.TemporaryDirectory(prefix="bench-source-plan-") as folder:
        files: list[tuple[str, str, int, Path]] = []
        for lines in (int(n) for n in args.lines.split(",") if n):
            files.append((f"jsonl, {lines:,} lines", "jsonl", lines, Path(folder) / f"{lines}.jsonl"))
            write_jsonl(files[-1][3], lines)
        if args.vidstg:
            files.append((f"VidSTG array, {args.vidstg:,} entries", "vidstg", args.vidstg, Path(folder) / "vidstg.json"))
            write_vidstg(files[-1][3], args.vidstg)
        print(f"records_per_partition = {k}; CPU s, peak RSS growth MB, tracemalloc peak MB: old, new, old/new "
              "('-': new below what can be told from noise)")
        print("| file | size | what | CPU old | CPU new | ratio | RSS old | RSS new | ratio | peak old | peak new | ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, adapter, count, path in files:
            for what in ("plan", "task"):
                old, new = (measure(way, what, adapter, path, k) for way in ("old", "new"))
                if old["result"] != new["result"]:
                    raise SystemExit(f"{label} {what}: old {old['result']} != new {new['result']}")
                cells = [f"{old[key]:.3f} | {new[key]:.3f} | " + (f"{old[key] / new[key]:.1f}" if new[key] >= least else "-")
                         for key, least in (("cpu", 0.01), ("rss_mb", 0.1), ("peak_mb", 0.01))]
                size = path.stat().st_size / 2**20
                print(f"| {label} | {size:.1f} MB | {what} ({new['result']:,}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
