"""The STGR record: one Arrow schema, filled in stage by stage.

Every stage reads and writes the same columns (those a stage has not reached yet are null), so a
partition from any stage opens with the same code and `pandas.read_parquet` gives plain Python
values. Canonical units everywhere: seconds on the source video's own timeline, boxes `[x1, y1, x2,
y2]` normalised to [0, 1] of the source frame. Bump SCHEMA_VERSION when a column changes meaning.

Names a user meets in pandas and `datasets`: no column shadows a pandas method (`row.ground_truth`,
not `row.gt`, which is `Series.gt`); a frame's picture is a `datasets.Image` struct (`{bytes, path}`),
so `datasets` decodes it to a PIL image while pandas gives the JPEG bytes; the `split` column holds the
set's own name (`stgr-cot`, `stgr-rl`), the name of its folder and of its `datasets` config. Shards of
schema 1.x (`gt`, `clip`, `frames[].jpeg`, splits `sft`/`rl`) are read through `upgrade`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = "2.1"

#: The published sets, in the order the dataset lists them: `stgr-cot` (SFT: reasoning traces to imitate)
#: and `stgr-rl` (RL: questions with ground truth to reward against). One name each for the value of
#: the `split` column, the dataset's sub-folder and its `datasets` config.
SETS = ("stgr-cot", "stgr-rl")

#: Schema 1.x names -> these: the split values, and the columns whose old names shadow pandas methods.
LEGACY_SETS = {"sft": "stgr-cot", "rl": "stgr-rl"}
RENAMED_COLUMNS = {"gt": "ground_truth", "clip": "clip_window"}

TASKS = ("spatio_temporal", "temporal", "temporal_mcq", "spatial", "general_mcq", "general_free")

#: The kind of answer each task has: `option` (a letter), `span` ("[s, e]" seconds), `box`
#: (canonical [x1, y1, x2, y2]) or `text`. Annotation prompts, alignment, rewards and evaluation all
#: read answers through this one table.
ANSWER_KINDS: dict[str, str] = {
    "spatio_temporal": "span",
    "temporal": "span",
    "temporal_mcq": "option",
    "spatial": "box",
    "general_mcq": "option",
    "general_free": "text",
}

# Boxes (4 floats) and spans (2 floats) are variable-size lists in the schema, their length checked
# by the code that writes them: Parquet has no fixed-size list, and pyarrow releases before ~23 (and
# other readers) fail to read a fixed-size list column with nulls back ("Expected all lists to be
# of size=2"), which would lock users of older stacks out of the shards.
BOX = pa.list_(pa.float64())
SPAN = pa.list_(pa.float64())

MEDIA = pa.struct(
    [
        ("uri", pa.string()),
        ("kind", pa.string()),
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("duration_s", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)
CLIP = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())])
#: The Arrow storage of `datasets.Image`: the card declares the field as an image, so `datasets` and
#: the Hub viewer decode it, and pandas reads `{"bytes": <JPEG>, "path": None}`.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FRAME = pa.struct([("t_s", pa.float64()), ("index", pa.int64()), ("image", IMAGE)])
OBJECT_BOX = pa.struct([("name", pa.string()), ("box", BOX)])
KEY_FRAME = pa.struct([("t_s", pa.float64()), ("objects", pa.list_(OBJECT_BOX))])
TRACK_POINT = pa.struct([("t_s", pa.float64()), ("box", BOX)])
GT_OBJECT = pa.struct([("name", pa.string()), ("track", pa.list_(TRACK_POINT))])
GT_SPAN = pa.struct([("label", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64())])
GROUND_TRUTH = pa.struct([("objects", pa.list_(GT_OBJECT)), ("spans", pa.list_(GT_SPAN))])
CLAIM_SCORE = pa.struct(
    [
        ("name", pa.string()),
        ("t_s", pa.float64()),
        ("t_snapped", pa.float64()),
        ("box", BOX),
        ("gt_name", pa.string()),
        ("iou", pa.float64()),
        ("dt", pa.float64()),
        ("verified", pa.bool_()),
    ]
)
SCORES = pa.struct(
    [
        ("format_ok", pa.bool_()),
        ("num_claims", pa.int64()),
        ("mean_iou", pa.float64()),
        ("min_iou", pa.float64()),
        ("answer_ok", pa.bool_()),
        ("claims", pa.list_(CLAIM_SCORE)),
        ("verify", pa.float64()),
        ("problems", pa.list_(pa.string())),
        ("num_matched", pa.int64()),
        ("answer_pred", pa.string()),
        ("answer_score", pa.float64()),
        ("times", pa.list_(pa.float64())),
    ]
)
PROVENANCE = pa.struct(
    [
        ("annotator", pa.string()),
        ("model", pa.string()),
        ("prompt_sha", pa.string()),
        ("build_id", pa.string()),
        # a list of pairs, not an Arrow map: `datasets` cannot load map columns
        ("stage_fingerprints", pa.list_(pa.struct([("stage", pa.string()), ("fingerprint", pa.string())]))),
        # 2.1: the annotation cascade's tier that wrote the row (null outside a cascade, and in 2.0
        # shards: `conform`'s cast adds the field)
        ("tier", pa.int64()),
    ]
)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("media", MEDIA),
        pa.field("clip_window", CLIP),
        pa.field("frames", pa.list_(FRAME)),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("answer_span", SPAN),
        pa.field("reasoning", pa.string()),
        pa.field("key_frames", pa.list_(KEY_FRAME)),
        pa.field("ground_truth", GROUND_TRUTH),
        pa.field("response", pa.string()),
        pa.field("split", pa.string()),
        pa.field("scores", SCORES),
        pa.field("provenance", PROVENANCE),
        pa.field("meta", pa.string()),
    ]
)


def record_id(source: str, source_id: str, task: str, variant: str | int = 0) -> str:
    """Stable id: the same seed gives the same id on every machine and every run."""
    key = f"{source}\x1f{source_id}\x1f{task}\x1f{variant}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts, missing keys = null) -> a table with exactly RECORD_SCHEMA."""
    rows = [{name: row.get(name) for name in RECORD_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def frame_image(jpeg: bytes | None) -> dict[str, Any] | None:
    """The `frames[].image` value of a JPEG (null when the frame is not embedded)."""
    return {"bytes": jpeg, "path": None} if jpeg else None


def light_frames(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """`frames` without their images: each frame's time and index, `image` null (then a reader that
    needs pixels decodes them from `media.uri` at `index`, or the engine puts the stored JPEGs back).

    What the stages after `sample` commit, so the run directory holds each JPEG once; vectorised:
    the lists' offsets and validity and the times and indices are reused, only the image child is
    replaced by nulls.
    """
    chunks = []
    for chunk in column.chunks:
        start = chunk.offsets[0].as_py() if len(chunk) else 0  # a sliced chunk's lists start inside its values
        offsets = pc.subtract(chunk.offsets, pa.scalar(start, chunk.offsets.type))
        frames = chunk.values.slice(start, chunk.offsets[-1].as_py() - start if len(chunk) else 0)
        light = pa.StructArray.from_arrays(
            [frames.field("t_s"), frames.field("index"), pa.nulls(len(frames), IMAGE)], fields=list(FRAME),
            mask=frames.is_null() if frames.null_count else None)
        chunks.append(pa.ListArray.from_arrays(offsets, light, type=column.type,
                                               mask=chunk.is_null() if chunk.null_count else None))
    return pa.chunked_array(chunks, column.type)


def frame_jpeg(frame: Mapping[str, Any]) -> bytes | None:
    """A frame's embedded JPEG, or None (then it is decoded from `media.uri` at `index`)."""
    return (frame.get("image") or {}).get("bytes") or None


def upgrade(table: pa.Table) -> pa.Table:
    """A table in this schema's names, whatever schema version wrote it (columns are not added).

    Schema 1.x wrote `gt` and `clip` (renamed: they shadow pandas methods), `frames[].jpeg` (now the
    `datasets.Image` struct `frames[].image`) and splits `sft`/`rl` (now the set names). Readers of
    shards call this (through `conform`), so a dataset built before 2.0 still loads.
    """
    names = [RENAMED_COLUMNS[n] if n in RENAMED_COLUMNS and RENAMED_COLUMNS[n] not in table.column_names else n
             for n in table.column_names]
    table = table.rename_columns(names)
    if "frames" in names and "jpeg" in _frame_fields(table.schema.field("frames").type):
        frames = pa.chunked_array([_embed_images(chunk) for chunk in table.column("frames").chunks],
                                  pa.list_(FRAME))
        table = table.set_column(names.index("frames"), "frames", frames)
    if "split" in names:
        split = table.column("split").cast(pa.string())
        for old, new in LEGACY_SETS.items():
            split = pc.if_else(pc.equal(split, old), new, split)
        table = table.set_column(names.index("split"), "split", split)
    return table


def _frame_fields(frames_type: pa.DataType) -> list[str]:
    value_type = getattr(frames_type, "value_type", None)
    return [f.name for f in value_type] if isinstance(value_type, pa.StructType) else []


def _embed_images(frames: pa.ListArray) -> pa.ListArray:
    """Schema 1.x frames `{t_s, index, jpeg}` -> `{t_s, index, image: {bytes, path}}`, in Arrow
    (a shard holds up to hundreds of MiB of JPEG: no trip through Python objects)."""
    offsets = frames.offsets  # of a sliced array: rebased, so that a null bitmap may go with them
    start = offsets[0].as_py()
    values = frames.values.slice(start, offsets[-1].as_py() - start)
    offsets = pc.subtract(offsets, pa.scalar(start, offsets.type))
    jpeg = values.field("jpeg").cast(pa.binary())
    image = pa.StructArray.from_arrays([jpeg, pa.nulls(len(jpeg), pa.string())], fields=list(IMAGE),
                                       mask=jpeg.is_null())
    items = pa.StructArray.from_arrays([values.field("t_s").cast(pa.float64()), values.field("index").cast(pa.int64()),
                                        image], fields=list(FRAME), mask=values.is_null())
    return pa.ListArray.from_arrays(offsets, items, mask=frames.is_null() if frames.null_count else None)


def conform(table: pa.Table) -> pa.Table:
    """Upgrade (see `upgrade`), add missing columns as nulls and order/cast columns to RECORD_SCHEMA."""
    table = upgrade(table)
    columns = []
    for field in RECORD_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=RECORD_SCHEMA)


def meta_dump(meta: Mapping[str, Any]) -> str:
    """`meta` is adapter-specific detail, kept as sorted JSON so it hashes stably."""
    return json.dumps(meta, sort_keys=True, default=str)
