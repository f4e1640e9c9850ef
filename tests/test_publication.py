"""The dataset belongs to the plan, and publishing it is atomic per attempt.

- switch-back: a run directory built with one config, then another, then the first again, holds the
  first config's dataset (the publish unit is reused; the shard units whose files the other config's
  publication deleted are recomputed, and the dataset is published from their summaries), and
  `stgr inspect --verify` fails while the dataset is not the plan's;
- racing publications: two publish attempts of the same fingerprint (a straggler of a killed build
  and the resumed one) run at once, one of them killed at a random instant, 20 times, over shard
  units that repeat an id across partitions (so a file is rewritten and its original deleted):
  whenever the publish unit is committed, the dataset is complete (manifest of that fingerprint,
  every file it lists intact, nothing else in the split folders).
Real `stgr` processes on real local Ray for the first; real processes racing `run_unit` for the second.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
from pathlib import Path

from pipeline.rundir import RunDir, Unit, commit, is_committed
from pipeline.worker import UnitTask, run_unit
from stages.lib.schema import to_table
from tests.engine_util import run_stgr
from tests.record_factory import make_record
from tests.shard_util import publish_records
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
    assert_complete_dataset(run, plan_fingerprint(run, "publish"))
    assert run_stgr("inspect", str(run), "--verify")[0] == 0

    # a dataset that is not the plan's (here: the strict one put back) fails verification, naming why,
    # and a resume republishes the plan's dataset: the publish unit is reused, the shard unit whose
    # files the strict publication deleted is recomputed from its committed input
    shutil.rmtree(run / "dataset")
    shutil.copytree(stale, run / "dataset")
    code, out = run_stgr("inspect", str(run), "--verify")
    assert code == 1, out
    assert "does not match the run's plan" in out
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-3000:]
    assert "1 unit(s) committed, 6 reused" in out
    assert dataset_rows(run) == clean
    assert run_stgr("inspect", str(run), "--verify")[0] == 0


FILTER_FP, SHARD_FP, PUBLISH_FP, OLD_FP = "f0" * 8, "5a" * 8, "9b" * 8, "01" * 8


def _race_run(tmp_path: Path) -> tuple[RunDir, UnitTask, Path]:
    """A run directory whose two filter and two shard units are committed (partition 1 repeats an id
    of partition 0), and the publish task that reads them; plus a saved dataset folder holding the
    shard units' files and the dataset of an older publish fingerprint, which each trial replaces."""
    run = RunDir.open(str(tmp_path / "run"))
    fingerprints = {"filter": FILTER_FP, "shard": SHARD_FP, "publish": PUBLISH_FP}
    nodes = {"filter": ([], False), "shard": (["filter"], False), "publish": (["shard"], True)}
    plan = {"build_id": "run", "nodes": {
        name: {"node": name, "stage": name, "fingerprint": fingerprints[name], "partitions": 1 if barrier else 2,
               "after": after, "actor": False, "barrier": barrier} for name, (after, barrier) in nodes.items()}}
    config = {"target_shard_mb": 0.05}
    publish_records(run.path, to_table([make_record(100 + i) for i in range(5)]), config,
                    {"shard": OLD_FP, "publish": OLD_FP})
    run.write_text("plan.json", json.dumps(plan))
    shards = []
    for p in range(2):
        unit = Unit("filter", FILTER_FP, p)
        ids = [*range(10 * p, 10 * p + 10), *([5] if p else [])]
        commit(run, unit, to_table([make_record(i, with_jpeg=True) for i in ids]), [], {"node": "filter", "partition": p})
        shard = UnitTask(run.uri, Unit("shard", SHARD_FP, p), "shard", config, (unit,), 2, 1, "run",
                         fingerprints=fingerprints)
        run_unit(shard)
        shards.append(shard.unit)
    old = tmp_path / "old-dataset"
    shutil.copytree(run.join("dataset"), old)
    task = UnitTask(run.uri, Unit("publish", PUBLISH_FP, 0), "publish", config, tuple(shards), 1, 1, "run",
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
    mp.set_forkserver_preload(["pipeline.worker", "stages.plugins", "stages.publish"])
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
            assert_complete_dataset(run.path, PUBLISH_FP)
            manifest = read_json(run.path, "dataset/manifest.json")
            assert manifest["rows"] == 20, f"trial {trial}"
    assert committed == 20, "every trial has an attempt that is not killed, and it commits"
