"""Where an annotation file's entries lie, found without holding them, and one partition's entries read
from where it starts.

The `source` stage plans partitions on the driver and builds each one on a worker. Holding every
entry to count them grows the driver with the file (72 MB of RSS for 10^5 JSON lines of ~560 bytes,
446 MB for 10^5 parsed VidSTG entries: docs/benchmarks.md), and every task that reloads the whole
file holds it again. Instead a `Layout` makes one streaming pass over the file (`scan`) and keeps,
per partition, only a `Slice`: the byte offset, the entry position and the line and column where the
partition's first entry starts. A task seeks there and reads its own `per_partition` entries
(`read`); a worker process makes the same pass once to find the starts (the adapter keeps them per
process: stages/sources/base.py), never holding more than the driver does.

Two layouts cover the released formats:

- `Lines`: one entry per non-blank line (JSON Lines, Charades-STA's text), as `(line number, text)`
  with the line ending removed. The scan reads bytes and parses nothing: the driver's memory is one
  line plus the slices (about 190 bytes per partition). A line that is not UTF-8 is an `Unreadable`
  entry, which the `source` stage ledgers: it spoils neither its partition nor the file.
- `JsonEntries`: the elements of a top-level JSON array (VidSTG, V-STaR, the released STGR json) or
  the `(key, value)` pairs of a top-level object (HC-STVG, ActivityNet Captions). The text is decoded
  a chunk at a time (`CHUNK` bytes) and each entry parsed alone by the stdlib's C decoder
  (`json.JSONDecoder.raw_decode`), then dropped: memory is a few chunks (about 5 MB) plus the
  largest entry, never the file, let alone the file twice (`json.load` holds the whole text and
  every parsed object at once: a 420 MB peak for a VidSTG-format array of 10^5 entries, VidSTG's
  full test set's size, in an 82 MB file). The scan parses every entry, so a syntax error anywhere
  is still an `InputError` naming line and column before any work is scheduled, as with
  `json.load`; a task then parses only its own entries.

Both keep the order and the values a whole-file read gives (`json.load`; for lines, Python's text
iteration), so entry *i* is in partition *i* // `per_partition` as before. Two departures, both
only for files no released dataset has: a line ends at `\\n` (`\\r\\n` too), so a lone `\\r` does
not end one; and an object's repeated key is two entries, where `json.load` keeps the last value at
the first key's place (the records then share an id and the second is ledgered as
`duplicate_id`, so none is dropped unseen).
"""
from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, Iterator, NamedTuple

from pipeline.errors import InputError

#: Bytes read per step of a JSON scan; an entry longer than this is read in growing steps.
CHUNK = 1 << 20
#: Entries kept from the scan for the adapter's file-level check (`Adapter.check_head`).
HEAD = 100
#: What `str.strip()` removes in ASCII, so a line is blank here exactly where Python's text reading
#: finds it blank.
ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
JSON_SPACE = re.compile(r"[ \t\n\r]*")
#: A character that ends a number or literal: one seen after it shows the token is complete.
TOKEN_END = re.compile(r"[ \t\n\r,\]}]")


class Slice(NamedTuple):
    """Where a partition's first entry starts: its position among the entries, its byte offset, and
    the (1-based) line and column there, so errors past it still name the file's line."""

    position: int
    offset: int
    line: int
    column: int = 1


class Scan(NamedTuple):
    """What one pass over a file found: every partition's start, the number of entries, the first ones."""

    starts: tuple[Slice, ...]
    count: int
    head: tuple[Any, ...]


class Unreadable(NamedTuple):
    """A line that is not UTF-8 text, in place of its `(line number, text)` entry."""

    line: int
    problem: str


