"""Publish a dataset the way a build does, without Ray: `shard` on each partition, then `publish` on
the shard units' summaries, with the contexts the engine would pass (for the shard, card and
publication tests, which look at the dataset folder, not at the engine)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from pipeline.stage import StageResult
from pipeline.testing import unit_context
from stages.publish import PublishStage
from stages.shard import ShardStage

FINGERPRINTS = {"source": "s" * 16, "sample": "a" * 16, "annotate": "n" * 16, "align": "l" * 16,
                "filter": "t" * 16, "shard": "h" * 16, "publish": "p" * 16}


def publish_partitions(run: str | Path, partitions: Sequence[pa.Table], config: Mapping[str, Any] | None = None,
                       fingerprints: Mapping[str, str] | None = None,
                       attempt: int = 1) -> tuple[list[StageResult], StageResult]:
    """The shard units' results (one per table in `partitions`) and the publish unit's."""
    fps = {**FINGERPRINTS, **(fingerprints or {})}
    config = dict(config or {})
    shards = [ShardStage(config).process(table, unit_context(run, stage="shard", partition=p,
                                                              num_partitions=len(partitions), attempt=attempt,
                                                              fingerprint=fps["shard"], fingerprints=fps))
              for p, table in enumerate(partitions)]
    ctx = unit_context(run, stage="publish", attempt=attempt, fingerprint=fps["publish"], fingerprints=fps)
    summaries = pa.concat_tables([r.table for r in shards]) if shards else None
    return shards, PublishStage(config).process(summaries, ctx)


def publish_records(run: str | Path, table: pa.Table, config: Mapping[str, Any] | None = None,
                    fingerprints: Mapping[str, str] | None = None, attempt: int = 1) -> StageResult:
    """`publish_partitions` of one partition; the publish unit's result."""
    return publish_partitions(run, [table], config, fingerprints, attempt)[1]
