"""Frames: the one place the project opens a video, decodes frames, encodes JPEGs and cuts out boxes.

Every reader of pixels goes through here: `sample` probes each video and decodes the frames it
keeps, `annotate` and `verify` show them to a model, `stgr export/show` write them, training renders
them and evaluation decodes benchmark videos. One decoder (decord, CPU, frame indices) means a model
sees the same pixels at annotation, training and evaluation, whether a shard embeds its JPEGs or only
records frame indices.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import InputError
from stages.lib.chat import LabelledImage, frame_label
from stages.lib.schema import frame_jpeg

#: Frames decoded per `get_batch` call: bounds memory on large videos.
DECODE_CHUNK = 32


class DecodeError(RuntimeError):
    """Frames `first`..`last` of a video do not decode; the decoder's own error is the `__cause__`."""

    def __init__(self, first: int, last: int, cause: BaseException) -> None:
        super().__init__(f"frames {first}..{last} do not decode: {cause}")
        self.first, self.last = first, last


def open_video(uri: str, threads: int = 1, base_dir: Path | None = None) -> Any:
    """A decord reader of the video at `uri`: a path (`file://` or not; a relative one is taken against
    `base_dir` when given) or any pyarrow filesystem URI (`s3://...`, read into memory)."""
    import decord

    path = uri.removeprefix("file://")
    source: Any
    if "://" in path:
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_file(inner) as handle:
            source = io.BytesIO(handle.read())
    else:
        source = str(base_dir / path) if base_dir is not None and not Path(path).is_absolute() else path
    return decord.VideoReader(source, ctx=decord.cpu(0), num_threads=threads)


def decode(reader: Any, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB array (H, W, 3)) of each frame at `indices`, in their order, `DECODE_CHUNK` at a
    time (sorted indices decode fastest). A chunk that does not decode raises DecodeError naming it."""
    indices = [int(i) for i in indices]
    for offset in range(0, len(indices), DECODE_CHUNK):
        chunk = indices[offset:offset + DECODE_CHUNK]
        try:
            batch = reader.get_batch(chunk).asnumpy()
        except Exception as exc:  # noqa: BLE001 - decord raises DECORDError/RuntimeError with the decoder's text
            raise DecodeError(chunk[0], chunk[-1], exc) from exc
        yield from zip(chunk, batch)


@dataclass(frozen=True)
class Probe:
    """What decord says about a video: per-frame start times and the stream's size and rate."""

    uri: str
    starts: np.ndarray  # (N,) float64 seconds, presentation time of each frame
    duration_s: float
    fps: float
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return int(self.starts.shape[0])

    def media(self) -> dict[str, Any]:
        """The record's `media` struct."""
        return {"uri": self.uri, "kind": "video", "fps": self.fps, "num_frames": self.num_frames,
                "duration_s": self.duration_s, "width": self.width, "height": self.height}

    def nearest(self, times: np.ndarray) -> np.ndarray:
        """Index of the frame whose start time is nearest each time."""
        right = np.clip(np.searchsorted(self.starts, times), 1, self.num_frames - 1) if self.num_frames > 1 else None
        if right is None:
            return np.zeros(len(times), dtype=np.int64)
        left = right - 1
        pick_left = np.abs(times - self.starts[left]) <= np.abs(self.starts[right] - times)
        return np.where(pick_left, left, right).astype(np.int64)


def probe_video(reader: Any, uri: str) -> Probe:
    """Each frame's presentation time from `get_frame_timestamp` (trusted over index / fps, so a
    variable frame rate is right), the size and the average rate; raises on a stream without frames."""
    count = len(reader)
    if count == 0:
        raise RuntimeError("the video stream has no frames")
    stamps = np.asarray(reader.get_frame_timestamp(np.arange(count)), dtype=np.float64)
    height, width = reader[0].shape[:2]
    reader.seek(0)
    return Probe(uri=uri, starts=np.round(stamps[:, 0], 6), duration_s=float(np.round(stamps[-1, 1], 6)),
                 fps=float(reader.get_avg_fps()), width=int(width), height=int(height))


# --- JPEG ------------------------------------------------------------------------------------------


def jpeg_bytes(image: Any, quality: int = 95) -> bytes:
    """A PIL image as JPEG bytes (what `LabelledImage` carries)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, max_side: int | None = None, quality: int = 90) -> bytes:
    """A decoded frame as JPEG, shrunk (aspect kept, bicubic) so its longer side is at most `max_side`."""
    from PIL import Image

    image = Image.fromarray(array)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return jpeg_bytes(image, quality)


def fit_jpeg(jpeg: bytes, max_side: int | None, quality: int = 90) -> bytes:
    """`jpeg` itself when its longer side is within `max_side` (or there is no bound), else shrunk."""
    if not max_side:
        return jpeg
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        if max(image.size) <= max_side:
            return jpeg
        return encode_jpeg(np.asarray(image.convert("RGB")), max_side, quality)


def video_jpegs(path: str | Path, indices: Sequence[int], quality: int = 95) -> list[bytes]:
    """JPEG bytes of the frames at `indices` of a video file (clamped to the file's real length: a
    benchmark's declared frame count may overshoot by a frame)."""
    reader = open_video(str(path))
    last = len(reader) - 1
    return [encode_jpeg(array, quality=quality) for _, array in decode(reader, [min(int(i), last) for i in indices])]


def crop(jpeg: bytes, box: Sequence[float], padding: float, min_side: int, quality: int = 90) -> bytes:
    """The box (canonical normalised xyxy) cut from the frame, grown by `padding` of its size on each
    side (a little context helps a VLM name what it sees), at least `min_side` pixels a side."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        image = image.convert("RGB")
        w, h = image.size
        x1, y1, x2, y2 = (float(v) for v in box)
        pad_x, pad_y = padding * (x2 - x1), padding * (y2 - y1)
        left, right = np.clip([x1 - pad_x, x2 + pad_x], 0.0, 1.0) * w
        top, bottom = np.clip([y1 - pad_y, y2 + pad_y], 0.0, 1.0) * h
        region = image.crop((int(left), int(top), max(int(right), int(left) + 1), max(int(bottom), int(top) + 1)))
        if min(region.size) < min_side:
            scale = min_side / min(region.size)
            region = region.resize((max(1, round(region.width * scale)), max(1, round(region.height * scale))))
        return jpeg_bytes(region, quality)


# --- a record's frames -----------------------------------------------------------------------------


def time_order(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A record's frames in time order (ties by frame index): the order a model is shown them."""
    return sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))


