"""`shard` + `publish`: stable split, per-partition files, manifest, card, atomic replacement, loadable
by pandas and datasets."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stage import LEDGER_SCHEMA, Rejection
from stages.lib.dataset import SUMMARY_SCHEMA
from stages.lib.schema import SCHEMA_VERSION, SETS, to_table
from stages.shard import ShardStage, split_of
from tests.record_factory import make_record
from tests.shard_util import FINGERPRINTS, publish_partitions, publish_records


def _records(n: int, first: int = 0) -> pa.Table:
    tasks = ["spatio_temporal", "temporal", "spatial"]
    sources = ["synthetic", "vidstg"]
    return to_table([make_record(i, task=tasks[i % 3], source=sources[i % 2], with_jpeg=(i < 4))
                     for i in range(first, first + n)])


def _write_ledger(run: Path, stage: str, fingerprint: str, rows: list[Rejection]) -> None:
    directory = run / "ledger" / stage / fingerprint
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([r.as_row(stage, 1) for r in rows], schema=LEDGER_SCHEMA)
    pq.write_table(table, directory / "part-00000.parquet")


def test_split_is_a_stable_function_of_the_id():
    ids = [f"id{i:05d}" for i in range(4000)]
    split = split_of(ids, 0.3)
    assert 0.27 < (split == "stgr-rl").mean() < 0.33
    # adding or removing other records never moves a record
    assert list(split_of(ids[:50], 0.3)) == list(split[:50])
    assert list(split_of(ids[::-1], 0.3)) == list(split[::-1])
    assert set(split_of(ids, 0.0)) == {"stgr-cot"} and set(split_of(ids, 1.0)) == {"stgr-rl"}
    assert (split_of(ids, 0.3, salt="other") != split).any()


def test_writes_loadable_shards_manifest_and_card(tmp_path):
    run = tmp_path / "run"
    _write_ledger(run, "filter", FINGERPRINTS["filter"], [
        Rejection(id="x1", rule="claim_iou", reason="claim IoU 0.1 < 0.5", value=0.1, threshold=0.5),
        Rejection(id="x1", rule="time_in_clip", reason="t=9 outside clip", value=[9.0], threshold=0.0),
        Rejection(id="x2", rule="claim_iou", reason="claim IoU 0.2 < 0.5", value=0.2, threshold=0.5),
    ])
    _write_ledger(run, "sample", FINGERPRINTS["sample"], [Rejection(id="x3", rule="unreadable", reason="moov atom not found")])
    # a ledger of an older config of the same stage must not be counted
    _write_ledger(run, "filter", "0" * 16, [Rejection(id="x9", rule="claim_iou", reason="old")])
    partitions = [_records(20), _records(20, first=20)]
    shards, published = publish_partitions(run, partitions, {"rl_fraction": 0.5, "target_shard_mb": 0.05})

    for p, result in enumerate(shards):  # a shard unit commits a summary of what it wrote, no record
        assert result.table.schema == SUMMARY_SCHEMA and result.table.num_rows == 20
        assert set(result.table.column("partition").to_pylist()) == {p}
    assert published.table.num_rows == 40
    assert sorted(published.table.column("id").to_pylist()) == sorted(
        i for t in partitions for i in t.column("id").to_pylist())

    dataset = run / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["rows"] == 40
    assert manifest["node"] == "publish" and manifest["fingerprint"] == FINGERPRINTS["publish"]
    total = 0
    for name in SETS:
        info = manifest["splits"][name]
        files = sorted(p.name for p in (dataset / name).iterdir())
        assert len(info["shards"]) > 2, "a 50 kB target must give several files per partition"
        assert files == sorted(s["path"].split("/")[1] for s in info["shards"])
        for shard in info["shards"]:
            assert shard["path"].startswith(f"{name}/part-0000") and shard["path"].endswith(f"-{shard['sha256'][:12]}.parquet")
            data = (dataset / shard["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
        frame = pd.read_parquet(dataset / name)
        assert len(frame) == info["rows"] == sum(s["rows"] for s in info["shards"])
        assert set(frame["split"]) == {name}
        assert frame["frames"].iloc[0][0]["t_s"] == 0.0  # nested columns come back as plain values
        assert all({f["stage"]: f["fingerprint"] for f in p["stage_fingerprints"]} == FINGERPRINTS
                   for p in frame["provenance"])
        assert all(p["build_id"] == "run" for p in frame["provenance"])
        total += len(frame)
    assert total == 40

    by_task = {(c["split"], c["task"]): c["rows"] for c in manifest["counts"]["task"]}
    assert sum(by_task.values()) == 40 and {t for _, t in by_task} == {"spatio_temporal", "temporal", "spatial"}
    assert sum(c["rows"] for c in manifest["counts"]["source"]) == 40
    ledger = {(r["stage"], r["rule"]): r["rows"] for r in manifest["ledger"]}
    assert ledger == {("filter", "claim_iou"): 2, ("filter", "time_in_clip"): 1, ("sample", "unreadable"): 1}

    card = (dataset / "README.md").read_text()
    assert card.startswith("---\n")
    assert "| filter | claim_iou | 2 |" in card and "moov atom not found" in card
    assert not [p for p in run.iterdir() if p.name.startswith(".dataset")], "temporary folders left behind"


def test_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    run = tmp_path / "run"
    publish_partitions(run, [_records(6), _records(6, first=6)], {"rl_fraction": 0.25})
    cot = datasets.load_dataset("parquet", data_dir=str(run / "dataset" / "stgr-cot"), split="train",
                                cache_dir=str(tmp_path / "hf"))
    rl = datasets.load_dataset(str(run / "dataset"), "stgr-rl", split="train", cache_dir=str(tmp_path / "hf"))
    assert len(cot) + len(rl) == 12 and set(rl["split"]) == {"stgr-rl"}
    assert cot[0]["key_frames"][0]["objects"][0]["name"] in {"red circle", "blue square"}


def test_replaces_a_previous_dataset_whole_and_is_idempotent(tmp_path):
    run = tmp_path / "run"
    publish_records(run, _records(10), {"rl_fraction": 0.5}, {"publish": "1" * 16})
    # debris of a killed attempt of an earlier version of the stage
    (run / f".dataset.tmp-{'2' * 16}-1" / "stgr-cot").mkdir(parents=True)
    publish_records(run, _records(6), {"rl_fraction": 0.5}, {"publish": "2" * 16})
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    assert manifest["fingerprint"] == "2" * 16 and manifest["rows"] == 6
    assert len(pd.read_parquet(run / "dataset" / "stgr-cot")) + len(pd.read_parquet(run / "dataset" / "stgr-rl")) == 6
    assert sorted(p.name for p in run.iterdir()) == ["dataset"]

    # a straggler of the same units (same fingerprints) leaves the committed dataset untouched
    before = {p: p.stat().st_mtime_ns for p in (run / "dataset").rglob("*")}
    publish_records(run, _records(6), {"rl_fraction": 0.5}, {"publish": "2" * 16}, attempt=2)
    assert {p: p.stat().st_mtime_ns for p in (run / "dataset").rglob("*")} == before


def test_empty_input_gives_an_empty_but_loadable_dataset(tmp_path):
    run = tmp_path / "run"
    publish_records(run, to_table([]))
    assert len(pd.read_parquet(run / "dataset" / "stgr-rl")) == 0
    assert json.loads((run / "dataset" / "manifest.json").read_text())["rows"] == 0


def test_duplicate_ids_are_ledgered_and_the_first_is_kept(tmp_path):
    first, other = make_record(0), make_record(1)
    repeat = {**first, "question": "the same id again"}
    shards, published = publish_partitions(tmp_path / "run", [to_table([first, other, repeat, repeat])])
    result = shards[0]
    assert sorted(result.table.column("id").to_pylist()) == sorted([first["id"], other["id"]])
    assert [(r.id, r.rule, r.record) for r in result.rejections] == [(first["id"], "duplicate_id", "video0000")] * 2
    assert "occurs 3 times upstream; the first is kept" in result.rejections[0].reason
    frame = pd.concat([pd.read_parquet(tmp_path / "run" / "dataset" / name) for name in SETS])
    assert frame.set_index("id").loc[first["id"], "question"] == first["question"]
    assert published.rejections == []
    manifest = json.loads((tmp_path / "run" / "dataset" / "manifest.json").read_text())
    assert manifest["rows"] == 2


def test_config_validation():
    assert ShardStage.validate_config({"rl_fraction": 0.3}) == []
    problems = ShardStage.validate_config({"rl_fraction": 1.5, "target_shard_mb": 0, "output": "../x"})
    assert [p.split(":")[0] for p in problems] == ["rl_fraction", "target_shard_mb", "output"]


@pytest.mark.slow
def test_default_build_end_to_end_then_refilter(tmp_path, capsys):
    """`stgr build` with the defaults ends in a dataset of every task with a verified manifest; a
    stricter filter reruns only filter, shard and publish, and the manifest counts only this config's ledger."""
    import tempfile

    from pipeline.build import run_build
    from pipeline.cli import main

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    run = tmp_path / "run"
    common = ["source.num_videos=4", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    assert run_build(str(run), common, interactive=False) == 0
    dataset = run / "dataset"
    manifest = json.loads((dataset / "manifest.json").read_text())
    frames = pd.concat([pd.read_parquet(dataset / "stgr-cot"), pd.read_parquet(dataset / "stgr-rl")])
    assert len(frames) == manifest["rows"] > 0
    assert set(frames["task"]) == {"spatio_temporal", "temporal", "temporal_mcq", "spatial", "general_mcq", "general_free"}
    assert all(f["stage"] for p in frames["provenance"] for f in p["stage_fingerprints"])
    assert {f["stage"] for f in frames["provenance"].iloc[0]["stage_fingerprints"]} == {
        "source", "sample", "annotate", "align", "filter", "shard", "publish"}
    assert main(["inspect", str(run), "--verify"]) == 0
    assert "all sizes and sha256 match" in capsys.readouterr().out
    assert manifest["config"]["filter"]["rules"]["claim_iou"]["threshold"] == 0.5

    strict = common + ["filter.rules.claim_iou.threshold=0.999", "shard.allow_empty=true"]  # it may reject every record
    assert run_build(str(run), strict, interactive=False) == 0
    manifest2 = json.loads((dataset / "manifest.json").read_text())
    rejected = sum(r["rows"] for r in manifest2["ledger"] if r["stage"] == "filter")
    assert rejected > 0 and manifest2["rows"] == manifest["rows"] - rejected
    assert {r["rule"] for r in manifest2["ledger"]} == {"claim_iou"}
    assert manifest2["stage_fingerprints"]["annotate"] == manifest["stage_fingerprints"]["annotate"]
    assert manifest2["stage_fingerprints"]["filter"] != manifest["stage_fingerprints"]["filter"]
