"""The published dataset's layout and what a run directory says about it, for every reader.

`shard` writes the dataset (`<run>/dataset/<split dir>/`, `manifest.json`, the card); `stgr
inspect`, `show`, `view` and `export` read it back, with the ledger rows of the units that built it.
The names of the split folders, how rows and rejections are counted, and which files of a dataset
folder a manifest does not list are defined here once, so the writer and the readers cannot drift.
"""
from __future__ import annotations

import posixpath
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.rundir import RunDir, Unit, is_committed, ledger_dir, read_verified_table
from pipeline.stage import LEDGER_SCHEMA

#: Split value in the `split` column -> dataset sub-directory (the names of the released STGR sets).
SPLIT_DIRS: dict[str, str] = {"sft": "stgr-cot", "rl": "stgr-rl"}


def count_rows(table: pa.Table, keys: list[str]) -> list[dict[str, Any]]:
    """Rows per combination of `keys`, sorted, as plain dicts (for JSON and the card)."""
    if table.num_rows == 0:
        return []
    grouped = table.select(keys).group_by(keys).aggregate([([], "count_all")]).to_pylist()
    rows = [{**{k: r[k] for k in keys}, "rows": r["count_all"]} for r in grouped]
    return sorted(rows, key=lambda r: tuple("" if r[k] is None else str(r[k]) for k in keys))


def read_ledger(fs: pafs.FileSystem, run_path: str, fingerprints: Mapping[str, str],
                verify_in: RunDir | None = None) -> pa.Table:
    """Every ledger row the given (stage, fingerprint) units committed, as one table.

    Only the fingerprints of this build count: a run directory keeps the ledgers of older configs
    too (they are reused when the config goes back), and counting them would double the rejections.
    With `verify_in` (the run directory, for the dataset's counts) a ledger whose unit is committed is
    checked against the sha256 in its commit record (CorruptUnit when it is damaged).
    """
    tables = []
    for stage, fingerprint in sorted(fingerprints.items()):
        directory = posixpath.join(run_path, ledger_dir(stage, fingerprint))
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        files = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(directory))
                       if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
        plain = []
        for path in files:
            unit = Unit(stage, fingerprint, int(posixpath.basename(path)[len("part-"):-len(".parquet")]))
            if verify_in is not None and is_committed(verify_in, unit):
                tables.append(read_verified_table(verify_in, unit, ledger=True)[0].cast(LEDGER_SCHEMA))
            else:
                plain.append(path)
        if plain:
            tables.append(pads.dataset(plain, filesystem=fs, format="parquet", schema=LEDGER_SCHEMA).to_table())
    return pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()


def ledger_counts(ledger: pa.Table) -> list[dict[str, Any]]:
    """Rejections per (stage, rule), with one example reason each, most frequent first."""
    if ledger.num_rows == 0:
        return []
    grouped = ledger.group_by(["stage", "rule"], use_threads=False).aggregate([([], "count_all"), ("reason", "first")]).to_pylist()
    rows = [{"stage": r["stage"], "rule": r["rule"], "rows": r["count_all"], "example": r["reason_first"]}
            for r in grouped]
    return sorted(rows, key=lambda r: (r["stage"], -r["rows"], r["rule"]))


def listing(fs: pafs.FileSystem, directory: str) -> dict[str, int]:
    """Relative path -> size of every file under `directory` (none if it does not exist)."""
    selector = pafs.FileSelector(directory, recursive=True, allow_not_found=True)
    return {info.path[len(directory) + 1:]: info.size for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File}


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def unlisted_files(files: Mapping[str, int], manifest: Mapping[str, Any] | None) -> list[str]:
    """The `files` of a dataset folder (see `listing`) inside its split folders that `manifest` does
    not list; hidden names (temporary files) are not a reader's concern."""
    listed = {s["path"] for info in (manifest or {}).get("splits", {}).values() for s in info.get("shards", [])}
    return sorted(rel for rel in files if "/" in rel and not _hidden(rel) and rel not in listed)
