"""The dataset belongs to the plan, and publishing it is atomic per attempt.

- switch-back: a run directory built with one config, then another, then the first again, holds the
  first config's dataset (the shard unit is reused, so the dataset is materialised from it), and
  `stgr inspect --verify` fails while the dataset is not the plan's;
- racing publications: two shard attempts of the same fingerprint (a straggler of a killed build and
  the resumed one) run at once, one of them killed at a random instant, 20 times: whenever the shard
  unit is committed, the dataset is complete (manifest of that fingerprint, every shard it lists
  intact, nothing else in the split folders).
Real `stgr` processes on real local Ray for the first; real processes racing `run_unit` for the second.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import signal
from pathlib import Path

from pipeline.rundir import RunDir, Unit, commit, is_committed
from pipeline.testing import unit_context
from pipeline.worker import UnitTask, run_unit
from stages.lib.schema import to_table
from stages.shard import ShardStage
from tests.engine_util import run_stgr
from tests.record_factory import make_record
from tests.storage_util import assert_complete_dataset, dataset_rows, plan_fingerprint, read_json
from tests.storage_util import small  # noqa: F401,F811 - a pytest fixture

BOX_SMALL = "filter.rules.box_too_large.threshold=0.02"


def test_switch_back_rebuilds_the_dataset_of_the_final_config(tmp_path: Path, small: list[str]) -> None:
    run = tmp_path / "run"
    code, out = run_stgr("build", "--run", str(run), *small, "shard.allow_empty=true")
    assert code == 0, out[-3000:]
    clean = dataset_rows(run)
    assert sum(len(rows) for rows in clean.values()) > 0

    code, out = run_stgr("build", "--run", str(run), *small, BOX_SMALL, "shard.allow_empty=true")
    assert code == 0, out[-3000:]
    strict = dataset_rows(run)
    assert strict != clean, "the stricter box rule must change the dataset for this test to mean anything"
    stale = tmp_path / "stale-dataset"
    shutil.copytree(run / "dataset", stale)

    code, out = run_stgr("build", "--run", str(run), *small, "shard.allow_empty=true")
    assert code == 0, out[-3000:]
    assert dataset_rows(run) == clean
    assert_complete_dataset(run, plan_fingerprint(run, "shard"))
    assert run_stgr("inspect", str(run), "--verify")[0] == 0

    # a dataset that is not the plan's (here: the strict one put back) fails verification, naming why,
    # and a resume republishes the plan's dataset from the committed shard unit without recomputing it
    shutil.rmtree(run / "dataset")
    shutil.copytree(stale, run / "dataset")
    code, out = run_stgr("inspect", str(run), "--verify")
    assert code == 1, out
    assert "does not match the run's plan" in out
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-3000:]
    assert "0 unit(s) committed, 6 reused" in out
    assert dataset_rows(run) == clean
    assert run_stgr("inspect", str(run), "--verify")[0] == 0


FILTER_FP, SHARD_FP, OLD_FP = "f0" * 8, "5a" * 8, "01" * 8


def _race_run(tmp_path: Path) -> tuple[RunDir, UnitTask, Path]:
    """A run directory whose two filter units are committed, and the shard task that reads them;
    plus a saved dataset of an older shard fingerprint, which each trial's publication replaces."""
    run = RunDir.open(str(tmp_path / "run"))
    inputs = []
    for p in range(2):
        unit = Unit("filter", FILTER_FP, p)
        table = to_table([make_record(10 * p + i, with_jpeg=True) for i in range(10)])
        commit(run, unit, table, [], {"node": "filter", "partition": p})
        inputs.append(unit)
    fingerprints = {"filter": FILTER_FP, "shard": SHARD_FP}
    plan = {"build_id": "run", "nodes": {
        "filter": {"node": "filter", "stage": "filter", "fingerprint": FILTER_FP, "partitions": 2, "after": [],
                   "actor": False, "barrier": False},
        "shard": {"node": "shard", "stage": "shard", "fingerprint": SHARD_FP, "partitions": 1, "after": ["filter"],
                  "actor": False, "barrier": True}}}
    config = {"target_shard_mb": 0.05}
    old_ctx = dataclasses.replace(unit_context(run.path, stage="shard", fingerprint=OLD_FP),
                                  fingerprints={**fingerprints, "shard": OLD_FP})
    ShardStage(config).process(to_table([make_record(100 + i) for i in range(5)]), old_ctx)
    old = tmp_path / "old-dataset"
    shutil.move(run.join("dataset"), old)
    run.write_text("plan.json", json.dumps(plan))
    task = UnitTask(run.uri, Unit("shard", SHARD_FP, 0), "shard", config, tuple(inputs), 1, 1, "run",
                    fingerprints=fingerprints)
    return run, task, old


def _attempt(task: UnitTask) -> None:
    try:
        run_unit(task)
    except Exception:  # noqa: BLE001 - a losing attempt may fail; what counts is the state it leaves
        os._exit(1)


def test_racing_publications_never_leave_a_committed_unit_without_its_dataset(tmp_path: Path) -> None:
    run, task, old = _race_run(tmp_path)
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["pipeline.worker", "stages.plugins", "stages.shard"])
    committed = 0
    for trial in range(20):
        rng = random.Random(trial)
        shutil.rmtree(run.join("dataset"), ignore_errors=True)
        shutil.copytree(old, run.join("dataset"))
        run.delete(task.unit.record)
        attempts = [mp.Process(target=_attempt, args=(task,)) for _ in range(2)]
        for proc in attempts:
            proc.start()
        victim = rng.choice([*attempts, None])
        if victim is not None:
            victim.join(rng.uniform(0.0, 1.5))
            if victim.is_alive():
                os.kill(victim.pid, signal.SIGKILL)
        for proc in attempts:
            proc.join(120)
        if is_committed(run, task.unit):
            committed += 1
            assert_complete_dataset(run.path, SHARD_FP)
            manifest = read_json(run.path, "dataset/manifest.json")
            assert manifest["rows"] == 20, f"trial {trial}"
    assert committed == 20, "every trial has an attempt that is not killed, and it commits"
