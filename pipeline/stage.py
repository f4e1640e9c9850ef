"""The Stage API: one class per stage, one job per class.

A stage turns one partition (an Arrow table) into the rows it keeps plus ledger rows for the records
it rejects. The engine owns everything else (scheduling, commits, retries, resume), so a stage is a
pure function of its input partition, its config and its version: that purity is what makes
write-once commits and fingerprint reuse correct.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
import traceback
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import pyarrow as pa

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("rule", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("value", pa.string()),
        pa.field("threshold", pa.string()),
        pa.field("error", pa.string()),
        pa.field("file", pa.string()),
        pa.field("record", pa.string()),
        pa.field("attempt", pa.int32()),
    ]
)


def _text(value: Any) -> str | None:
    """Ledger values are strings so that one column can hold a float, a list or a path."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


@dataclass
class Rejection:
    """One ledger row: why a record did not make it through a stage."""

    id: str | None
    rule: str
    reason: str
    value: Any = None
    threshold: Any = None
    error: str | None = None
    file: str | None = None
    record: str | None = None

    def as_row(self, stage: str, attempt: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "stage": stage,
            "rule": self.rule,
            "reason": self.reason,
            "value": _text(self.value),
            "threshold": _text(self.threshold),
            "error": self.error,
            "file": self.file,
            "record": _text(self.record),
            "attempt": attempt,
        }


class Reject(Exception):
    """Raised by a record-level stage to reject one record with a named rule (not a crash)."""

    def __init__(self, rejection: Rejection | list[Rejection]) -> None:
        self.rejections = rejection if isinstance(rejection, list) else [rejection]
        super().__init__("; ".join(r.reason for r in self.rejections))


@dataclass
class StageReport:
    """What a unit tells the person who ran the build; kept in its commit record.

    The engine does not know what a stage makes (a dataset, an index, ...), so a stage that can judge
    its own product says so here. `summary` lines are printed at the end of every build; `failure`,
    when set, is one line saying why the product is unusable (an empty dataset), and the build exits 3.
    Stored with the commit, it is read back when a resumed build reuses the unit: same report, same
    exit code, without running the stage again.
    """

    summary: list[str] = field(default_factory=list)
    failure: str | None = None


@dataclass
class StageResult:
    """What one unit of work produces: the kept rows, the ledger rows and an optional report."""

    table: pa.Table
    rejections: list[Rejection] = field(default_factory=list)
    report: StageReport | None = None


