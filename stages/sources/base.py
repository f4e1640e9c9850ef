"""Source adapters: one dataset format in, canonical seed records out.

An adapter knows one annotation format and nothing else: where its entries lie in the file (its
`layout`: one per line, or the elements of a top-level JSON array or object; stages/sources/layout.py),
what a file must look like, and how each entry becomes seed records in canonical units (seconds on
the source video's own timeline, boxes `[x1, y1, x2, y2]` normalised to the source frame). The
`source` stage (stages/source.py) owns partitioning and the ledger: on the driver `num_partitions`
makes one streaming pass that keeps only where each partition starts, and on a worker `partition`
reads that partition's entries alone. A new format is one new module with one `@register_adapter`
class, whose `Config` declares the settings it reads from the `source` block (`FileSettings` for one
annotation file and a video folder).

Two kinds of bad input, two outcomes:
- the *file* is unusable (missing, not JSON, wrong top-level shape, no entries): `InputError` naming
  the file and the position, which the CLI turns into exit 2 before anything is built;
- one *entry* is malformed (missing field, wrong type, end before start, a line that is not UTF-8):
  the adapter raises `Reject` with rule `malformed_record`, naming file, entry position and field;
  the other entries are still built.

Whatever the adapter, its records then pass `Adapter.checked` (the `source` stage calls it): every
value storable (no lone surrogate, no integer beyond 64 bits), every object name citable in a trace,
and the media inside `video_dir` (`resolve_media`: `..`, absolute paths and symlinks resolved; a
path outside is the rule `media_outside_video_dir` unless `allow_outside_video_dir`). A record that
fails is one ledger row naming file, entry and field, never a failed partition.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import functools
import json
import os
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import InputError
from pipeline.registry import Registry
from pipeline.settings import Settings, setting
from pipeline.stage import Reject, Rejection, UnitContext
from stages.lib.evidence import Claim
from stages.lib.schema import record_id, to_table
from stages.sources.layout import Layout, Slice

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


@dataclass(kw_only=True)
class AdapterConfig(Settings):
    """Base of an adapter's settings, read from the `source` block beside the stage's own."""


@dataclass(kw_only=True)
class FileSettings(AdapterConfig):
    """The settings of an adapter that reads one annotation file about a folder of videos."""

    annotations: str = setting(help="the annotation file", path=True)
    video_dir: str = setting(help="the folder the entries' videos are found in (or relative to)", path=True)
    allow_outside_video_dir: bool = setting(False, "true: media paths that resolve outside video_dir (.., "
                                                   "absolute, symlinks) are used; false: each is a ledger row")


@dataclass(kw_only=True)
class TrackSettings(FileSettings):
    """The settings of a file-based adapter whose ground truth has box tracks."""

    key_frames_per_track: int = setting(3, "key frames per ground-truth track given to the annotator, spread "
                                           "evenly over it (first and last included)", ge=1)


class Adapter(ABC):
    """Base class of a source adapter.

    Subclasses set `name` (the value of `source.adapter`), optionally `aliases`, their settings
    (`Config`: `FileSettings` or a subclass for a file-based adapter), the file's `layout`, and
    implement `seed`. Where each partition starts is found once per process (`starts`) and kept,
    not the entries: a partition's entries are read from the file when it is built.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[AdapterConfig]] = FileSettings
    #: Where the entries lie in the annotation file; None for an adapter that generates its entries
    #: (synthetic), which overrides `num_partitions` and `partition` instead.
    layout: ClassVar[Layout | None] = None
    cfg: AdapterConfig

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.cfg = self.Config.from_config(self.config, f"source adapter '{self.name}'")

    # -- the annotation file ---------------------------------------------------------------
    @property
    def annotations(self) -> str:
        return str(self.config["annotations"])

    @property
    def annotations_label(self) -> str:
        """What the ledger names as the input file (the synthetic source has none)."""
        return str(self.config.get("annotations") or self.name)

    def starts(self, per_partition: int) -> tuple[Slice, ...]:
        """Where each partition of `per_partition` entries starts in the file (entry *i* is in
        partition *i* // `per_partition`). One streaming pass per process and file version, which
        also checks the file (InputError: unreadable, not the layout, no entries, `check_head`)."""
        if self.layout is None:
            raise TypeError(f"adapter '{self.name}' reads no annotation file")
        path = self.annotations
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc
        return _cached_starts(type(self), path, stat.st_mtime_ns, stat.st_size, per_partition,
                              json.dumps(self.config, sort_keys=True, default=str))

    def num_partitions(self, per_partition: int) -> int:
        """How many partitions of `per_partition` entries the file makes (the driver's `plan()`)."""
        return len(self.starts(per_partition))

    def partition(self, index: int, per_partition: int, start: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        """(position, entry) of partition `index`'s entries, read from the file where it starts:
        `start` as the driver's plan found it (a `Slice`), else from this process's own scan."""
        if start is None:
            start = self.starts(per_partition)[index]
        assert self.layout is not None  # starts() raised otherwise
        return self.layout.read(self.annotations, Slice(*start), per_partition)

    def entries(self) -> list[Any]:
        """Every entry, in file order: the whole file in memory, for tools and tests (the `source`
        stage reads one partition at a time)."""
        return [entry for _, entry in self.partition(0, sys.maxsize)]

    def check_head(self, head: Sequence[Any]) -> None:
        """File-level checks of the first entries (up to `layout.HEAD`): raise InputError where they
        show the file is not in this format (a JSON file given to a line format)."""

    def entry_label(self, entry: Any, position: int) -> str:
        """How the ledger names an entry (its video id where the format has one)."""
        return f"entry {position}"

    @abstractmethod
    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        """Seed records of one entry (RECORD_SCHEMA columns); raise Reject for a malformed entry."""

    # -- helpers shared by the file-based adapters ------------------------------------------
    def media_path(self, *stems: str) -> str:
        """The video file for an entry: the first of `stems` found under `video_dir`.

        Datasets name files by id with varying extensions and sub-folders (VidOR keeps `0000/<vid>.mp4`,
        ActivityNet ids carry a `v_` prefix some mirrors drop), so the folder is indexed once per
        process by file stem. A video not found still gets a path (`<video_dir>/<stem>.mp4`): the
        `sample` stage then puts the record in the ledger as `missing_media`, naming that path.
        """
        video_dir = str(self.config["video_dir"])
        try:
            stamp = os.stat(video_dir).st_mtime_ns
        except OSError:
            stamp = 0
        index = _video_index(video_dir, stamp)
        for stem in stems:
            key = os.path.splitext(stem)[0] if stem.lower().endswith(VIDEO_EXTENSIONS) else stem
            if key in index:
                return index[key]
        first = stems[0]
        return os.path.join(video_dir, first if first.lower().endswith(VIDEO_EXTENSIONS) else first + ".mp4")

    def reject(self, position: int, label: str, problem: str, field: str | None = None,
               rule: str = "malformed_record") -> Reject:
        """A rejection (`malformed_record` unless said otherwise) naming file, entry and field."""
        where = f"{self.annotations_label}: {label}"
        reason = f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}"
        return Reject(Rejection(id=None, rule=rule, reason=reason, value=field,
                                file=self.annotations_label, record=label))

    def checked(self, rows: list[dict[str, Any]], position: int, label: str) -> pa.Table:
        """One entry's seed records as a table, once each passes what every adapter's records must
        (the module docstring); raises Reject naming file, entry and field. The media path is kept
        normalised (`a/../b.mp4` becomes `b.mp4`), so what `sample` opens is what was checked."""
        for row in rows:
            problem = unstorable(row)
            if problem is not None:
                raise self.reject(position, label, problem[1], problem[0])
            media = row.get("media") or {}
            if media.get("uri") and self.config.get("video_dir"):
                row["media"] = {**media, "uri": self._confined(str(media["uri"]), position, label)}
        try:
            return to_table(rows)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
            raise self.reject(position, label, f"cannot be stored: {type(exc).__name__}: {exc}") from None

    def _confined(self, uri: str, position: int, label: str) -> str:
        video_dir = str(self.config["video_dir"])
        kept, outside = resolve_media(uri, video_dir)
        if outside is not None and not self.config.get("allow_outside_video_dir"):
            raise self.reject(position, label, f"{uri} resolves to {outside}, outside source.video_dir {video_dir} "
                              "(source.allow_outside_video_dir=true admits it)", "media.uri", "media_outside_video_dir")
        if "://" not in kept and os.path.isdir(kept):
            raise self.reject(position, label, f"{kept} is a directory, not a video file", "media.uri", "missing_media")
        return kept

    def validate(self, model: type[BaseModel], entry: Any, position: int, label: str) -> Any:
        """Validate one entry with a pydantic model; the first error becomes a named rejection."""
        try:
            return model.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or None
            raise self.reject(position, label, first["msg"], field) from None


