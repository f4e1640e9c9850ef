"""The published dataset's layout and what a run directory says about it, for every reader.

`shard` writes each upstream partition's records straight into the dataset folder
(`<run>/dataset/<set>/part-PPPPP-KKKKK-<digest>.parquet`, `shard_path`) and commits only a summary of
them (`SUMMARY_SCHEMA`); `publish` reads the summaries, writes the card and `manifest.json` (the commit
point) and deletes what no manifest lists. `stgr inspect`, `show`, `view` and `export` read the dataset
back through the manifest, with the ledger rows of the units that built it. The sets' folders
(`stages.lib.schema.SETS`: one name for the folder, the `datasets` config and the `split` value), the
file names, the settings both stages read (`DatasetConfig`, the `shard` block), how rows and
rejections are counted, and which files of a dataset folder a manifest does not list are defined here
once, so the writers and the readers cannot drift.
"""
from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipeline.rundir import RunDir, Unit, is_committed, ledger_dir, read_verified_table
from pipeline.settings import setting
from pipeline.stage import LEDGER_SCHEMA, StageConfig, UnitContext
from stages.lib.card import parquet_metadata

#: What a `shard` unit commits: one row per record it wrote into the dataset, never the record
#: itself (no frames): its id, set, task and source, the partition, and the file that holds it with
#: that file's rows, bytes, in-memory Arrow bytes and sha256 (repeated on each of its rows). That is
#: all `publish` needs to drop ids repeated across partitions, count rows and list every file in the
#: manifest without opening one.
SUMMARY_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("source_id", pa.string()), pa.field("split", pa.string()),
    pa.field("task", pa.string()), pa.field("source", pa.string()), pa.field("partition", pa.int64()),
    pa.field("file", pa.string()), pa.field("file_rows", pa.int64()), pa.field("file_bytes", pa.int64()),
    pa.field("file_arrow_bytes", pa.int64()), pa.field("file_sha256", pa.string()),
])

#: Characters of the sha256 a dataset file's name ends in.
DIGEST_CHARS = 12


@dataclass(kw_only=True)
class DatasetConfig(StageConfig):
    """The `shard` config block, read by both dataset nodes (`shard` writes the files, `publish`
    the manifest and card), so a user sets each once."""

    rl_fraction: float = setting(0.5, "share of records that go to stgr-rl (RL), the rest to stgr-cot (SFT), "
                                      "drawn from a stable hash of (salt, id): a record stays in its split "
                                      "across rebuilds", ge=0, le=1)
    salt: str = setting("", "change it to draw a different (still stable) split")
    target_shard_mb: float = setting(256, "most in-memory Arrow data (MiB) of one Parquet file: a partition "
                                          "holding more is written as several files (files are smaller: zstd)",
                                     gt=0)
    compression: str = setting("zstd", "Parquet compression codec")
    output: str = setting("dataset", "folder under the run directory that receives stgr-cot/, stgr-rl/, "
                                     "manifest.json and README.md")
    allow_empty: bool = setting(False, "an empty dataset (every record rejected) fails the build with exit 3 and "
                                       "the ledger's top rules; true accepts it (a probe of a filter threshold)")
    license: str | None = setting(None, "the dataset card's licence (a Hugging Face licence id such as "
                                        "cc-by-4.0, or other); null: the sources' own, each listed in the card")

    def check(self) -> list[str]:
        if not self.output or "/" in self.output or self.output.startswith("."):
            return [f"output: must be a plain folder name under the run directory, got {self.output!r}"]
        return []


def shard_path(name: str, partition: int, index: int, digest: str) -> str:
    """A dataset file's path under the dataset folder: set, upstream partition, file of that partition,
    and its digest. The digest makes the name content-addressed: two attempts write the same bytes
    under the same name, and no attempt overwrites a file a manifest lists with other bytes."""
    return f"{name}/part-{partition:05d}-{index:05d}-{digest[:DIGEST_CHARS]}.parquet"


def rewritten_path(path: str, digest: str) -> str:
    """The name of a file `path` rewritten with other bytes (`publish` dropping repeated ids)."""
    return f"{path[:-len('-.parquet') - DIGEST_CHARS]}-{digest[:DIGEST_CHARS]}.parquet"


def encode_parquet(table: pa.Table, compression: str) -> bytes:
    """A dataset file's bytes, with the Hugging Face features in its schema metadata (see `parquet_metadata`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(parquet_metadata()), sink, compression=compression)
    return sink.getvalue().to_pybytes()


def write_once(run: RunDir, rel: str, data: bytes) -> None:
    """Write a content-addressed file unless it is there already with this size (same name, same bytes)."""
    if run.fs.get_file_info(run.join(rel)).size != len(data):
        run.write_atomic(rel, data)


def read_run_config(fs: pafs.FileSystem, run_path: str) -> dict[str, Any] | None:
    """The run directory's config.yaml (the resolved config of the build), None without one."""
    path = posixpath.join(run_path, "config.yaml")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return yaml.safe_load(io.BytesIO(stream.read()))


