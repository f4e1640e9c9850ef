"""Damaged files and storage faults: detected, repaired or reported, never silently used.

- A bit flip (or a truncation) in a committed stage file is caught by its sha256 in the commit record
  when a unit reads it; the damaged unit is invalidated and recomputed, the message names the file,
  and the final dataset equals a clean build. One resume covers every stage: each partition carries
  the damage of one stage, with the units that read it not yet committed, as a kill right after that
  stage committed leaves them.
- A full disk or a read-only run directory mid-build: the build ends with the failed units and the
  cause, a non-zero exit and no traceback; `stgr resume` completes once the fault is gone.
Real `stgr build` / `stgr resume` processes on real local Ray over the synthetic source.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.rundir import Unit
from tests.engine_util import build_cmd, run_stgr, stgr, wait_for_commits
from tests.storage_util import assert_complete_dataset, dataset_rows, plan_fingerprint

VIDEOS = 6


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def overrides(ray_tmp: str) -> list[str]:
    """One synthetic video per partition, so each partition can carry a different damage; a strict
    `box_too_large` makes some filter units reject records (a unit that rejects none has no ledger file)."""
    return [f"source.num_videos={VIDEOS}", "source.records_per_partition=1", "cluster.num_cpus=2",
            "filter.rules.box_too_large.threshold=0.02", f"cluster.temp_dir={ray_tmp}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    code, out = run_stgr("build", "--run", str(run), *overrides)
    assert code == 0, out[-3000:]
    return run


def _descendants(run: Path, node: str) -> list[str]:
    nodes = json.loads((run / "plan.json").read_text())["nodes"]
    found: list[str] = []
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for name, info in nodes.items():
            if current in info["after"] and name not in found:
                found.append(name)
                frontier.append(name)
    return found


def _unit_file(run: Path, node: str, partition: int, kind: str = "stages") -> Path:
    return run / kind / node / plan_fingerprint(run, node) / f"part-{partition:05d}.parquet"


def _flip_bit(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    position = (len(data) // 3 + 7919 * seed) % len(data)
    data[position] ^= 1 << (seed % 8)
    path.write_bytes(bytes(data))


def _uncommit_readers(run: Path, node: str, partition: int) -> None:
    """Remove the commit records of what reads `node`'s partition: as a kill right after it committed."""
    for reader in _descendants(run, node):
        fp = plan_fingerprint(run, reader)
        barrier = json.loads((run / "plan.json").read_text())["nodes"][reader]["barrier"]
        (run / Unit(reader, fp, 0 if barrier else partition).record).unlink(missing_ok=True)


def test_damaged_stage_files_are_detected_and_recomputed(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = []
    ledgered = [p for p in range(VIDEOS) if _unit_file(run, "filter", p, "ledger").exists()]
    assert ledgered, "no filter unit of the reference build rejected a record"
    others = [p for p in range(VIDEOS) if p != ledgered[-1]]
    damages = [*zip(others, [("source", "stages"), ("sample", "stages"), ("annotate", "stages"), ("align", "stages"),
                             ("filter", "stages")]), (ledgered[-1], ("filter", "ledger"))]
    for partition, (node, kind) in damages:
        path = _unit_file(run, node, partition, kind)
        if node == "align":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated file
        else:
            _flip_bit(path, partition)
        _uncommit_readers(run, node, partition)
        damaged.append(str(path.relative_to(run)))
    shutil.rmtree(run / "dataset")
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-5000:]
    for rel in damaged:
        assert rel in out, f"{rel} is not named in the build's output"
    assert dataset_rows(run) == dataset_rows(reference)
    assert_complete_dataset(run, plan_fingerprint(run, "publish"))
    assert run_stgr("inspect", str(run), "--verify")[0] == 0


def test_damaged_shard_output_is_detected_when_the_dataset_is_materialised(tmp_path: Path, reference: Path) -> None:
    """A shard unit's summary is read (and its damage caught) when the dataset is published again from it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    path = _unit_file(run, "shard", 0)
    _flip_bit(path, 3)
    shutil.rmtree(run / "dataset")
    code, out = run_stgr("inspect", str(run), "--verify")
    assert code == 1 and str(path.relative_to(run)) in out, out
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-5000:]
    assert str(path.relative_to(run)) in out
    assert dataset_rows(run) == dataset_rows(reference)
    assert run_stgr("inspect", str(run), "--verify")[0] == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs for the run directory: a disk that can be filled and made read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the storage-fault tests need mount rights")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    return ballast


def _remount(disk: Path, mode: str) -> None:
    """Remount `disk` ro/rw; a remount to ro is refused while a file is open for writing, so retry."""
    for _ in range(400):
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], capture_output=True).returncode == 0:
            return
    raise AssertionError(f"could not remount {disk} {mode}")


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_storage_fault_mid_build_is_a_failure_and_resume_completes(small_disk: Path, reference: Path,
                                                                   overrides: list[str], fault: str) -> None:
    run = small_disk / "run"
    proc = stgr("build", "--run", str(run), *overrides)
    wait_for_commits(run, 3, proc)
    ballast = _fill(small_disk) if fault == "full" else None
    if fault == "read-only":
        _remount(small_disk, "ro")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    cause = "No space left on device" if fault == "full" else "Read-only file system"
    failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert failed and any(cause in line for line in failed), out[-5000:]
    assert f"stgr resume {run}" in out
    if ballast is not None:
        ballast.unlink()
    else:
        _remount(small_disk, "rw")
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-5000:]
    assert dataset_rows(run) == dataset_rows(reference)


def test_unwritable_run_directory_at_start_is_one_line(small_disk: Path) -> None:
    _remount(small_disk, "ro")
    code, out = run_stgr(*build_cmd(small_disk / "run"))
    assert code != 0 and "Traceback" not in out, out
    assert "Read-only file system" in out.strip().splitlines()[-1]
