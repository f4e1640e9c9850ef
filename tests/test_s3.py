"""A run directory on an S3-compatible object store (a moto server on 127.0.0.1, started here):
a build killed with SIGKILL mid-way and resumed gives the dataset of a local build; nothing is
published by renaming a folder, and no temporary object is left behind.

moto comes with the `dev` extra (`moto[server]`), so CI runs this test; the server listens only on
127.0.0.1 and stops with the test module.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pytest

from tests.engine_util import kill_session, run_stgr, stgr
from tests.storage_util import assert_complete_dataset, dataset_rows, open_dir, plan_fingerprint

BUCKET = "stgr-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start moto's S3 server on 127.0.0.1, create the bucket, point this process and its children at it."""
    import boto3

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"moto server exited with {server.returncode}; see {log.name}") from None
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def overrides() -> Iterator[list[str]]:
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield ["source.num_videos=4", "source.records_per_partition=1", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _keys(uri: str) -> list[str]:
    fs, path = open_dir(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def _commits(uri: str) -> int:
    return sum(1 for k in _keys(posixpath.join(uri, "stages")) if k.endswith(".json") and not k.endswith(".error.json"))


def test_build_killed_and_resumed_on_s3_equals_a_local_build(tmp_path: Path, s3_env: dict[str, str],
                                                             overrides: list[str]) -> None:
    local = tmp_path / "run"
    code, out = run_stgr("build", "--run", str(local), *overrides)
    assert code == 0, out[-3000:]

    remote = f"s3://{BUCKET}/run"
    proc = stgr("build", "--run", remote, *overrides, env=s3_env)
    deadline = time.time() + 300
    while proc.poll() is None and _commits(remote) < 8 and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the build ended before it could be killed"
    kill_session(proc)
    code, out = run_stgr("resume", remote, env=s3_env)
    assert code == 0, out[-5000:]

    assert dataset_rows(remote) == dataset_rows(local)
    assert_complete_dataset(remote, plan_fingerprint(remote, "publish"))
    keys = _keys(remote)
    debris = [k for k in keys if ".tmp-" in k or k.startswith(".")]
    assert not debris, debris
    code, out = run_stgr("inspect", remote, "--verify", env=s3_env)
    assert code == 0, out[-3000:]
