"""`stgr diff A B` on real builds: real `stgr build` processes on real local Ray, small synthetic builds.

Three builds of the same two synthetic videos, each in its own run directory: two with the same
config and one with `filter.rules.claim_iou.threshold` raised so that some records fail it. What
the diff must report is computed here with pandas from the run directories themselves (the
manifest-listed shards, the ledger files, the scores), never with the code under test.
"""
from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.engine_util import run_stgr
from tests.test_s3 import BUCKET, s3_env  # noqa: F401 (the moto server fixture)

SMALL = ["source.num_videos=2", "source.records_per_partition=2", "cluster.num_cpus=2"]
THRESHOLD_KEY = "filter.rules.claim_iou.threshold"
#: The template annotator's claims have IoU 0.988..0.996 with the ground truth: this cuts through them.
THRESHOLD = 0.992


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> dict[str, Path]:
    """`a` and `same`: one config in two run directories; `strict`: `a` with the threshold raised."""
    base = tmp_path_factory.mktemp("diff")
    out = {}
    for name, extra in (("a", []), ("same", []), ("strict", [f"{THRESHOLD_KEY}={THRESHOLD}"])):
        out[name] = base / name
        code, log = run_stgr("build", "--run", str(out[name]), *SMALL, f"cluster.temp_dir={ray_tmp}", *extra)
        assert code == 0, log[-3000:]
    return out


def diff_json(capsys: pytest.CaptureFixture[str], old: Path | str, new: Path | str) -> tuple[int, dict]:
    code = main(["diff", str(old), str(new), "--json"])
    return code, json.loads(capsys.readouterr().out)


def dataset(run: Path) -> pd.DataFrame:
    """id and min claim IoU of every row, read through the shards dataset/manifest.json lists."""
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    frames = [pq.read_table(run / "dataset" / shard["path"], columns=["id", "scores"]).to_pandas()
              for info in manifest["splits"].values() for shard in info["shards"]]
    df = pd.concat(frames, ignore_index=True)
    return df.assign(min_iou=df.scores.map(lambda s: s["min_iou"])).drop(columns="scores")


def ledger(run: Path) -> pd.DataFrame:
    """Every ledger row of the units of the run's plan."""
    plan = json.loads((run / "plan.json").read_text())
    files = [f for node, info in plan["nodes"].items()
             for f in sorted((run / "ledger" / node / info["fingerprint"]).glob("part-*.parquet"))]
    columns = ["id", "stage", "rule"]
    return pd.concat([pq.read_table(f, columns=columns).to_pandas() for f in files], ignore_index=True) \
        if files else pd.DataFrame(columns=columns)


def assert_identical(result: dict) -> None:
    assert result["identical"] is True
    assert result["rows"] == {"added": [], "dropped": [], "changed": []}
    assert result["columns"] == {"only_old": [], "only_new": [], "changed": []}
    assert result["ledger"] == [] and result["config"] == [] and result["fingerprints"] == []
    assert all(r["old"] == r["new"] for key in ("task", "source") for r in result["counts"][key])


# -- (a) the same config twice -------------------------------------------------------------------------


def test_two_identical_builds_exit_0(runs: dict[str, Path]) -> None:
    code, out = run_stgr("diff", str(runs["a"]), str(runs["same"]), "--json")
    assert code == 0, out[-3000:]
    result = json.loads(out)
    assert_identical(result)
    assert result["old"]["rows"] == result["new"]["rows"] == len(dataset(runs["a"])) > 0
    assert result["cost"]["old"] == result["cost"]["new"] == {"total_usd": 0.0, "per_kept_row_usd": 0.0}
    code, text = run_stgr("diff", str(runs["a"]), str(runs["same"]))
    assert code == 0 and text.rstrip().endswith("identical"), text
    assert "rows: 0 added, 0 dropped, 0 changed" in text and "cost (USD)" in text


# -- (b) one threshold changed ---------------------------------------------------------------------------