def _where(record: Mapping[str, Any]) -> str:
    """How an error names a record: its shard (`_file`) when known, and its id."""
    return f"{record['_file']}: record {record.get('id')!r}" if record.get("_file") else f"record {record.get('id')}"


def require_frames(record: Mapping[str, Any], frames: Sequence[Mapping[str, Any]] | None = None) -> None:
    """InputError naming the record when it has no frames (`frames`, else the record's own): what a
    reader that needs no pixels (the template annotator) still checks, without decoding any."""
    if not (record.get("frames") if frames is None else frames):
        raise InputError(f"{_where(record)}: field 'frames' is empty; the sample stage must choose frames first")


class FrameReader:
    """The pixels of a record's frames: the embedded `frames[].image` JPEG, or decoded from `media.uri` at
    the frames' indices.

    The `sample` stage may embed JPEGs (self-contained shards) or only record indices; either way
    the model sees the same pixels. Decoders are kept for the last few videos because a partition
    holds several records (tasks) of the same video in a row.
    """

    def __init__(self, max_side: int | None = None, quality: int = 90, keep_open: int = 2) -> None:
        self.max_side = max_side
        self.quality = quality
        self.keep_open = keep_open
        self._readers: OrderedDict[str, Any] = OrderedDict()

    def _reader(self, uri: str, base_dir: Path | None) -> Any:
        key = f"{base_dir}\x1f{uri}"
        if key in self._readers:
            self._readers.move_to_end(key)
            return self._readers[key]
        reader = open_video(uri, base_dir=base_dir)
        self._readers[key] = reader
        while len(self._readers) > self.keep_open:
            self._readers.popitem(last=False)
        return reader

    def pixels(self, record: Mapping[str, Any], frames: Sequence[Mapping[str, Any]],
               base_dir: Path | None = None) -> list[bytes | np.ndarray]:
        """Per frame of `frames` (frames of `record`): its embedded JPEG bytes, else its decoded RGB array.
        InputError naming the record (and its shard, `_file`, when known) when a frame cannot be read."""
        require_frames(record, frames)
        where = _where(record)
        out: list[bytes | np.ndarray | None] = [frame_jpeg(f) for f in frames]
        todo = [i for i, value in enumerate(out) if value is None]
        if todo:
            uri = (record.get("media") or {}).get("uri")
            if not uri:
                raise InputError(f"{where}: frames carry no 'image' and field 'media.uri' is empty")
            indices = [frames[i].get("index") for i in todo]
            if any(index is None for index in indices):
                raise InputError(f"{where}: a frame has neither 'image' nor 'index'")
            try:
                reader = self._reader(uri, base_dir)
                if max(indices) >= len(reader):
                    raise InputError(f"{where}: frame index {max(indices)} is beyond the {len(reader)} frames of {uri}")
                for i, (_, array) in zip(todo, decode(reader, indices)):
                    out[i] = array
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - decord's own error types: name the record and the file
                raise InputError(f"{where}: cannot decode field 'media.uri' {uri}: {exc}") from exc
        return out  # type: ignore[return-value]

    def images(self, record: Mapping[str, Any]) -> list[LabelledImage]:
        """The record's frames in time order as JPEG, each labelled `Frame k at t s:` (k from 1). An
        embedded JPEG within `max_side` is passed on as it is (only its header is read); `sample`
        embeds frames at the annotators' default size, so by default none is re-encoded."""
        frames = time_order(record)
        jpegs = [fit_jpeg(p, self.max_side, self.quality) if isinstance(p, bytes) else encode_jpeg(p, self.max_side, self.quality)
                 for p in self.pixels(record, frames)]
        return [LabelledImage(jpeg=j, label=frame_label(k, f["t_s"])) for k, (f, j) in enumerate(zip(frames, jpegs), 1)]

    def pil_images(self, record: Mapping[str, Any], positions: Sequence[int], base_dir: Path | None = None) -> list[Any]:
        """PIL images (RGB) of `record["frames"][p]` for each position: an embedded JPEG opened as it
        is, a decoded frame without a JPEG round trip (what a trainer's processor resizes itself)."""
        from PIL import Image

        frames = [record["frames"][p] for p in positions]
        return [Image.open(io.BytesIO(p)).convert("RGB") if isinstance(p, bytes) else Image.fromarray(p)
                for p in self.pixels(record, frames, base_dir)]
