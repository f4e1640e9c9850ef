"""Batched, resumable model calls for evaluation.

An evaluation is a few thousand independent calls (answers, crop checks, judge scores). Each is a
`Call`: where its completion is stored (sample key, call kind) and how to build its request. The
request is built only if the completion is not stored yet, so a rerun does not even decode the
frames of the samples already done; completions are stored after every backend batch.

Each call is counted and priced (`stages.lib.cost`, the backend's `price` setting) in `meter`, its
usage stored with its completion, so a call reused from a previous run counts as saved.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from stages.backends import Backend, RequestFailed
from stages.lib.chat import ChatRequest
from stages.lib.cost import CostMeter
from train.eval.store import CompletionStore

log = logging.getLogger("stgr.eval")


@dataclass(frozen=True)
class Call:
    key: str
    kind: str
    make: Callable[[], ChatRequest]
    #: Stored with the completion (e.g. the model's box frame, needed to read its boxes later).
    meta: Callable[[], Mapping[str, Any]] | None = None


class Runner:
    """Runs calls through one backend in batches of `batch_size`, skipping those already stored."""

    def __init__(self, backend: Backend, store: CompletionStore, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"generation.batch_size: must be >= 1, got {batch_size}")
        self.backend, self.store, self.batch_size = backend, store, batch_size
        self.generated = 0
        self.reused = 0
        self.meter = CostMeter.for_backend(backend)

    def run(self, calls: Iterable[Call]) -> None:
        pending: list[tuple[Call, ChatRequest]] = []
        for call in calls:
            stored = self.store.get(call.key, call.kind)
            if stored is not None:
                self.reused += 1
                self.meter.cached(stored.get("usage"))
                continue
            pending.append((call, call.make()))
            if len(pending) >= self.batch_size:
                self._flush(pending)
                pending = []
        if pending:
            self._flush(pending)

    def _flush(self, pending: list[tuple[Call, ChatRequest]]) -> None:
        results, usages = self.meter.call(self.backend, [request for _, request in pending])
        for (call, _), result, usage in zip(pending, results, usages):
            entry: dict[str, Any] = {**dict(call.meta() if call.meta else {}), "usage": usage.as_dict()}
            if isinstance(result, RequestFailed):
                entry["failed"] = str(result)
            else:
                entry["completion"] = result
            self.store.put(call.key, call.kind, entry)
        self.generated += len(pending)
        log.info("eval: %d calls generated, %d reused from a previous run", self.generated, self.reused)

    def completion(self, key: str, kind: str) -> str | None:
        """The stored completion; None when the call failed for good or was never made."""
        entry = self.store.get(key, kind)
        return None if entry is None else entry.get("completion")

    def entry(self, key: str, kind: str) -> dict[str, Any] | None:
        return self.store.get(key, kind)


