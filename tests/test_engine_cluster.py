"""The engine on a real multi-node Ray cluster (all on this machine): node loss and Ray Jobs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.engine_util import (REPO, build_cmd, expected_threshold_rows, kill_session, node_rows, run_stgr, stgr,
                               wait_for_commits)
from tests.test_build_outcome import REJECT_ALL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_removing_a_node_mid_build_loses_nothing(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=1)
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run = tmp_path / "run"
        proc = stgr(*build_cmd(run, "numbers.work_s=0.3", "scale.work_s=0.1", "max_attempts=3",
                               f"cluster.address={cluster.address}"))
        wait_for_commits(run, 8, proc)
        assert proc.poll() is None, "the build finished before the node could be removed"
        cluster.remove_node(doomed)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        rows = sorted(node_rows(run, "threshold"), key=lambda r: r["id"])
        assert rows == expected_threshold_rows()
        assert node_rows(run, "total")[0]["rows"] == len(rows)
    finally:
        cluster.shutdown()


def test_submit_runs_the_build_as_a_ray_job(tmp_path: Path) -> None:
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="stgr-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--block"],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}, stderr=(tmp_path / "head.log").open("w"),
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail(f"the Ray head's dashboard did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}")
        run = tmp_path / "run"
        code, out = run_stgr(*build_cmd(run, "numbers.partitions=4", "numbers.secret_env=STGR_TEST_SECRET"), "--submit",
                             env={"RAY_ADDRESS": address, "STGR_TEST_SECRET": "hunter2-secret"})
        assert code == 0, out
        job_id = out.strip().splitlines()[-1]
        assert json.loads((run / "job.json").read_text())["job_id"] == job_id
        code, log = run_stgr("build", "--run", str(run), "--follow", timeout=300)
        assert code == 0, log
        assert "committed" in log
        code, status = run_stgr("status", str(run))
        assert code == 0 and "(complete)" in status
        rows = sorted(node_rows(run, "threshold"), key=lambda r: r["id"])
        assert all(r.pop("secret_seen") for r in rows), "the named variable did not reach the workers"
        assert rows == expected_threshold_rows(partitions=4)
        leaked = [p for p in run.rglob("*") if p.is_file() and b"hunter2-secret" in p.read_bytes()]
        assert not leaked, f"the secret was written to {leaked}"

        # a submitted build that ends with an empty dataset: --follow exits 3, as the build does
        empty = tmp_path / "empty"
        code, out = run_stgr("build", "--run", str(empty), "source.num_videos=1", *REJECT_ALL, "--submit",
                             env={"RAY_ADDRESS": address})
        assert code == 0, out
        code, log = run_stgr("build", "--run", str(empty), "--follow", timeout=300)
        assert code == 3 and "is empty (0 rows)" in log, log[-3000:]
    finally:
        kill_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
