"""The run directory and its write-once commit protocol.

    <run>/config.yaml
    <run>/plan.json                                   # node -> stage, fingerprint, partitions
    <run>/lease.json                                  # the build that holds the run (pipeline.lease)
    <run>/stages/<node>/<fingerprint>/part-00007.parquet
    <run>/stages/<node>/<fingerprint>/_part-00007.json   # commit record, written last, exactly once
    <run>/stages/<node>/<fingerprint>/_part-00007.error.json  # last failure of an uncommitted unit
    <run>/ledger/<node>/<fingerprint>/part-00007.parquet   # only when the unit rejected a record

The records' leading underscore makes Parquet readers skip them (pyarrow's dataset discovery ignores
names starting with `_` or `.`), so `pd.read_parquet("<run>/stages/align")` reads a stage's output.

A unit is done if and only if its commit record exists. Data is written under a temporary name and
renamed into place before the record (on an object store, where a PUT is atomic, straight under its
name), so a kill at any instant leaves either a committed unit or debris that the next attempt
overwrites. The record is created with the store's conditional write, so of two attempts racing to
commit one unit exactly one record is written. A unit's output is a pure function of its inputs and
fingerprint, so a straggler from a killed build writes the same bytes to the same names: a no-op.

The record holds the sha256 of the unit's data and ledger files. A unit that reads them checks it
(`read_verified`): a bit flip, a truncation or a lost file is `CorruptUnit`, and the damaged unit is
withdrawn (`invalidate`) so that the next pass of the build recomputes it. Most units reject
nothing, so an empty ledger is no file at all: the record says `"ledger": null` (a third of a run's
files were empty ledgers), and it reads back as an empty ledger table.

The run directory may be any pyarrow filesystem URI (local path, file://, s3://, gs://, hdfs://).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.redact import scrub
from pipeline.stage import LEDGER_SCHEMA

log = logging.getLogger("stgr")

#: pyarrow filesystems where one PUT replaces an object atomically and a folder cannot be renamed.
OBJECT_STORES = frozenset({"s3", "gcs"})


def part_name(partition: int) -> str:
    return f"part-{partition:05d}"


def ledger_dir(node: str, fingerprint: str) -> str:
    """The folder (relative to the run) of the ledger files a node's units of one fingerprint commit."""
    return f"ledger/{node}/{fingerprint}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class RunDir:
    """A run directory on some pyarrow filesystem."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def open(cls, uri: str) -> "RunDir":
        if "://" not in uri:
            uri = os.path.abspath(uri)
        fs, path = pafs.FileSystem.from_uri(uri)
        return cls(uri=uri, fs=fs, path=path.rstrip("/"))

    @property
    def object_store(self) -> bool:
        return self.fs.type_name in OBJECT_STORES

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.join(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.join(rel), recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace `rel` so that a reader sees the old content or the new, never a part.

        Locally: a hidden temporary name beside the target (readers of a folder skip names that
        start with a dot), then a rename. On an object store the PUT itself is atomic, and a rename
        would be a second copy.
        """
        target = self.join(rel)
        if self.object_store:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        parent, base = target.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        except BaseException:
            with suppress(OSError):
                self.fs.delete_file(tmp)
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_atomic(rel, text.encode())

    def list_dir(self, rel: str) -> list[str]:
        selector = pafs.FileSelector(self.join(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.join(rel))
        except FileNotFoundError:
            pass

    # Conditional writes: what makes a commit record write-once and the lease exclusive.

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` unless it exists; True if this call created it.

        Locally a hard link of a complete temporary file (atomic, and it fails if the name exists);
        on S3 a PUT with `If-None-Match: *`. Elsewhere: a check, then a write (advisory only).
        """
        if self.fs.type_name == "local":
            return _local_create(self.join(rel), data)
        if self.fs.type_name == "s3" and _boto3() is not None:
            return _S3(self).put(rel, data, IfNoneMatch="*") is not None
        if self.exists(rel):
            return False
        self.write_atomic(rel, data)
        return True

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """`rel`'s content and a version token for `replace_if` / `delete_if`; None if absent."""
        if self.fs.type_name == "s3" and _boto3() is not None:
            return _S3(self).get(rel)
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None
        return data, sha256(data)

    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        """Replace `rel` only if it is still at version `token`; the new token, or None if it moved on."""
        if self.fs.type_name == "s3" and _boto3() is not None:
            return _S3(self).put(rel, data, IfMatch=token)
        with self._locked(rel):
            current = self.read_versioned(rel)
            if current is None or current[1] != token:
                return None
            self.write_atomic(rel, data)
            return sha256(data)

    def delete_if(self, rel: str, token: str) -> bool:
        """Delete `rel` only if it is still at version `token`."""
        if self.fs.type_name == "s3" and _boto3() is not None:
            return _S3(self).delete(rel, token)
        with self._locked(rel):
            current = self.read_versioned(rel)
            if current is None or current[1] != token:
                return False
            self.delete(rel)
            return True

    @contextmanager
    def _locked(self, rel: str) -> Iterator[None]:
        """Serialise read-compare-write of `rel` between processes: flock on a hidden lock file
        locally (it holds across NFS clients too); nothing on a store without locks (advisory)."""
        if self.fs.type_name != "local":
            yield
            return
        import fcntl

        target = self.join(rel)
        parent, base = target.rsplit("/", 1)
        os.makedirs(parent, exist_ok=True)
        with open(f"{parent}/.{base}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _local_create(target: str, data: bytes) -> bool:
    parent, base = target.rsplit("/", 1)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # a filesystem without hard links: exclusive create (the record is small, so a reader
        # seeing it half written is unlikely, and `read_commit` treats that as damage, not success)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        with suppress(OSError):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _boto3() -> Any:
    """boto3, for S3's conditional writes (pyarrow's S3 client has none); None when not installed."""
    try:
        import boto3
    except ImportError:
        log.warning("boto3 is not installed: commit records and the lease on S3 fall back to unconditional "
                    "writes (pip install 'stgr[s3]')")
        return None
    return boto3


class _S3:
    """S3 conditional requests through boto3, addressed like the pyarrow filesystem of the run."""

    def __init__(self, run: RunDir) -> None:
        query = parse_qs(urlparse(run.uri).query)
        endpoint = (query.get("endpoint_override") or [None])[0]
        if endpoint and "://" not in endpoint:
            scheme = (query.get("scheme") or ["https"])[0]
            endpoint = f"{scheme}://{endpoint}"
        self.client = _s3_client(endpoint, getattr(run.fs, "region", None) or None)
        self.run = run

    def _key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.run.join(rel).partition("/")
        return bucket, key

    def put(self, rel: str, data: bytes, **condition: str) -> str | None:
        """PUT under `condition` (IfNoneMatch / IfMatch); the new ETag, or None when the condition failed."""
        bucket, key = self._key(rel)
        with _s3_errors(bucket, key):
            return self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        return None

    def get(self, rel: str) -> tuple[bytes, str] | None:
        bucket, key = self._key(rel)
        with _s3_errors(bucket, key):
            response = self.client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        return None

    def delete(self, rel: str, token: str) -> bool:
        bucket, key = self._key(rel)
        with _s3_errors(bucket, key):
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=token)
            return True
        return False


@contextmanager
def _s3_errors(bucket: str, key: str) -> Iterator[None]:
    """A failed precondition or a missing key ends the block quietly (the caller returns its "no");
    any other S3 or connection error becomes OSError, like every other storage fault."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (404, 409, 412):
            return
        raise OSError(f"s3://{bucket}/{key}: {exc}") from None
    except BotoCoreError as exc:
        raise OSError(f"s3://{bucket}/{key}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _s3_client(endpoint: str | None, region: str | None) -> Any:
    """One boto3 client per endpoint and region (they are thread-safe, and slow to create)."""
    return _boto3().client("s3", endpoint_url=endpoint, region_name=region)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@functools.lru_cache(maxsize=1)
def empty_ledger() -> bytes:
    """What the ledger of a unit that rejected nothing reads as (no file is written for it); made on
    first use, since writing Parquet imports pandas, which `stgr status` never needs."""
    return table_bytes(LEDGER_SCHEMA.empty_table())


@dataclass(frozen=True)
class Unit:
    """One (node, partition) unit of work and where its files live."""

    node: str
    fingerprint: str
    partition: int

    @property
    def stage_dir(self) -> str:
        return f"stages/{self.node}/{self.fingerprint}"

    @property
    def data(self) -> str:
        return f"{self.stage_dir}/{part_name(self.partition)}.parquet"

    @property
    def record(self) -> str:
        return f"{self.stage_dir}/_{part_name(self.partition)}.json"

    @property
    def error(self) -> str:
        return f"{self.stage_dir}/_{part_name(self.partition)}.error.json"

    @property
    def ledger(self) -> str:
        return f"{ledger_dir(self.node, self.fingerprint)}/{part_name(self.partition)}.parquet"

    def key(self) -> str:
        return f"{self.node}/{part_name(self.partition)}"


class CorruptUnit(Exception):
    """A committed unit's file is not what its commit record says: damaged, truncated or gone."""

    def __init__(self, unit: Unit, path: str, problem: str) -> None:
        self.unit, self.path, self.problem = unit, path, problem
        super().__init__(f"{path}: {problem}")


def is_committed(run: RunDir, unit: Unit) -> bool:
    return run.exists(unit.record)


def read_commit(run: RunDir, unit: Unit) -> dict[str, Any] | None:
    try:
        return json.loads(run.read_text(unit.record))
    except FileNotFoundError:
        return None


def has_ledger(record: dict[str, Any]) -> bool:
    """Whether the unit of this commit record wrote a ledger file (it did not when it rejected nothing)."""
    return record.get("ledger", "") is not None


def read_verified(run: RunDir, unit: Unit, ledger: bool = False, record: dict[str, Any] | None = None) -> bytes:
    """A committed unit's data (or ledger) file, checked against the sha256 in its commit record.

    Raises CorruptUnit naming the file when the record is gone or unreadable, the file is missing, or
    its bytes differ. Records written before digests were kept are trusted as they are. The ledger of
    a unit that rejected nothing has no file: it reads as `empty_ledger()` (a file left there by an
    earlier attempt is not the committed ledger, and is not read). `record`: the unit's commit record
    where the caller has read it already (`verified_record`), so it is not fetched twice.
    """
    rel = unit.ledger if ledger else unit.data
    if record is None:
        record = verified_record(run, unit)
    if ledger and not has_ledger(record):
        return empty_ledger()
    try:
        data = run.read_bytes(rel)
    except FileNotFoundError:
        raise CorruptUnit(unit, f"{run.uri}/{rel}", "missing, but its unit is committed") from None
    expected = record.get("ledger_sha256" if ledger else "sha256")
    if expected and sha256(data) != expected:
        size = record.get("ledger_bytes" if ledger else "bytes")
        raise CorruptUnit(unit, f"{run.uri}/{rel}", f"sha256 differs from its commit record "
                                                    f"({len(data)} bytes read, {size} committed): the file is damaged")
    return data


def verified_record(run: RunDir, unit: Unit) -> dict[str, Any]:
    """A committed unit's commit record; CorruptUnit when it is gone (invalidated) or not JSON."""
    try:
        return json.loads(run.read_text(unit.record))
    except FileNotFoundError:
        raise CorruptUnit(unit, f"{run.uri}/{unit.record}", "no commit record (the unit was invalidated)") from None
    except ValueError as exc:
        raise CorruptUnit(unit, f"{run.uri}/{unit.record}", f"commit record is not valid JSON ({exc})") from None


def read_verified_table(run: RunDir, unit: Unit, ledger: bool = False,
                        record: dict[str, Any] | None = None) -> tuple[pa.Table, str]:
    """`read_verified` decoded as Parquet, and the file's sha256; an undecodable file is CorruptUnit too."""
    data = read_verified(run, unit, ledger, record)
    try:
        return pq.read_table(pa.BufferReader(data)), sha256(data)
    except (pa.ArrowException, OSError) as exc:
        rel = unit.ledger if ledger else unit.data
        raise CorruptUnit(unit, f"{run.uri}/{rel}", f"not readable as Parquet ({exc})") from None


def verify_committed(run: RunDir, units: list[Unit]) -> list[str]:
    """Problems found re-hashing the data and ledger files of the committed `units` (empty: all intact)."""
    problems = []
    for unit in units:
        if not is_committed(run, unit):
            continue
        for ledger in (False, True):
            try:
                read_verified(run, unit, ledger)
            except CorruptUnit as exc:
                problems.append(f"{exc.path.removeprefix(run.uri + '/')}: {exc.problem}")
    return problems


def commit(run: RunDir, unit: Unit, table: pa.Table, ledger_rows: list[dict[str, Any]], record: dict[str, Any]) -> bool:
    """Write data, ledger (only when there are `ledger_rows`), then the commit record. Returns False
    when the unit was already committed.

    The early return makes a straggler's late commit a no-op, and the record's exclusive create
    decides a race between two attempts; a crash between the writes leaves files without a
    record, which the next attempt overwrites with identical content.
    """
    if is_committed(run, unit):
        return False
    data = table_bytes(table)
    run.write_atomic(unit.data, data)
    record = {**record, "committed_at": time.time(), "data": unit.data, "sha256": sha256(data), "bytes": len(data)}
    if ledger_rows:
        ledger = table_bytes(pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA))
        run.write_atomic(unit.ledger, ledger)
        record.update(ledger=unit.ledger, ledger_sha256=sha256(ledger), ledger_bytes=len(ledger))
    else:
        run.delete(unit.ledger)  # an earlier attempt's rows, if any, are not this commit's
        record["ledger"] = None
    if not run.create_exclusive(unit.record, json.dumps(record, indent=2, sort_keys=True).encode()):
        return False
    with suppress(OSError):  # a stale error note only; `stgr status` reads the record first
        run.delete(unit.error)
    return True


def record_failure(run: RunDir, unit: Unit, attempt: int, error: str, final: bool) -> None:
    """Keep the last error of an uncommitted unit, so `stgr status` can name it.

    Best effort: when the run directory itself is what fails (full disk, read-only), the driver
    still holds the error and prints it; a storage fault must not turn into a crash of the driver.
    """
    payload = {"node": unit.node, "partition": unit.partition, "attempt": attempt, "error": scrub(error),
               "final": final, "at": time.time()}
    try:
        run.write_text(unit.error, json.dumps(payload, indent=2))
    except OSError as exc:
        log.warning("cannot record the failure of %s in %s: %s", unit.key(), run.uri, exc)


def invalidate(run: RunDir, unit: Unit, reason: str) -> None:
    """Withdraw a committed unit whose files are damaged: it is pending again, and the next pass of
    the build recomputes it (its files are overwritten then). The reason stays in its error note."""
    run.delete(unit.record)
    record_failure(run, unit, 0, f"invalidated: {reason}", final=False)
    log.warning("%s invalidated: %s", unit.key(), reason)