class Entry(BaseModel):
    """Base of the pydantic models that describe one annotation entry: extra keys are allowed."""

    model_config = ConfigDict(extra="allow", frozen=True)


def _has_boxes(columns: Mapping[str, Any]) -> bool:
    key_frames = columns.get("key_frames") or []
    objects = (columns.get("ground_truth") or {}).get("objects") or []
    return any(o.get("box") for kf in key_frames for o in kf.get("objects") or []) or \
        any(p.get("box") for o in objects for p in o.get("track") or [])


def _has_span(columns: Mapping[str, Any]) -> bool:
    return bool(columns.get("answer_span")) or bool((columns.get("ground_truth") or {}).get("spans"))


def supported_task(task: str, columns: Mapping[str, Any]) -> str:
    """The task a record's ground truth can support: a spatio-temporal record without a single box
    is a temporal-grounding record when it has a span (VidSTG without trajectory files), and a
    general question otherwise; a spatial record without boxes is a general question. Without this a
    record would be annotated for evidence nobody can check, and rejected by every box rule."""
    if task in ("spatio_temporal", "spatial") and not _has_boxes(columns):
        return "temporal" if task == "spatio_temporal" and _has_span(columns) else "general_free"
    return task


def make_record(*, source: str, source_id: str, task: str, variant: str | int = 0, **columns: Any) -> dict[str, Any]:
    """A seed record with its stable id; columns not given stay null. The task is the one its ground
    truth supports (`supported_task`), so every adapter follows the same rule."""
    task = supported_task(task, columns)
    return {"id": record_id(source, source_id, task, variant), "source": source, "source_id": source_id,
            "task": task, **columns}


