"""Benchmark: the `sample` stage's throughput in *source* frames per second, against decord decoding
every frame of the same videos sequentially in the same run, and its scaling from one to two CPUs.

    .venv/bin/python tests/bench/bench_sample.py [--copies 4] [--repeats 2] [--no-scaling]

Source frames per second counts the videos' own frames (decoded or skipped) per wall second, which
is what a 2 fps sample of an inter-frame codec must be judged by: at 29.97 fps every sampled frame
still needs the frames since its key frame. Videos: the real clips of ../shared/fixtures (VidSTG and
the TVQA+ clip), each linked `--copies` times under distinct names so they are separate videos.
- ratio 1 (target >= 0.9): `SampleStage.process` (default config, JPEG embedding on) on one CPU,
  one record per video, against `VideoReader.next()` over every frame; both with one decoder thread.
- ratio 2 (target >= 1.7): the same partitions (one video each) as Ray tasks of one CPU each, with an
  embedded Ray of 2 CPUs against one of 1 CPU (each warmed up before timing).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from omegaconf import OmegaConf  # noqa: E402

from pipeline.config import compose  # noqa: E402
from pipeline.testing import unit_context  # noqa: E402
from stages.sample import SampleStage  # noqa: E402
from stages.lib.schema import record_id, to_table  # noqa: E402

FIXTURES = Path(os.environ.get("STGR_FIXTURES", REPO.parent / "shared" / "fixtures"))
CLIPS = ("vidstg/5587257558.mp4", "vidstg/5804131706.mp4", "raw/s08e18_seg02_clip_03.mp4")


def videos(scratch: Path, copies: int) -> list[Path]:
    out = []
    for k in range(copies):
        for clip in CLIPS:
            link = scratch / f"{k}-{Path(clip).name}"
            link.symlink_to(FIXTURES / clip)
            out.append(link)
    return out


def partition(path: Path):
    return to_table([{"id": record_id("bench", path.name, "general_free"), "source": "bench", "source_id": path.name,
                      "task": "general_free", "media": {"uri": str(path)}}])


def sequential(paths: list[Path]) -> tuple[float, int]:
    import decord

    start, frames = time.perf_counter(), 0
    for path in paths:
        reader = decord.VideoReader(str(path), num_threads=1)
        for _ in range(len(reader)):
            reader.next()
        frames += len(reader)
    return time.perf_counter() - start, frames


def sample_in_process(paths: list[Path], config: dict, scratch: Path) -> tuple[float, int, int]:
    stage = SampleStage(config)
    ctx = unit_context(scratch / "run", stage="sample")
    start, frames, sampled = time.perf_counter(), 0, 0
    for path in paths:
        result = stage.process(partition(path), ctx)
        row = result.table.to_pylist()[0]
        frames += row["media"]["num_frames"]
        sampled += len(row["frames"])
    return time.perf_counter() - start, frames, sampled


def sample_on_ray(paths: list[Path], config: dict, scratch: Path, cpus: int) -> float:
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=ray_tmp)
    try:
        @ray.remote(num_cpus=1)
        def unit(path: str) -> int:
            result = SampleStage(config).process(partition(Path(path)), unit_context(scratch / "run", stage="sample"))
            return result.table.num_rows

        ray.get([unit.remote(str(p)) for p in paths[:cpus]])  # warm the workers (imports, decord)
        start = time.perf_counter()
        assert sum(ray.get([unit.remote(str(p)) for p in paths])) == len(paths)
        return time.perf_counter() - start
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="links per fixture clip (videos = 3 x copies)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs for ratio 1")
    parser.add_argument("--no-scaling", action="store_true", help="skip the Ray 1 vs 2 CPU measurement")
    args = parser.parse_args()
    config = OmegaConf.to_container(compose()["sample"], resolve=True)
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        scratch = Path(tmp)
        paths = videos(scratch, args.copies)
        base = min(sequential(paths)[0] for _ in range(args.repeats))
        runs = [sample_in_process(paths, config, scratch) for _ in range(args.repeats)]
        wall, frames, sampled = min(runs)
        seq_fps = frames / base
        print(f"videos: {len(paths)} ({', '.join(CLIPS)} x {args.copies}), {frames} source frames, {sampled} sampled")
        print(f"sequential decord, every frame, 1 thread: {base:7.2f} s  {seq_fps:7.1f} source frames/s")
        print(f"sample stage (fps {config['fps']}, JPEG {config['embed_jpeg']}), 1 CPU: {wall:7.2f} s  "
              f"{frames / wall:7.1f} source frames/s  {sampled / wall:6.1f} sampled frames/s")
        print(f"ratio 1 (sample / sequential, target >= 0.9): {(frames / wall) / seq_fps:.2f}")
        if not args.no_scaling:
            one = sample_on_ray(paths, config, scratch, 1)
            two = sample_on_ray(paths, config, scratch, 2)
            print(f"Ray, 1 CPU: {one:7.2f} s  {frames / one:7.1f} source frames/s")
            print(f"Ray, 2 CPUs: {two:7.2f} s  {frames / two:7.1f} source frames/s")
            print(f"ratio 2 (2 CPUs / 1 CPU, target >= 1.7): {one / two:.2f}")


if __name__ == "__main__":
    main()
