"""Helpers for the run-directory tests (publication, lease, corruption, storage faults, S3): small
default builds on the synthetic source, and the dataset read back the way a reader must read it,
through its manifest, on any pyarrow filesystem."""
from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from stages.lib.schema import SETS


@pytest.fixture
def small() -> Iterator[list[str]]:
    """Overrides for a default build of two synthetic videos in one partition (seconds on 2 cores)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield ["source.num_videos=2", "source.records_per_partition=2", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def open_dir(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    fs, path = pafs.FileSystem.from_uri(str(uri) if "://" in str(uri) else str(Path(uri).resolve()))
    return fs, path.rstrip("/")


def read_json(uri: str | Path, rel: str) -> dict[str, Any]:
    fs, path = open_dir(uri)
    with fs.open_input_stream(posixpath.join(path, rel)) as f:
        return json.loads(f.read())


def _portable(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its media location relative to the run's media folder (the only column that names
    the run directory), so datasets built in different run directories compare equal."""
    media = dict(row["media"])
    media["uri"] = media["uri"].split("/media/", 1)[-1]
    return {**row, "media": media}


def dataset_rows(run: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of `run`'s dataset per split folder, read through dataset/manifest.json."""
    fs, path = open_dir(run)
    manifest = read_json(run, "dataset/manifest.json")
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in SETS:
        rows[name] = []
        for shard in manifest["splits"][name]["shards"]:
            with fs.open_input_file(posixpath.join(path, "dataset", shard["path"])) as f:
                rows[name].extend(_portable(r) for r in pq.read_table(f).to_pylist())
    return rows


def dataset_files(run: str | Path) -> list[str]:
    """Every file under `run`/dataset, relative to it."""
    fs, path = open_dir(run)
    base = posixpath.join(path, "dataset")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)


def assert_complete_dataset(run: str | Path, fingerprint: str) -> None:
    """The dataset is the one of publish fingerprint `fingerprint`: its manifest says so, every shard it
    lists is there with its size and sha256, and nothing else is (a reader listing a split folder
    reads exactly the manifest's rows)."""
    import hashlib

    fs, path = open_dir(run)
    manifest = read_json(run, "dataset/manifest.json")
    assert manifest["fingerprint"] == fingerprint
    listed = sorted(s["path"] for info in manifest["splits"].values() for s in info["shards"])
    assert dataset_files(run) == sorted([*listed, "README.md", "manifest.json"])
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            with fs.open_input_stream(posixpath.join(path, "dataset", shard["path"])) as f:
                data = f.read()
            assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard["path"]


def plan_fingerprint(run: str | Path, node: str) -> str:
    return read_json(run, "plan.json")["nodes"][node]["fingerprint"]


def built_run(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> Path:
    """A run directory built once by a real `stgr build` with `overrides` (a module's reference run)."""
    from tests.engine_util import run_stgr

    run = tmp_path_factory.mktemp(name) / "run"
    code, out = run_stgr("build", "--run", str(run), *overrides)
    assert code == 0, out[-3000:]
    return run
