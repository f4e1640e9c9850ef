"""Per-sample completion store: what makes `stgr eval` resumable.

Every model call of an evaluation (an answer, a judge score, a crop check) is written to its own
small JSON file under `OUT/completions/<fingerprint>/` as soon as its batch returns: first to a
temporary name, then linked into place, so a file that exists is complete. A rerun of the same
command finds the file and skips the call; a crash or kill loses at most the batch in flight.

The fingerprint is a hash of everything a completion depends on besides the sample itself (model,
backend, prompts' settings, sampling), so rerunning with a different model or prompt settings into
the same OUT never reuses a stale answer: the new completions go to a sibling folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (sorted keys; non-JSON values through `str`)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _safe(part: str) -> str:
    """A key part as a file name: readable where possible, hashed where it holds odd characters."""
    if part and all(c.isalnum() or c in "-_." for c in part) and not part.startswith("."):
        return part
    return hashlib.sha1(part.encode()).hexdigest()[:16]


class CompletionStore:
    """Write-once JSON files keyed by `(sample key, call kind)` under one fingerprint folder."""

    def __init__(self, root: str | Path, fingerprint_: str) -> None:
        self.root = Path(root) / "completions" / fingerprint_
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, kind: str) -> Path:
        return self.root / _safe(key) / f"{_safe(kind)}.json"

    def get(self, key: str, kind: str) -> dict[str, Any] | None:
        """The stored entry, or None when this call has not completed yet."""
        path = self.path(key, kind)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def put(self, key: str, kind: str, entry: Mapping[str, Any]) -> None:
        """Store once. A concurrent or straggling writer of the same call is a no-op, never a
        second or partial copy (os.link refuses to replace an existing name)."""
        path = self.path(key, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(dict(entry), f, ensure_ascii=False, default=str)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))
