"""Multiple-choice video benchmarks read into one item type: Video-MME, WorldSense, VideoMMMU and a
generic JSONL / JSON / Parquet format whose field names are given in the config.

Published layouts read as they are (docs/evaluation.md, "General video benchmarks"):

- **Video-MME**: `videomme/test-00000-of-00001.parquet` with columns `video_id, duration, domain,
  sub_category, url, videoID, question_id, task_type, question, options, answer`; `options` are
  "A. …" strings, `answer` a letter. Videos default to `<root>/data/<videoID>.mp4` (where the
  released script looks), any `data.video_dir` wins.
- **WorldSense**: `worldsense_qa.json` of its dataset card (one object per video, holding
  `duration, domain, sub_category, audio_class` and `task1`, `task2`, … each with `question,
  candidates, answer, task_domain, task_type`), or `WorldSense.tsv` as the released script reads it
  (one row per question, lists written as Python literals). Videos: `<root>/videos/<video>.mp4`.
- **VideoMMMU**: `<root>/{Perception,Comprehension,Adaptation}/test-00000-of-00001.parquet` with
  `id, question, options, answer, question_type` (Adaptation also `image`); videos `<id>.mp4` below
  `<root>` (the release keeps them in one folder per discipline). Only `question_type ==
  "multiple-choice"` questions are scored; the others are listed as skipped.

A record that cannot be read (no question, an answer that is not one of its options, …) becomes a
ledger row naming file, record and field, and the rest are evaluated; a file that cannot be read
at all, or lacks a column every record needs, is an InputError.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.errors import InputError
from stages.lib import evidence

FORMATS = ("videomme", "worldsense", "videommmu", "mcq")
TITLES = {"videomme": "Video-MME", "worldsense": "WorldSense", "videommmu": "VideoMMMU", "mcq": "Multiple-choice"}
TRACKS = ("Perception", "Comprehension", "Adaptation")
VIDEOMME_COLUMNS = frozenset({"videoID", "question_id", "duration", "domain", "sub_category", "task_type",
                              "question", "options", "answer"})
VIDEOMMMU_COLUMNS = frozenset({"id", "question", "options", "answer", "question_type"})
WORLDSENSE_TSV_COLUMNS = frozenset({"video", "question", "candidates", "answer"})
#: VideoMMMU's six disciplines and their subjects (a question's subject is the middle of its id,
#: `validation_<Subject>_<n>`), as the benchmark groups them.
VIDEOMMMU_DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
#: Values of a breakdown shown in this order (the benchmarks' own); other values follow, sorted.
VALUE_ORDER = ("short", "medium", "long", "<1min", "1-2min", "2-4min", "4-6min", "6-8min", ">8min", *TRACKS)
NONE = "(none)"


@dataclass(frozen=True)
class McqItem:
    """One question. `key` is the completion store's sample key (question id plus a hash of what the
    model is shown, so an edited question never reuses an old answer); `groups` maps each breakdown
    to the item's values (a list where the benchmark gives several, e.g. WorldSense's audio classes)."""

    key: str
    qid: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    groups: Mapping[str, tuple[str, ...]]
    hint: str = ""
    image: bytes | None = field(default=None, repr=False)

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(chr(ord("A") + i) for i in range(len(self.options)))


@dataclass
class McqSet:
    """What a benchmark file holds: its items, the ledger of records left out, the breakdowns in
    report order, and where its layout keeps the videos (None: `data.video_dir` must say)."""

    benchmark: str
    items: list[McqItem]
    skipped: list[dict[str, Any]]
    breakdowns: tuple[str, ...]
    video_dir: Path | None


@dataclass(frozen=True)
class Layout:
    """Which source field holds each part of a question (`qid`, `video`, `question`, `options`,
    `answer`; `qid` may be absent: the record's position is used) and which fields are breakdowns."""

    benchmark: str
    fields: Mapping[str, str]
    groups: tuple[str, ...]


class BadRecord(Exception):
    def __init__(self, field_: str, why: str) -> None:
        super().__init__(f"field '{field_}': {why}")
        self.field, self.why = field_, why


# --- format detection --------------------------------------------------------------------------------


def _parquets(folder: Path) -> list[Path]:
    """The Parquet files of a folder, or of its subfolders (the Hub's converted `<name>/test/0000.parquet`)."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.parquet")) or sorted(folder.glob("*/*.parquet"))


def _parquet_format(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        columns = set(pq.read_schema(path).names)
    except Exception:  # pyarrow raises several types for files that are not Parquet
        return None
    if VIDEOMME_COLUMNS <= columns:
        return "videomme"
    if VIDEOMMMU_COLUMNS <= columns:
        return "videommmu"
    return None


def _tsv_header(path: Path) -> set[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return set(next(csv.reader(f, delimiter="\t"), []))


def _is_task(name: str, value: Any) -> bool:
    """A question entry of a WorldSense video (`task1`, `task2`, …)."""
    return name.startswith("task") and isinstance(value, dict)


def _is_worldsense_json(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    first = next(iter(data.values()), None) if isinstance(data, dict) else None
    return isinstance(first, dict) and any(_is_task(k, v) for k, v in first.items())


def detect_format(path: str | Path) -> str | None:
    """The benchmark a `--data` path holds in its published layout, or None (V-STaR, STGR, other)."""
    p = Path(path)
    if p.is_dir():
        if _parquets(p / "videomme"):
            return "videomme"
        if (p / "worldsense_qa.json").is_file() or (p / "WorldSense.tsv").is_file():
            return "worldsense"
        if any(_parquets(p / track) for track in TRACKS):
            return "videommmu"
        files = _parquets(p)
        return _parquet_format(files[0]) if files else None
    if not p.is_file():
        return None
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _parquet_format(p)
    if suffix == ".tsv" and WORLDSENSE_TSV_COLUMNS <= _tsv_header(p):
        return "worldsense"
    if suffix == ".json" and _is_worldsense_json(p):
        return "worldsense"
    return None


# --- reading files -----------------------------------------------------------------------------------


def _read_parquet(path: Path, needed: Sequence[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...
        raise InputError(f"{path}: cannot read as Parquet: {exc}") from None
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; it has {table.column_names}")
    return table.to_pylist()


def _read_tsv(path: Path, needed: Sequence[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}")
    return rows


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
    return rows


def _read_records(path: Path, needed: Sequence[str]) -> list[Any]:
    """Rows of a generic file: JSON Lines, a JSON list, Parquet or TSV, by suffix."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if suffix == ".parquet":
        return _read_parquet(path, needed)
    if suffix == ".tsv":
        return _read_tsv(path, needed)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    raise InputError(f"{path}: expected a .jsonl, .json, .parquet or .tsv file")


# --- one record -> one item --------------------------------------------------------------------------


def _literal_list(value: Any) -> Any:
    """A list written as text (WorldSense's TSV: "['A. …', 'B. …']") as a list; anything else as is."""
    if isinstance(value, str) and value.strip().startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(value)
            except (ValueError, SyntaxError):
                continue
    return value


_LETTERED = re.compile(r"\s*[(\[]?([A-Z])[)\].:]\s*")


def lettered_options(options: Sequence[str]) -> tuple[str, ...]:
    """Options as "A. …" strings: kept as written when each already starts with its own letter
    ("A. …", "(A) …", "A) …"), else prefixed "A. ", "B. ", … in order."""
    texts = [str(o).strip() for o in options]
    letters = [chr(ord("A") + i) for i in range(len(texts))]
    marks = [_LETTERED.match(t) for t in texts]
    if all(m and m.group(1) == letter for m, letter in zip(marks, letters)):
        return tuple(texts)
    return tuple(f"{letter}. {text}" for letter, text in zip(letters, texts))


def option_text(option: str) -> str:
    """An option without its letter mark."""
    match = _LETTERED.match(option)
    return option[match.end():].strip() if match else option.strip()


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, float) and value != value):
        raise BadRecord(name, "missing")
    text = str(value).strip()
    if not text:
        raise BadRecord(name, "empty")
    return text


