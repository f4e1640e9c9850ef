"""`stgr inspect`: the same summary from a run, its dataset, a split folder, a stage output or a file."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from tests.record_factory import FINGERPRINTS, build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "run"
    return path, build_run(path)


def _summary(capsys, *args):
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_and_dataset_summaries_agree(run, capsys):
    path, fates = run
    for target in (path, path / "dataset"):
        s = _summary(capsys, str(target))
        assert s["kind"] == "dataset" and s["rows"] == len(fates["kept"])
        assert sum(r["rows"] for r in s["split"]) == len(fates["kept"])
        assert s["task"] == [{"task": "spatio_temporal", "rows": len(fates["kept"])}]
        ledger = {(r["stage"], r["rule"]): r["rows"] for r in s["ledger"]}
        assert ledger[("filter", "claim_iou")] == len(fates["rejected"])
        assert s["scores"]["aligned"] == len(fates["kept"])


def test_split_folder_stage_output_and_file(run, capsys):
    path, fates = run
    cot = _summary(capsys, str(path / "dataset" / "stgr-cot"))
    rl = _summary(capsys, str(path / "dataset" / "stgr-rl"))
    assert cot["kind"] == "split" and cot["rows"] + rl["rows"] == len(fates["kept"])
    stage = _summary(capsys, str(path / "stages" / "align" / FINGERPRINTS["align"]))
    assert stage["kind"] == "stage" and stage["rows"] == len(fates["records"]) and stage["ledger"] == []
    filtered = _summary(capsys, str(path / "stages" / "filter" / FINGERPRINTS["filter"]))
    assert filtered["rows"] == len(fates["kept"]) and filtered["ledger"][0]["rule"] == "claim_iou"
    file = _summary(capsys, str(path / "stages" / "align" / FINGERPRINTS["align"] / "part-00000.parquet"))
    assert file["kind"] == "file" and file["rows"] == len(fates["records"])


def test_text_output_and_verify(run, capsys):
    path, fates = run
    assert main(["inspect", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"rows: {len(fates['kept'])}" in out and "claim_iou" in out and "all sizes and sha256 match" in out
    assert "per task:" in out and "spatio_temporal" in out


def test_verify_catches_a_changed_shard(tmp_path, capsys):
    path = tmp_path / "run"
    build_run(path, n=6)
    shard = next((path / "dataset" / "stgr-cot").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["inspect", str(path / "dataset"), "--verify"]) == 1
    assert "sha256 differs" in capsys.readouterr().out


def test_bad_paths_are_clear_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
