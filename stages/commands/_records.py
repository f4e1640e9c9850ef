"""Find the records behind a path the user gives `stgr inspect/show/export`.

Users point these commands at whatever they have at hand: a run directory, its `dataset/`, one split
folder of it, one stage's output folder (`stages/<node>/<fingerprint>/`) or a single Parquet file.
This module resolves each to the Parquet files of records, the ledger files that go with them and
the manifest where there is one, on any pyarrow filesystem, so each command is a few lines.
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.errors import InputError
from stages.lib.dataset import read_ledger
from stages.lib.schema import RECORD_SCHEMA, SETS, conform


@dataclass
class Located:
    """What a path holds: `kind` is dataset, split, stage or file."""

    kind: str
    uri: str
    fs: pafs.FileSystem
    path: str
    files: list[str]
    manifest: dict[str, Any] | None = None
    run_path: str | None = None
    ledger_units: dict[str, str] = field(default_factory=dict)  # node -> fingerprint whose ledger counts
    label: str = ""

    def ledger(self) -> pa.Table:
        """Ledger rows of the units this path covers (empty when it is not inside a run directory)."""
        if self.run_path is None or not self.ledger_units:
            from pipeline.stage import LEDGER_SCHEMA

            return LEDGER_SCHEMA.empty_table()
        return read_ledger(self.fs, self.run_path, self.ledger_units)

    def dataset(self) -> pads.Dataset:
        try:
            return pads.dataset(self.files, filesystem=self.fs, format="parquet")
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{self.uri}: cannot read its Parquet files ({exc}); "
                             "`stgr inspect --verify` checks a dataset's shards against its manifest") from None

    def read(self, columns: Iterable[str] | None = None, where: pc.Expression | None = None) -> pa.Table:
        """Records (only `columns` where given), optionally filtered, in the record schema's types."""
        if not self.files:
            table = RECORD_SCHEMA.empty_table()
            return table.select(list(columns)) if columns is not None else table
        table = self.dataset().to_table(columns=list(columns) if columns is not None else None, filter=where)
        return table if columns is not None else conform(table)

    def iter_records(self, where: pc.Expression | None = None, batch_size: int = 64) -> Iterator[dict[str, Any]]:
        """Whole records one at a time, without holding the whole dataset in memory."""
        if not self.files:
            return
        for batch in self.dataset().to_batches(filter=where, batch_size=batch_size):
            yield from conform(pa.Table.from_batches([batch])).to_pylist()

    def record(self, record_id: str) -> dict[str, Any]:
        """One whole record by id; InputError naming the path when it is not there."""
        table = self.read(where=pc.field("id") == record_id)
        if table.num_rows == 0:
            raise InputError(f"{self.uri}: no record with id {record_id!r} (stgr inspect {self.uri} lists what is there)")
        return table.slice(0, 1).to_pylist()[0]


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as stream:
        try:
            return json.loads(stream.read())
        except ValueError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    return sorted(info.path for info in fs.get_file_info(pafs.FileSelector(directory))
                  if info.type == pafs.FileType.File and info.path.endswith(".parquet"))


def _run_of(fs: pafs.FileSystem, path: str, levels: int) -> str | None:
    run = path
    for _ in range(levels):
        run = posixpath.dirname(run)
    return run if _kind(fs, posixpath.join(run, "plan.json")) == pafs.FileType.File else None


def _dataset(uri: str, fs: pafs.FileSystem, path: str, splits: Iterable[str] | None = None) -> Located:
    manifest = _read_json(fs, posixpath.join(path, "manifest.json"))
    wanted = set(splits) if splits is not None else set(manifest.get("splits", {}))
    files = [posixpath.join(path, shard["path"]) for name, info in manifest.get("splits", {}).items()
             if name in wanted for shard in info.get("shards", [])]
    run = _run_of(fs, path, 1)
    fingerprints = dict(manifest.get("stage_fingerprints") or {})
    label = f"dataset {manifest.get('build_id')} (schema {manifest.get('schema_version')})"
    return Located("dataset", uri, fs, path, files, manifest, run, fingerprints, label)


def locate(uri: str) -> Located:
    """Resolve a user's path (local or any pyarrow filesystem URI) to the records it holds."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    path = path.rstrip("/") or "/"
    kind = _kind(fs, path)
    if kind == pafs.FileType.NotFound:
        raise InputError(f"{uri}: no such file or directory")
    if kind == pafs.FileType.File:
        if not path.endswith(".parquet"):
            raise InputError(f"{uri}: not a Parquet file, dataset, split folder, stage output or run directory")
        return Located("file", uri, fs, path, [path], label="Parquet file")
    if _kind(fs, posixpath.join(path, "manifest.json")) == pafs.FileType.File:
        return _dataset(uri, fs, path)
    parent = posixpath.dirname(path)
    if posixpath.basename(path) in SETS and _kind(fs, posixpath.join(parent, "manifest.json")) == pafs.FileType.File:
        located = _dataset(uri, fs, parent, [posixpath.basename(path)])
        located.kind, located.label = "split", f"{posixpath.basename(path)} of {located.label}"
        return located
    if _kind(fs, posixpath.join(path, "plan.json")) == pafs.FileType.File:
        return _run(uri, fs, path)
    files = _parquet_files(fs, path)
    if files:
        run = _run_of(fs, path, 3)
        node, fingerprint = posixpath.basename(parent), posixpath.basename(path)
        units = {node: fingerprint} if run is not None else {}
        return Located("stage", uri, fs, path, files, None, run, units, f"output of stage {node} ({fingerprint})")
    raise InputError(f"{uri}: holds no manifest.json, plan.json or Parquet files; give a run directory, its "
                     "dataset/, a split folder, a stage output folder or a Parquet file")


def _run(uri: str, fs: pafs.FileSystem, path: str) -> Located:
    """A run directory: its dataset if publish has written one, else the output of its last stage."""
    plan = _read_json(fs, posixpath.join(path, "plan.json"))
    nodes: dict[str, Any] = plan.get("nodes", {})
    fingerprints = {name: node["fingerprint"] for name, node in nodes.items()}
    for name, node in nodes.items():
        if node.get("stage") == "publish":
            candidate = posixpath.join(path, "dataset")
            if _kind(fs, posixpath.join(candidate, "manifest.json")) == pafs.FileType.File:
                located = _dataset(uri, fs, candidate)
                located.ledger_units = dict(fingerprints)  # publish ledgers repeats across partitions
                return located
    downstream = {u for node in nodes.values() for u in node.get("after", [])}
    sinks = [name for name in nodes if name not in downstream]
    if len(sinks) != 1:
        raise InputError(f"{uri}: the run has no dataset yet and {len(sinks)} final stages ({sinks}); "
                         "give one stage's output folder (stages/<node>/<fingerprint>/)")
    node = sinks[0]
    directory = posixpath.join(path, "stages", node, fingerprints[node])
    files = _parquet_files(fs, directory) if _kind(fs, directory) == pafs.FileType.Directory else []
    return Located("stage", uri, fs, directory, files, None, path, fingerprints,
                   f"run {plan.get('build_id')} (no dataset yet): committed output of its last stage, {node}")
