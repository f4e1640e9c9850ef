"""Small files: a unit that rejects nothing writes no ledger file (its commit record says
`"ledger": null`), every reader takes that for an empty ledger, and `stgr status` reads only plan.json
and the commit records, importing no stage code.

Real `stgr build` processes of the engine's test DAG on a real local Ray (its `threshold` stage
rejects the rows below `min_value`, so some units have a ledger and most have none), and the real
commit protocol on a local run directory.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rundir import RunDir, Unit, commit, read_commit, read_verified_table, verify_committed
from pipeline.stage import LEDGER_SCHEMA
from stages.lib.dataset import read_ledger
from tests.engine_util import REPO, build_cmd, ledger_rows, run_stgr

PARTITIONS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("small") / "run"
    code, out = run_stgr(*build_cmd(run, f"numbers.partitions={PARTITIONS}"))
    assert code == 0, out[-3000:]
    return run


def _units(run: Path) -> list[Unit]:
    plan = json.loads((run / "plan.json").read_text())
    return [Unit(node, info["fingerprint"], p) for node, info in plan["nodes"].items() for p in range(info["partitions"])]


def test_only_units_that_rejected_records_have_a_ledger_file(built: Path) -> None:
    run = RunDir.open(str(built))
    with_ledger, without = [], []
    for unit in _units(built):
        record = read_commit(run, unit)
        assert record is not None, f"{unit.key()} is not committed"
        path = built / unit.ledger
        if record["rows_rejected"]:
            with_ledger.append(unit.key())
            assert record["ledger"] == unit.ledger and path.exists()
            assert pq.read_table(path).num_rows == record["rows_rejected"]
        else:
            without.append(unit.key())
            assert record["ledger"] is None and "ledger_sha256" not in record, record
            assert not path.exists(), f"{unit.key()} rejected nothing but wrote {unit.ledger}"
            assert read_verified_table(run, unit, ledger=True)[0].num_rows == 0
    assert with_ledger and without, (with_ledger, without)
    assert all(pq.read_table(p).num_rows for p in (built / "ledger").rglob("*.parquet")), "an empty ledger file"
    # the digest checks still cover the data files and the ledgers that exist
    assert verify_committed(run, _units(built)) == []
    fingerprint = json.loads((built / "plan.json").read_text())["nodes"]["threshold"]["fingerprint"]
    ledger = read_ledger(run.fs, run.path, {"threshold": fingerprint}, verify_in=run)
    assert ledger.num_rows == len(ledger_rows(built, "threshold")) > 0


def test_a_ledger_left_by_an_earlier_attempt_is_not_the_committed_one(tmp_path: Path) -> None:
    """An attempt that rejected rows, killed before its commit record, leaves a ledger file; the attempt
    that commits with no rejections removes it, and a file that appears there later (a straggler's
    debris) is never read as the unit's ledger."""
    run = RunDir.open(str(tmp_path / "run"))
    unit = Unit("stage", "f" * 16, 3)
    stale = pa.Table.from_pylist([{"id": "r1", "stage": "stage", "rule": "exception", "reason": "earlier attempt"}],
                                 schema=LEDGER_SCHEMA)
    pq.write_table(stale, tmp_path / "stale.parquet")
    (tmp_path / "run" / unit.ledger).parent.mkdir(parents=True)
    shutil.copy(tmp_path / "stale.parquet", tmp_path / "run" / unit.ledger)
    assert commit(run, unit, pa.table({"id": ["r1"]}), [], {"node": "stage", "rows_rejected": 0})
    assert not run.exists(unit.ledger)
    assert read_commit(run, unit)["ledger"] is None
    shutil.copy(tmp_path / "stale.parquet", tmp_path / "run" / unit.ledger)
    assert read_verified_table(run, unit, ledger=True)[0].num_rows == 0
    assert read_ledger(run.fs, run.path, {"stage": "f" * 16}, verify_in=run).num_rows == 0
    assert verify_committed(run, [unit]) == []


def test_a_ledger_the_record_lists_must_be_there(tmp_path: Path) -> None:
    run = RunDir.open(str(tmp_path / "run"))
    unit = Unit("stage", "f" * 16, 0)
    rows = [{"id": "r1", "stage": "stage", "rule": "exception", "reason": "bad", "attempt": 1}]
    assert commit(run, unit, pa.table({"id": ["r2"]}), rows, {"node": "stage", "rows_rejected": 1})
    assert read_verified_table(run, unit, ledger=True)[0].to_pylist()[0]["reason"] == "bad"
    (tmp_path / "run" / unit.ledger).unlink()
    (problem,) = verify_committed(run, [unit])
    assert problem == f"{unit.ledger}: missing, but its unit is committed"


STATUS = """
import json, sys
from pipeline.cli import main
code = main(["status", "--json", sys.argv[1]])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("stages", "train", "ray"))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def test_status_reads_the_plan_and_commit_records_and_imports_no_stage_code(built: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(built, run)
    shutil.rmtree(run / "ledger")  # status never reads a ledger, nor any unit's data
    for data in (run / "stages").rglob("part-*.parquet"):
        data.unlink()
    done = subprocess.run([sys.executable, "-c", STATUS, str(run)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    outcome = json.loads(done.stderr.strip().splitlines()[-1])
    assert outcome == {"code": 0, "loaded": []}, done.stderr[-2000:]
    status = json.loads(done.stdout)
    rejected = {n["node"]: n["rows_rejected"] for n in status["stages"]}
    assert rejected["threshold"] == len(ledger_rows(built, "threshold")) > 0
    assert all(n["done"] == n["partitions"] for n in status["stages"])
