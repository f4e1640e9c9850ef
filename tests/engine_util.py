"""Run the engine's test DAG as a real `stgr build` process and read its results back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "tests" / "engine_conf"


def stgr(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start `stgr ...` in its own session (so a test can kill the driver *and* its Ray workers)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
           **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def build_cmd(run: Path | str, *overrides: str) -> list[str]:
    return ["build", "--run", str(run), "--config-dir", str(CONF), "--config-name", "engine", *overrides]


def run_stgr(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = stgr(*args, env=env)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the build's session: the driver, raylet, GCS and every worker."""
    sid = os.getsid(proc.pid)
    subprocess.run(["pkill", "-9", "-s", str(sid)], check=False)
    proc.wait(timeout=60)
    for _ in range(50):
        if subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).returncode != 0:
            return
        time.sleep(0.1)


def kill_when_cached(proc: subprocess.Popen, cache: Path, count: int, server: Any) -> int:
    """SIGKILL the build's session once `count` responses are in the response cache folder `cache`,
    let the requests `server` (a test endpoint with `in_flight`) had already accepted finish, and
    return how many responses were cached then."""
    deadline = time.monotonic() + 300
    while len(list(cache.rglob("*.json"))) < count:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "annotate never cached a response"
        time.sleep(0.05)
    kill_session(proc)
    while server.in_flight:
        time.sleep(0.05)
    return len(list(cache.rglob("*.json")))


def commit_records(run: Path) -> dict[str, str]:
    """unit path -> commit record text, for every committed unit."""
    out = {}
    for path in sorted((run / "stages").glob("*/*/_part-*.json")):
        if not path.name.endswith(".error.json"):
            out[str(path.relative_to(run))] = path.read_text()
    return out


def node_rows(run: Path, node: str) -> list[dict]:
    plan = json.loads((run / "plan.json").read_text())
    fp = plan["nodes"][node]["fingerprint"]
    rows = []
    for path in sorted((run / "stages" / node / fp).glob("part-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def ledger_rows(run: Path, node: str) -> list[dict]:
    plan = json.loads((run / "plan.json").read_text())
    fp = plan["nodes"][node]["fingerprint"]
    rows = []
    for path in sorted((run / "ledger" / node / fp).glob("part-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def wait_for_commits(run: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(commit_records(run)) >= count:
            return
        time.sleep(0.05)


def expected_threshold_rows(partitions: int = 16, rows: int = 25, factor: int = 3, min_value: int = 30) -> list[dict]:
    """What the test DAG must produce, computed without the engine."""
    values = [(f"r{v:06d}", v * factor) for v in range(partitions * rows)]
    return [{"id": i, "value": x} for i, x in values if x >= min_value]
