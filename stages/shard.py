"""`shard`: the last stage. Split the filtered records into `stgr-cot` (SFT) and `stgr-rl` (RL),
write Parquet shards, a `manifest.json` and a dataset card under `<run>/dataset/`.

Why the card matters as much as the shards: it makes the folder a Hugging Face dataset (each set a
config with a `train` split, frames decoded as images, a cache entry per build; `stages.lib.card`),
and it says what a user must know before training: licence, columns, an example, counts, yield.

Why a barrier: shard sizes, shard counts (`-of-000NN`) and the manifest's totals need every record,
so this stage runs once on all upstream partitions. Why a stable hash of the id for the split: the
same record lands in the same split on every rebuild and every machine, so an RL set never leaks into
the SFT set when a build is extended. Why no folder rename: an object store has none, so shards are
written under final names ending in a digest of their bytes and `manifest.json`, written last, is the
commit point (see `ShardStage.write_dataset`); a killed build leaves the previous dataset or the new one.
Why `publish`: when the unit is reused but the dataset folder holds another config's dataset (the run
was built with another config in between) or lost files, the driver writes it again from the unit's
committed output, so the dataset always belongs to the run's plan. Why a report: an empty dataset is a failed build (exit 3) unless `allow_empty`, and every build ends
with the dataset's path, rows per split and task and the ledger's top rules, taken from the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipeline.registry import register_stage
from pipeline.rundir import RunDir
from pipeline.settings import setting
from pipeline.stage import LEDGER_SCHEMA, Rejection, Stage, StageConfig, StageReport, StageResult, UnitContext
from stages.lib.card import dataset_card, parquet_metadata
from stages.lib.dataset import count_rows, ledger_counts, listing, read_ledger, source_yield, unlisted_files
from stages.lib.schema import PROVENANCE, RECORD_SCHEMA, SCHEMA_VERSION, SETS, conform


def split_of(ids: pa.Array | list[str], rl_fraction: float, salt: str = "") -> np.ndarray:
    """The set per id, `"stgr-rl"` for an `rl_fraction` of them, else `"stgr-cot"`, from a 64-bit
    BLAKE2 hash of salt + id.

    The hash depends on nothing but the id and the salt, so the assignment of a record never changes
    when other records are added or removed, or when partitioning changes.
    """
    values = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else list(ids)
    prefix = salt.encode()
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + v.encode(), digest_size=8).digest(), "big") for v in values),
        dtype=np.uint64, count=len(values),
    )
    threshold = np.uint64(min(int(rl_fraction * 2.0**64), 2**64 - 1)) if rl_fraction < 1.0 else None
    is_rl = np.ones(len(values), dtype=bool) if threshold is None else draws < threshold
    return np.where(is_rl, "stgr-rl", "stgr-cot")


def _with_provenance(table: pa.Table, ctx: UnitContext) -> pa.Table:
    """Fill `provenance.build_id` where empty and `provenance.stage_fingerprints` from the engine."""
    n = table.num_rows
    prov = table.column("provenance").combine_chunks()
    fields = {f.name: (prov.field(f.name) if n else pa.array([], f.type)) for f in PROVENANCE}
    build_ids = pc.fill_null(fields["build_id"], ctx.build_id) if n else fields["build_id"]
    fingerprints = dict(getattr(ctx, "fingerprints", {}) or {})
    fp_type = PROVENANCE.field("stage_fingerprints").type
    if fingerprints:
        fp = pa.array([sorted(fingerprints.items())] * n, type=fp_type)
    else:
        fp = fields["stage_fingerprints"]
    arrays = [fields[f.name] for f in PROVENANCE]
    names = [f.name for f in PROVENANCE]
    arrays[names.index("build_id")] = build_ids
    arrays[names.index("stage_fingerprints")] = fp
    struct = pa.StructArray.from_arrays(arrays, fields=list(PROVENANCE))
    return table.set_column(table.schema.get_field_index("provenance"), "provenance", struct)


def top_rules(ledger: list[dict[str, Any]], n: int) -> str:
    """`filter/claim_iou 26, align/exception 2, ...`: the n (stage, rule) pairs with the most ledger rows."""
    ranked = sorted(ledger, key=lambda r: (-r["rows"], r["stage"], r["rule"]))[:n]
    return ", ".join(f"{r['stage']}/{r['rule']} {r['rows']}" for r in ranked) or "none"


def build_report(manifest: Mapping[str, Any], location: str, allow_empty: bool, node: str) -> StageReport:
    """The build's closing lines from the manifest, and a failure when the dataset has no row.

    An empty dataset is almost always a mistake (a filter threshold, a source whose records all fail):
    exiting 0 would let it pass unnoticed, so it fails with the rules that rejected the records.
    """
    rejected = sum(r["rows"] for r in manifest["ledger"])
    summary = [f"dataset {location}: {manifest['rows']} rows"]
    if manifest.get("partial"):
        missing = manifest["partial"]["missing_units"]
        summary[0] += (f" (PARTIAL: built without {len(missing)} unit(s) that did not commit, "
                       f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; `stgr resume` completes it)")
    for name in SETS:
        tasks = ", ".join(f"{c['task']} {c['rows']}" for c in manifest["counts"]["task"] if c["split"] == name)
        summary.append(f"  {name}: {manifest['splits'][name]['rows']} rows" + (f" ({tasks})" if tasks else ""))
    summary.append(f"  ledger: {rejected} rows; top rules: {top_rules(manifest['ledger'], 5)}")
    failure = None
    if manifest["rows"] == 0 and not allow_empty:
        failure = (f"stgr: dataset {location} is empty (0 rows); top ledger rules: {top_rules(manifest['ledger'], 3)}"
                   f" (`{node}.allow_empty=true` accepts an empty dataset)")
    return StageReport(summary=summary, failure=failure)


def _encode_parquet(table: pa.Table, compression: str) -> bytes:
    """A shard's bytes, with the Hugging Face features in its schema metadata (see `parquet_metadata`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(parquet_metadata()), sink, compression=compression)
    return sink.getvalue().to_pybytes()


