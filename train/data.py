"""STGR shards -> the datasets TRL trains on: read the split's records, render each one, cache the result.

What a record looks like to the model is decided by `stages.lib.render.render_example`, the one
renderer that the verl export and evaluation use too. This module reads the shards (checking the
columns rendering needs, naming file, record and field), renders every record with the model's
`FramePolicy` and the configured instruction and system prompt, leaves out (with a warning) the
records whose boxes cannot be written in the model's frame, and caches the rendered dataset under a
fingerprint of the shards and every rendering option.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.errors import InputError
from stages.lib.media import FrameReader
from stages.lib.render import RENDER_VERSION, FramePolicy, RenderError, RenderedExample, render_example
from stages.lib.schema import TASKS, upgrade

log = logging.getLogger("stgr.train.data")

#: Columns a record needs to be rendered (others are carried along or ignored).
REQUIRED = ("id", "task", "frames", "question", "answer")


# --- reading shards ---------------------------------------------------------------------------------


def split_dir(data_dir: str | Path, split: str) -> Path:
    """`data.dir` may be a run directory (`RUN/dataset/<split>`) or the dataset folder itself."""
    root = Path(data_dir)
    for candidate in (root / "dataset" / split, root / split):
        if candidate.is_dir():
            return candidate
    raise InputError(f"data.dir: no '{split}' folder under {root} (expected {root}/dataset/{split} from `stgr build`)")


def shard_files(data_dir: str | Path, split: str) -> list[Path]:
    files = sorted(split_dir(data_dir, split).glob("*.parquet"))
    if not files:
        raise InputError(f"data.dir: {split_dir(data_dir, split)} holds no .parquet shards")
    return files


def data_fingerprint(files: Sequence[Path], *parts: Any) -> str:
    """Changes whenever a shard changes (name, size, mtime) or a rendering option does."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\x1f{st.st_size}\x1f{st.st_mtime_ns}\x1e".encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def load_records(
    data_dir: str | Path, split: str, max_records: int | None = None, tasks: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The split's records as plain dicts, sorted by id (stable across machines), checked for the
    columns rendering needs; a bad record raises InputError naming the file, the record and the field."""
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise InputError(f"data.tasks: unknown task(s) {unknown}; known: {list(TASKS)}")
    records = []
    for path in shard_files(data_dir, split):
        table = upgrade(pq.read_table(path))  # a dataset of schema 1.x reads as this schema's names
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}")
        for row in table.to_pylist():
            for name in REQUIRED:
                if row.get(name) in (None, [], ""):
                    raise InputError(f"{path}: record {row.get('id')!r}: field '{name}' is empty")
            if tasks is None or row["task"] in tasks:
                row["_file"] = str(path)
                records.append(row)
    records.sort(key=lambda r: r["id"])
    return records[:max_records] if max_records is not None else records


# --- rendering --------------------------------------------------------------------------------------


def iter_examples(records: Sequence[Mapping[str, Any]], policy: FramePolicy, data: Mapping[str, Any]) -> Iterator[RenderedExample]:
    """Rendered examples; a record whose trace cannot be moved to the model's frame is left out
    with a warning naming it (and a count at the end), any other bad record raises."""
    skipped = 0
    reader = FrameReader()
    for record in records:
        try:
            yield render_example(record, policy, data.get("instruction") or "", data.get("system_prompt"),
                                 Path(record["_file"]).parent if record.get("_file") else None, reader)
        except RenderError as exc:
            skipped += 1
            log.warning("left out: %s", exc)
    if skipped:
        log.warning("left out %d of %d records whose boxes could not be rendered in the model's frame",
                    skipped, len(records))


def build_dataset(kind: str, data: Mapping[str, Any], model: Mapping[str, Any], cache_dir: Path):
    """A `datasets.Dataset` for TRL, written to `cache_dir` as it is rendered (not held in memory).

    sft: `messages` (with the assistant target) + `images`; rl: `prompt` (no target) + `images` +
    `reward_target` (JSON). Cached under a fingerprint of the shards and every rendering option.
    """
    import datasets

    records_args = (data["dir"], data["split"], data.get("max_records"), data.get("tasks"))
    files = shard_files(data["dir"], data["split"])
    policy = FramePolicy.from_config(model, data)
    fp = data_fingerprint(files, RENDER_VERSION, kind, records_args[1:], policy, data.get("instruction"),
                          data.get("system_prompt"))

    def generate() -> Iterator[dict[str, Any]]:
        for ex in iter_examples(load_records(*records_args), policy, data):
            if kind == "sft":
                yield {"messages": ex.messages, "images": ex.images}
            else:
                yield {"prompt": ex.prompt(), "images": ex.images, "reward_target": json.dumps(ex.reward_target)}

    ds = datasets.Dataset.from_generator(generate, cache_dir=str(cache_dir), fingerprint=fp)
    if len(ds) == 0:
        raise InputError(f"data.dir: no records in {split_dir(data['dir'], data['split'])} (tasks={data.get('tasks')})")
    return ds