def _options(row: Mapping[str, Any], name: str) -> tuple[str, ...]:
    raw = _literal_list(row.get(name))
    if raw is None:
        raise BadRecord(name, "missing")
    if isinstance(raw, str) or not hasattr(raw, "__iter__"):
        raise BadRecord(name, f"expected a list of options, got {raw!r:.80}")
    options = [str(o) for o in raw if o is not None and str(o).strip()]
    if not 2 <= len(options) <= 26:
        raise BadRecord(name, f"expected 2 to 26 options, got {len(options)}")
    return lettered_options(options)


def _answer(row: Mapping[str, Any], name: str, options: Sequence[str]) -> str:
    """The correct letter: the answer as a letter (`B`, `(B)`, `B. …`) or the text of one option."""
    answer = _text(row, name)
    letter = evidence.parse_option_letter(answer, len(options))
    if letter is None:
        by_text = [i for i, o in enumerate(options) if option_text(o).lower() == option_text(answer).lower()]
        letter = chr(ord("A") + by_text[0]) if len(by_text) == 1 else None
    if letter is None:
        last = chr(ord("A") + len(options) - 1)
        raise BadRecord(name, f"{answer!r:.80} is not one of the options A-{last}")
    return letter


def _values(value: Any) -> tuple[str, ...]:
    value = _literal_list(value)
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return (NONE,)
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value) or (NONE,)
    return (str(value),)


