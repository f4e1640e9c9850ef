"""The streaming shard: `shard` writes each partition's dataset files, `publish` only the manifest.

- a real `stgr build` (real local Ray) SIGKILLed, driver and workers, while the per-partition shard
  units write their files, then `stgr resume`: the dataset (rows, ids, splits, frame bytes) equals a
  clean build's;
- the same, killed during publication: every shard unit committed, its files in the dataset folder,
  the manifest not yet written (the kill is timed like the engine's kill -9 tests: by polling the
  run directory's commit records, tests/engine_util.py);
- ids repeated across partitions: the first partition's record is kept, each other copy is one
  ledger row, the dataset holds each id once, and the rewritten file survives a publication that
  is repeated after its original was deleted (a kill after the manifest, before the commit).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from pipeline.rundir import RunDir, Unit, is_committed
from stages.lib.schema import SETS, to_table
from tests.engine_util import commit_records, kill_session, run_stgr, stgr
from tests.record_factory import make_record
from tests.shard_util import publish_partitions
from tests.storage_util import assert_complete_dataset, built_run, dataset_files, dataset_rows, plan_fingerprint

PARTITIONS = 8


@pytest.fixture(scope="module")
def overrides() -> Iterator[list[str]]:
    """One synthetic video per partition: eight shard units, each writing its own files."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield [f"source.num_videos={PARTITIONS}", "source.records_per_partition=1", "cluster.num_cpus=2",
           f"cluster.temp_dir={ray_tmp}"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    return built_run(tmp_path_factory, "clean", overrides)


def _committed(run: Path, node: str) -> int:
    return sum(key.startswith(f"stages/{node}/") for key in commit_records(run))


def _shard_files(run: Path) -> list[Path]:
    return [p for name in SETS for p in (run / "dataset" / name).glob("part-*.parquet")]


def _poll(until, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not until():
        time.sleep(0.01)


def _assert_equals_clean(run: Path, clean: Path) -> None:
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-3000:]
    rows, reference = dataset_rows(run), dataset_rows(clean)
    assert rows == reference  # every column: ids, splits, frames with their JPEG bytes
    assert sum(len(r) for r in rows.values()) > 0
    assert all(f["image"]["bytes"] for r in rows.values() for row in r for f in row["frames"])
    assert_complete_dataset(run, plan_fingerprint(run, "publish"))
    assert run_stgr("inspect", str(run), "--verify")[0] == 0


def test_kill_during_the_per_partition_shard_writes_then_resume(tmp_path: Path, clean: Path,
                                                                 overrides: list[str]) -> None:
    run = tmp_path / "run"
    proc = stgr("build", "--run", str(run), *overrides)
    _poll(lambda: bool(_shard_files(run)), proc)
    kill_session(proc)
    shards = _committed(run, "shard")
    assert _shard_files(run) and shards < PARTITIONS, "the kill must land while shard units are writing"
    assert not (run / "dataset" / "manifest.json").exists()
    _assert_equals_clean(run, clean)


def test_kill_during_publication_then_resume(tmp_path: Path, clean: Path, overrides: list[str]) -> None:
    """Killed once every shard unit committed and before the publish unit did: the files are all
    in the dataset folder, no manifest lists them yet."""
    run = tmp_path / "run"
    killed_between = False
    for delay in (0.0, 0.05, 0.2):
        proc = stgr("build", "--run", str(run), *overrides)
        _poll(lambda: _committed(run, "shard") == PARTITIONS, proc)
        time.sleep(delay)
        kill_session(proc)
        if _committed(run, "publish") == 0 and not (run / "dataset" / "manifest.json").exists():
            killed_between = True
            assert len(_shard_files(run)) >= PARTITIONS
            break
        shutil.rmtree(run)
    assert killed_between, "no kill landed between the shard files and the manifest"
    _assert_equals_clean(run, clean)


def test_ids_repeated_across_partitions_are_ledgered_once_and_published_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    partitions = [to_table([make_record(i, with_jpeg=True) for i in ids])
                  for ids in ([0, 1, 2, 3], [2, 3, 4, 5], [3, 6])]
    first = {make_record(i)["id"]: partitions[0].slice(i, 1).to_pylist()[0]["question"] for i in (2, 3)}
    shards, published = publish_partitions(run, partitions, {"rl_fraction": 0.5})
    assert all(r.rejections == [] for r in shards)
    repeated = sorted(r.id for r in published.rejections)
    assert repeated == sorted([make_record(2)["id"], make_record(3)["id"], make_record(3)["id"]])
    assert {r.rule for r in published.rejections} == {"duplicate_id"}

    frame = pd.concat([pd.read_parquet(run / "dataset" / name) for name in SETS])
    assert sorted(frame["id"]) == sorted(make_record(i)["id"] for i in range(7))
    assert all(frame.set_index("id").loc[i, "question"] == q for i, q in first.items())
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    assert manifest["rows"] == 7 and manifest["replaced"], "a file holding a repeated id is rewritten"
    assert_complete_dataset(run, "p" * 16)
    assert not any(path in dataset_files(run) for path in manifest["replaced"]), "originals are deleted"

    # publishing again once the originals are gone (a kill after the manifest, before the unit
    # committed, with a debris file that makes the dataset look incomplete) reuses the rewritten files
    (run / "dataset" / "stgr-cot" / "part-00009-00000-000000000000.parquet").write_bytes(b"debris")
    _, again = publish_partitions(run, partitions, {"rl_fraction": 0.5}, attempt=2)
    assert json.loads((run / "dataset" / "manifest.json").read_text())["splits"] == manifest["splits"]
    assert sorted(r.id for r in again.rejections) == repeated
    assert_complete_dataset(run, "p" * 16)


def test_a_lost_shard_file_has_its_unit_recomputed(tmp_path: Path, clean: Path) -> None:
    """A shard file deleted from a complete run: `stgr resume` recomputes that shard unit only (its
    committed summary names the file) and publishes again; nothing else runs."""
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    lost = manifest["splits"]["stgr-cot"]["shards"][0]["path"]
    (run / "dataset" / lost).unlink()
    partition = int(lost.split("/part-")[1][:5])
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-3000:]
    assert "1 unit(s) committed" in out and lost in out
    assert is_committed(RunDir.open(str(run)), Unit("shard", plan_fingerprint(run, "shard"), partition))
    assert dataset_rows(run) == dataset_rows(clean)
    assert_complete_dataset(run, plan_fingerprint(run, "publish"))
