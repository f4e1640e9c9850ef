"""Model responses cached by request hash under `<run>/cache/annotate/`, so a resumed build never pays twice.

A call to a model is the one thing in a build that costs money (API) or GPU hours, and a unit can die
after paying for half its records. Each response is therefore stored the moment it arrives, keyed by
`ChatRequest.cache_key(model_id)` (model + revision, prompt, frames digest, sampling parameters), and
looked up before any call. The cache goes through the run's pyarrow filesystem, so it lives wherever
the run directory does (local disk, NFS, object storage) and every worker of a cluster shares it.

Entries are write-once: written to a temporary name, then renamed into place. Two workers racing on
the same key (a straggler of a killed build and its resume) both write complete files and the second
rename replaces an identical response, so a reader never sees a partial entry.

An entry also keeps what its call used (`usage`: tokens, images, seconds; `stages.lib.cost.Usage`)
and the unit that paid for it (`paid_by`), so the cost ledger can count what a cache hit saved, and
an attempt can tell a response its own unit paid for. Entries written before the ledger have neither.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow.fs as pafs

CACHE_DIR = "cache/annotate"


@dataclass(frozen=True)
class CachedResponse:
    """One stored completion and what produced it (kept so a cache entry can be audited by hand)."""

    key: str
    model: str
    response: str
    #: What the call that paid for it used (`stages.lib.cost.Usage.as_dict`); None when not stored.
    usage: dict[str, Any] | None = None
    #: The unit that paid for it (`stages.lib.cost.paid_by`); None when not stored.
    paid_by: dict[str, Any] | None = None


class ResponseCache:
    """Write-once response store: `<root>/<key[:2]>/<key>.json`, one small JSON file per response.

    Sharding by the key's first two hex digits keeps directories small on file systems that slow
    down with many entries, and lets `len()` be computed without a recursive listing of one folder.
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str) -> None:
        self.fs = filesystem
        self.root = root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)

    @classmethod
    def for_run(cls, filesystem: pafs.FileSystem, run_path: str, subdir: str = CACHE_DIR) -> "ResponseCache":
        """The cache of one run directory (the same for every stage attempt and every resume)."""
        return cls(filesystem, f"{run_path.rstrip('/')}/{subdir}")

    def _path(self, key: str) -> str:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"response cache: key must be a lowercase hex digest, got {key!r}")
        return f"{self.root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> CachedResponse | None:
        """The stored response for `key`, or None. A corrupt entry raises: it names the file."""
        path = self._path(key)
        try:
            with self.fs.open_input_stream(path) as stream:
                raw = stream.read()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            usage, payer = data.get("usage"), data.get("paid_by")
            return CachedResponse(key=data["key"], model=data["model"], response=data["response"],
                                  usage=usage if isinstance(usage, dict) else None,
                                  paid_by=payer if isinstance(payer, dict) else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"response cache: corrupt entry {path}: {exc}") from exc

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """Responses for the keys that are cached; one listing per key prefix instead of one stat per key."""
        keys = list(dict.fromkeys(keys))
        prefixes = sorted({k[:2] for k in keys})
        present: set[str] = set()
        for prefix in prefixes:
            selector = pafs.FileSelector(f"{self.root}/{prefix}", allow_not_found=True)
            present.update(info.base_name[:-5] for info in self.fs.get_file_info(selector)
                           if info.type == pafs.FileType.File and info.base_name.endswith(".json"))
        found = {}
        for key in keys:
            if key in present:
                entry = self.get(key)
                if entry is not None:
                    found[key] = entry
        return found

    def put(self, key: str, model: str, response: str, extra: dict[str, Any] | None = None) -> None:
        """Store a response: temp file, then rename into place. An existing entry is left as it is."""
        path = self._path(key)
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            return
        folder = path.rsplit("/", 1)[0]
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{key}-{uuid.uuid4().hex}"
        payload = {"key": key, "model": model, "response": response, **(extra or {})}
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode())
        self.fs.move(tmp, path)

    def __len__(self) -> int:
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        return sum(1 for info in self.fs.get_file_info(selector)
                   if info.type == pafs.FileType.File and info.base_name.endswith(".json"))