def test_a_changed_threshold_lists_exactly_the_rows_and_rules_that_moved(runs: dict[str, Path],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    before, after = dataset(runs["a"]), dataset(runs["strict"])
    ledger_before, ledger_after = ledger(runs["a"]), ledger(runs["strict"])
    moved = set(before.id) - set(after.id)
    # the verdict that changed: rejected by claim_iou in the strict build, not in the first one
    rejected_now = set(ledger_after[ledger_after.rule == "claim_iou"].id)
    rejected_then = set(ledger_before[ledger_before.rule == "claim_iou"].id)
    assert moved == rejected_now - rejected_then == set(before[before.min_iou < THRESHOLD].id)
    assert moved and set(after.id), "the threshold must move some rows and keep some"
    assert set(after.id) <= set(before.id)

    code, result = diff_json(capsys, runs["a"], runs["strict"])
    assert code == 1 and result["identical"] is False
    assert result["rows"] == {"added": [], "dropped": sorted(moved), "changed": []}
    assert result["columns"]["changed"] == []
    counts_before = ledger_before.groupby(["stage", "rule"]).size().to_dict()
    counts_after = ledger_after.groupby(["stage", "rule"]).size().to_dict()
    expected = [{"stage": s, "rule": r, "old": counts_before.get((s, r), 0), "new": counts_after.get((s, r), 0)}
                for s, r in sorted(set(counts_before) | set(counts_after))
                if counts_before.get((s, r), 0) != counts_after.get((s, r), 0)]
    assert result["ledger"] == expected and expected
    assert result["config"] == [{"key": THRESHOLD_KEY, "old": 0.5, "new": THRESHOLD}]
    assert {r["node"] for r in result["fingerprints"]} >= {"filter"}
    assert sum(r["old"] - r["new"] for r in result["counts"]["task"]) == len(moved)
    assert sum(r["old"] - r["new"] for r in result["counts"]["source"]) == len(moved)

    # the other way round, the same rows are added
    code, back = diff_json(capsys, runs["strict"], runs["a"])
    assert code == 1 and back["rows"] == {"added": sorted(moved), "dropped": [], "changed": []}
    assert back["config"] == [{"key": THRESHOLD_KEY, "old": THRESHOLD, "new": 0.5}]

    assert main(["diff", str(runs["a"]), str(runs["strict"])]) == 1
    text = capsys.readouterr().out
    assert f"rows: 0 added, {len(moved)} dropped, 0 changed" in text
    assert THRESHOLD_KEY in text and "ledger rules that moved" in text and text.rstrip().endswith("the builds differ")


# -- (c) dataset folders -----------------------------------------------------------------------------------


def test_a_dataset_folder_against_a_run_directory(runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, by_runs = diff_json(capsys, runs["a"], runs["strict"])
    code, by_folder = diff_json(capsys, runs["a"] / "dataset", runs["strict"])
    assert code == 1
    assert {k: by_folder[k] for k in ("rows", "ledger", "config", "counts")} == \
        {k: by_runs[k] for k in ("rows", "ledger", "config", "counts")}
    code, result = diff_json(capsys, runs["a"], runs["a"] / "dataset")
    assert code == 0, result
    # a dataset folder copied out of its run: its manifest's ledger counts and config stand in for the run's
    copy = tmp_path / "published"
    shutil.copytree(runs["a"] / "dataset", copy)
    code, result = diff_json(capsys, copy, runs["same"])
    assert code == 0, result
    assert_identical(result)
    code, result = diff_json(capsys, copy, runs["strict"])
    assert code == 1 and result["rows"] == by_runs["rows"] and result["ledger"] == by_runs["ledger"]


def test_a_changed_row_names_its_columns_and_shows_frame_bytes_by_digest(runs: dict[str, Path], tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "edited"
    shutil.copytree(runs["a"] / "dataset", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["splits"]["stgr-cot"]["shards"][0]["path"]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["question"] = "What changed?"
    rows[0]["frames"][1]["image"]["bytes"] = not_a_frame = b"\xff\xd8 not the frame"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)

    code, result = diff_json(capsys, runs["a"], copy)
    assert code == 1
    assert result["rows"] == {"added": [], "dropped": [], "changed": [rows[0]["id"]]}
    changed = {c["column"]: c for c in result["columns"]["changed"]}
    assert sorted(changed) == ["frames", "question"] and all(c["rows"] == 1 for c in changed.values())
    assert changed["question"]["examples"][0]["changes"] == [
        {"path": "question", "old": table.column("question")[0].as_py(), "new": "What changed?"}]
    frame_change = changed["frames"]["examples"][0]["changes"]
    assert [c["path"] for c in frame_change] == ["frames[1].image.bytes"]
    assert frame_change[0]["new"].startswith(f"<{len(not_a_frame)} bytes sha256:")
    assert result["ledger"] == [] and result["config"] == []

    assert main(["diff", str(runs["a"]), str(copy)]) == 1
    text = capsys.readouterr().out
    assert "frames[1].image.bytes" in text and "\\xff" not in text and "What changed?" in text


def test_a_dataset_on_s3(runs: dict[str, Path], s3_env: dict[str, str],  # noqa: F811
                         capsys: pytest.CaptureFixture[str]) -> None:
    s3 = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], region="us-east-1")
    pafs.copy_files(str(runs["a"] / "dataset"), posixpath.join(BUCKET, "diff", "dataset"),
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    code, result = diff_json(capsys, f"s3://{BUCKET}/diff/dataset", runs["same"])
    assert code == 0, result
    assert_identical(result)
    code, result = diff_json(capsys, runs["strict"], f"s3://{BUCKET}/diff/dataset")
    assert code == 1 and result["rows"]["added"] and not result["rows"]["dropped"]


# -- (d) bad input -----------------------------------------------------------------------------------------


def test_bad_input_is_one_line_exit_2_naming_the_path(runs: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-run"
    code, out = run_stgr("diff", str(runs["a"]), str(missing))
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("stgr: error: ") and str(missing) in lines[0], out
    split = runs["a"] / "dataset" / "stgr-cot"
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (split, empty, next(split.glob("*.parquet"))):
        assert main(["diff", str(bad), str(runs["a"])]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0], captured.err


# -- the row digests -----------------------------------------------------------------------------------------


def test_digests_are_equal_exactly_for_equal_values_in_any_slice() -> None:
    """Every pair of distinct values here differs in one way a digest could miss (null against empty,
    order, where a list splits, a nested null); the digests of a slice are those of the whole."""
    from stages.commands.diff import digest

    values = [None, [], [None], [{"a": None, "b": []}], [{"a": 1.0, "b": [b""]}], [{"a": 1.0, "b": [None]}],
              [{"a": 1.0, "b": [b"x", b"y"]}], [{"a": 1.0, "b": [b"y", b"x"]}], [{"a": 1.0, "b": [b"xy"]}],
              [{"a": 1.0, "b": [b"x"]}, {"a": 1.0, "b": [b"y"]}], [{"a": -0.5, "b": [b"x", b"y"]}], [None, None]]
    array = pa.array(values * 2, pa.list_(pa.struct([("a", pa.float64()), ("b", pa.list_(pa.binary()))])))
    whole = digest(array)
    assert len(set(whole[:len(values)].tolist())) == len(values)
    assert whole[:len(values)].tolist() == whole[len(values):].tolist()
    for start in range(1, len(values) + 1):
        assert digest(array.slice(start)).tolist() == whole[start:].tolist()
    assert digest(pa.chunked_array([array.slice(0, 5), array.slice(5)])).tolist() == whole.tolist()
