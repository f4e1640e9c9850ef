"""V-STaR annotation files: load and validate, with errors that name file, record and field.

The format is the one V-STaR's own `eval.py` reads (a JSON list of objects):

    vid, domain, fps, width, height, frame_count, question, answer, temporal_question,
    timestamps [start_s, end_s], spatial_question, spatial_question_2,
    bboxes [{timestamp, frame_index, xmin, ymin, xmax, ymax}]        # pixels of the source video

The dataset card of V-STaR also shows `bboxes` as `[{"<timestamp>_<frame_index>": {xmin, ...}}]`;
both spellings are accepted so either release loads. Boxes stay in source pixels here (the
metrics compare them after the model's boxes are converted back to the same frame).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

DURATION_BUCKETS = (("short (<60 s)", 60.0), ("medium (60-180 s)", 180.0), ("long (>=180 s)", math.inf))


@dataclass(frozen=True)
class VStarBox:
    """One ground-truth box: the second it is annotated at, its frame index, pixel xyxy."""

    timestamp: float
    frame_index: int | None
    xyxy: tuple[float, float, float, float]


@dataclass(frozen=True)
class VStarItem:
    key: str
    index: int
    vid: str
    domain: str
    fps: float
    width: int
    height: int
    frame_count: int
    question: str
    answer: str
    temporal_question: str
    timestamps: tuple[float, float]
    spatial_question: str
    spatial_question_2: str
    bboxes: tuple[VStarBox, ...]

    @property
    def duration_s(self) -> float:
        """As V-STaR computes it: frame_count / fps, rounded to 0.01 s."""
        return round(self.frame_count / self.fps, 2)

    @property
    def duration_bucket(self) -> str:
        return next(name for name, upper in DURATION_BUCKETS if self.duration_s < upper)

    def gt_boxes_by_time(self) -> dict[float, list[tuple[float, float, float, float]]]:
        out: dict[float, list[tuple[float, float, float, float]]] = {}
        for box in self.bboxes:
            out.setdefault(box.timestamp, []).append(box.xyxy)
        return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Record:
    """Field access that raises InputError naming the file, the record and the field."""

    def __init__(self, path: Path, index: int, raw: Any) -> None:
        self.path, self.index, self.raw = path, index, raw
        vid = raw.get("vid") if isinstance(raw, dict) else None
        self.where = f"{path}: record {index}" + (f" (vid {vid!r})" if vid is not None else "")
        if not isinstance(raw, dict):
            raise InputError(f"{self.where}: expected an object, got {type(raw).__name__}")

    def fail(self, field: str, why: str) -> InputError:
        return InputError(f"{self.where}: field '{field}': {why}")

    def get(self, field: str) -> Any:
        if field not in self.raw:
            raise self.fail(field, "missing")
        return self.raw[field]

    def text(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {value!r:.80}")
        return value

    def positive(self, field: str, integer: bool = False) -> float:
        value = self.get(field)
        if not _number(value) or value <= 0 or (integer and float(value) != int(value)):
            kind = "a positive integer" if integer else "a positive number"
            raise self.fail(field, f"expected {kind}, got {value!r:.80}")
        return int(value) if integer else float(value)


def _box(rec: _Record, pos: str, raw: Any, timestamp: Any, frame_index: Any) -> VStarBox:
    field = f"bboxes[{pos}]"
    if not isinstance(raw, dict):
        raise rec.fail(field, f"expected an object with xmin, ymin, xmax, ymax, got {raw!r:.80}")
    coords = []
    for name in ("xmin", "ymin", "xmax", "ymax"):
        if name not in raw:
            raise rec.fail(f"{field}.{name}", "missing")
        if not _number(raw[name]):
            raise rec.fail(f"{field}.{name}", f"expected a number, got {raw[name]!r:.80}")
        coords.append(float(raw[name]))
    if coords[2] < coords[0] or coords[3] < coords[1]:
        raise rec.fail(field, f"xmax < xmin or ymax < ymin: {coords}")
    if not _number(timestamp) or timestamp < 0:
        raise rec.fail(f"{field}.timestamp", f"expected seconds >= 0, got {timestamp!r:.80}")
    if frame_index is not None and (not _number(frame_index) or frame_index < 0):
        raise rec.fail(f"{field}.frame_index", f"expected a frame index >= 0, got {frame_index!r:.80}")
    return VStarBox(float(timestamp), None if frame_index is None else int(frame_index),
                    (coords[0], coords[1], coords[2], coords[3]))


def _boxes(rec: _Record) -> tuple[VStarBox, ...]:
    raw = rec.get("bboxes")
    if not isinstance(raw, list):
        raise rec.fail("bboxes", f"expected a list, got {type(raw).__name__}")
    out = []
    for i, entry in enumerate(raw):
        if isinstance(entry, dict) and "xmin" in entry:
            out.append(_box(rec, str(i), entry, entry.get("timestamp"), entry.get("frame_index")))
        elif isinstance(entry, dict):
            # Dataset-card spelling: {"<timestamp>_<frame_index>": {xmin, ymin, xmax, ymax}}.
            for name, box in entry.items():
                ts, _, fi = str(name).partition("_")
                try:
                    timestamp, frame_index = float(ts), (int(fi) if fi else None)
                except ValueError:
                    raise rec.fail(f"bboxes[{i}]", f"key {name!r} is not '<timestamp>_<frame_index>'") from None
                out.append(_box(rec, f"{i}].[{name!r}", box, timestamp, frame_index))
        else:
            raise rec.fail(f"bboxes[{i}]", f"expected an object, got {entry!r:.80}")
    if not out:
        raise rec.fail("bboxes", "no boxes: V-STaR's spatial questions need at least one")
    return tuple(out)


def _item(path: Path, index: int, raw: Any) -> VStarItem:
    rec = _Record(path, index, raw)
    ts = rec.get("timestamps")
    if not (isinstance(ts, (list, tuple)) and len(ts) == 2 and all(_number(x) for x in ts)):
        raise rec.fail("timestamps", f"expected [start_s, end_s], got {ts!r:.80}")
    if not 0 <= ts[0] <= ts[1]:
        raise rec.fail("timestamps", f"expected 0 <= start <= end, got {ts}")
    domain = raw.get("domain", "unknown")
    item_fields = {
        "vid": str(rec.get("vid")),
        "domain": str(domain) if domain is not None else "unknown",
        "fps": rec.positive("fps"),
        "width": rec.positive("width", integer=True),
        "height": rec.positive("height", integer=True),
        "frame_count": rec.positive("frame_count", integer=True),
        "question": rec.text("question"),
        "answer": rec.text("answer"),
        "temporal_question": rec.text("temporal_question"),
        "timestamps": (float(ts[0]), float(ts[1])),
        "spatial_question": rec.text("spatial_question"),
        "spatial_question_2": rec.text("spatial_question_2"),
    }
    boxes = _boxes(rec)
    # The key is a hash of the inputs, not the position, so reordering the file reuses completions.
    key = hashlib.sha1(json.dumps(item_fields, sort_keys=True).encode()).hexdigest()[:16]
    return VStarItem(key=key, index=index, bboxes=boxes, **item_fields)


def load_vstar(path: str | Path) -> list[VStarItem]:
    """Read and validate a V-STaR annotation file; the first bad record stops with InputError."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of V-STaR records, got {type(data).__name__}")
    items = [_item(path, i, raw) for i, raw in enumerate(data)]
    seen: dict[str, int] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{path}: record {item.index} (vid {item.vid!r}) repeats record "
                             f"{seen[item.key]}: same video and questions")
        seen[item.key] = item.index
    return items


def is_vstar_file(path: str | Path) -> bool:
    """A JSON list whose first object has V-STaR's question fields (used to pick the evaluator)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) \
        and "temporal_question" in data[0] and "spatial_question" in data[0]
