"""The `source` stage: the first node of the DAG, turning an adapter's entries into seed partitions.

`source.adapter` picks the adapter (stages/sources/base.py registry). `plan()` runs on the driver: it
reads and validates the annotation file (a malformed file stops the build with exit 2 before any
work is scheduled) and returns the number of partitions. `process(None, ctx)` runs on a worker and
builds partition `ctx.partition` from a contiguous slice of the entries, so the same config always
gives the same partitions, which is what makes committed units reusable on resume. Each entry's
records pass `Adapter.checked` (storable values, citable names, media inside `video_dir`); an entry
that fails, or whose adapter raises, is one ledger row and the partition goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import Settings, setting
from pipeline.stage import Reject, Rejection, Stage, StageConfig, StageResult, UnitContext
from stages.lib.schema import to_table
from stages.sources.base import Adapter, get_adapter


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
        return max(1, math.ceil(len(self.adapter.entries()) / self.per_partition))

    def process(self, table: Any, ctx: UnitContext) -> StageResult:
        entries = self.adapter.entries()
        start = ctx.partition * self.per_partition
        tables: list[pa.Table] = []
        rejections: list[Rejection] = []
        for position in range(start, min(start + self.per_partition, len(entries))):
            entry = entries[position]
            try:
                rows = self.adapter.seed(entry, position, ctx)
                tables.append(self.adapter.checked(rows, position, self.adapter.entry_label(entry, position)))
            except Reject as rej:
                rejections.extend(rej.rejections)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not sink its partition
                label = self.adapter.entry_label(entry, position)
                rejections.append(Rejection(
                    id=None, rule="exception", reason=f"{self.adapter.annotations_label}: {label}: "
                    f"{type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}",
                    file=self.adapter.annotations_label, record=label))
        return StageResult(pa.concat_tables(tables) if tables else to_table([]), rejections)
