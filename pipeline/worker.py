"""What runs on a Ray worker: read one unit's input from the run directory, process, commit.

Inputs travel through the run directory, not the object store: a committed unit is then the only
truth a resumed build needs, and a unit can run on any node that sees the run directory. Each input
is checked against the sha256 in its commit record as it is read; a damaged one (a bit flip, a
truncation, a lost file) is invalidated, so the build's next pass recomputes it, and this unit fails
with a message naming the file.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.redact import Secrets, install, scrub, scrub_value
from pipeline.registry import STAGES, load_plugins
from pipeline.rundir import CorruptUnit, RunDir, Unit, commit, invalidate, is_committed
from pipeline.stage import Stage, UnitContext
from pipeline.stored import Input, commit_form, read_input


@dataclass(frozen=True)
class UnitTask:
    """Everything a worker needs to run one unit; small and picklable."""

    run_uri: str
    unit: Unit
    stage_name: str
    config: dict[str, Any]
    inputs: tuple[Unit, ...]
    num_partitions: int
    attempt: int
    build_id: str
    plugins: tuple[str, ...] = ()
    fingerprints: dict[str, str] = field(default_factory=dict)
    secrets: Secrets = field(default_factory=Secrets)  # the stages' API keys: see pipeline.redact
    spec: Any = None  # a source unit's descriptor from `Stage.plan()` (e.g. where its slice starts)


class UnitFailed(Exception):
    """A unit raised (not a single record: the whole partition); carries the formatted error."""


_STAGE_CACHE: dict[tuple[str, str], Stage] = {}


def _stage_for(task: UnitTask, ctx: UnitContext) -> Stage:
    """One stage instance per worker process and fingerprint, so setup() runs once per worker."""
    key = (task.stage_name, task.unit.fingerprint)
    stage = _STAGE_CACHE.get(key)
    if stage is None:
        load_plugins(task.plugins)
        stage = STAGES[task.stage_name](task.config)
        stage.setup(ctx)
        _STAGE_CACHE[key] = stage
    return stage


def _read_inputs(run: RunDir, inputs: tuple[Unit, ...], full: tuple[str, ...] | None) -> list[Input]:
    """Each input as read, with the stored columns in `full` whole (None: all; see pipeline/stored.py)."""
    return [read_input(run, unit, full) for unit in inputs]


def _concat(inputs: list[Input]) -> pa.Table | None:
    if not inputs:
        return None
    tables = [i.table for i in inputs]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def run_unit(task: UnitTask) -> dict[str, Any]:
    """Run and commit one unit; returns its commit summary. Raises UnitFailed with the traceback."""
    install(task.secrets)
    run = RunDir.open(task.run_uri)
    if is_committed(run, task.unit):
        return {"skipped": True, "node": task.unit.node, "partition": task.unit.partition}
    ctx = UnitContext(
        stage=task.unit.node, partition=task.unit.partition, num_partitions=task.num_partitions,
        attempt=task.attempt, fingerprint=task.unit.fingerprint, run_uri=task.run_uri,
        run_path=run.path, filesystem=run.fs, build_id=task.build_id, fingerprints=task.fingerprints, spec=task.spec,
    )
    started = time.perf_counter()
    try:
        stage = _stage_for(task, ctx)
        # a barrier's inputs carry different references, so it reads every stored column whole
        full = None if stage.needs_all_input else stage.wants_full()
        inputs = _read_inputs(run, task.inputs, full)
        table = _concat(inputs)
        result = stage.process(table, ctx)
        output, stored = commit_form(result.table, None if stage.needs_all_input else inputs[0] if inputs else None,
                                     stage.stores, task.unit, task.stage_name, full or ())
    except CorruptUnit as exc:
        # a damaged input (or a ledger a stage reads): withdraw it, so the next pass recomputes it
        try:
            invalidate(run, exc.unit, str(exc))
        except OSError as fault:
            raise UnitFailed(f"CorruptUnit: {exc}; cannot invalidate {exc.unit.key()}: {fault}") from None
        raise UnitFailed(f"CorruptUnit: {exc}; {exc.unit.key()} is invalidated and will be recomputed") from None
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which counts attempts
        raise UnitFailed(scrub(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")) from None
    seconds = time.perf_counter() - started
    ledger_rows = [scrub_value(r.as_row(task.unit.node, task.attempt)) for r in result.rejections]
    record = {
        "node": task.unit.node, "stage": task.stage_name, "partition": task.unit.partition,
        "fingerprint": task.unit.fingerprint, "attempt": task.attempt,
        "rows_in": 0 if table is None else table.num_rows, "rows_out": output.num_rows,
        "rows_rejected": len(ledger_rows), "seconds": round(seconds, 4),
        "inputs": [{"data": i.unit.data, "sha256": i.sha256} for i in inputs],
    }
    if stored:
        record["stored"] = stored
    if result.report is not None:
        record["report"] = dataclasses.asdict(result.report)
    if result.cost is not None:
        record["cost"] = result.cost
    try:
        committed = commit(run, task.unit, output, ledger_rows, record)
    except OSError as exc:  # the run directory is full, read-only or unreachable: the unit's attempt fails
        raise UnitFailed(f"{type(exc).__name__}: {exc} (committing {task.unit.key()} to {run.uri})") from None
    return {**record, "skipped": not committed}


class StageActor:
    """A Ray actor holding one stage instance (and its model) for many units."""

    def run(self, task: UnitTask) -> dict[str, Any]:
        return run_unit(task)
