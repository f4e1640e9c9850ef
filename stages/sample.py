"""The `sample` stage: probe each video with decord, choose the clip and its frames, keep their true times.

For every seed record:
1. probe the video (decord): frame count, each frame's presentation time from
   `get_frame_timestamp` (trusted over index / fps, so variable frame rate is right), size;
2. check the ground truth against it: every time inside the video, every box inside the frame with
   positive area; what fails goes to the ledger with every failed rule, naming file and record;
3. choose the clip: the whole video (or the adapter's `clip` bound) up to `clip_max_s`; a longer
   video gets a window of `clip_max_s` that holds the evidence plus `clip_padding_s`, placed at an
   offset drawn from the record id (so the evidence is not always at the same place in the clip);
4. choose frames: the frames nearest the ground-truth key times, then uniform frames at `fps` over
   the clip, `max_frames` in all; record each frame's index and timestamp, and optionally its JPEG.

Records that share a video (a partition usually holds several tasks per video) are probed and
decoded together: one reader, one sorted `get_batch` per chunk of the union of their frames, one
JPEG per frame.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import setting
from pipeline.stage import Reject, Rejection, Stage, StageConfig, StageResult, UnitContext, iter_records, record_error
from stages.lib.geometry import has_positive_area, is_inside
from stages.lib.media import DecodeError, Probe, decode, encode_jpeg, open_video, probe_video
from stages.lib.schema import frame_image, light_frames, to_table


@register_stage
class SampleStage(Stage):
    """Probe, validate ground truth, choose clip and frames (decord), optionally embed JPEGs."""

    name = "sample"
    version = "1"
    stores = ("frames",)  # the JPEGs are written here once; later stages commit `light_frames`

    @dataclass(kw_only=True)
    class Config(StageConfig):
        fps: float = setting(2.0, "uniform frames per second over the clip", gt=0)
        max_frames: int = setting(32, "cap on frames per record, key frames included", ge=1)
        min_frames: int = setting(4, "at least this many uniform frames, however short the clip", ge=1)
        clip_max_s: float = setting(120.0, "a longer video (or adapter bound) gets a window of this length around "
                                           "the evidence", gt=0)
        clip_padding_s: float = setting(2.0, "seconds kept on each side of the evidence when the window is narrowed",
                                        ge=0)
        embed_jpeg: bool = setting(True, "store each chosen frame as JPEG bytes, so shards are self-contained")
        jpeg_quality: int = setting(90, "JPEG quality of an embedded frame", ge=1, le=100)
        jpeg_max_side: int = setting(
            448, "longest side of an embedded JPEG (boxes are normalised, so unaffected). The annotators send "
            "frames at most their image_max_side (448) long, so frames embedded at that size are sent as they "
            "are; 448 px also covers the reference's video frame budget (128 * 28 * 28 pixels per frame)", ge=16)
        decode_threads: int = setting(1, "decord threads per task; parallelism comes from Ray tasks", ge=1)
        box_tolerance: float = setting(0.01, "a box may exceed the frame by this much (normalised) before it is "
                                             "rejected", ge=0)
        duration_tolerance_s: float = setting(1.0, "a video shorter than its declared duration by more than this is "
                                                   "truncated", ge=0)

        def check(self) -> list[str]:
            if self.min_frames > self.max_frames:
                return [f"min_frames: must be <= max_frames ({self.max_frames}), got {self.min_frames}"]
            return []

    cfg: Config

    @classmethod
    def lighten(cls, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """Frames keep their times and indices downstream (align and the rules read them), not their JPEGs."""
        return light_frames(column) if name == "frames" else super().lighten(name, column)

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        for record in iter_records(table):
            groups.setdefault((record.get("media") or {}).get("uri") or "", []).append(record)
        rows: list[dict[str, Any]] = []
        rejections: list[Rejection] = []
        for uri, records in groups.items():
            out, rejected = self._sample_video(uri, records)
            rows.extend(out)
            rejections.extend(rejected)
        return StageResult(to_table(rows), rejections)

    # -- one video, all its records ------------------------------------------------------------
    def _sample_video(self, uri: str, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Rejection]]:
        rejections: list[Rejection] = []
        pending = records  # the records not yet ledgered, which a failure of the video costs
        try:
            with _local_copy(uri) as path:
                probe, reader = _open(uri, path, self.cfg.decode_threads)
                plans: list[tuple[dict[str, Any], tuple[float, float], np.ndarray]] = []
                for record in records:
                    try:
                        self._check_ground_truth(record, probe)
                        clip, indices = self._choose(record, probe)
                    except Reject as rej:
                        rejections.extend(rej.rejections)
                        continue
                    except Exception as exc:  # noqa: BLE001 - a bug on one record must not sink the others
                        rejections.append(record_error(record, exc))
                        continue
                    plans.append((record, clip, indices))
                pending = [plan[0] for plan in plans]
                if not plans:
                    return [], rejections
                jpegs = self._decode(reader, probe, np.unique(np.concatenate([p[2] for p in plans])))
        except Reject as rej:
            return [], rejections + [_for_record(r, rej.rejections[0]) for r in pending]
        except Exception as exc:  # noqa: BLE001 - whatever one video does, only its own records pay
            cause = f"{type(exc).__name__}: {_first_line(exc)}"
            failure = Rejection(None, "exception", f"{uri}: {cause}", error=cause, file=uri)
            return [], rejections + [_for_record(r, failure) for r in pending]
        rows = []
        for record, (start, end), indices in plans:
            frames = [{"t_s": round(float(probe.starts[i]), 6), "index": int(i), "image": frame_image(jpegs.get(int(i)))}
                      for i in indices.tolist()]
            rows.append({**record, "media": probe.media(), "clip_window": {"start_s": start, "end_s": end}, "frames": frames})
        return rows, rejections

    def _check_ground_truth(self, record: dict[str, Any], probe: Probe) -> None:
        """Every time inside the video and every box inside the frame; all failures, not only the first."""
        uri, rid, label = probe.uri, record.get("id"), record.get("source_id") or record.get("id")
        frame_s = 1.0 / probe.fps if probe.fps > 0 else 0.0
        tol_t = frame_s + 1e-6
        tol_box = float(self.cfg.box_tolerance)
        times: list[tuple[str, float]] = []
        boxes: list[tuple[str, float, list[float]]] = []
        span = record.get("answer_span")
        if span:
            times += [("answer_span[0]", span[0]), ("answer_span[1]", span[1])]
        for kf in record.get("key_frames") or []:
            times.append(("key_frames.t_s", kf["t_s"]))
            boxes += [(f"key_frames[{kf['t_s']}].{o['name']}", kf["t_s"], o["box"]) for o in kf.get("objects") or []]
        gt = record.get("ground_truth") or {}
        for obj in gt.get("objects") or []:
            for point in obj.get("track") or []:
                times.append((f"ground_truth.objects.{obj['name']}.track.t_s", point["t_s"]))
                boxes.append((f"ground_truth.objects.{obj['name']}.track", point["t_s"], point["box"]))
        for gspan in gt.get("spans") or []:
            times += [(f"ground_truth.spans.{gspan['label']}", gspan["start_s"]), (f"ground_truth.spans.{gspan['label']}", gspan["end_s"])]
        problems: list[Rejection] = []
        if span and span[1] < span[0]:
            problems.append(Rejection(rid, "invalid_span", f"{uri}: record {label}: answer_span {list(span)} ends before it starts",
                                      value=list(span), file=uri, record=label))
        outside = [(field, t) for field, t in times if t is None or not (-tol_t <= t <= probe.duration_s + tol_t)]
        if outside:
            field, t = outside[0]
            problems.append(Rejection(
                rid, "gt_time_outside_video",
                f"{uri}: record {label}: {len(outside)} ground-truth time(s) outside the video [0, {probe.duration_s:.3f}] s, "
                f"first {field} = {t}", value=t, threshold=[0.0, probe.duration_s], file=uri, record=label))
        if boxes:
            array = np.array([b for _, _, b in boxes], dtype=np.float64)
            inside = is_inside(array, tol=tol_box)
            positive = has_positive_area(array)
            for rule, mask, what in (("box_outside_frame", ~inside, "outside the frame [0, 1]"),
                                     ("degenerate_box", inside & ~positive, "with no area (x2 <= x1 or y2 <= y1)")):
                bad = np.flatnonzero(mask)
                if bad.size:
                    field, t, box = boxes[int(bad[0])]
                    problems.append(Rejection(
                        rid, rule, f"{uri}: record {label}: {bad.size} box(es) {what}, first {field} at {t} s = {box}",
                        value=box, threshold=tol_box if rule == "box_outside_frame" else None, file=uri, record=label))
        declared = record.get("media") or {}
        tolerance = float(self.cfg.duration_tolerance_s)
        if declared.get("duration_s") and declared["duration_s"] > probe.duration_s + tolerance:
            problems.append(Rejection(
                rid, "truncated_media", f"{uri}: record {label}: the video lasts {probe.duration_s:.3f} s but the "
                f"annotation declares {declared['duration_s']:.3f} s", value=probe.duration_s,
                threshold=declared["duration_s"], file=uri, record=label))
        if problems:
            raise Reject(problems)

    def _choose(self, record: dict[str, Any], probe: Probe) -> tuple[tuple[float, float], np.ndarray]:
        """The clip window and the sorted frame indices: key frames first, then uniform at `fps`."""
        duration = probe.duration_s
        bound = record.get("clip_window") or {}
        lo = max(0.0, float(bound.get("start_s") or 0.0))
        hi = min(duration, float(bound["end_s"])) if bound.get("end_s") is not None else duration
        key_times = np.array([kf["t_s"] for kf in record.get("key_frames") or []], dtype=np.float64)
        span = record.get("answer_span")
        evidence = np.concatenate([key_times, np.asarray(span or [], dtype=np.float64)])
        if evidence.size:  # the adapter's bound never hides the ground truth
            lo, hi = min(lo, float(evidence.min())), max(hi, float(evidence.max()))
        start, end = self._window(record, lo, hi, evidence)
        max_frames = self.cfg.max_frames
        keys = np.unique(probe.nearest(key_times)) if key_times.size else np.zeros(0, dtype=np.int64)
        if keys.size > max_frames:
            keys = keys[np.linspace(0, keys.size - 1, max_frames).round().astype(np.int64)]
        wanted = max(self.cfg.min_frames, math.ceil((end - start) * float(self.cfg.fps)))
        count = max(0, min(wanted, max_frames - keys.size))
        first = min(int(np.searchsorted(probe.starts, start - 1e-6)), probe.num_frames - 1)
        last = max(first, int(np.searchsorted(probe.starts, end, side="right")) - 1)
        uniform = np.clip(probe.nearest(start + np.arange(count) * (end - start) / max(count, 1)), first, last)
        indices = np.unique(np.concatenate([keys, uniform]))
        if indices.size > max_frames:  # uniform frames that collided with key frames left room; drop extras evenly
            extra = np.setdiff1d(indices, keys)
            keep = extra[np.linspace(0, extra.size - 1, max_frames - keys.size).round().astype(np.int64)] if max_frames > keys.size else extra[:0]
            indices = np.unique(np.concatenate([keys, keep]))
        return (round(start, 6), round(end, 6)), indices

    def _window(self, record: dict[str, Any], lo: float, hi: float, evidence: np.ndarray) -> tuple[float, float]:
        clip_max = float(self.cfg.clip_max_s)
        if hi - lo <= clip_max:
            return lo, hi
        pad = float(self.cfg.clip_padding_s)
        if not evidence.size:  # nothing to centre on: a window from the start of the bound
            return lo, lo + clip_max
        need_lo, need_hi = max(lo, float(evidence.min()) - pad), min(hi, float(evidence.max()) + pad)
        if need_hi - need_lo >= clip_max:
            return need_lo, need_hi
        first, last = max(lo, need_hi - clip_max), min(need_lo, hi - clip_max)
        draw = int(hashlib.sha1(str(record.get("id")).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        start = first + draw * (last - first)
        return start, start + clip_max

    def _decode(self, reader: Any, probe: Probe, indices: np.ndarray) -> dict[int, bytes | None]:
        """Decode the frames (sorted, in chunks) and JPEG-encode them if configured."""
        embed, side, quality = self.cfg.embed_jpeg, self.cfg.jpeg_max_side, self.cfg.jpeg_quality
        out: dict[int, bytes | None] = {}
        try:
            for index, frame in decode(reader, indices.tolist()):
                out[index] = encode_jpeg(frame, side, quality) if embed else None
        except DecodeError as exc:
            cause = _first_line(exc.__cause__ or exc)
            raise Reject(Rejection(None, "truncated_media", f"{probe.uri}: frames {exc.first}..{exc.last} do not "
                                   f"decode: {cause}", error=cause, file=probe.uri)) from None
        return out


def _open(uri: str, path: str, threads: int) -> tuple[Probe, Any]:
    """Open and probe a video; every way it can fail becomes one named rejection for its records."""
    if not uri:
        raise Reject(Rejection(None, "missing_media", "the record names no media file (media.uri is empty)"))
    if not os.path.exists(path):
        raise Reject(Rejection(None, "missing_media", f"{uri}: no such file", file=uri))
    if os.path.isdir(path):
        raise Reject(Rejection(None, "missing_media", f"{uri}: a directory, not a video file", file=uri))
    if os.path.getsize(path) == 0:
        raise Reject(Rejection(None, "empty_media", f"{uri}: the file is empty (0 bytes)", file=uri))
    try:
        reader = open_video(path, threads)
        return probe_video(reader, uri), reader
    except Exception as exc:  # noqa: BLE001 - decord's errors are RuntimeError/DECORDError with the decoder's text
        raise Reject(_diagnose(uri, path, exc)) from None


def _diagnose(uri: str, path: str, exc: BaseException) -> Rejection:
    """Tell a truncated video (a container that still parses) from a file that is not a video at all."""
    import av

    message = _first_line(exc)
    try:
        with av.open(path) as container:
            streams = container.streams.video
            declared = streams[0].frames if streams else 0
    except Exception as probe_exc:  # noqa: BLE001 - any failure here means "not a readable container"
        container_name = _container_signature(path)
        if container_name:
            return Rejection(None, "truncated_media", f"{uri}: starts like {container_name} but its index or data is "
                             f"incomplete, the file is probably truncated ({_first_line(probe_exc)}; decord: {message})",
                             error=message, file=uri)
        return Rejection(None, "unreadable_media", f"{uri}: not a readable video ({_first_line(probe_exc)}; decord: {message})",
                         error=message, file=uri)
    if not declared:
        return Rejection(None, "unreadable_media", f"{uri}: the container holds no video stream (decord: {message})",
                         error=message, file=uri)
    return Rejection(None, "truncated_media", f"{uri}: the container declares {declared} frames but its data does not "
                     f"decode, the file is probably truncated (decord: {message})", error=message, file=uri)


def _container_signature(path: str) -> str | None:
    """The container a file's first bytes announce (ISO BMFF `ftyp`, Matroska/WebM EBML, AVI RIFF), if any."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head[4:8] == b"ftyp":
        return "an MP4/MOV file"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "a Matroska/WebM file"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "an AVI file"
    return None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("File ", "Stack trace", "[bt]"))]
    return (useful or lines or [type(exc).__name__])[0][:300]


def _for_record(record: dict[str, Any], rejection: Rejection) -> Rejection:
    label = record.get("source_id") or record.get("id")
    return Rejection(record.get("id"), rejection.rule, f"record {label}: {rejection.reason}", value=rejection.value,
                     threshold=rejection.threshold, error=rejection.error, file=rejection.file, record=label)


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    """A local path for `uri`: itself for a plain path, a temporary copy for `scheme://` URIs (decord needs a file)."""
    if "://" not in uri or uri.startswith("file://"):
        yield uri.removeprefix("file://")
        return
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
    except Exception as exc:  # noqa: BLE001 - an unknown scheme or unreachable store is a per-record problem
        raise Reject(Rejection(None, "unreadable_media", f"{uri}: cannot open ({_first_line(exc)})", file=uri)) from None
    if info.type != pafs.FileType.File:
        raise Reject(Rejection(None, "missing_media", f"{uri}: no such file", file=uri))
    with tempfile.TemporaryDirectory(prefix="stgr-sample-") as tmp:
        local = os.path.join(tmp, os.path.basename(path) or "video")
        with filesystem.open_input_stream(path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        yield local
