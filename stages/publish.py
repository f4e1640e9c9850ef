"""`publish`: the last stage, a small barrier after `shard`. From the shard units' summaries (never
their records) it drops ids repeated across partitions, writes the dataset card (`README.md`) and
`manifest.json` under `<run>/dataset/`, and deletes the files no manifest lists.

Why the card matters as much as the files: it makes the folder a Hugging Face dataset (each set a
config with a `train` split, frames decoded as images, a cache entry per build; `stages.lib.card`),
and it says what a user must know before training: licence, columns, an example, counts, yield.

Why bounded memory: the shard units wrote every record already (stages/shard.py); this unit holds
one summary row per record (id, set, task, source, file) and at most one dataset file at a time: the
card's example, read from one file, and each file rewritten below.

Ids repeated across partitions: the first partition's record wins (as a single barrier keeping the
first of an id in upstream order would), each other one is a ledger row (`duplicate_id`), and each
file holding one is rewritten without it, one file at a time, under a new content-addressed name;
the manifest lists the rewritten file and maps the original to it (`replaced`), and the original is
deleted once the manifest is in place. Why `manifest.json` last, and no folder rename: an object store
has none, so every file is written under a final name ending in its digest and the manifest, written
last, is the commit point; a kill at any instant leaves the previous dataset or this one, listed whole
by the manifest in place, and the debris is deleted by the next publication.

A file a summary names that is missing (lost, deleted by a publication of another config, or a
rewritten file's original deleted before the unit committed) is not rebuilt here, which would need its
records: the shard units whose files are missing are invalidated, and the build's next pass
recomputes them from their committed inputs (the engine's own repair path, pipeline/build.py), then
publishes. Why `publish`: when the unit is reused but the dataset folder holds another config's
dataset or lost files, the driver publishes again from the summaries, so the dataset always belongs
to the run's plan. Why a report: an empty dataset is a failed build (exit 3) unless
`shard.allow_empty`, and every build ends with the dataset's path, rows per split and task and the
ledger's top rules, taken from the manifest.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.registry import register_stage
from pipeline.rundir import CorruptUnit, RunDir, Unit, invalidate, is_committed, read_verified_table
from pipeline.stage import LEDGER_SCHEMA, Rejection, Stage, StageReport, StageResult, UnitContext
from stages.lib.card import dataset_card
from stages.lib.cost import cost_summary
from stages.lib.dataset import (DIGEST_CHARS, SUMMARY_SCHEMA, DatasetConfig, count_rows, dataset_problems, encode_parquet,
                                existing_manifest, in_plan, ledger_counts, listing, plan_nodes, read_ledger,
                                read_run_config, remove_unlisted, rewritten_path, source_yield, write_once)
from stages.lib.schema import RECORD_SCHEMA, SCHEMA_VERSION, SETS

#: The columns of the unit's committed output: the dataset's rows, as their summary.
KEPT_COLUMNS = ("id", "split", "task", "source", "partition", "file")


def top_rules(ledger: list[dict[str, Any]], n: int) -> str:
    """`filter/claim_iou 26, align/exception 2, ...`: the n (stage, rule) pairs with the most ledger rows."""
    ranked = sorted(ledger, key=lambda r: (-r["rows"], r["stage"], r["rule"]))[:n]
    return ", ".join(f"{r['stage']}/{r['rule']} {r['rows']}" for r in ranked) or "none"


def build_report(manifest: Mapping[str, Any], location: str, allow_empty: bool, config_key: str) -> StageReport:
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
                   f" (`{config_key}.allow_empty=true` accepts an empty dataset)")
    return StageReport(summary=summary, failure=failure)


def drop_repeats(summary: pa.Table) -> tuple[pa.Table, pa.Table, list[Rejection]]:
    """(kept rows, dropped rows, their ledger rows) of `summary` (sorted by partition): the first
    partition's row of each id is kept. Vectorised (one group-by), so 10^6 rows cost seconds."""
    n = summary.num_rows
    rows = pa.table({"id": summary.column("id"), "row": pa.array(np.arange(n, dtype=np.int64))})
    firsts = rows.group_by("id", use_threads=False).aggregate([("row", "min"), ("row", "count")])
    keep = np.zeros(n, dtype=bool)
    keep[firsts.column("row_min").to_numpy()] = True
    if keep.all():
        return summary, summary.slice(0, 0), []
    mask = pa.array(keep)
    dropped = summary.filter(pc.invert(mask))
    repeated = firsts.filter(pc.greater(firsts.column("row_count"), 1))
    counts = dict(zip(repeated.column("id").to_pylist(), repeated.column("row_count").to_pylist()))
    rejections = [Rejection(id=i, rule="duplicate_id", record=s or i,
                            reason=f"id occurs in {counts[i]} partitions upstream; the first partition's record is kept")
                  for i, s in zip(dropped.column("id").to_pylist(), dropped.column("source_id").to_pylist())]
    return summary.filter(mask), dropped, rejections


