"""The `source` stage: the first node of the DAG, turning an adapter's entries into seed partitions.

`source.adapter` picks the adapter (stages/sources/base.py registry). `plan()` runs on the driver: one
streaming pass over the annotation file finds where each partition of `records_per_partition`
entries starts (a byte offset and the entry's position: stages/sources/layout.py) and checks the
file (a malformed file stops the build with exit 2 before any work is scheduled), keeping no entry.
`process(None, ctx)` runs on a worker and builds partition `ctx.partition`, entries `p*k .. p*k+k-1`
read from where it starts, so the same file and config always give the same partitions, which is
what makes committed units reusable on resume. Each entry's records pass `Adapter.checked`
(storable values, citable names, media inside `video_dir`); an entry that fails, a line that is not
UTF-8, or an entry whose adapter raises, is one ledger row and the partition goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import Settings, setting
from pipeline.stage import Reject, Rejection, Stage, StageConfig, StageResult, UnitContext
from stages.lib.schema import to_table
from stages.sources.base import Adapter, get_adapter
from stages.sources.layout import Unreadable


@register_stage
class SourceStage(Stage):
    """Seed records from one dataset (or the synthetic generator), `records_per_partition` entries each."""

    name = "source"
    version = "1"
    source = True

    @dataclass(kw_only=True)
    class Config(StageConfig):
        """The stage's settings; the adapter's own (its files, ...) come from the same block."""

        adapter: str = setting(help="the source adapter (stages/sources): the dataset format read")
        records_per_partition: int = setting(16, "annotation entries per partition (a synthetic scene is one entry)",
                                             ge=1)

    cfg: Config

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.adapter: Adapter = get_adapter(self.cfg.adapter, "adapter")(self.config)

    @classmethod
    def config_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
        adapter = get_adapter(config.get("adapter"), "adapter")
        return super().config_parts(config) + [(f"source adapter '{adapter.name}'", adapter.Config)]

    @property
    def per_partition(self) -> int:
        return self.cfg.records_per_partition

    def plan(self) -> int:
        return max(1, self.adapter.num_partitions(self.per_partition))

    def partition_specs(self) -> Sequence[Any] | None:
        """Where each partition starts in the annotation file (a `Slice`; the scan `plan()` made, cached
        in this process), so a task reads its slice without scanning the file; none for an adapter
        without a file (synthetic)."""
        return None if self.adapter.layout is None else self.adapter.starts(self.per_partition)

    def process(self, table: Any, ctx: UnitContext) -> StageResult:
        adapter = self.adapter
        tables: list[pa.Table] = []
        rejections: list[Rejection] = []
        for position, entry in adapter.partition(ctx.partition, self.per_partition, ctx.spec):
            label = adapter.entry_label(entry, position)
            try:
                if isinstance(entry, Unreadable):
                    raise adapter.reject(position, label, entry.problem)
                tables.append(adapter.checked(adapter.seed(entry, position, ctx), position, label))
            except Reject as rej:
                rejections.extend(rej.rejections)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not sink its partition
                rejections.append(Rejection(
                    id=None, rule="exception", reason=f"{adapter.annotations_label}: {label}: "
                    f"{type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}",
                    file=adapter.annotations_label, record=label))
        return StageResult(pa.concat_tables(tables) if tables else to_table([]), rejections)