@dataclass(frozen=True)
class Resources:
    """Ray resources per task (CPU stages) or per actor (model stages)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "Resources":
        cfg = dict(cfg or {})
        return cls(
            num_cpus=float(cfg.get("num_cpus", 1.0)),
            num_gpus=float(cfg.get("num_gpus", 0.0)),
            memory=cfg.get("memory"),
        )


@dataclass(frozen=True)
class UnitContext:
    """What a stage may know about the unit it is running: where, which partition, which attempt.

    `run_uri` and `fingerprint` let a stage keep side data (e.g. the annotate response cache) under
    the run directory; `filesystem` is the pyarrow filesystem the run directory lives on.
    """

    stage: str
    partition: int
    num_partitions: int
    attempt: int
    fingerprint: str
    run_uri: str
    run_path: str
    filesystem: Any
    build_id: str
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    # Set only when a barrier runs on the inputs that committed because others failed (the driver's
    # `pipeline.build.publish_partial`): the missing units' keys, so its product says it is partial.
    missing_inputs: tuple[str, ...] = ()


class Stage(ABC):
    """Base class of every stage.

    Subclasses set `name` (registry key) and `version` (bump it when the output for the same input
    and config changes: that is what invalidates committed units), and implement `process`.

    - `source = True`: the stage has no input; `plan()` returns its number of partitions and
      `process(None, ctx)` produces partition `ctx.partition`.
    - `needs_all_input = True` (a barrier): the stage runs once, on all upstream partitions
      concatenated, after every one of them committed.
    - `actor = True`: run in a pool of Ray actors, each calling `setup()` once (load a model there).
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    source: ClassVar[bool] = False
    needs_all_input: ClassVar[bool] = False
    actor: ClassVar[bool] = False
    required_keys: ClassVar[tuple[str, ...]] = ()
    key_types: ClassVar[Mapping[str, type | tuple[type, ...]]] = {}
    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("num_cpus", "num_gpus", "memory", "num_actors", "max_attempts")
    # Config keys holding local paths: made absolute when the build starts, so workers in other
    # directories (or on other nodes) and a later `resume` from elsewhere read the same files.
    path_keys: ClassVar[tuple[str, ...]] = ()
    # Config keys whose values name environment variables the workers need (an API key's variable):
    # the driver forwards those variables to Ray workers; their values never enter the run directory.
    env_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    @classmethod
    def excluded_keys(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys of `config` left out of the fingerprint: `fingerprint_exclude`, and what a stage
        learns from the config itself (a model stage: the how-to-run keys of the backend it names)."""
        return cls.fingerprint_exclude

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        """Return problems as `key: message` strings; an empty list means valid."""
        problems = []
        for key in cls.required_keys:
            if config.get(key) is None:
                problems.append(f"{key}: required by stage '{cls.name}' but missing")
        for key, types in cls.key_types.items():
            value = config.get(key)
            if value is None:
                continue
            accepted = types if isinstance(types, tuple) else (types,)
            if bool in accepted or not isinstance(value, bool):
                if isinstance(value, accepted):
                    continue
            if float in accepted and isinstance(value, int) and not isinstance(value, bool):
                continue
            names = " or ".join(t.__name__ for t in accepted)
            problems.append(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
        return problems

    def resources(self) -> Resources:
        return Resources.from_config(self.config)

    def setup(self, ctx: UnitContext) -> None:
        """Load what is expensive once per worker (models); the default needs nothing."""

    def plan(self) -> int:
        """Source stages: how many partitions to produce. Runs on the driver."""
        raise TypeError(f"stage '{self.name}' is not a source stage")

    @abstractmethod
    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        """The kept rows and the ledger rows of one partition (`table` is None for a source)."""

    def published(self, ctx: UnitContext) -> bool:
        """Whether this committed unit's product outside its own files (shard's `dataset/`) is in place.

        After every build the driver asks each committed unit of a stage that overrides this, and
        calls `publish` when the answer is no: a reused unit whose product another config replaced,
        or that was lost, is materialised again from its committed output. Most stages have none.
        """
        return True

    def publish(self, table: pa.Table, ctx: UnitContext) -> None:
        """(Re)write the product from the unit's committed output `table` (read back and verified)."""


class RecordStage(Stage):
    """A stage written one record at a time; a record that raises becomes a ledger row.

    Use it where the work per record dominates (decoding a video, calling a model); vectorise with
    a plain `Stage` where it does not.
    """

    output_schema: ClassVar[pa.Schema | None] = None

    @abstractmethod
    def process_record(self, record: dict[str, Any], ctx: UnitContext) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The output row(s) of one record, or None to drop it silently (prefer `Reject`)."""

    def schema_for(self, table: pa.Table | None) -> pa.Schema | None:
        return self.output_schema or (table.schema if table is not None else None)

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        rows: list[dict[str, Any]] = []
        rejections: list[Rejection] = []
        for record in iter_records(table):
            try:
                out = self.process_record(record, ctx)
            except Reject as rej:
                rejections.extend(rej.rejections)
                continue
            except Exception as exc:  # noqa: BLE001 - the ledger is where a record's crash belongs
                rejections.append(record_error(record, exc))
                continue
            if out is None:
                continue
            rows.extend(out if isinstance(out, list) else [out])
        schema = self.schema_for(table)
        out_table = pa.Table.from_pylist(rows, schema=schema) if schema is not None else pa.Table.from_pylist(rows)
        return StageResult(out_table, rejections)


def iter_records(table: pa.Table | None) -> Iterable[dict[str, Any]]:
    if table is None:
        return []
    return table.to_pylist()


def record_error(record: Mapping[str, Any], exc: BaseException) -> Rejection:
    """A ledger row for a record whose processing raised: exception type, message and origin."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return Rejection(
        id=record.get("id"),
        rule="exception",
        reason=f"{type(exc).__name__}: {exc}",
        error=f"{type(exc).__name__}: {exc}{where}",
        record=record.get("source_id") or record.get("id"),
    )
