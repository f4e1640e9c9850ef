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
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.settings import Settings, setting, unknown_keys

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
    """What one unit of work produces: the kept rows, the ledger rows, an optional report and what its
    model calls cost (`cost`, JSON-ready: kept as it is in the commit record, where `stgr status`, the
    manifest and the card sum it; see stages/lib/cost.py)."""

    table: pa.Table
    rejections: list[Rejection] = field(default_factory=list)
    report: StageReport | None = None
    cost: dict[str, Any] | None = None


@dataclass(kw_only=True)
class StageConfig(Settings):
    """What every stage's config holds: the Ray resources of each of its tasks (CPU stages) or actors
    (model stages). How to run, not what to compute: left out of the fingerprint."""

    num_cpus: float = setting(1.0, "CPUs per task (or per actor)", run=True, ge=0)
    num_gpus: float = setting(0.0, "GPUs per task (or per actor)", run=True, ge=0)
    memory: int | None = setting(None, "bytes of memory Ray reserves per task or actor (null: none)", run=True, gt=0)

    def ray_options(self) -> dict[str, Any]:
        """The resources as Ray's `.options(...)` takes them."""
        out: dict[str, Any] = {"num_cpus": float(self.num_cpus), "num_gpus": float(self.num_gpus)}
        if self.memory:
            out["memory"] = int(self.memory)
        return out


@dataclass(kw_only=True)
class ActorConfig(StageConfig):
    """A model stage's config (`actor = True`): its pool size besides the resources of each actor."""

    num_actors: int = setting(1, "actors in the pool (each loads the model once, in setup())", run=True, ge=1)


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
    # A source unit's descriptor of its partition, as its stage's `plan()` returned it (None when
    # `plan()` returned a count, or the stage is run outside a build, as in tests).
    spec: Any = None


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
    #: Columns whose bulk this stage writes, stored once (sample: `frames`, the JPEGs): later units
    #: commit them light (`lighten`) with a reference to this stage's unit; see pipeline/stored.py.
    stores: ClassVar[tuple[str, ...]] = ()
    #: Stored columns whose bulk this stage reads (shard: `frames`, its shards are self-contained):
    #: the engine puts them back from the unit that stores them. Others arrive light.
    full_columns: ClassVar[tuple[str, ...]] = ()
    #: The stage's settings (a `StageConfig` dataclass; `ActorConfig` for a model stage), built from
    #: its config block as `self.cfg`; see pipeline/settings.py.
    Config: ClassVar[type[StageConfig]] = StageConfig
    cfg: StageConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.actor and not issubclass(cls.Config, ActorConfig):
            raise TypeError(f"{cls.__qualname__}: an actor stage's Config extends ActorConfig (num_actors)")

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.cfg = self.Config.from_config(self.config, f"stage '{self.name}'")

    @classmethod
    def config_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
        """(owner, settings class) of everything that reads this stage's config block: the stage's own
        `Config`, and what the stage builds from the block (the source's adapter, a model stage's
        backend). Raises ConfigError when the block names an unknown one."""
        return [(f"stage '{cls.name}'", cls.Config)]

    @classmethod
    def expand_dag(cls, node: str, dag: Mapping[str, Mapping[str, Any]],
                   config: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]] | None:
        """Rewrite this stage's part of the DAG at plan time: None (the default) leaves it as it is;
        else the whole rewritten DAG and the config blocks its new nodes name, by config key
        (annotate's cascade: one annotate -> align -> filter chain per tier; see pipeline.config.expand_dag)."""
        return None

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        """Problems as `key: message` strings (an empty list means valid): every declared setting's
        type, bounds and presence, then every key nothing declares."""
        try:
            parts = cls.config_parts(config)
        except ConfigError as exc:
            return [str(exc)]
        problems = [p for owner, part in parts for p in part.problems(config, owner)]
        known = [n for _, part in parts for n in part.names()]
        said = {p.split(":", 1)[0] for p in problems}  # a key refused already (api_key) is not also unknown
        unknown = [p for p in unknown_keys(config, known, f"stage '{cls.name}'") if p.split(":", 1)[0] not in said]
        return problems + unknown

    @classmethod
    def resolved_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Every declared setting of a valid `config`, defaults filled in: what the plan stores, what
        the workers get and what the fingerprint hashes."""
        out: dict[str, Any] = {}
        for _, part in cls.config_parts(config):
            out.update(part.build(config).as_dict())
        return out

    @classmethod
    def marked_keys(cls, config: Mapping[str, Any], mark: str) -> tuple[str, ...]:
        """The settings of `config` marked `run` (how to run), `path` (a local path) or `env` (names an
        environment variable the workers need), across `config_parts`."""
        return tuple(name for _, part in cls.config_parts(config) for name in part.names(mark))

    @classmethod
    def excluded_keys(cls, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys left out of the fingerprint: the settings marked `run` (resources, pool sizes,
        batch sizes, a backend's connections and retries), which never change the output."""
        return cls.marked_keys(config, "run")

    def wants_full(self) -> tuple[str, ...]:
        """The stored columns this instance reads whole: `full_columns`, unless its config says more
        or less (annotate reads frames only when its backend looks at pixels)."""
        return self.full_columns

    @classmethod
    def lighten(cls, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """The light form of a column this stage `stores`, committed by later units: all nulls unless
        the stage keeps part of it (sample keeps each frame's time and index)."""
        return pa.chunked_array([pa.nulls(len(column), column.type)], column.type)

    def partition_specs(self) -> Sequence[Any] | None:
        """Source stages: one small picklable descriptor per partition that `plan()` counted (where
        its slice of a file starts), handed to that partition's unit as `UnitContext.spec`, so no
        worker scans the input again; None (the default) hands none. Runs on the driver, after `plan()`."""
        return None

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
