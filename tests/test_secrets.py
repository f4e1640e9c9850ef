"""An API key never reaches disk: not the run directory, not Ray's temp directory.

A real OpenAI-compatible endpoint on 127.0.0.1 (stdlib HTTP) echoes the key it was sent in every
error body, as some providers do: 401 for a wrong key, 400 for one request it refuses, 503 for the
first tries of every other request. Two real builds on a real local Ray (synthetic source, the
default DAG with `annotator=openai`): with the right key, the 503s are retried and the 400 is
ledgered; with a wrong key, every annotate unit fails with one clear message (no ledger rows, no
exit-0 empty dataset). Then every file under the run directory and under `cluster.temp_dir` (Ray's
session: its logs, the runtime-env agent's log) is searched for the key, Parquet files decoded
(their pages are compressed, so a byte search alone would miss it).
"""
from __future__ import annotations

import collections
import hashlib
import json
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest

from pipeline.build import run_build

KEY_ENV = "STGR_TEST_SECRET_KEY"
GOOD_KEY = "sk-live-0123456789abcdef-GOOD"
WRONG_KEY = "sk-live-fedcba9876543210-WRONG"
COMPLETION = "<think>The red square is at [0.1, 0.1, 0.3, 0.3] at 1.0 s.</think><answer>A</answer>"


class EchoingServer:
    """POST /v1/chat/completions that echoes the presented key in its error bodies: 401 unless the key
    is `GOOD_KEY`; 400 for temporal-grounding prompts; 503 for the first two calls of every other
    body, then a canned completion."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                with server.lock:
                    server.statuses[status] += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                presented = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if presented != GOOD_KEY:
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {presented}"}})
                    return
                key = hashlib.sha256(raw).hexdigest()
                with server.lock:
                    server.calls[key] += 1
                    attempt = server.calls[key]
                if "Task: temporal grounding" in raw.decode():
                    self._send(400, {"error": {"message": f"request refused for key {presented}"}})
                elif attempt <= 2:
                    self._send(503, {"error": {"message": f"overloaded; retry later (key {presented})"}})
                else:
                    self._send(200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": COMPLETION}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "EchoingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def file_texts(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file below `root` as bytes; a Parquet file also as the JSON of its decoded rows."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        yield path, data
        if path.suffix == ".parquet":
            yield path, json.dumps(pq.read_table(path).to_pylist(), default=str).encode()


def files_holding(root: Path, secret: str) -> list[str]:
    return sorted({str(path) for path, data in file_texts(root) if secret.encode() in data})


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def overrides(url: str, ray_tmp: Path) -> list[str]:
    return ["source.num_videos=2", "source.records_per_partition=2", "annotator=openai", f"annotator.base_url={url}",
            "annotator.model=m", f"annotator.api_key_env={KEY_ENV}", "annotator.max_retries=1",
            "annotator.backoff_s=0.01", "annotator.max_backoff_s=0.02", "cluster.num_cpus=2",
            f"cluster.temp_dir={ray_tmp}"]


def ledger(run: Path, node: str) -> list[dict[str, Any]]:
    return [row for path in sorted((run / "ledger" / node).glob("*/part-*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_echoed_key_reaches_no_file_and_a_wrong_key_fails_the_units(tmp_path: Path, ray_tmp: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    with EchoingServer() as server:
        monkeypatch.setenv(KEY_ENV, GOOD_KEY)
        code = run_build(str(run), overrides(server.url, ray_tmp), interactive=False)
        out = capsys.readouterr()
        assert code in (0, 3), out.err[-3000:]
        assert server.statuses[503] and server.statuses[400] and server.statuses[200]
        refused = [r for r in ledger(run, "annotate") if r["rule"] == "annotate_request_failed"]
        assert refused and all("HTTP 400" in r["reason"] and f"[REDACTED:{KEY_ENV}]" in r["reason"] for r in refused)
        assert (run / "dataset" / "manifest.json").exists() and (run / "dataset" / "README.md").exists()
        assert files_holding(run, GOOD_KEY) == [] and files_holding(ray_tmp, GOOD_KEY) == []
        assert list(ray_tmp.rglob("runtime_env_agent.log")), "Ray's runtime-env agent log is where env_vars are logged"
        assert GOOD_KEY not in out.out + out.err

        wrong = tmp_path / "wrong"
        monkeypatch.setenv(KEY_ENV, WRONG_KEY)
        calls = sum(server.statuses.values())
        code = run_build(str(wrong), [*overrides(server.url, ray_tmp), "max_attempts=2", "annotator.concurrency=2"],
                         interactive=False)
        out = capsys.readouterr()
    assert code == 1
    failed = [line for line in out.err.splitlines() if line.startswith("FAILED annotate/")]
    assert failed and all("HTTP 401" in line and f"api_key_env ({KEY_ENV})" in line for line in failed), out.err
    assert ledger(wrong, "annotate") == []
    # a refused key ends the unit's attempt: at most the calls in flight (concurrency 2) per attempt, not one per record
    assert sum(server.statuses.values()) - calls == server.statuses[401] <= 2 * 2 * len(failed) < 10
    errors = sorted((wrong / "stages" / "annotate").glob("*/*part-*.error.json"))
    assert errors and all("authentication failed" in json.loads(p.read_text())["error"] for p in errors)
    assert files_holding(wrong, WRONG_KEY) == [] and files_holding(ray_tmp, WRONG_KEY) == []
    assert WRONG_KEY not in out.out + out.err


def test_scrub_replaces_every_form_of_a_configured_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw, JSON-escaped and URL-quoted forms are all replaced; short values are not secrets."""
    from pipeline.redact import Secrets, scrub

    monkeypatch.setenv("K1", 'sk-"quoted"/key+1')
    monkeypatch.setenv("K2", "abc")
    secrets = Secrets.from_env(["K1", "K2", "UNSET_VARIABLE"])
    assert secrets.names() == ["K1"] and "sk-" not in repr(secrets)
    text = 'raw sk-"quoted"/key+1, json "sk-\\"quoted\\"/key+1", url sk-%22quoted%22%2Fkey%2B1, abc'
    assert scrub(text, secrets) == "raw [REDACTED:K1], json \"[REDACTED:K1]\", url [REDACTED:K1], abc"
