"""One bad record costs one ledger row; one failed partition costs no dataset.

Real builds on a real local Ray over the real VidSTG clip: a JSON Lines file whose good lines sit
among a `video` that is empty, `.` or a folder, a question with a lone surrogate, object names that
are empty or hold `<`/`>`, a repeated line and a path leading outside `video_dir`; and a VidSTG file
with a `frame_count` and a `width` of 10^30. Each bad input is exactly one ledger row naming file,
record and reason, and every good record reaches the dataset. A partition whose commit keeps failing
(its output path is taken by a folder) blocks `shard` and `publish`: the dataset is still published from what
committed, marked partial, the build exits 1 naming the failed unit, and `stgr resume` completes it
once the folder is gone.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest

from pipeline.build import load_plan, run_build
from pipeline.executor import resolve_nodes
from pipeline.rundir import Unit
from stages.commands.inspect import locate, verify

CLIP = "5804131706.mp4"  # 553 frames at 29.97 fps: 18.45 s


@pytest.fixture
def cluster() -> Iterator[list[str]]:
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield ["cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}", "sample.max_frames=8"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def plan_rows(run: Path, kind: str, node: str | None = None) -> list[dict[str, Any]]:
    """The rows of the current plan's `kind` ("stages" or "ledger") files, of one node or of all."""
    plan = json.loads((run / "plan.json").read_text())["nodes"]
    return [row for name, state in plan.items() if node in (None, name)
            for path in sorted((run / kind / name / state["fingerprint"]).glob("part-*.parquet"))
            for row in pq.read_table(path).to_pylist()]


def dataset_ids(run: Path) -> list[str]:
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    return sorted(i for info in manifest["splits"].values() for shard in info["shards"]
                  for i in pq.read_table(run / "dataset" / shard["path"], columns=["id"]).column("id").to_pylist())