def _read_run_config(fs: pafs.FileSystem, run_path: str) -> dict[str, Any] | None:
    path = posixpath.join(run_path, "config.yaml")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return yaml.safe_load(io.BytesIO(stream.read()))


def _existing_manifest(fs: pafs.FileSystem, directory: str) -> dict[str, Any] | None:
    path = posixpath.join(directory, "manifest.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        try:
            return json.loads(stream.read())
        except ValueError:
            return None


@register_stage
class ShardStage(Stage):
    """Split by a stable hash, write Parquet shards + manifest + card; output: the records with `split`."""

    name = "shard"
    version = "2"
    needs_all_input = True

    @dataclass(kw_only=True)
    class Config(StageConfig):
        rl_fraction: float = setting(0.5, "share of records that go to stgr-rl (RL), the rest to stgr-cot (SFT), "
                                          "drawn from a stable hash of (salt, id): a record stays in its split "
                                          "across rebuilds", ge=0, le=1)
        salt: str = setting("", "change it to draw a different (still stable) split")
        target_shard_mb: float = setting(256, "target size of one Parquet shard, in MiB of in-memory Arrow data "
                                              "(files are smaller: zstd)", gt=0)
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

    cfg: Config

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table if table is not None else RECORD_SCHEMA.empty_table())
        table, rejections = drop_duplicate_ids(table)
        table = table.sort_by("id")
        ids = table.column("id")
        splits = split_of(ids.combine_chunks(), float(self.cfg.rl_fraction), self.cfg.salt)
        table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
        table = _with_provenance(table, ctx)
        own = pa.Table.from_pylist([r.as_row(ctx.stage, ctx.attempt) for r in rejections], schema=LEDGER_SCHEMA)
        manifest = self.write_dataset(table, ctx, own)
        report = build_report(manifest, posixpath.join(ctx.run_uri, self.cfg.output), self.cfg.allow_empty, ctx.stage)
        return StageResult(table, rejections, report=report)

    def published(self, ctx: UnitContext) -> bool:
        """The dataset folder holds this unit's dataset, complete (see `dataset_problems`)."""
        final = posixpath.join(ctx.run_path, self.cfg.output)
        manifest = _existing_manifest(ctx.filesystem, final)
        return manifest is not None and not dataset_problems(ctx.filesystem, final, manifest, ctx.fingerprint)

    def publish(self, table: pa.Table, ctx: UnitContext) -> None:
        """Write the dataset again from this unit's committed output (the records with their split)."""
        run = RunDir(ctx.run_uri, ctx.filesystem, ctx.run_path)
        own = read_ledger(ctx.filesystem, ctx.run_path, {ctx.stage: ctx.fingerprint}, verify_in=run)
        self.write_dataset(table, ctx, own)

    def write_dataset(self, table: pa.Table, ctx: UnitContext, own_ledger: pa.Table) -> dict[str, Any]:
        """Publish `table` (records with `split`) as the dataset; returns its manifest.

        No folder is renamed (an object store cannot): each shard is written under its final name,
        which ends in a digest of its bytes, so an attempt never overwrites a file the current
        manifest lists with other bytes, and two attempts of one unit write the same bytes to the same
        names. Then the card, then `manifest.json`, the commit point (readers follow it), then the
        files no longer listed are deleted. A kill at any instant leaves the previous dataset or this
        one, listed whole by the manifest in place; the debris is deleted by the next publication.
        """
        run = RunDir(ctx.run_uri, ctx.filesystem, ctx.run_path)
        output = self.cfg.output
        existing = _existing_manifest(run.fs, run.join(output))
        if existing is not None and not dataset_problems(run.fs, run.join(output), existing, ctx.fingerprint):
            return existing  # this unit's dataset is already in place: writing again would change nothing
        compression = self.cfg.compression
        target = float(self.cfg.target_shard_mb) * 2**20
        present = listing(run.fs, run.join(output))
        splits_info: dict[str, Any] = {}
        for name in SETS:
            part = table.filter(pc.equal(table.column("split"), name))
            n_shards = max(1, math.ceil(part.nbytes / target))
            bounds = np.linspace(0, part.num_rows, n_shards + 1).round().astype(int)
            shards = []
            for k in range(n_shards):
                data = _encode_parquet(part.slice(bounds[k], bounds[k + 1] - bounds[k]), compression)
                digest = hashlib.sha256(data).hexdigest()
                rel = f"{name}/train-{k:05d}-of-{n_shards:05d}-{digest[:12]}.parquet"
                if present.get(rel) != len(data):  # the same name holds the same bytes: nothing to write
                    run.write_atomic(f"{output}/{rel}", data)
                shards.append({"path": rel, "rows": int(bounds[k + 1] - bounds[k]), "bytes": len(data), "sha256": digest})
            splits_info[name] = {"split": name, "rows": part.num_rows, "arrow_bytes": part.nbytes, "shards": shards}
        fingerprints = dict(getattr(ctx, "fingerprints", {}) or {})
        upstream = {s: f for s, f in fingerprints.items() if s != ctx.stage}
        ledger = pa.concat_tables([read_ledger(run.fs, run.path, upstream, verify_in=run), own_ledger])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "build_id": ctx.build_id,
            "node": ctx.stage,
            "fingerprint": ctx.fingerprint,
            "stage_fingerprints": fingerprints,
            "rows": table.num_rows,
            "splits": splits_info,
            "counts": {"task": count_rows(table, ["split", "task"]), "source": count_rows(table, ["split", "source"])},
            "ledger": ledger_counts(ledger),
            "yield": source_yield(run.fs, run.path, _plan_nodes(run), table, ledger),
            "config": _read_run_config(run.fs, run.path) or {ctx.stage: self.config},
        }
        if ctx.missing_inputs:  # built by the driver from what committed while other units failed
            manifest["partial"] = {"missing_units": list(ctx.missing_inputs)}
        if not _in_plan(run, ctx):
            # a straggler of a build whose config has since changed: its unit may commit, but the
            # dataset is the run's current plan's, so its shards are withdrawn and nothing is listed
            _remove_unlisted(run, output, _existing_manifest(run.fs, run.join(output)))
            return manifest
        card = dataset_card(manifest, _example(table), self.cfg.license or None)
        run.write_atomic(f"{output}/README.md", card.encode())
        run.write_atomic(f"{output}/manifest.json", json.dumps(manifest, indent=2, sort_keys=False, default=str).encode())
        _remove_unlisted(run, output, manifest)
        return manifest


