"""Small real stages for the engine's tests (imported through the build config's `plugins`).

They do real work over real Arrow tables (no mocks): a source of numbered rows, a record-level map
that can raise on chosen records or kill its worker on a chosen partition, and a barrier. Each unit
may leave a marker file per execution so tests can prove what was (not) recomputed.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register_stage
from pipeline.stage import Rejection, RecordStage, Stage, StageResult, UnitContext


def _mark(config: dict[str, Any], ctx: UnitContext) -> None:
    marks = config.get("marks_dir")
    if marks:
        Path(marks).mkdir(parents=True, exist_ok=True)
        (Path(marks) / f"{ctx.stage}-{ctx.partition:05d}-{time.time_ns()}-{uuid.uuid4().hex[:6]}").touch()


def _work(config: dict[str, Any]) -> None:
    """Burn CPU (not sleep) so engine overhead is measured against real work."""
    deadline = time.perf_counter() + float(config.get("work_s", 0.0))
    x = 0
    while time.perf_counter() < deadline:
        x += 1


@register_stage
class Numbers(Stage):
    name = "test_numbers"
    source = True
    required_keys = ("partitions", "rows")
    key_types = {"partitions": int, "rows": int, "work_s": float}
    env_keys = ("secret_env",)

    def plan(self) -> int:
        return int(self.config["partitions"])

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.config, ctx)
        _work(self.config)
        n = int(self.config["rows"])
        start = ctx.partition * n
        values = list(range(start, start + n))
        columns = {"id": [f"r{v:06d}" for v in values], "value": values}
        if self.config.get("secret_env"):
            columns["secret_seen"] = [bool(os.environ.get(self.config["secret_env"]))] * n
        return StageResult(pa.table(columns))


@register_stage
class Scale(RecordStage):
    name = "test_scale"
    key_types = {"factor": int, "fail_every": int, "die_on_partition": int, "work_s": float}

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.config, ctx)
        _work(self.config)
        if self.config.get("die_on_partition") == ctx.partition:
            os._exit(1)
        return super().process(table, ctx)

    def process_record(self, record: dict[str, Any], ctx: UnitContext) -> dict[str, Any]:
        every = self.config.get("fail_every")
        if every and record["value"] % every == every - 1:
            raise ValueError(f"value {record['value']} is unlucky")
        return {**record, "value": record["value"] * int(self.config.get("factor", 2))}


@register_stage
class Threshold(Stage):
    name = "test_threshold"
    key_types = {"min_value": int, "work_s": float}

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.config, ctx)
        _work(self.config)
        keep = pc.greater_equal(table["value"], int(self.config.get("min_value", 0)))
        rejected = table.filter(pc.invert(keep))
        rejections = [Rejection(id=i, rule="min_value", reason="value below min_value", value=v,
                                threshold=self.config.get("min_value"))
                      for i, v in zip(rejected["id"].to_pylist(), rejected["value"].to_pylist())]
        return StageResult(table.filter(keep), rejections)


@register_stage
class Total(Stage):
    name = "test_total"
    needs_all_input = True

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.config, ctx)
        return StageResult(pa.table({"id": ["total"], "rows": [table.num_rows],
                                     "sum": [int(pc.sum(table["value"]).as_py() or 0)]}))


@register_stage
class ActorScale(Scale):
    """`test_scale` in an actor pool: `setup()` (the "model load") leaves a marker per actor."""

    name = "test_actor_scale"
    actor = True

    def setup(self, ctx: UnitContext) -> None:
        marks = self.config.get("marks_dir")
        if marks:
            Path(marks).mkdir(parents=True, exist_ok=True)
            (Path(marks) / f"setup-{os.getpid()}-{uuid.uuid4().hex[:6]}").touch()