@dataclass(frozen=True)
class _File:
    """One dataset file a shard unit wrote, as its summary rows describe it."""

    path: str
    split: str
    partition: int
    rows: int
    bytes: int
    arrow_bytes: int
    sha256: str

    def entry(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def _files(summary: pa.Table) -> list[_File]:
    """The distinct files of `summary`, by partition then path."""
    if not summary.num_rows:
        return []
    keys = ["file", "split", "partition", "file_rows", "file_bytes", "file_arrow_bytes", "file_sha256"]
    distinct = summary.select(keys).group_by(keys, use_threads=False).aggregate([]).to_pylist()
    files = [_File(r["file"], r["split"], r["partition"], r["file_rows"], r["file_bytes"], r["file_arrow_bytes"],
                   r["file_sha256"]) for r in distinct]
    return sorted(files, key=lambda f: (f.partition, f.path))


@register_stage
class PublishStage(Stage):
    """Publish the dataset from the shard units' summaries: manifest + card; output: the kept rows' summary."""

    name = "publish"
    version = "1"
    needs_all_input = True
    Config = DatasetConfig
    cfg: DatasetConfig

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        summary = SUMMARY_SCHEMA.empty_table() if table is None else table.select(SUMMARY_SCHEMA.names).cast(SUMMARY_SCHEMA)
        order = np.argsort(summary.column("partition").to_numpy(), kind="stable")
        kept, dropped, rejections = drop_repeats(summary.take(pa.array(order, pa.int64())))
        run = RunDir(ctx.run_uri, ctx.filesystem, ctx.run_path)
        own = pa.Table.from_pylist([r.as_row(ctx.stage, ctx.attempt) for r in rejections], schema=LEDGER_SCHEMA)
        manifest = self.write_dataset(run, summary, kept, dropped, ctx, own)
        key = _config_key(run, ctx.stage)
        report = build_report(manifest, posixpath.join(ctx.run_uri, self.cfg.output), self.cfg.allow_empty, key)
        return StageResult(kept.select(list(KEPT_COLUMNS)), rejections, report=report)

    def published(self, ctx: UnitContext) -> bool:
        """The dataset folder holds this unit's dataset, complete (see `dataset_problems`)."""
        final = posixpath.join(ctx.run_path, self.cfg.output)
        manifest = existing_manifest(ctx.filesystem, final)
        return manifest is not None and not dataset_problems(ctx.filesystem, final, manifest, ctx.fingerprint)

    def publish(self, table: pa.Table, ctx: UnitContext) -> None:
        """Publish the dataset again from the shard units' committed summaries (this unit's own output
        holds only the kept rows, not which rows were dropped from which file). Does nothing while one
        of them is not committed: the build runs it, then publishes."""
        run = RunDir(ctx.run_uri, ctx.filesystem, ctx.run_path)
        nodes = plan_nodes(run)
        inputs = [Unit(u, nodes[u]["fingerprint"], p) for u in (nodes.get(ctx.stage) or {}).get("after", [])
                  for p in range(int(nodes[u]["partitions"]))]
        if not inputs or not all(is_committed(run, u) for u in inputs):
            return
        self.process(pa.concat_tables([read_verified_table(run, u)[0] for u in inputs]), ctx)

    def write_dataset(self, run: RunDir, summary: pa.Table, kept: pa.Table, dropped: pa.Table, ctx: UnitContext,
                      own_ledger: pa.Table) -> dict[str, Any]:
        """Publish the files `summary` lists, less the `dropped` rows, as the dataset; returns its manifest.

        First every listed file is checked (a missing one has its shard unit recomputed, see the
        module docstring), then the files holding a dropped row are rewritten without it, then an
        empty file is written for a set with no file (so every set folder reads as a table), then the
        card, then `manifest.json`, the commit point (readers follow it), then the files no longer
        listed are deleted.
        """
        output = self.cfg.output
        folder = run.join(output)
        existing = existing_manifest(run.fs, folder)
        if existing is not None and not dataset_problems(run.fs, folder, existing, ctx.fingerprint):
            return existing  # this unit's dataset is already in place: writing again would change nothing
        files = _files(summary)
        drops: dict[str, set[str]] = {}
        for record_id, path in zip(dropped.column("id").to_pylist(), dropped.column("file").to_pylist()):
            drops.setdefault(path, set()).add(record_id)
        present = listing(run.fs, folder)
        # read after the listing: a racing attempt deletes an original only after its manifest, so an
        # original missing from the listing has its rewrite named by the manifest read now
        latest = existing_manifest(run.fs, folder)
        earlier = (latest or {}).get("replaced") or {} if _same_unit(latest, ctx) else {}
        lost = [f for f in files if present.get(f.path) != f.bytes and not _reusable(earlier, f, drops, present)]
        if lost:
            _recompute(run, ctx, folder, lost)
        replaced: dict[str, dict[str, Any] | None] = {}
        shards: dict[str, list[dict[str, Any]]] = {name: [] for name in SETS}
        arrow_bytes = dict.fromkeys(SETS, 0)
        for f in files:
            if f.path in drops:
                entry = earlier[f.path] if present.get(f.path) != f.bytes else self._rewrite(run, ctx, f, drops[f.path])
                replaced[f.path] = entry
            else:
                entry = {**f.entry(), "arrow_bytes": f.arrow_bytes}
            if entry is not None:
                shards[f.split].append({k: entry[k] for k in ("path", "rows", "bytes", "sha256")})
                arrow_bytes[f.split] += entry["arrow_bytes"]
        for name in SETS:
            if not shards[name]:
                shards[name].append(self._empty_file(run, name))
        splits_info = {name: {"split": name, "rows": sum(s["rows"] for s in shards[name]),
                              "arrow_bytes": arrow_bytes[name], "shards": shards[name]} for name in SETS}
        fingerprints = dict(getattr(ctx, "fingerprints", {}) or {})
        upstream = {s: f for s, f in fingerprints.items() if s != ctx.stage}
        ledger = pa.concat_tables([read_ledger(run.fs, run.path, upstream, verify_in=run), own_ledger])
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "build_id": ctx.build_id,
            "node": ctx.stage,
            "fingerprint": ctx.fingerprint,
            "stage_fingerprints": fingerprints,
            "rows": kept.num_rows,
            "splits": splits_info,
            "counts": {"task": count_rows(kept, ["split", "task"]), "source": count_rows(kept, ["split", "source"])},
            "ledger": ledger_counts(ledger),
            "yield": source_yield(run.fs, run.path, plan_nodes(run), kept, ledger),
            "cost": cost_summary(run.fs, run.path, plan_nodes(run), kept.num_rows),
            "config": read_run_config(run.fs, run.path) or {ctx.stage: self.config},
            # original file -> the file rewritten without its repeated ids (null: no row was left), so
            # a later attempt of this unit whose original is deleted already reuses the rewritten one
            "replaced": replaced,
        }
        if ctx.missing_inputs:  # built by the driver from what committed while other units failed
            manifest["partial"] = {"missing_units": list(ctx.missing_inputs)}
        if not in_plan(run, ctx):
            # a straggler of a build whose config has since changed: its unit may commit, but the
            # dataset is the run's current plan's, so its files are withdrawn and nothing is listed
            remove_unlisted(run, output, existing_manifest(run.fs, folder))
            return manifest
        card = dataset_card(manifest, self._example(run, kept, replaced), self.cfg.license or None)
        run.write_atomic(f"{output}/README.md", card.encode())
        run.write_atomic(f"{output}/manifest.json", json.dumps(manifest, indent=2, sort_keys=False, default=str).encode())
        remove_unlisted(run, output, manifest)
        return manifest

    def _read(self, run: RunDir, path: str) -> bytes:
        with run.fs.open_input_stream(run.join(self.cfg.output, path)) as stream:
            return stream.read()

    def _write(self, run: RunDir, name: Callable[[str], str], records: pa.Table) -> dict[str, Any]:
        """Write `records` under `name(their digest)`; the file's manifest entry (and Arrow bytes)."""
        data = encode_parquet(records, self.cfg.compression)
        digest = hashlib.sha256(data).hexdigest()
        path = name(digest)
        write_once(run, f"{self.cfg.output}/{path}", data)
        return {"path": path, "rows": records.num_rows, "bytes": len(data), "sha256": digest,
                "arrow_bytes": records.nbytes}

    def _rewrite(self, run: RunDir, ctx: UnitContext, f: _File, drop: set[str]) -> dict[str, Any] | None:
        """`f` without the rows of the ids in `drop`, under a new name; None when no row is left.
        Only this one file is held in memory; a damaged original has its shard unit recomputed."""
        data = self._read(run, f.path)
        if hashlib.sha256(data).hexdigest() != f.sha256:
            _recompute(run, ctx, run.join(self.cfg.output), [f])
        records = pq.read_table(pa.BufferReader(data))
        records = records.filter(pc.invert(pc.is_in(records.column("id"), value_set=pa.array(sorted(drop)))))
        if not records.num_rows:
            return None
        return self._write(run, lambda digest: rewritten_path(f.path, digest), records)

    def _empty_file(self, run: RunDir, name: str) -> dict[str, Any]:
        """A set with no row still gets one (empty) file, so its folder reads as a table with the schema."""
        entry = self._write(run, lambda digest: f"{name}/empty-{digest[:DIGEST_CHARS]}.parquet", RECORD_SCHEMA.empty_table())
        return {k: entry[k] for k in ("path", "rows", "bytes", "sha256")}

    def _example(self, run: RunDir, kept: pa.Table, replaced: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any] | None:
        """The card's example: the first record (by id) of the first non-empty set, read from its file."""
        for name in SETS:
            rows = kept.filter(pc.equal(kept.column("split"), name))
            if not rows.num_rows:
                continue
            first = rows.take(pc.sort_indices(rows, [("id", "ascending")])[:1]).to_pylist()[0]
            path = (replaced.get(first["file"]) or {}).get("path", first["file"])
            records = pq.read_table(pa.BufferReader(self._read(run, path)))
            return records.filter(pc.equal(records.column("id"), first["id"])).slice(0, 1).to_pylist()[0]
        return None


