"""The STGR record: one Arrow schema, filled in stage by stage.

Every stage reads and writes the same columns (those a stage has not reached yet are null), so a
partition from any stage opens with the same code and `pandas.read_parquet` gives plain Python
values. Canonical units everywhere: seconds on the source video's own timeline, boxes `[x1, y1, x2,
y2]` normalised to [0, 1] of the source frame. Bump SCHEMA_VERSION when a column changes meaning.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import pyarrow as pa

SCHEMA_VERSION = "1.1"

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
FRAME = pa.struct([("t_s", pa.float64()), ("index", pa.int64()), ("jpeg", pa.binary())])
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
    ]
)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("media", MEDIA),
        pa.field("clip", CLIP),
        pa.field("frames", pa.list_(FRAME)),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("answer_span", SPAN),
        pa.field("reasoning", pa.string()),
        pa.field("key_frames", pa.list_(KEY_FRAME)),
        pa.field("gt", GROUND_TRUTH),
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


def conform(table: pa.Table) -> pa.Table:
    """Add missing columns as nulls and order/cast columns to RECORD_SCHEMA."""
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
