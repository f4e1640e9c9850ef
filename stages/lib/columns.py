"""What every column of the STGR record means: the one source of the dataset card's column table and
of the table in docs/schema.md (tests/test_hf_dataset.py checks that the two agree).

Each row names a column or a nested field (`media.uri`, `frames[].image`: `[]` is an element of a
list), the stage that writes it, its units and its meaning; its type is read from `RECORD_SCHEMA`,
so the table cannot claim a type the shards do not have. A row covers the fields below it that no
row of their own names. Units: `s` is seconds on the source video's own timeline (not the clip's,
not a frame index), `xyxy` is a box `[x1, y1, x2, y2]` normalised to [0, 1] of the source frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from stages.lib.schema import IMAGE, RECORD_SCHEMA


@dataclass(frozen=True)
class Column:
    """One row of the column table."""

    name: str
    stage: str
    units: str
    meaning: str


S = "s"
XYXY = "xyxy"

COLUMNS: tuple[Column, ...] = (
    Column("id", "source", "-", "stable 16-hex id: sha1(source, source_id, task, variant); the same seed gives the "
           "same id on every machine, and the set is drawn from it"),
    Column("source", "source", "-", "adapter name: `synthetic`, `vidstg`, `hcstvg`, `stgr_json`, ..."),
    Column("source_id", "source", "-", "the example's id in its source (e.g. `5804131706#0`); ledger rows name it "
           "in `record`"),
    Column("task", "source", "-", "one of `spatio_temporal`, `temporal`, `temporal_mcq`, `spatial`, `general_mcq`, "
           "`general_free`"),
    Column("media.uri", "source", "-", "path or URI of the video"),
    Column("media.kind", "source", "-", "`video`"),
    Column("media.fps", "source, sample", "frames/s", "native frame rate (decord's probe replaces a declared one)"),
    Column("media.num_frames", "source, sample", "frames", "frames in the video"),
    Column("media.duration_s", "source, sample", S, "length of the video"),
    Column("media.width", "source, sample", "px", "source frame width (what boxes are normalised to)"),
    Column("media.height", "source, sample", "px", "source frame height"),
    Column("clip_window.start_s", "sample", S, "start of the window the frames were taken from"),
    Column("clip_window.end_s", "sample", S, "its end; filter's `time_in_clip` checks every `<t>` against the window"),
    Column("frames[].t_s", "sample", S, "timestamp of each sampled frame (decord's, so variable frame rate is exact)"),
    Column("frames[].index", "sample", "frame", "its frame index in the video"),
    Column("frames[].image", "sample", "JPEG", "the frame (`sample.embed_jpeg`, on by default): a `datasets.Image` "
           "(`{bytes, path}`; pandas gives the JPEG bytes); null means decode `media.uri` at `index`"),
    Column("question", "source or annotate", "-", "the question; a source's question is never replaced"),
    Column("options", "source or annotate", "-", "multiple-choice options (`A. ...`), null for open questions"),
    Column("answer", "source or annotate", "-", "the ground-truth answer: an option letter, a span `[s, e]`, a box or "
           "free text; annotate fills it only when the source had none"),
    Column("answer_span", "source or annotate", S, "the answer's time span `[start, end]`, for temporal tasks"),
    Column("reasoning", "annotate (or source `stgr_json`)", f"{S}, {XYXY}", "the grounded trace, the `<think>` part of "
           "the response: `<obj>name</obj><box>[x1,y1,x2,y2]</box>at<t>12.5</t>s` (grammar in docs/evidence.md)"),
    Column("key_frames[].t_s", "source", S, "a time that carries ground-truth boxes"),
    Column("key_frames[].objects", "source", XYXY, "the named boxes `{name, box}` at that time"),
    Column("ground_truth.objects[].name", "source", "-", "a ground-truth object"),
    Column("ground_truth.objects[].track", "source", f"{S}, {XYXY}", "its boxes over time `{t_s, box}` (per native "
           "frame where the source has them)"),
    Column("ground_truth.spans", "source", S, "ground-truth events `{label, start_s, end_s}`"),
    Column("response", "annotate", "-", "the model's raw text, kept whatever it is: align and filter judge it"),
    Column("split", "shard", "-", "the set: `stgr-cot` (SFT) or `stgr-rl` (RL), from a stable hash of `id`; also the "
           "set's folder and `datasets` config"),
    Column("scores.format_ok", "align", "-", "no entry in `scores.problems`"),
    Column("scores.problems", "align", "-", "`code: detail` for every problem the evidence grammar found, plus "
           "`missing_section` and `missing_evidence` (the trace lacks what its task needs)"),
    Column("scores.num_claims", "align", "-", "claims parsed (`<obj>` with a box and/or a time)"),
    Column("scores.claims[].name", "align", "-", "a claimed object name (one row per claimed box; a time-only claim "
           "is a row without a box)"),
    Column("scores.claims[].t_s", "align", S, "the claimed time, or null"),
    Column("scores.claims[].t_snapped", "align", S, "the nearest sampled frame's time: the model saw only those frames"),
    Column("scores.claims[].dt", "align", S, "`t_snapped - t_s`"),
    Column("scores.claims[].box", "align", XYXY, "the claimed box, or null"),
    Column("scores.claims[].gt_name", "align", "-", "the ground-truth object it was matched to (null: unmatched, or "
           "nothing to match)"),
    Column("scores.claims[].iou", "align", "IoU", "IoU with that object at the snapped time; 0 when ground truth "
           "exists there but the box matched none; null when there is no ground truth at that time"),
    Column("scores.claims[].verified", "verify", "-", "verify's verdict on the crop (null: verify did not run or the "
           "box could not be placed in a frame)"),
    Column("scores.num_matched", "align", "-", "claims with a `gt_name`"),
    Column("scores.mean_iou", "align", "IoU", "mean over claims with a non-null `iou`"),
    Column("scores.min_iou", "align", "IoU", "minimum over claims with a non-null `iou`"),
    Column("scores.times", "align", S, "every well-formed `<t>` of the trace, bound to a claim or not"),
    Column("scores.answer_pred", "align", "-", "the `<answer>` of the response"),
    Column("scores.answer_score", "align", "0-1", "agreement of `answer_pred` with the ground truth by answer kind: "
           "option letter 1/0, span temporal IoU, box IoU, free text ROUGE-L F1; null without ground truth"),
    Column("scores.answer_ok", "align", "-", "`answer_score >= align.answer_ok_at` (0.5)"),
    Column("scores.verify", "verify", "0-1", "fraction of claimed boxes verify's model confirmed; null without the "
           "verify stage"),
    Column("provenance.annotator", "annotate", "-", "backend name (`template`, `transformers`, `vllm`, `openai`)"),
    Column("provenance.model", "annotate", "-", "model name `@` revision"),
    Column("provenance.tier", "annotate", "-", "the annotation cascade's tier that wrote the row (1: the first; "
           "null outside a cascade)"),
    Column("provenance.prompt_sha", "annotate", "-", "hash of the prompt template (or of the template backend's "
           "phrase tables)"),
    Column("provenance.build_id", "annotate, shard", "-", "the build's label (run directory name by default)"),
    Column("provenance.stage_fingerprints", "annotate, shard", "-", "`{stage, fingerprint}` of every DAG node that "
           "produced the record (docs/resume.md)"),
    Column("meta", "source", "-", "adapter-specific detail, sorted JSON"),
)


def field_type(path: str) -> pa.DataType:
    """The Arrow type at `path` (`a.b`, `a[].b`, `a[]`) of RECORD_SCHEMA; KeyError naming the path."""
    current: pa.DataType = pa.struct(list(RECORD_SCHEMA))
    for part in path.split("."):
        name, lists = part.rstrip("[]"), part.count("[]")
        if not isinstance(current, pa.StructType) or current.get_field_index(name) < 0:
            raise KeyError(f"{path}: no field {name!r} in the record schema")
        current = current.field(name).type
        for _ in range(lists):
            if not pa.types.is_list(current):
                raise KeyError(f"{path}: {name!r} is not a list")
            current = current.value_type
    return current


def type_name(data_type: pa.DataType) -> str:
    """A reader's name for an Arrow type: `string`, `float`, `list of float`, `struct`, `image (JPEG)`."""
    if data_type == IMAGE:
        return "image (JPEG)"
    if pa.types.is_list(data_type):
        return f"list of {type_name(data_type.value_type)}"
    if pa.types.is_struct(data_type):
        return "struct"
    return {"double": "float", "int64": "int", "binary": "bytes"}.get(str(data_type), str(data_type))


def column_table() -> str:
    """The Markdown table of COLUMNS (name, type, units, written by, meaning)."""
    lines = ["| column | type | units | written by | meaning |", "| --- | --- | --- | --- | --- |"]
    for column in COLUMNS:
        cells = [f"`{column.name}`", type_name(field_type(column.name)), column.units, column.stage, column.meaning]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
