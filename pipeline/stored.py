"""Columns stored once: the bulk of a column (sample's frame JPEGs) lives only in the unit that wrote it.

A stage that lists a column in `Stage.stores` writes its bulk; every later unit commits that column
in its light form (`Stage.lighten` of the storing stage: frames keep their times and indices, their
images are null) and its commit record says, under `stored`, which committed unit holds the bulk.
A stage that reads the bulk lists the column in `full_columns` (or `Stage.wants_full`), and the
engine puts it back from that unit, verified against its sha256, matched by record `id`. So the run
directory holds each frame once, a stage that reads no pixels reads none, and a resumed build needs
nothing but the commit records it already trusts.

Why by `id`: rows may be dropped or reordered between stages but keep their id (the record
contract, docs/stages.md). A row whose id repeats takes the first row of that id (shard keeps only
the first of a repeated id). A unit whose output rows are not its input rows by id cannot carry a
reference: it keeps the column inline when it read the bulk, and fails naming the contract when it
did not (its rows would lose their frames).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.registry import STAGES
from pipeline.rundir import RunDir, Unit, read_verified, read_verified_table, verified_record

#: A commit record's `stored` entry: column -> the unit holding its bulk, {"stage", "node",
#: "fingerprint", "partition"}; a unit that stores the column names itself.
Stored = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Input:
    """One input unit as a worker read it: its table, its file's sha256 and its `stored` entry."""

    unit: Unit
    table: pa.Table
    sha256: str
    stored: Stored


class StoredError(Exception):
    """A unit's rows cannot be matched to the unit holding a stored column's bulk."""


def _unit(ref: Mapping[str, Any]) -> Unit:
    return Unit(ref["node"], ref["fingerprint"], int(ref["partition"]))


def own_refs(stage_name: str, unit: Unit, columns: Iterable[str]) -> Stored:
    """The `stored` entry of a unit whose stage stores `columns` itself."""
    return {c: {"stage": stage_name, "node": unit.node, "fingerprint": unit.fingerprint, "partition": unit.partition}
            for c in columns}


def _is_light(unit: Unit, ref: Mapping[str, Any]) -> bool:
    return _unit(ref) != unit


def read_input(run: RunDir, unit: Unit, full: Iterable[str] | None) -> Input:
    """A committed unit's verified table with the stored columns in `full` (None: all of them) put
    back whole, its file's sha256, and its `stored` entry. Raises CorruptUnit (naming the damaged
    unit, the bulk's holder included) or StoredError."""
    record = verified_record(run, unit)
    table, digest = read_verified_table(run, unit, record=record)
    stored: Stored = dict(record.get("stored") or {})
    names = stored if full is None else full
    wanted = [c for c in names if c in stored and c in table.column_names and _is_light(unit, stored[c])]
    by_holder: dict[Unit, list[str]] = {}
    for column in wanted:
        by_holder.setdefault(_unit(stored[column]), []).append(column)
    for holder, columns in by_holder.items():
        table = restore(table, _holder_columns(run, holder, columns), columns, unit, holder)
    return Input(unit, table, digest, stored)


def _holder_columns(run: RunDir, holder: Unit, columns: list[str]) -> pa.Table:
    """The id and `columns` of the unit holding their bulk (the whole file is verified, then only
    those columns are decoded)."""
    data = read_verified(run, holder)
    return pq.read_table(pa.BufferReader(data), columns=["id", *columns])


def restore(table: pa.Table, bulk: pa.Table, columns: list[str], unit: Unit, holder: Unit) -> pa.Table:
    """`table` with `columns` replaced by `bulk`'s values of the same ids (vectorised: one index_in,
    one take per column)."""
    index = pc.index_in(table.column("id"), value_set=bulk.column("id").combine_chunks())
    if index.null_count:
        missing = table.column("id").filter(pc.is_null(index)).to_pylist()[:3]
        raise StoredError(f"{unit.key()}: {index.null_count} row(s) have no row in {holder.key()}, which holds "
                          f"their {', '.join(columns)} (first ids {missing}); a stage must keep its rows' ids")
    for column in columns:
        values = bulk.column(column).take(index)
        table = table.set_column(table.schema.get_field_index(column), table.schema.field(column), values)
    return table


def commit_form(table: pa.Table, source: Input | None, stores: Iterable[str], unit: Unit, stage_name: str,
                restored: Iterable[str]) -> tuple[pa.Table, Stored]:
    """The table a unit commits and its `stored` entry.

    The columns this unit's stage stores are kept whole and name this unit. A stored column of the
    unit's one input (`source`) is lightened (the storing stage's `lighten`) and keeps the input's
    reference, when the output's ids are among the input's; otherwise it stays inline if this unit
    read its bulk (`restored`), and the unit fails if it did not. Without a `source` (a source
    stage, or a barrier, which read every stored column whole) the columns stay as they are.
    """
    stored = own_refs(stage_name, unit, [c for c in stores if c in table.column_names])
    if source is None:
        return table, stored
    carried = {c: ref for c, ref in source.stored.items() if c in table.column_names and c not in stored}
    if not carried:
        return table, stored
    ids = table.column("id")
    matched = not len(ids) or bool(pc.all(pc.is_in(ids, value_set=source.table.column("id").combine_chunks())).as_py())
    restored = set(restored)
    for column, ref in carried.items():
        if matched:
            lighten = STAGES.lookup(ref["stage"], "stage").lighten
            table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                                     lighten(column, table.column(column)))
            stored[column] = dict(ref)
        elif column in restored or not _is_light(source.unit, ref):
            stored[column] = own_refs(stage_name, unit, [column])[column]
        else:
            raise StoredError(f"{unit.key()}: its rows are not its input's rows by id, so their {column} (stored by "
                              f"{_unit(ref).key()}) cannot be referenced; list {column!r} in the stage's full_columns")
    return table, stored