def drop_duplicate_ids(table: pa.Table) -> tuple[pa.Table, list[Rejection]]:
    """Keep the first record of each id (in upstream partition order); a ledger row for each other.

    Two records with one id would be one example twice, and could land in both splits' counts; one
    bad input line must not cost the dataset, so the repeat is ledgered, never raised.
    """
    ids = table.column("id").to_pylist()
    if len(set(ids)) == len(ids):
        return table, []
    counts: dict[str, int] = {}
    for record_id in ids:
        counts[record_id] = counts.get(record_id, 0) + 1
    seen: set[str] = set()
    keep, rejections = [], []
    sources = table.column("source_id").to_pylist()
    for i, record_id in enumerate(ids):
        if record_id not in seen:
            seen.add(record_id)
            keep.append(i)
            continue
        rejections.append(Rejection(id=record_id, rule="duplicate_id", record=sources[i] or record_id,
                                    reason=f"id occurs {counts[record_id]} times upstream; the first is kept"))
    return table.take(pa.array(keep, pa.int64())), rejections


def dataset_problems(fs: pafs.FileSystem, directory: str, manifest: Mapping[str, Any],
                     fingerprint: str | None = None) -> list[str]:
    """Why the dataset folder is not exactly the one `manifest` describes (empty: it is): another
    fingerprint than `fingerprint` wrote it, a listed shard is missing or has another size, or a
    split folder holds a file the manifest does not list (a reader of the folder would read it too).
    Sizes only: `stgr inspect --verify` re-hashes the bytes."""
    problems = []
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        problems.append(f"manifest.json: written by {manifest.get('node', 'shard')} fingerprint "
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


def _plan_nodes(run: RunDir) -> dict[str, Any]:
    """plan.json's nodes (none without a plan: a stage run on its own, as in tests)."""
    try:
        return dict(json.loads(run.read_text("plan.json")).get("nodes") or {})
    except (FileNotFoundError, ValueError):
        return {}


def _in_plan(run: RunDir, ctx: UnitContext) -> bool:
    """Whether the run's plan.json names this unit's fingerprint for its node (true without a plan)."""
    return (_plan_nodes(run).get(ctx.stage) or {}).get("fingerprint", ctx.fingerprint) == ctx.fingerprint


def _example(table: pa.Table) -> dict[str, Any] | None:
    """The card's example: the first record (by id) of the first non-empty set."""
    for name in SETS:
        part = table.filter(pc.equal(table.column("split"), name))
        if part.num_rows:
            return part.slice(0, 1).to_pylist()[0]
    return None


def _remove_unlisted(run: RunDir, output: str, manifest: Mapping[str, Any] | None) -> None:
    """Delete the split folders' files that `manifest` does not list, and the temporary folders that
    earlier versions of this stage published through (`.<output>.tmp-*`, `.<output>.old-*`)."""
    for rel in unlisted_files(listing(run.fs, run.join(output)), manifest):
        run.delete(f"{output}/{rel}")
    for info in run.fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith((f".{output}.tmp-", f".{output}.old-")):
            run.fs.delete_dir(info.path)