def _image(value: Any) -> bytes | None:
    """The question's image as the file's bytes (the Hub stores images as {"bytes": …, "path": …})."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:60].lstrip(".") or "q"


def make_item(row: Mapping[str, Any], layout: Layout, index: int, hint: str = "", image: bytes | None = None) -> McqItem:
    """One record as an item; BadRecord names the field that is wrong."""
    fields = layout.fields
    qid = _text(row, fields["qid"]) if fields.get("qid") and row.get(fields["qid"]) is not None else str(index)
    video = _text(row, fields["video"])
    question = _text(row, fields["question"])
    options = _options(row, fields["options"])
    answer = _answer(row, fields["answer"], options)
    shown = {"video": video, "question": question, "options": options, "hint": hint,
             "image": hashlib.sha1(image).hexdigest() if image else None}
    digest = hashlib.sha1(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:10]
    groups = {g: _values(row.get(g)) for g in layout.groups}
    return McqItem(f"{_slug(qid)}-{digest}", qid, video, question, options, answer, groups, hint, image)


class _Builder:
    """Items and the ledger, filled record by record."""

    def __init__(self, layout: Layout, max_records: int | None) -> None:
        self.layout, self.max_records = layout, max_records
        self.items: list[McqItem] = []
        self.skipped: list[dict[str, Any]] = []
        self._seen: dict[str, str] = {}

    @property
    def full(self) -> bool:
        return self.max_records is not None and len(self.items) >= self.max_records

    def skip(self, where: str, field_: str, why: str) -> None:
        self.skipped.append({"record": where, "field": field_, "reason": why, "message": f"{where}: field '{field_}': {why}"})

    def add(self, where: str, row: Any, index: int, hint: str = "", image_field: str | None = None) -> None:
        if self.full:
            return
        if not isinstance(row, dict):
            self.skip(where, "(record)", f"expected an object, got {type(row).__name__}")
            return
        try:
            item = make_item(row, self.layout, index, hint, _image(row.get(image_field)) if image_field else None)
        except BadRecord as exc:
            self.skip(where, exc.field, exc.why)
            return
        if item.key in self._seen:
            self.skip(where, self.layout.fields.get("qid") or "(record)",
                      f"repeats {self._seen[item.key]} (same question id, video and question)")
            return
        self._seen[item.key] = where
        self.items.append(item)

    def result(self, video_dir: Path | None) -> McqSet:
        return McqSet(self.layout.benchmark, self.items, self.skipped, self.layout.groups, video_dir)


# --- the layouts -------------------------------------------------------------------------------------

VIDEOMME = Layout("videomme", {"qid": "question_id", "video": "videoID", "question": "question", "options": "options",
                               "answer": "answer"}, ("duration", "domain", "sub_category", "task_type"))
WORLDSENSE = Layout("worldsense", {"qid": "id", "video": "video", "question": "question", "options": "candidates",
                                   "answer": "answer"},
                    ("duration", "domain", "sub_category", "task_domain", "task_type", "audio_class"))
VIDEOMMMU = Layout("videommmu", {"qid": "id", "video": "id", "question": "question", "options": "options",
                                 "answer": "answer"}, ("track", "discipline", "subject"))


def _folder_files(path: Path, sub: str) -> tuple[list[Path], Path]:
    """(the Parquet files, the benchmark's root folder) of a file, a `<sub>/` folder or the root."""
    if path.is_file():
        folder = path.parent
        files = [path]
    elif _parquets(path / sub):
        folder, files = path / sub, _parquets(path / sub)
    else:
        folder, files = path, _parquets(path)
    if not files:
        raise InputError(f"{path}: no Parquet file found (expected {sub}/test-00000-of-00001.parquet)")
    root = next((p.parent for p in (folder, *folder.parents) if p.name == sub), folder)
    return files, root


def load_videomme(path: Path, max_records: int | None = None) -> McqSet:
    files, root = _folder_files(path, "videomme")
    build = _Builder(VIDEOMME, max_records)
    needed = [VIDEOMME.fields[k] for k in ("qid", "video", "question", "options", "answer")]
    for file in files:
        for i, row in enumerate(_read_parquet(file, needed)):
            build.add(f"{file}: record {i} (question_id {row.get('question_id')!r})", row, i)
    return build.result(root / "data" if (root / "data").is_dir() else None)


def _worldsense_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """WorldSense questions as flat rows: the video's fields, then the task's, `id` = `<video>_<task>`."""
    if path.suffix.lower() == ".tsv":
        for i, row in enumerate(_read_tsv(path, sorted(WORLDSENSE_TSV_COLUMNS))):
            qid = row.get("index") or row.get("qid") or str(i)
            yield f"{path}: record {i} (video {row.get('video')!r})", {**row, "id": f"{row['video']}_{qid}"}
        return
    data = _read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected WorldSense's object of videos, got {type(data).__name__}")
    for vid, video in data.items():
        if not isinstance(video, dict):
            yield f"{path}: video {vid!r}", video  # not an object: the builder ledgers it
            continue
        common = {k: v for k, v in video.items() if not _is_task(k, v)}
        for task, entry in video.items():
            if _is_task(task, entry):
                yield (f"{path}: video {vid!r} {task}",
                       {**common, **entry, "id": f"{vid}_{task}", "video": str(video.get("video_id") or vid)})


def load_worldsense(path: Path, max_records: int | None = None) -> McqSet:
    if path.is_dir():
        found = [p for p in (path / "worldsense_qa.json", path / "WorldSense.tsv") if p.is_file()]
        if not found:
            raise InputError(f"{path}: neither worldsense_qa.json nor WorldSense.tsv is there")
        file, root = found[0], path
    else:
        file, root = path, path.parent
    build = _Builder(WORLDSENSE, max_records)
    for i, (where, row) in enumerate(_worldsense_rows(file)):
        build.add(where, row, i)
    return build.result(root / "videos" if (root / "videos").is_dir() else root)


def _subject(qid: str) -> str:
    parts = qid.split("_")
    return "_".join(parts[1:-1]) if len(parts) > 2 else NONE


def load_videommmu(path: Path, hints: Mapping[str, str], max_records: int | None = None) -> McqSet:
    if path.is_dir() and any(_parquets(path / t) for t in TRACKS):
        tracks = [(t, _parquets(path / t)) for t in TRACKS if _parquets(path / t)]
        root = path
    else:
        files = [path] if path.is_file() else _parquets(path)
        if not files:
            raise InputError(f"{path}: no Parquet file found (expected Perception/, Comprehension/, Adaptation/)")
        track = next((p.name for p in files[0].parents if p.name in TRACKS), NONE)
        tracks = [(track, files)]
        root = next((p.parent for p in files[0].parents if p.name in TRACKS), files[0].parent)
    discipline_of = {s: d for d, subjects in VIDEOMMMU_DISCIPLINES.items() for s in subjects}
    build = _Builder(VIDEOMMMU, max_records)
    for track, files in tracks:
        for file in files:
            for i, row in enumerate(_read_parquet(file, sorted(VIDEOMMMU_COLUMNS))):
                where = f"{file}: record {i} (id {row.get('id')!r})"
                if row.get("question_type") != "multiple-choice":
                    build.skip(where, "question_type", f"{row.get('question_type')!r}: only multiple-choice "
                                                      "questions are scored")
                    continue
                subject = _subject(str(row.get("id") or ""))
                row = {**row, "track": track, "subject": subject, "discipline": discipline_of.get(subject, NONE)}
                build.add(where, row, i, str(hints.get(track) or ""), "image")
    return build.result(root)


def load_generic(path: Path, fields: Mapping[str, Any], group_by: Sequence[str],
                 max_records: int | None = None) -> McqSet:
    """Any multiple-choice video file: JSONL, a JSON list, Parquet or TSV, read through `mcq.fields`."""
    layout = Layout("mcq", {k: str(v) for k, v in fields.items() if v}, tuple(str(g) for g in group_by))
    for name in ("video", "question", "options", "answer"):
        if not layout.fields.get(name):
            raise InputError(f"mcq.fields.{name}: required (the field of each record that holds the {name})")
    needed = [layout.fields[k] for k in ("video", "question", "options", "answer")]
    build = _Builder(layout, max_records)
    for i, row in enumerate(_read_records(path, needed)):
        ident = row.get(layout.fields.get("qid", "")) if isinstance(row, dict) else None
        build.add(f"{path}: record {i}" + (f" ({layout.fields['qid']} {ident!r})" if ident is not None else ""), row, i)
    return build.result(None)


def load_mcq(fmt: str, path: str | Path, mcq: Mapping[str, Any], max_records: int | None = None) -> McqSet:
    """The benchmark at `path` in format `fmt` (one of FORMATS); `mcq` is the config's `mcq` section."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if fmt == "videomme":
        return load_videomme(p, max_records)
    if fmt == "worldsense":
        return load_worldsense(p, max_records)
    if fmt == "videommmu":
        return load_videommmu(p, mcq.get("hints") or {}, max_records)
    if fmt == "mcq":
        return load_generic(p, mcq.get("fields") or {}, mcq.get("group_by") or (), max_records)
    raise ValueError(f"not a multiple-choice format: {fmt!r}")


def ordered_values(values: Sequence[str]) -> list[str]:
    """A breakdown's values: the benchmarks' own order first (durations, tracks), then sorted."""
    known = [v for v in VALUE_ORDER if v in values]
    return known + sorted(set(values) - set(known))
