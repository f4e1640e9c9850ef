"""The published dataset's layout and what a run directory says about it, for every reader.

`shard` writes the dataset (`<run>/dataset/<set>/`, `manifest.json`, the card); `stgr
inspect`, `show`, `view` and `export` read it back, with the ledger rows of the units that built it.
The sets' folders (`stages.lib.schema.SETS`: one name for the folder, the `datasets` config and the
`split` value), how rows and rejections are counted, and which files of a dataset folder a manifest
does not list are defined here once, so the writer and the readers cannot drift.
"""
from __future__ import annotations

import posixpath
from collections import Counter
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.rundir import RunDir, Unit, is_committed, ledger_dir, read_verified_table
from pipeline.stage import LEDGER_SCHEMA


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


def _seed_sources(fs: pafs.FileSystem, run_path: str, plan_nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Record id -> source of every record the plan's source nodes (nodes with no upstream) committed."""
    run = RunDir(run_path, fs, run_path)
    origin: dict[str, str] = {}
    for node, info in sorted(plan_nodes.items()):
        if info.get("after"):
            continue
        for partition in range(int(info.get("partitions", 0))):
            unit = Unit(node, info["fingerprint"], partition)
            if is_committed(run, unit):
                table = pq.read_table(run.join(unit.data), columns=["id", "source"], filesystem=fs)
                origin.update(zip(table.column("id").to_pylist(), table.column("source").to_pylist()))
    return origin


def source_yield(fs: pafs.FileSystem, run_path: str, plan_nodes: Mapping[str, Mapping[str, Any]],
                 table: pa.Table, ledger: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Per source: the records it produced, how many `table` (the dataset) kept and how many distinct
    records were rejected; per (source, stage, rule): the records that rule rejected.

    A ledger row names a record id, not its source: the source is looked up in the source nodes'
    committed outputs (`plan_nodes`: plan.json's nodes), then in `table`. A rejection whose record
    neither holds (an entry too broken to become a record) counts under source `unknown`. A source no
    source output names (a shard run on its own, `unknown`) has its kept plus its rejected records.
    """
    seeds = _seed_sources(fs, run_path, plan_nodes)
    origin = {**seeds, **dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist()))}
    rejected: dict[str, set[str]] = {}
    by_rule: dict[tuple[str, str, str], set[str]] = {}
    columns = (ledger.column(c).to_pylist() for c in ("id", "stage", "rule"))
    for row, (rid, stage, rule) in enumerate(zip(*columns)):
        source = origin.get(rid) or "unknown"
        key = rid if rid is not None else f"ledger row {row}"  # an id-less row is a record of its own
        rejected.setdefault(source, set()).add(key)
        by_rule.setdefault((source, stage, rule), set()).add(key)
    kept = Counter(s or "unknown" for s in table.column("source").to_pylist())
    produced = Counter(s or "unknown" for s in seeds.values())
    sources = [{"source": s, "records": produced[s] if s in produced else kept[s] + len(rejected.get(s, ())),
                "kept": kept[s], "rejected": len(rejected.get(s, ()))}
               for s in sorted(set(produced) | set(kept) | set(rejected))]
    rules = [{"source": s, "stage": stage, "rule": rule, "records": len(ids)}
             for (s, stage, rule), ids in sorted(by_rule.items())]
    return {"sources": sources, "rules": rules}
