"""The run directory and its write-once commit protocol.

    <run>/config.yaml
    <run>/plan.json                                   # node -> stage, fingerprint, partitions
    <run>/stages/<node>/<fingerprint>/part-00007.parquet
    <run>/stages/<node>/<fingerprint>/part-00007.json   # commit record, written last
    <run>/stages/<node>/<fingerprint>/part-00007.error.json  # last failure of an uncommitted unit
    <run>/ledger/<node>/<fingerprint>/part-00007.parquet

A unit is done if and only if its commit record exists. Data is written under a temporary name and
renamed into place before the record, so a kill at any instant leaves either a committed unit or
debris that the next attempt overwrites. A unit's output is a pure function of its inputs and
fingerprint, so a straggler from a killed build that commits after `resume` started writes the same
bytes to the same names: a no-op, never a second copy.

The run directory may be any pyarrow filesystem URI (local path, file://, s3://, gs://, hdfs://).
"""
from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.stage import LEDGER_SCHEMA


def part_name(partition: int) -> str:
    return f"part-{partition:05d}"


@dataclass(frozen=True)
class RunDir:
    """A run directory on some pyarrow filesystem."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def open(cls, uri: str) -> "RunDir":
        if "://" not in uri:
            import os

            uri = os.path.abspath(uri)
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(uri=uri, fs=fs, path=path.rstrip("/"))

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.join(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.join(rel), recursive=True)

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return f.read().decode()

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write to a unique temporary name beside the target, then rename onto it."""
        target = self.join(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_atomic(rel, text.encode())

    def list_dir(self, rel: str) -> list[str]:
        selector = pafs.FileSelector(self.join(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.join(rel))
        except FileNotFoundError:
            pass


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass(frozen=True)
class Unit:
    """One (node, partition) unit of work and where its files live."""

    node: str
    fingerprint: str
    partition: int

    @property
    def stage_dir(self) -> str:
        return f"stages/{self.node}/{self.fingerprint}"

    @property
    def data(self) -> str:
        return f"{self.stage_dir}/{part_name(self.partition)}.parquet"

    @property
    def record(self) -> str:
        return f"{self.stage_dir}/{part_name(self.partition)}.json"

    @property
    def error(self) -> str:
        return f"{self.stage_dir}/{part_name(self.partition)}.error.json"

    @property
    def ledger(self) -> str:
        return f"ledger/{self.node}/{self.fingerprint}/{part_name(self.partition)}.parquet"

    def key(self) -> str:
        return f"{self.node}/{part_name(self.partition)}"


def is_committed(run: RunDir, unit: Unit) -> bool:
    return run.exists(unit.record)


def read_commit(run: RunDir, unit: Unit) -> dict[str, Any] | None:
    try:
        return json.loads(run.read_text(unit.record))
    except FileNotFoundError:
        return None


def read_output(run: RunDir, unit: Unit) -> pa.Table:
    with run.fs.open_input_file(run.join(unit.data)) as f:
        return pq.read_table(f)


def commit(run: RunDir, unit: Unit, table: pa.Table, ledger_rows: list[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Write data, ledger, then the commit record. Returns False when the unit was already committed.

    The early return makes a straggler's late commit a no-op; a crash between the renames leaves
    files without a record, which the next attempt overwrites with identical content.
    """
    if is_committed(run, unit):
        return False
    run.write_atomic(unit.data, table_bytes(table))
    ledger = pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA)
    run.write_atomic(unit.ledger, table_bytes(ledger))
    record = {**record, "committed_at": time.time(), "data": unit.data, "ledger": unit.ledger}
    run.write_atomic(unit.record, json.dumps(record, indent=2, sort_keys=True).encode())
    run.delete(unit.error)
    return True


def record_failure(run: RunDir, unit: Unit, attempt: int, error: str, final: bool) -> None:
    """Keep the last error of an uncommitted unit, so `stgr status` can name it."""
    payload = {"node": unit.node, "partition": unit.partition, "attempt": attempt, "error": error,
               "final": final, "at": time.time()}
    run.write_text(unit.error, json.dumps(payload, indent=2))
