"""The engine's contract, end to end on real local Ray: exactly-once commits, resume, fingerprints,
failures, config validation, isolation. Builds run as real `stgr build` processes."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.engine_util import (build_cmd, commit_records, expected_threshold_rows, kill_session, ledger_rows, node_rows,
                               run_stgr, stgr,
                               wait_for_commits)

FAST = ["numbers.work_s=0.05"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted build, the yardstick for every disturbed one."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, out = run_stgr(*build_cmd(run, *FAST))
    assert code == 0, out
    return run


def _output(run: Path) -> tuple[list[dict], list[dict], list[dict]]:
    rows = sorted(node_rows(run, "threshold"), key=lambda r: r["id"])
    ledger = sorted(ledger_rows(run, "threshold"), key=lambda r: r["id"])
    return rows, ledger, node_rows(run, "total")


def test_reference_build(reference: Path) -> None:
    rows, ledger, total = _output(reference)
    assert len(rows) == 390 and len(ledger) == 10
    assert len({r["id"] for r in rows}) == 390
    assert total == [{"id": "total", "rows": 390, "sum": sum(r["value"] for r in rows)}]
    code, out = run_stgr("status", str(reference), "--json")
    status = json.loads(out[out.index("{"):])
    assert code == 0 and status["complete"]
    assert [s["done"] for s in status["stages"]] == [16, 16, 16, 1]


def test_sigkill_ten_times_then_resume(tmp_path: Path, reference: Path) -> None:
    """Ten SIGKILLs of the whole build (driver and workers) at random moments, then a resume:
    exactly the reference rows, and no unit committed before a kill ever ran again."""
    run = tmp_path / "run"
    marks = tmp_path / "marks"
    overrides = [*FAST, f"numbers.marks_dir={marks}", f"scale.marks_dir={marks}", f"threshold.marks_dir={marks}"]
    snapshots: list[tuple[int, dict[str, str]]] = []
    total_units = 49
    for seed in range(10):
        rng = random.Random(seed)
        proc = stgr(*build_cmd(run, *overrides))
        target = len(commit_records(run)) + rng.randint(1, 6)
        wait_for_commits(run, min(target, total_units - 1), proc)
        time.sleep(rng.uniform(0, 0.2))
        kill_session(proc)
        snapshots.append((time.time_ns(), commit_records(run)))
    code, out = run_stgr("resume", str(run))
    assert code == 0, out
    assert _output(run) == _output(reference)
    final = commit_records(run)
    for killed_at, committed in snapshots:
        for unit, record in committed.items():
            assert final[unit] == record, f"{unit} was committed twice"
            node, fp, name = unit.split("/")[1:]
            part = int(name[5:10])
            reruns = [m for m in marks.glob(f"{node}-{part:05d}-*") if int(m.name.split("-")[2]) > killed_at]
            assert not reruns, f"{unit} committed before a kill but ran again"
    assert any(committed for _, committed in snapshots[:3]), "no kill happened after a commit"
    assert len(snapshots[-1][1]) < total_units or len(commit_records(run)) == total_units


def test_changed_parameter_reruns_only_downstream(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    assert run_stgr(*build_cmd(run, *FAST))[0] == 0
    before = commit_records(run)
    plan_before = json.loads((run / "plan.json").read_text())["nodes"]
    code, out = run_stgr(*build_cmd(run, *FAST, "threshold.min_value=60"))
    assert code == 0, out
    plan_after = json.loads((run / "plan.json").read_text())["nodes"]
    after = commit_records(run)
    for node in ("numbers", "scale"):
        assert plan_after[node]["fingerprint"] == plan_before[node]["fingerprint"]
    for node in ("threshold", "total"):
        assert plan_after[node]["fingerprint"] != plan_before[node]["fingerprint"]
    reused = {k for k in before if k.startswith(("stages/numbers/", "stages/scale/"))}
    assert reused and all(after[k] == before[k] for k in reused)
    new = [k for k in after if k not in before]
    assert len(new) == 17 and all(k.startswith(("stages/threshold/", "stages/total/")) for k in new)
    assert all(r["value"] >= 60 for r in node_rows(run, "threshold"))


def test_record_error_goes_to_ledger(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = run_stgr(*build_cmd(run, "numbers.partitions=4", "scale.fail_every=100", "threshold.min_value=0"))
    assert code == 0, out
    assert len(node_rows(run, "scale")) == 99
    (rejected,) = ledger_rows(run, "scale")
    assert rejected["id"] == "r000099" and rejected["rule"] == "exception"
    assert rejected["reason"] == "ValueError: value 99 is unlucky"
    assert "engine_stages.py" in rejected["error"] and rejected["attempt"] == 1


def test_worker_death_marks_partition_failed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = run_stgr(*build_cmd(run, "numbers.partitions=6", "scale.die_on_partition=2"))
    assert code == 1, out
    assert "FAILED scale/part-00002" in out
    code, status_text = run_stgr("status", str(run))
    assert code == 1
    assert "FAILED scale/part-00002 (attempt 2)" in status_text
    assert "died" in status_text.lower() or "worker" in status_text.lower()
    status = json.loads(run_stgr("status", str(run), "--json")[1])
    by_node = {s["node"]: s for s in status["stages"]}
    assert by_node["scale"]["done"] == 5 and by_node["scale"]["failed"] == 1
    assert by_node["threshold"]["done"] == 5 and by_node["total"]["done"] == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("dag.scale.stage=nope", "dag.scale.stage: unknown stage 'nope'"),
        ("~numbers.rows", "numbers.rows: required by stage 'test_numbers' but missing"),
        ("+dag.numbers.after=[total]", "dag.numbers.after: source stage"),
        ("dag.scale.after=[total]", "dag: cycle"),
        ("numbers.partitions=many", "numbers.partitions: expected int, got str 'many'"),
    ],
)
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys, override: str, expected: str) -> None:
    run = tmp_path / "run"
    from tests.engine_util import CONF

    code = main(["build", "--run", str(run), "--config-dir", str(CONF), "--config-name", "engine", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0], err
    assert not run.exists()


def test_two_builds_at_once_do_not_disturb_each_other(tmp_path: Path, reference: Path) -> None:
    """Two embedded Rays side by side; the second run directory is given as a pyarrow URI."""
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [stgr(*build_cmd(runs[0], *FAST)), stgr(*build_cmd(f"file://{runs[1]}", *FAST))]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    for run in runs:
        assert _output(run) == _output(reference)


@pytest.mark.parametrize("cpus", [1, 4])
def test_actor_stage_loads_once_per_actor_and_never_starves_tasks(tmp_path: Path, cpus: int) -> None:
    """A model stage in an actor pool, fed by CPU tasks: the actor's setup runs once per actor, and
    on a 1-CPU cluster the idle actor gives its CPU back instead of deadlocking the tasks it waits for."""
    run, marks = tmp_path / "run", tmp_path / "marks"
    code, out = run_stgr(*build_cmd(run, "numbers.partitions=6", "numbers.work_s=0.2", "dag.scale.stage=test_actor_scale",
                                    f"scale.marks_dir={marks}", f"cluster.num_cpus={cpus}"))
    assert code == 0, out
    assert sorted(node_rows(run, "threshold"), key=lambda r: r["id"]) == expected_threshold_rows(partitions=6)
    setups = list(marks.glob("setup-*"))
    runs = list(marks.glob("scale-*"))
    assert len(runs) == 6
    assert 1 <= len(setups) <= (6 if cpus == 1 else 1)
