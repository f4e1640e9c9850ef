"""Helpers for testing a stage on its own, outside a build (no Ray, same context a worker gets)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow.fs as pafs

from pipeline.stage import UnitContext


def unit_context(run_dir: str | Path, stage: str = "test", partition: int = 0, num_partitions: int = 1,
                 attempt: int = 1, fingerprint: str = "f" * 16,
                 fingerprints: Mapping[str, str] | None = None, spec: Any = None) -> UnitContext:
    """A UnitContext over a local run directory, as the engine would pass to `Stage.process`."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return UnitContext(
        stage=stage,
        partition=partition,
        num_partitions=num_partitions,
        attempt=attempt,
        fingerprint=fingerprint,
        run_uri=str(run_dir),
        run_path=str(run_dir),
        filesystem=pafs.LocalFileSystem(),
        build_id=run_dir.name,
        fingerprints=dict(fingerprints or {stage: fingerprint}),
        spec=spec,
    )