def _same_unit(manifest: Mapping[str, Any] | None, ctx: UnitContext) -> bool:
    """Whether `manifest` was written by an attempt of this unit from all of its inputs."""
    return manifest is not None and manifest.get("fingerprint") == ctx.fingerprint and not manifest.get("partial")


def _reusable(earlier: Mapping[str, Any], f: _File, drops: Mapping[str, set[str]], present: Mapping[str, int]) -> bool:
    """Whether a rewrite of `f` that an earlier attempt of this unit published is in place."""
    if f.path not in drops or f.path not in earlier:
        return False
    entry = earlier[f.path]
    return entry is None or present.get(entry["path"]) == entry["bytes"]


def _recompute(run: RunDir, ctx: UnitContext, folder: str, lost: list[_File]) -> None:
    """Have the shard units whose files are missing recomputed: each is invalidated, and CorruptUnit
    names the first (the worker or the driver invalidates it too and runs the build's next pass)."""
    upstream = (plan_nodes(run).get(ctx.stage) or {}).get("after") or []
    if len(upstream) != 1:
        raise RuntimeError(f"{ctx.stage}: dataset files missing ({', '.join(f.path for f in lost[:3])}) and no single "
                           "upstream node in plan.json to recompute them")
    node = upstream[0]
    units = {f.partition: Unit(node, ctx.fingerprints[node], f.partition) for f in lost}
    reason = "its dataset files are missing (lost, or deleted by another publication); recomputing writes them"
    first = lost[0]
    for partition, unit in sorted(units.items()):
        if partition != first.partition and is_committed(run, unit):
            invalidate(run, unit, reason)
    raise CorruptUnit(units[first.partition], posixpath.join(folder, first.path), reason)


def _config_key(run: RunDir, node: str) -> str:
    """The config block the node reads (`shard` for the default dag), as the user names it."""
    dag = (read_run_config(run.fs, run.path) or {}).get("dag") or {}
    return str((dag.get(node) or {}).get("config") or node)