class Layout(ABC):
    """How entries lie in one kind of annotation file."""

    @abstractmethod
    def scan(self, path: str, per_partition: int) -> Scan:
        """One streaming pass: the start of every `per_partition`-th entry; InputError if the file is unusable."""

    @abstractmethod
    def read(self, path: str, start: Slice, count: int) -> Iterator[tuple[int, Any]]:
        """(position, entry) of the `count` entries (fewer at the end of the file) from `start`."""


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from exc


class Lines(Layout):
    """One entry per non-blank line: `(line number, text)`, or `Unreadable` for a line that is not UTF-8."""

    def scan(self, path: str, per_partition: int) -> Scan:
        starts: list[Slice] = []
        head: list[Any] = []
        count = offset = 0
        with _open(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if _is_entry(raw):
                    if count % per_partition == 0:
                        starts.append(Slice(count, offset, number))
                    if count < HEAD:
                        head.append(_line_entry(number, raw))
                    count += 1
                offset += len(raw)
        return Scan(tuple(starts), count, tuple(head))

    def read(self, path: str, start: Slice, count: int) -> Iterator[tuple[int, Any]]:
        end = start.position + count
        position, number = start.position, start.line
        with _open(path) as handle:
            handle.seek(start.offset)
            for raw in handle:
                if position >= end:
                    return
                if _is_entry(raw):
                    yield position, _line_entry(number, raw)
                    position += 1
                number += 1


def _is_entry(raw: bytes) -> bool:
    """Whether a line holds anything but whitespace (`str.strip`'s, also for a non-ASCII line)."""
    stripped = raw.strip(ASCII_SPACE)
    if not stripped or stripped.isascii():
        return bool(stripped)
    try:
        return bool(stripped.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True


def _line_entry(number: int, raw: bytes) -> tuple[int, str] | Unreadable:
    text = raw.removesuffix(b"\n").removesuffix(b"\r")
    try:
        return number, text.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Unreadable(number, f"not UTF-8 text at byte {exc.start + 1} of the line")


class JsonEntries(Layout):
    """The elements of a top-level JSON array (`shape=list`), or the `(key, value)` pairs of a
    top-level object (`shape=dict`); `what` names the expected shape in the error for another."""

    def __init__(self, shape: type[list[Any]] | type[dict[str, Any]], what: str) -> None:
        self.shape = shape
        self.what = what

    def scan(self, path: str, per_partition: int) -> Scan:
        starts: list[Slice] = []
        head: list[Any] = []
        count = 0
        with _JsonReader(path, Slice(0, 0, 1), self.shape) as reader:
            reader.open_top(self.what)
            while reader.next_entry(first=not count):
                if count % per_partition == 0:
                    starts.append(reader.mark(count))
                entry = reader.entry()
                if count < HEAD:
                    head.append(entry)
                count += 1
            reader.expect_end()
        return Scan(tuple(starts), count, tuple(head))

    def read(self, path: str, start: Slice, count: int) -> Iterator[tuple[int, Any]]:
        with _JsonReader(path, start, self.shape) as reader:
            for position in range(start.position, start.position + count):
                if position > start.position and not reader.next_entry(first=False):
                    return
                yield position, reader.entry()


class _JsonReader:
    """A JSON text read a chunk at a time from a byte offset, one top-level entry at a time.

    `text[pos:]` is what is not yet consumed. A cursor (`at`: an index of `text`, with the byte
    offset, line and column there) moves only forward, so every character is measured once.
    """

    def __init__(self, path: str, start: Slice, shape: type) -> None:
        self.path = path
        self.shape = shape
        self.opener, self.closer = ("[", "]") if shape is list else ("{", "}")
        self.handle = _open(path)
        self.handle.seek(start.offset)
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.json = json.JSONDecoder()
        self.read_bytes = start.offset
        self.eof = False
        self.step = CHUNK
        self.text = ""
        self.ascii = True
        self.pos = 0
        self.at, self.offset, self.line, self.column = 0, start.offset, start.line, start.column

    def __enter__(self) -> "_JsonReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    # -- the text --------------------------------------------------------------------------
    def _advance(self, index: int) -> None:
        """Move the cursor to `text[index]` (counting in place: no copy of ASCII text)."""
        text, at = self.text, self.at
        self.offset += index - at if self.ascii else len(text[at:index].encode("utf-8"))
        newlines = text.count("\n", at, index)
        if newlines:
            self.line += newlines
            self.column = index - text.rfind("\n", at, index)
        else:
            self.column += index - at
        self.at = index

    def _fill(self) -> bool:
        """Append the next step of the file to the text (dropping what was consumed); False at its end."""
        if self.eof:
            return False
        data = self.handle.read(self.step)
        pending = len(self.utf8.getstate()[0])
        try:
            chunk = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.path}: not UTF-8 text at byte {self.read_bytes - pending + exc.start}") from None
        self.read_bytes += len(data)
        self.eof = not data
        self._advance(self.pos)
        rest, self.text = self.text[self.pos:], ""
        self.text = rest + chunk
        self.ascii = self.text.isascii()
        self.pos = self.at = 0
        return True

    def _peek(self) -> str:
        """The next character that is not JSON whitespace ('' at the end of the file), consuming the whitespace."""
        while True:
            self.pos = JSON_SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._fill():
                return ""

    def _error(self, message: str, index: int | None = None) -> InputError:
        self._advance(self.pos if index is None else index)
        return InputError(f"{self.path}: not valid JSON at line {self.line}, column {self.column}: {message}")

    def _value(self) -> Any:
        """The JSON value at the current position. A value cut by the end of the text fails to parse
        (an object, array or string ends at its closing mark) or, a number or literal, has nothing
        after it: either way more text is read and the value parsed again from its start."""
        self._peek()
        while True:
            try:
                value, end = self.json.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise self._error(exc.msg, exc.pos) from None
            if self.text[self.pos] in '{["' or TOKEN_END.match(self.text, end) or not self._more():
                self.pos, self.step = end, CHUNK
                return value

    def _more(self) -> bool:
        """Read one more step, each longer than the last while one entry needs them (an entry larger
        than a chunk costs a few re-parses, not one per chunk)."""
        more = self._fill()
        self.step *= 2
        return more

    def _expect(self, mark: str, message: str) -> None:
        if self._peek() != mark:
            raise self._error(message)
        self.pos += 1

    # -- the top level ---------------------------------------------------------------------
    def open_top(self, what: str) -> None:
        """Consume the opening `[` or `{`; a file of another shape is an InputError naming `what`."""
        first = self._peek()
        if first == "\ufeff" and self.offset == 0 and self.pos == 0:
            raise self._error("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        if first != self.opener:
            found = {"[": "list", "{": "dict"}.get(first) or type(self._value()).__name__
            raise InputError(f"{self.path}: expected {what} at the top level (position 0), got {found}")
        self.pos += 1

    def next_entry(self, first: bool) -> bool:
        """Move to the next entry's first character; False once the closing `]` or `}` is consumed."""
        mark = self._peek()
        if mark == self.closer:
            self.pos += 1
            return False
        if not first:
            if mark != ",":
                raise self._error("Expecting ',' delimiter")
            self.pos += 1
            self._peek()
        return True

    def mark(self, position: int) -> Slice:
        """The Slice of the entry that starts here."""
        self._advance(self.pos)
        return Slice(position, self.offset, self.line, self.column)

    def entry(self) -> Any:
        """The entry that starts here: a value, or for an object a `(key, value)` pair."""
        if self.shape is list:
            return self._value()
        if self._peek() != '"':
            raise self._error("Expecting property name enclosed in double quotes")
        key = self._value()
        self._expect(":", "Expecting ':' delimiter")
        return key, self._value()

    def expect_end(self) -> None:
        """Only whitespace may follow the top-level value (as `json.load` requires)."""
        if self._peek():
            raise self._error("Extra data")
