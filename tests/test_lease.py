"""One build per run directory at a time: the lease (`lease.json`: owner, host, pid, heartbeat).

A second build with another plan is refused with one line and exit 2 while the first is alive; a
lease is taken over only when stale (its heartbeat older than its TTL, or its process gone from this
host); builds of the same plan share the run directory. Builds run as real `stgr` processes on real
local Ray; the lease rules are also checked directly on the run directory's files.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.lease import LEASE, LeaseHeld, acquire
from pipeline.rundir import RunDir
from pipeline.status import format_status, run_status
from tests.engine_util import CONF, build_cmd, expected_threshold_rows, kill_session, node_rows, run_stgr, stgr

FAST = ["numbers.work_s=0.05"]


def _foreign(**fields: object) -> str:
    record = {"owner": "0" * 32, "host": "elsewhere.example", "pid": 4242, "pid_start": None, "plan": "another plan",
              "build_id": "other", "heartbeat": time.time(), "acquired": time.time(), "ttl_s": 60.0}
    return json.dumps({**record, **fields})


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lease_record_sharing_heartbeat_and_release(tmp_path: Path) -> None:
    run = RunDir.open(str(tmp_path / "run"))
    run.makedirs("")
    lease = acquire(run, "plan a", "a")
    record = json.loads(run.read_text(LEASE))
    assert {k: record[k] for k in ("owner", "host", "pid", "plan")} == {
        "owner": lease.owner, "host": socket.gethostname(), "pid": os.getpid(), "plan": "plan a"}
    assert not lease.shared and record["heartbeat"] >= record["acquired"]

    with pytest.raises(LeaseHeld) as refused:
        acquire(run, "plan b", "b")
    message = str(refused.value)
    assert "\n" not in message and f"pid {os.getpid()}" in message and socket.gethostname() in message

    run.write_text("plan.json", json.dumps({"build_id": "a", "nodes": {}}))
    status = format_status(run_status(run))
    assert f"held by build 'a' on host {socket.gethostname()}, pid {os.getpid()}" in status.splitlines()[1]

    joined = acquire(run, "plan a", "a again")
    assert joined.shared and json.loads(run.read_text(LEASE))["owner"] == lease.owner

    lease.beat()
    assert json.loads(run.read_text(LEASE))["heartbeat"] > record["heartbeat"]
    joined.release()  # a sharer never removes the holder's record
    assert json.loads(run.read_text(LEASE))["owner"] == lease.owner
    lease.release()
    assert not run.exists(LEASE)


@pytest.mark.parametrize("stale", [{"heartbeat": time.time() - 3600},
                                   {"host": socket.gethostname(), "pid": _dead_pid()}],
                         ids=["old-heartbeat", "dead-process"])
def test_a_stale_lease_is_taken_over(tmp_path: Path, stale: dict) -> None:
    run = RunDir.open(str(tmp_path / "run"))
    run.write_text(LEASE, _foreign(**stale))
    lease = acquire(run, "plan b", "b")
    assert not lease.shared and json.loads(run.read_text(LEASE))["owner"] == lease.owner
    lease.release()


def test_a_lost_lease_is_noticed_and_left_alone(tmp_path: Path) -> None:
    run = RunDir.open(str(tmp_path / "run"))
    lease = acquire(run, "plan a", "a")
    run.write_text(LEASE, _foreign())  # taken over while this holder's heartbeat was stale
    lease.beat()
    assert lease.lost and "elsewhere.example" in lease.lost
    lease.release()
    assert json.loads(run.read_text(LEASE))["host"] == "elsewhere.example"


def test_build_refused_by_a_live_lease_of_another_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LEASE).write_text(_foreign())
    code = main(["build", "--run", str(run), "--config-dir", str(CONF), "--config-name", "engine", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "elsewhere.example" in err[0] and "pid 4242" in err[0]
    assert sorted(p.name for p in run.iterdir()) == [LEASE]


def test_concurrent_build_with_another_config_exits_2(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = stgr(*build_cmd(run, "numbers.work_s=2"))
    try:
        deadline = time.time() + 120
        while not (run / "plan.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        code, out = run_stgr(*build_cmd(run, "numbers.work_s=2", "threshold.min_value=60"))
        assert first.poll() is None, "the first build ended before the second one started: nothing was tested"
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1, out
        assert f"pid {first.pid}" in lines[0] and "another plan" in lines[0]
        assert json.loads((run / LEASE).read_text())["pid"] == first.pid
    finally:
        kill_session(first)
    # the killed build's lease is stale at once (its process is gone from this host): a new build takes over
    code, out = run_stgr(*build_cmd(run, *FAST))
    assert code == 0, out[-3000:]
    assert sorted(node_rows(run, "threshold"), key=lambda r: r["id"]) == expected_threshold_rows()
    assert not (run / LEASE).exists()


def test_same_config_builds_share_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = [stgr(*build_cmd(run, *FAST)) for _ in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    assert sorted(node_rows(run, "threshold"), key=lambda r: r["id"]) == expected_threshold_rows()
