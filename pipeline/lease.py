"""One build per run directory at a time: a lease record, `<run>/lease.json`.

Two builds of different configs on one run directory would each publish their own dataset, and the
last writer would win. So a build takes the lease before it writes anything: a record of who holds
the run (owner id, host, pid and the process's start time), which plan it runs, and a heartbeat the
holder refreshes every `ttl_s / 4` seconds. A second build is refused (exit 2, one line) while the
lease is live and its plan differs; with the same plan it shares the run (the commit protocol makes
same-plan builds safe) and takes the lease over if the holder releases it first.

A lease is stale, and taken over, when its heartbeat is older than its TTL, or at once when its
holder ran on this host and that process is gone (a build killed with SIGKILL). Every change of the
record is a conditional write (`RunDir.create_exclusive` / `replace_if`), so of two builds taking a
stale lease over exactly one gets it; a holder whose record was taken over (it stalled longer than
the TTL) notices at its next heartbeat and says so at the end of its build.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.rundir import RunDir

log = logging.getLogger("stgr")

LEASE = "lease.json"
DEFAULT_TTL_S = 60.0


class LeaseHeld(UserError):
    """Another live build with another plan holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc), so a recycled pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(record: dict[str, Any]) -> bool:
    pid = int(record.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = record.get("pid_start")
    return started is None or _process_start(pid) in (None, started)


def is_stale(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the holder of `record` is gone: no heartbeat for its TTL, or its process ended here."""
    now = time.time() if now is None else now
    if now - float(record.get("heartbeat") or 0.0) > float(record.get("ttl_s") or DEFAULT_TTL_S):
        return True
    return record.get("host") == socket.gethostname() and not _alive_here(record)


def describe(record: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    age = max(0.0, now - float(record.get("heartbeat") or 0.0))
    return (f"build {record.get('build_id')!r} on host {record.get('host')}, pid {record.get('pid')}, "
            f"last heartbeat {age:.0f} s ago")


@dataclass
class Lease:
    """This build's hold on a run directory; `shared` when another build of the same plan holds it."""

    run: RunDir
    owner: str
    plan: str
    build_id: str
    ttl_s: float
    shared: bool = False
    token: str | None = None
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def record(self, acquired: float | None = None) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "plan": self.plan, "build_id": self.build_id,
                "heartbeat": now, "acquired": acquired or now, "ttl_s": self.ttl_s}

    def beat(self) -> None:
        """One heartbeat: refresh the record if this build holds it, or take it when a sharer finds it gone."""
        current = self.run.read_versioned(LEASE)
        if self.shared:
            if current is None or is_stale(_parse(current[0])):
                _take(self, current)
            return
        if current is None or current[1] != self.token:
            holder = _parse(current[0]) if current else None
            self.lost = describe(holder) if holder else "its record was deleted"
            self._stop.set()
            return
        acquired = _parse(current[0]).get("acquired")
        token = self.run.replace_if(LEASE, _encode(self.record(acquired)), current[1])
        if token is None:
            self.lost = "its record changed under it"
            self._stop.set()
        else:
            self.token = token

    def start(self) -> "Lease":
        """Beat in a daemon thread until `release`; storage errors are logged, never raised."""
        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.beat()
                except OSError as exc:
                    log.warning("lease heartbeat on %s failed: %s", self.run.uri, exc)
        self._thread = threading.Thread(target=loop, name="stgr-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop beating and delete the record if it is still this build's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.shared or self.lost or self.token is None:
            return
        try:
            self.run.delete_if(LEASE, self.token)
        except OSError as exc:
            log.warning("cannot release the lease of %s: %s (the next build takes it over)", self.run.uri, exc)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()


def _parse(data: bytes) -> dict[str, Any]:
    """A lease record; an unreadable one counts as stale (heartbeat 0), so it never blocks a run forever."""
    try:
        record = json.loads(data)
    except ValueError:
        return {"heartbeat": 0.0}
    return record if isinstance(record, dict) else {"heartbeat": 0.0}


def _take(lease: Lease, current: tuple[bytes, str] | None) -> bool:
    """Create the record, or replace the stale `current` one; True if this build now holds the lease."""
    data = _encode(lease.record())
    if current is None:
        if not lease.run.create_exclusive(LEASE, data):
            return False
        token = lease.run.read_versioned(LEASE)
        lease.token = token[1] if token else None
    else:
        lease.token = lease.run.replace_if(LEASE, data, current[1])
        if lease.token is None:
            return False
    if lease.shared:
        log.info("took over the lease of %s from the build it shared the run with", lease.run.uri)
    lease.shared = False
    return True


def acquire(run: RunDir, plan: str, build_id: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take the run directory's lease for a build of `plan`, or share it with a live build of the same
    plan; raises LeaseHeld (one line: who holds it) when a live build of another plan does."""
    lease = Lease(run, uuid.uuid4().hex, plan, build_id, float(ttl_s))
    for _ in range(8):
        current = run.read_versioned(LEASE)
        holder = _parse(current[0]) if current else None
        if holder is not None and not is_stale(holder):
            if holder.get("plan") != plan:
                raise LeaseHeld(f"run {run.uri} is in use by {describe(holder)}, which runs another plan (config); "
                                f"wait for it to end or use another run directory (a lease is taken over when its "
                                f"heartbeat is {holder.get('ttl_s', DEFAULT_TTL_S):.0f} s old, or at once when its "
                                f"process is gone from its host)")
            lease.shared = True
            log.info("%s: sharing the run with %s (same plan)", run.uri, describe(holder))
            return lease
        if holder is not None:
            log.warning("%s: taking over the stale lease of %s", run.uri, describe(holder))
        if _take(lease, current):
            return lease
    raise LeaseHeld(f"run {run.uri}: could not take its lease (another build keeps changing it); try again")