def by_record(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[(row["file"], row["record"])].append(row)
    return out


def test_bad_jsonl_lines_cost_one_row_each_and_a_failed_partition_costs_no_dataset(
        fixtures_dir: Path, tmp_path: Path, cluster: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    shutil.copyfile(fixtures_dir / "vidstg" / CLIP, videos / "a.mp4")
    shutil.copyfile(fixtures_dir / "vidstg" / CLIP, tmp_path / "outside.mp4")
    good = {"video": "a.mp4", "task": "temporal", "question": "When does the man walk?", "answer_span": [3.0, 6.0],
            "spans": [{"label": "the man walks", "start_s": 3.0, "end_s": 6.0}]}

    def named(name: str) -> dict[str, Any]:
        box = [0.1, 0.1, 0.5, 0.5]
        return {**good, "task": "spatio_temporal", "key_frames": [{"t_s": 3.0, "objects": [{"name": name, "box": box}]}],
                "objects": [{"name": name, "track": [{"t_s": 3.0, "box": box}]}]}

    lines = [json.dumps({**good, "id": "g1"}),                                         # line 1
             json.dumps({**good, "id": "empty", "video": ""}),                         # 2
             json.dumps({**good, "id": "dot", "video": "."}),                          # 3
             json.dumps({**good, "id": "folder", "video": "sub"}),                     # 4
             json.dumps({**good, "id": "surrogate"}).replace("the man", "the \\ud800 man"),  # 5
             json.dumps({**named(""), "id": "noname"}),                                # 6
             json.dumps({**named("a <b> c"), "id": "angle"}),                          # 7
             json.dumps({**good, "id": "g1"}),                                         # 8: line 1 again
             json.dumps({**good, "id": "g2"}),                                         # 9
             json.dumps({**good, "id": "out", "video": "../outside.mp4"})]             # 10
    annotations = tmp_path / "data.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    overrides = ["source=jsonl", f"source.annotations={annotations}", f"source.video_dir={videos}",
                 "source.records_per_partition=4", *cluster]
    run = tmp_path / "run"

    # filter's partition 2 (lines 9-10) cannot commit: its output's name is taken by a folder
    _, _, plan = load_plan(str(run), overrides)
    blocked = Unit("filter", resolve_nodes(plan)["filter"].fingerprint, 2)
    blocker = run / blocked.data
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("a folder in the way")
    assert run_build(str(run), overrides, interactive=False) == 1
    err = capsys.readouterr().err
    assert "FAILED filter/part-00002: " in err and "2 unit(s) not run because an input failed" in err  # shard 2 and publish
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    assert manifest["partial"] == {"missing_units": ["shard/part-00002"]}  # publish's input, blocked by filter
    seeds = {row["source_id"]: row["id"] for row in plan_rows(run, "stages", "source")}
    assert dataset_ids(run) == [seeds["g1"]]  # what committed is published, the repeat of line 1 ledgered
    [problem] = verify(locate(str(run)), whole_run=True)
    assert problem.startswith("manifest.json: a partial dataset, built without shard/part-00002")

    shutil.rmtree(blocker)
    assert run_build(str(run), resume=True, interactive=False) == 0
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    assert "partial" not in manifest
    assert dataset_ids(run) == sorted([seeds["g1"], seeds["g2"]]) and verify(locate(str(run)), whole_run=True) == []
    rows = by_record(plan_rows(run, "ledger"))
    name = str(annotations)
    expected = {(name, "line 2"): ("source", "malformed_record", "field 'video'"),
                (name, "line 3"): ("source", "missing_media", f"{videos} is a directory"),
                (name, "line 4"): ("source", "missing_media", f"{videos / 'sub'} is a directory"),
                (name, "line 5"): ("source", "malformed_record", "field 'question': text holds '\\ud800'"),
                (name, "line 6"): ("source", "malformed_record", "field 'key_frames.0.objects.0.name'"),
                (name, "line 7"): ("source", "malformed_record", "field 'key_frames.0.objects.0.name'"),
                (name, "line 10"): ("source", "media_outside_video_dir", f"resolves to {tmp_path / 'outside.mp4'}"),
                (None, "g1"): ("publish", "duplicate_id", "the first partition's record is kept")}  # lines 1 and 8
    assert set(rows) == set(expected)
    # `stgr inspect RUN` counts the same ledger, publish's repeat across partitions included
    assert sorted((r["stage"], r["rule"]) for r in locate(str(run)).ledger().to_pylist()) == sorted(
        stage_rule[:2] for stage_rule in expected.values())
    for key, (stage, rule, says) in expected.items():
        [row] = rows[key]
        assert (row["stage"], row["rule"]) == (stage, rule) and says in row["reason"], row


def test_vidstg_numbers_beyond_64_bits_cost_their_entry_only(fixtures_dir: Path, tmp_path: Path,
                                                            cluster: list[str]) -> None:
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())[:2]
    huge = [{**entries[0], "frame_count": 10**30}, {**entries[1], "width": 10**30}]
    annotations = tmp_path / "vidstg.json"
    annotations.write_text(json.dumps(entries + huge))
    run = tmp_path / "run"
    assert run_build(str(run), ["source=vidstg", f"source.annotations={annotations}",
                                f"source.video_dir={fixtures_dir / 'vidstg'}", *cluster], interactive=False) == 0
    rows = plan_rows(run, "ledger")
    assert [(r["stage"], r["rule"], r["file"], r["record"]) for r in rows] == [
        ("source", "malformed_record", str(annotations), f"entry 2 (vid {entries[0]['vid']})"),
        ("source", "malformed_record", str(annotations), f"entry 3 (vid {entries[1]['vid']})")]
    assert "field 'media.num_frames': 1000000000000000000000000000000 does not fit a 64-bit integer" in rows[0]["reason"]
    assert "field 'media.width': 1000000000000000000000000000000 does not fit a 64-bit integer" in rows[1]["reason"]
    seeds = plan_rows(run, "stages", "source")
    assert {row["source_id"].split("#")[1] for row in seeds} == {"0", "1"}  # every record of the good entries
    assert dataset_ids(run) == sorted(row["id"] for row in seeds)
