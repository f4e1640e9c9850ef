"""How a build ends: an empty dataset fails it (exit 3, one line naming the ledger's top rules) unless
`shard.allow_empty=true`; `stgr resume` of that run says the same; every build closes with a summary
(dataset path, rows per split and task, top ledger rules). The default DAG on the synthetic source,
built by real `stgr build` / `stgr resume` processes on real local Ray; expectations are computed
from the run's own Parquet files, not from the summary's source (the manifest)."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from stages.lib.schema import SETS
from tests.engine_util import ledger_rows, node_rows, run_stgr

# Every record fails format_valid (more than -1 problems) and every claimed box fails claim_iou.
REJECT_ALL = ["filter.rules.format_valid.threshold=-1", "filter.rules.claim_iou.threshold=1.01"]


@pytest.fixture
def small(tmp_path: Path) -> Iterator[list[str]]:
    """Two videos in one partition: the whole DAG in seconds on a 2-core machine."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield ["source.num_videos=2", "source.records_per_partition=2", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def top_rules(run: Path, n: int) -> list[tuple[tuple[str, str], int]]:
    """The n most frequent (stage, rule) pairs over the ledger files of the run's current plan."""
    plan = json.loads((run / "plan.json").read_text())
    counts = Counter((r["stage"], r["rule"]) for node in plan["nodes"] for r in ledger_rows(run, node))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def empty_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if " is empty " in line]


def test_empty_dataset_exits_3_resume_agrees_and_allow_empty_exits_0(tmp_path: Path, small: list[str]) -> None:
    run = tmp_path / "run"
    code, out = run_stgr("build", "--run", str(run), *small, *REJECT_ALL)
    assert code == 3, out[-3000:]
    records = len(node_rows(run, "align"))
    assert records > 0 and node_rows(run, "filter") == []
    top = top_rules(run, 3)
    assert dict(top)[("filter", "format_valid")] == records
    [line] = empty_lines(out)
    assert line.startswith(f"stgr: dataset {run}/dataset is empty (0 rows); top ledger rules: ")
    assert line.endswith("(`shard.allow_empty=true` accepts an empty dataset)")
    listed = line.split("top ledger rules: ")[1].split(" (")[0]
    assert listed == ", ".join(f"{stage}/{rule} {count}" for (stage, rule), count in top)
    assert json.loads((run / "dataset" / "manifest.json").read_text())["rows"] == 0  # written, for inspection

    code, resumed = run_stgr("resume", str(run))
    assert code == 3, resumed[-3000:]
    assert "0 unit(s) committed, 7 reused" in resumed
    assert empty_lines(resumed) == [line]

    code, status = run_stgr("status", str(run))
    assert code == 0 and line in status.splitlines()  # complete, and it says why the build failed

    code, allowed = run_stgr("build", "--run", str(run), *small, *REJECT_ALL, "shard.allow_empty=true")
    assert code == 0, allowed[-3000:]
    assert "2 unit(s) committed, 5 reused" in allowed  # only shard and publish reran
    assert empty_lines(allowed) == []
    assert f"dataset {run}/dataset: 0 rows" in allowed.splitlines()


def test_every_build_ends_with_a_summary(tmp_path: Path, small: list[str]) -> None:
    """A build that keeps some records and rejects others (general_mcq answers cannot reach 1.01)."""
    run = tmp_path / "run"
    code, out = run_stgr("build", "--run", str(run), *small, "filter.rules.answer_agrees.threshold.general_mcq=1.01")
    assert code == 0, out[-3000:]
    assert empty_lines(out) == []
    lines = out.splitlines()
    start = lines.index(f"dataset {run}/dataset: {len(node_rows(run, 'filter'))} rows")
    expected = []
    for name in SETS:
        frame = pd.read_parquet(run / "dataset" / name)
        tasks = ", ".join(f"{task} {n}" for task, n in sorted(Counter(frame["task"]).items()))
        expected.append(f"  {name}: {len(frame)} rows ({tasks})")
    top = top_rules(run, 5)
    general_mcq = sum(r["task"] == "general_mcq" for r in node_rows(run, "align"))
    assert general_mcq > 0 and top == [(("filter", "answer_agrees"), general_mcq)]
    expected.append(f"  ledger: {general_mcq} rows; top rules: filter/answer_agrees {general_mcq}")
    assert lines[start + 1:start + 4] == expected
