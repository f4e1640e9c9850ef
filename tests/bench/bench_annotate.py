"""Benchmark: CPU per record of the `annotate` stage with the template backend, against the path it
replaced, measured in the same run on the same records.

    .venv/bin/python tests/bench/bench_annotate.py [--copies 8] [--repeats 3]

Records: the 13 VidSTG entries of ../shared/fixtures (real 640x360 and 640x480 clips), through the
real `source` and `sample` stages in this process, copied `--copies` times under distinct ids. Each
row is `AnnotateStage.process` over all of them as one partition (what a worker runs, Arrow in and
out), CPU seconds of this process (`time.process_time`), best of `--repeats`:
- baseline: what every build did before frames had one size: `sample` embedding 640-px JPEGs
  (`sample.jpeg_max_side=640`) and the template backend's requests carrying the frames, each decoded
  and re-encoded to the annotator's `image_max_side` (448).
- pixels, one size: the default `sample` (448-px JPEGs) with a backend that reads pixels (the
  template backend made to read them): each frame passes as it is, only its header is parsed.
- default: the default `sample` and the default template annotator, which reads no pixels.
Target: default <= 10 ms per record.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.config import compose  # noqa: E402
from pipeline.testing import unit_context  # noqa: E402
from stages.annotate import AnnotateStage  # noqa: E402
from stages.backends.template import TemplateBackend  # noqa: E402
from stages.lib.schema import to_table  # noqa: E402
from stages.sample import SampleStage  # noqa: E402
from stages.source import SourceStage  # noqa: E402

FIXTURES = Path(os.environ.get("STGR_FIXTURES", REPO.parent / "shared" / "fixtures"))


def config(group: str, *overrides: str) -> dict[str, Any]:
    return OmegaConf.to_container(compose(list(overrides))[group], resolve=True)


def sampled(scratch: Path, copies: int, **sample: Any) -> pa.Table:
    """The VidSTG fixture records after `source` and `sample` (default config plus `sample`), each
    record `copies` times under distinct ids."""
    vidstg = FIXTURES / "vidstg"
    source = config("source", "source=vidstg", f"source.annotations={vidstg / 'test_annotations_subset.json'}",
                    f"source.video_dir={vidstg}")
    seeds = SourceStage(source).process(None, unit_context(scratch / "run", stage="source")).table
    result = SampleStage({**config("sample"), **sample}).process(seeds, unit_context(scratch / "run", stage="sample"))
    assert not result.rejections, result.rejections[:3]
    rows = result.table.to_pylist()
    return to_table([dict(row, id=f"{row['id']}-{k}") for k in range(copies) for row in rows])


def cpu_per_record(table: pa.Table, annotator: dict[str, Any], scratch: Path, repeats: int) -> float:
    """Best CPU seconds per record of `AnnotateStage.process` over `table` (the backend built first)."""
    stage = AnnotateStage(annotator)
    ctx = unit_context(scratch / "run", stage="annotate")
    stage.setup(ctx)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        result = stage.process(table, ctx)
        best = min(best, time.process_time() - start)
        assert not result.rejections and result.table.num_rows == table.num_rows, result.rejections[:3]
    return best / table.num_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of each fixture record")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes per row")
    args = parser.parse_args()
    template = config("annotator")
    with tempfile.TemporaryDirectory(prefix="stgr-bench-") as tmp:
        scratch = Path(tmp)
        large = sampled(scratch / "large", args.copies, jpeg_max_side=640)
        default = sampled(scratch / "default", args.copies)
        frames = pc.list_value_length(default.column("frames"))
        jpeg = pc.binary_length(pc.struct_field(pc.list_flatten(default.column("frames")), ["image", "bytes"]))
        per_record = pc.mean(frames).as_py()
        print(f"{default.num_rows} records, {per_record:.1f} frames each of {pc.mean(jpeg).as_py() / 1e3:.1f} KB "
              f"({pc.sum(jpeg).as_py() / default.num_rows / 1e3:.0f} KB of JPEG per record); sample.jpeg_max_side "
              f"{config('sample')['jpeg_max_side']} by default, annotators send 448")
        TemplateBackend.needs_pixels = True
        try:
            baseline = cpu_per_record(large, {**template, "image_max_side": 448}, scratch, args.repeats)
            pixels = cpu_per_record(default, {**template, "image_max_side": 448}, scratch, args.repeats)
        finally:
            TemplateBackend.needs_pixels = False
        after = cpu_per_record(default, template, scratch, args.repeats)
    print(f"{'annotate, template backend':<58} {'ms/record':>9} {'ratio':>7}")
    for label, value in (("baseline: 640-px frames re-encoded to 448", baseline),
                         ("pixels, one size: 448-px frames passed as they are", pixels),
                         ("default: template reads no pixels (target <= 10 ms)", after)):
        print(f"{label:<58} {value * 1000:>9.2f} {value / baseline:>7.4f}")
    return 0 if after <= 0.010 else 1


if __name__ == "__main__":
    raise SystemExit(main())