def existing_manifest(fs: pafs.FileSystem, directory: str) -> dict[str, Any] | None:
    """The dataset folder's manifest.json, None when it has none (or an unreadable one)."""
    path = posixpath.join(directory, "manifest.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        try:
            manifest = json.loads(stream.read())
        except ValueError:
            return None
    return manifest if isinstance(manifest, dict) else None


def plan_nodes(run: RunDir) -> dict[str, Any]:
    """plan.json's nodes (none without a plan: a stage run on its own, as in tests)."""
    try:
        return dict(json.loads(run.read_text("plan.json")).get("nodes") or {})
    except (FileNotFoundError, ValueError):
        return {}


def in_plan(run: RunDir, ctx: UnitContext) -> bool:
    """Whether the run's plan.json names this unit's fingerprint for its node (true without a plan).
    A straggler of a build whose config has since changed may commit its unit, but must not touch
    the dataset folder, which is the current plan's."""
    return (plan_nodes(run).get(ctx.stage) or {}).get("fingerprint", ctx.fingerprint) == ctx.fingerprint


def remove_unlisted(run: RunDir, output: str, manifest: Mapping[str, Any] | None) -> None:
    """Delete the split folders' files that `manifest` does not list, and the temporary folders that
    earlier versions of the shard stage published through (`.<output>.tmp-*`, `.<output>.old-*`)."""
    for rel in unlisted_files(listing(run.fs, run.join(output)), manifest):
        run.delete(f"{output}/{rel}")
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith((f".{output}.tmp-", f".{output}.old-")):
            run.fs.delete_dir(info.path)


def dataset_problems(fs: pafs.FileSystem, directory: str, manifest: Mapping[str, Any],
                     fingerprint: str | None = None) -> list[str]:
    """Why the dataset folder is not exactly the one `manifest` describes (empty: it is): another
    fingerprint than `fingerprint` (the plan's `publish` node) wrote it, it is partial, a listed file
    is missing or has another size, or a split folder holds a file the manifest does not list (a
    reader of the folder would read it too). Sizes only: `stgr inspect --verify` re-hashes the bytes."""
    problems = []
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        problems.append(f"manifest.json: written by {manifest.get('node', 'publish')} fingerprint "
                        f"{manifest.get('fingerprint')}, but the run's plan has {fingerprint}")
    if manifest.get("partial"):
        problems.append(f"manifest.json: a partial dataset, built without the units that did not commit "
                        f"({', '.join(manifest['partial']['missing_units'])})")
    files = listing(fs, directory)
    for info in manifest.get("splits", {}).values():
        for shard in info.get("shards", []):
            size = files.get(shard["path"])
            if size is None:
                problems.append(f"{shard['path']}: listed in manifest.json but missing")
            elif size != shard["bytes"]:
                problems.append(f"{shard['path']}: {size} bytes, manifest says {shard['bytes']}")
    problems += [f"{rel}: not listed in manifest.json" for rel in unlisted_files(files, manifest)]
    return problems



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
    records were rejected and not kept; per (source, stage, rule): the records that rule rejected.

    A record rejected and then kept (a cascade's tier 1 rejected it, a later tier's answer passed)
    counts as kept once, so kept + rejected is the number of records; its tier-1 rejection still
    counts under that rule.

    A ledger row names a record id, not its source: the source is looked up in the source nodes'
    committed outputs (`plan_nodes`: plan.json's nodes), then in `table`. A rejection whose record
    neither holds (an entry too broken to become a record) counts under source `unknown`. A source no
    source output names (a shard run on its own, `unknown`) has its kept plus its rejected records.
    """
    seeds = _seed_sources(fs, run_path, plan_nodes)
    origin = {**seeds, **dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist()))}
    kept_ids = set(table.column("id").to_pylist())
    rejected: dict[str, set[str]] = {}
    by_rule: dict[tuple[str, str, str], set[str]] = {}
    columns = (ledger.column(c).to_pylist() for c in ("id", "stage", "rule"))
    for row, (rid, stage, rule) in enumerate(zip(*columns)):
        source = origin.get(rid) or "unknown"
        key = rid if rid is not None else f"ledger row {row}"  # an id-less row is a record of its own
        if rid not in kept_ids:
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