def media(uri: str, *, fps: float | None = None, num_frames: int | None = None, duration_s: float | None = None,
          width: int | None = None, height: int | None = None, kind: str = "video") -> dict[str, Any]:
    """The `media` struct as the annotation declares it; `sample` replaces it with what it probes."""
    return {"uri": uri, "kind": kind, "fps": fps, "num_frames": num_frames, "duration_s": duration_s,
            "width": width, "height": height}


def read_json(path: str) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text at byte {exc.start}") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc


# -- what every seed record must satisfy -------------------------------------------------------
INT64_RANGE = (-(2**63), 2**63 - 1)


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first field of a seed record (dotted path) that cannot be stored or cited, and why.

    Parquet holds UTF-8 and 64-bit integers: a lone surrogate (`"\\ud800"` is valid JSON) or a number
    like 10^30 would fail the whole partition's write. An object name (a `name` in an `objects`
    list) must be one a trace can cite (`stages.lib.evidence.Claim`: non-empty, no `<` or `>`),
    else annotating the record fails.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, f"text holds {value[exc.start]!r} at position {exc.start}, a lone surrogate (not valid Unicode)"
    elif isinstance(value, bool) or value is None:
        return None
    elif isinstance(value, int):
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            return path, f"{value} does not fit a 64-bit integer"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            problem = unstorable(item, f"{path}.{key}" if path else str(key))
            if problem is not None:
                return problem
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            where = f"{path}.{index}"
            if path.rsplit(".", 1)[-1] == "objects" and isinstance(item, Mapping) and "name" in item:
                try:
                    Claim(item["name"])
                except ValueError as exc:
                    return f"{where}.name", str(exc)
            problem = unstorable(item, where)
            if problem is not None:
                return problem
    return None


def resolve_media(uri: str, video_dir: str) -> tuple[str, str | None]:
    """(`uri` normalised, where it resolves when that is outside `video_dir`, else None).

    A local path is joined to `video_dir` when relative and judged by its real path: `..`, an
    absolute path and a symlink all count where they lead. A remote `video_dir` (`s3://bucket/videos`)
    contains the URIs below it once `..` is resolved; a remote URI is outside a local `video_dir`.
    """
    if "://" in video_dir and not video_dir.startswith("file://"):
        scheme, rest = video_dir.rstrip("/").split("://", 1)
        target = uri if "://" in uri else f"{scheme}://{rest}/{uri}"
        t_scheme, t_rest = target.split("://", 1)
        t_host, _, t_path = t_rest.partition("/")
        kept = f"{t_scheme}://{t_host}{posixpath.normpath('/' + t_path)}"
        root = f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
        return kept, None if kept == root or kept.startswith(root + "/") else kept
    root = os.path.realpath(video_dir.removeprefix("file://"))
    if "://" in uri and not uri.startswith("file://"):
        return uri, uri
    kept = os.path.normpath(os.path.join(video_dir.removeprefix("file://"), uri.removeprefix("file://")))
    real = os.path.realpath(kept)
    return kept, None if os.path.commonpath([root, real]) == root else real


# -- registry ---------------------------------------------------------------------------------
#: Every adapter by name (`source.adapter=<name>`, and its aliases); reading it imports the modules
#: of this package, so that every adapter registers itself.
ADAPTERS: Registry[type[Adapter]] = Registry("adapter", package="stages.sources", schema="adapter")
register_adapter = ADAPTERS.register


def get_adapter(name: str, key: str = "source.adapter") -> type[Adapter]:
    """The adapter `name`; UnknownName naming `key` when there is none."""
    return ADAPTERS.lookup(name, key)


def adapter_names() -> list[str]:
    return sorted(ADAPTERS)


# -- per-process caches -------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _cached_starts(cls: type[Adapter], path: str, stamp: int, size: int, per_partition: int,
                   config_json: str) -> tuple[Slice, ...]:
    assert cls.layout is not None
    scan = cls.layout.scan(path, per_partition)
    if not scan.count:
        raise InputError(f"{path}: the annotation file holds no entries")
    cls(json.loads(config_json)).check_head(scan.head)
    return scan.starts


@functools.lru_cache(maxsize=8)
def _video_index(video_dir: str, stamp: int) -> dict[str, str]:
    index: dict[str, str] = {}
    for path in sorted(_walk_videos(Path(video_dir))):
        index.setdefault(path.stem, str(path))
    return index


def _walk_videos(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            if filename.lower().endswith(VIDEO_EXTENSIONS):
                yield Path(dirpath) / filename
