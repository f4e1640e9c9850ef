"""`shard`: split one upstream partition's records into `stgr-cot` (SFT) and `stgr-rl` (RL) and write
them straight into the dataset folder, `<run>/dataset/<set>/part-PPPPP-KKKKK-<digest>.parquet`.

Why per partition, not a barrier: a barrier holds every record, frames included, in one process, so
its memory grows with the dataset (terabytes at 10^6 clips). Nothing here needs more than one
partition: the split is a stable hash of each record's id, and a file's name is its partition, its
index and its digest. So shard runs as a map stage, its units in parallel, each holding one
partition; `publish`, a small barrier after it, reads the units' summaries and writes the manifest
(the commit point) and the card (stages/publish.py).

Why a stable hash of the id for the split: the same record lands in the same split on every rebuild
and every machine, so an RL set never leaks into the SFT set when a build is extended. Why
content-addressed names and no folder rename: an object store has none; two attempts of one unit
write the same bytes under the same names, and no attempt overwrites a file the manifest in place
lists with other bytes (a reader following the manifest sees the previous dataset or the new one).
Why the frames are read whole (`full_columns`): the dataset stays self-contained, frames inside, so
users open it with pandas alone.

The unit's committed output is a summary (`stages.lib.dataset.SUMMARY_SCHEMA`: id, set, task,
source, file, the file's size and sha256), never the records. A partition holding more than
`target_shard_mb` of Arrow data per set is written as several files.
"""
from __future__ import annotations

import hashlib
import math
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register_stage
from pipeline.rundir import RunDir
from pipeline.stage import Rejection, Stage, StageResult, UnitContext
from stages.lib.dataset import SUMMARY_SCHEMA, DatasetConfig, encode_parquet, in_plan, shard_path, write_once
from stages.lib.schema import PROVENANCE, RECORD_SCHEMA, SETS, conform


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


def file_summary(records: pa.Table, partition: int, path: str, data: bytes, arrow_bytes: int) -> pa.Table:
    """The summary rows (`SUMMARY_SCHEMA`) of the dataset file `path`, which holds `records` as `data`."""
    n = records.num_rows
    digest = hashlib.sha256(data).hexdigest()
    columns = {name: records.column(name) for name in ("id", "source_id", "split", "task", "source")}
    columns |= {"partition": pa.array([partition] * n, pa.int64()), "file": pa.array([path] * n, pa.string()),
                "file_rows": pa.array([n] * n, pa.int64()), "file_bytes": pa.array([len(data)] * n, pa.int64()),
                "file_arrow_bytes": pa.array([arrow_bytes] * n, pa.int64()),
                "file_sha256": pa.array([digest] * n, pa.string())}
    return pa.table(columns).cast(SUMMARY_SCHEMA)


@register_stage
class ShardStage(Stage):
    """Split one partition by a stable hash and write its dataset files; output: their summary."""

    name = "shard"
    version = "3"
    full_columns: ClassVar[tuple[str, ...]] = ("frames",)
    Config = DatasetConfig
    cfg: DatasetConfig

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table if table is not None else RECORD_SCHEMA.empty_table())
        table, rejections = drop_duplicate_ids(table)
        table = table.sort_by("id")
        ids = table.column("id")
        splits = split_of(ids.combine_chunks(), float(self.cfg.rl_fraction), self.cfg.salt)
        table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
        table = _with_provenance(table, ctx)
        run = RunDir(ctx.run_uri, ctx.filesystem, ctx.run_path)
        return StageResult(self.write_partition(table, run, ctx.partition, write=in_plan(run, ctx)), rejections)

    def write_partition(self, table: pa.Table, run: RunDir, partition: int, write: bool = True) -> pa.Table:
        """Write the partition's records (with `split`) as one file per set, or several where a set
        holds more than `target_shard_mb`; returns their summary. A set with no record gets no file.
        With `write` false (a straggler of another plan) the names are computed, nothing is written:
        if a later build reuses the unit, `publish` finds its files missing and has it recomputed."""
        target = float(self.cfg.target_shard_mb) * 2**20
        pieces = []
        for name in SETS:
            part = table.filter(pc.equal(table.column("split"), name))
            if not part.num_rows:
                continue
            n_files = max(1, math.ceil(part.nbytes / target))
            bounds = np.linspace(0, part.num_rows, n_files + 1).round().astype(int)
            for k in range(n_files):
                records = part.slice(bounds[k], bounds[k + 1] - bounds[k])
                data = encode_parquet(records, self.cfg.compression)
                path = shard_path(name, partition, k, hashlib.sha256(data).hexdigest())
                if write:
                    write_once(run, f"{self.cfg.output}/{path}", data)
                pieces.append(file_summary(records, partition, path, data, records.nbytes))
        return pa.concat_tables(pieces) if pieces else SUMMARY_SCHEMA.empty_table()


def drop_duplicate_ids(table: pa.Table) -> tuple[pa.Table, list[Rejection]]:
    """Keep the first record of each id (in upstream order); a ledger row for each other.

    Two records with one id would be one example twice, and could land in both splits' counts; one
    bad input line must not cost the dataset, so the repeat is ledgered, never raised. An id repeated
    across partitions is `publish`'s to drop (the first partition's record is kept there).
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
