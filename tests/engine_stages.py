"""Small real stages for the engine's tests (imported through the build config's `plugins`).

They do real work over real Arrow tables (no mocks): a source of numbered rows, a record-level map
that can raise on chosen records or kill its worker on a chosen partition, and a barrier. Each unit
may leave a marker file per execution so tests can prove what was (not) recomputed.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register_stage
from pipeline.settings import setting
from pipeline.stage import ActorConfig, Rejection, RecordStage, Stage, StageConfig, StageResult, UnitContext


@dataclass(kw_only=True)
class TestConfig(StageConfig):
    """What every test stage takes: CPU work per unit and a folder for its markers."""

    work_s: float = setting(0.0, "seconds of CPU work per unit")
    marks_dir: str | None = setting(None, "folder that receives a marker file per execution")


def _mark(cfg: TestConfig, ctx: UnitContext) -> None:
    marks = cfg.marks_dir
    if marks:
        Path(marks).mkdir(parents=True, exist_ok=True)
        (Path(marks) / f"{ctx.stage}-{ctx.partition:05d}-{time.time_ns()}-{uuid.uuid4().hex[:6]}").touch()


def _work(cfg: TestConfig) -> None:
    """Burn CPU (not sleep) so engine overhead is measured against real work."""
    deadline = time.perf_counter() + cfg.work_s
    x = 0
    while time.perf_counter() < deadline:
        x += 1


@register_stage
class Numbers(Stage):
    name = "test_numbers"
    source = True

    @dataclass(kw_only=True)
    class Config(TestConfig):
        partitions: int = setting(help="partitions to make")
        rows: int = setting(help="rows per partition")
        secret_env: str | None = setting(None, "an environment variable the workers need", env=True)

    def plan(self) -> int:
        return self.cfg.partitions

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.cfg, ctx)
        _work(self.cfg)
        n = self.cfg.rows
        start = ctx.partition * n
        values = list(range(start, start + n))
        columns = {"id": [f"r{v:06d}" for v in values], "value": values}
        if self.cfg.secret_env:
            columns["secret_seen"] = [bool(os.environ.get(self.cfg.secret_env))] * n
        return StageResult(pa.table(columns))


@register_stage
class Scale(RecordStage):
    name = "test_scale"

    @dataclass(kw_only=True)
    class Config(TestConfig):
        factor: int = setting(2, "what each value is multiplied by")
        fail_every: int | None = setting(None, "raise on every value v with v % n == n - 1")
        die_on_partition: int | None = setting(None, "kill the worker on this partition")

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.cfg, ctx)
        _work(self.cfg)
        if self.cfg.die_on_partition == ctx.partition:
            os._exit(1)
        return super().process(table, ctx)

    def process_record(self, record: dict[str, Any], ctx: UnitContext) -> dict[str, Any]:
        every = self.cfg.fail_every
        if every and record["value"] % every == every - 1:
            raise ValueError(f"value {record['value']} is unlucky")
        return {**record, "value": record["value"] * self.cfg.factor}


@register_stage
class Threshold(Stage):
    name = "test_threshold"

    @dataclass(kw_only=True)
    class Config(TestConfig):
        min_value: int = setting(0, "values below it are rejected")

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.cfg, ctx)
        _work(self.cfg)
        keep = pc.greater_equal(table["value"], self.cfg.min_value)
        rejected = table.filter(pc.invert(keep))
        rejections = [Rejection(id=i, rule="min_value", reason="value below min_value", value=v,
                                threshold=self.cfg.min_value)
                      for i, v in zip(rejected["id"].to_pylist(), rejected["value"].to_pylist())]
        return StageResult(table.filter(keep), rejections)


@register_stage
class Total(Stage):
    name = "test_total"
    needs_all_input = True
    Config = TestConfig

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        _mark(self.cfg, ctx)
        return StageResult(pa.table({"id": ["total"], "rows": [table.num_rows],
                                     "sum": [int(pc.sum(table["value"]).as_py() or 0)]}))


@register_stage
class ActorScale(Scale):
    """`test_scale` in an actor pool: `setup()` (the "model load") leaves a marker per actor."""

    name = "test_actor_scale"
    actor = True

    @dataclass(kw_only=True)
    class Config(ActorConfig, Scale.Config):
        pass

    def setup(self, ctx: UnitContext) -> None:
        marks = self.cfg.marks_dir
        if marks:
            Path(marks).mkdir(parents=True, exist_ok=True)
            (Path(marks) / f"setup-{os.getpid()}-{uuid.uuid4().hex[:6]}").touch()
