"""Source adapters and the `source` stage: real VidSTG / HC-STVG records, the synthetic generator,
and the two ways bad input is reported (a bad file stops the build, a bad entry goes to the ledger)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.registry import get_stage
from pipeline.testing import unit_context
from stages.lib.geometry import pixels_to_normalised, xywh_to_xyxy
from stages.lib.schema import RECORD_SCHEMA, TASKS
from stages.lib.truth import name_agrees
from stages.source import SourceStage
from stages.sources import adapter_names, get_adapter


def build(config: dict, tmp_path: Path, partition: int = 0):
    stage = SourceStage(config)
    return stage, stage.process(None, unit_context(tmp_path / "run", stage="source", partition=partition,
                                                   num_partitions=stage.plan()))


def test_registry_names_every_adapter_and_rejects_unknown() -> None:
    assert {"synthetic", "vidstg", "hcstvg"} <= set(adapter_names())
    assert get_stage("source") is SourceStage
    with pytest.raises(ConfigError, match="source.adapter: unknown adapter 'nope'"):
        get_adapter("nope")


def test_file_adapters_require_annotations_and_video_dir() -> None:
    problems = SourceStage.validate_config({"adapter": "vidstg"})
    assert any(p.startswith("annotations:") for p in problems)
    assert any(p.startswith("video_dir:") for p in problems)


# -- VidSTG -----------------------------------------------------------------------------------------
def vidstg_config(fixtures_dir: Path, **extra) -> dict:
    return {"adapter": "vidstg", "annotations": str(fixtures_dir / "vidstg" / "test_annotations_subset.json"),
            "video_dir": str(fixtures_dir / "vidstg"), "records_per_partition": 4, **extra}


def test_vidstg_record_5804131706_span_in_seconds(fixtures_dir: Path, tmp_path: Path) -> None:
    stage, result = build(vidstg_config(fixtures_dir), tmp_path)
    assert stage.plan() == 4  # 13 entries, 4 per partition
    rows = result.table.to_pylist()
    assert result.rejections == []
    first = [r for r in rows if r["source_id"] == "5804131706#0"]
    assert len(first) == 2  # one caption, one question
    fps = 29.97002997002997
    for record in first:
        start, end = record["answer_span"]
        # temporal_gt frames 104..389 (end exclusive) at 29.97 fps -> [3.470, 12.980] s, to one frame
        assert abs(start - 3.470) < 1 / fps and abs(end - 12.980) < 1 / fps
        assert start == pytest.approx(104 / fps, abs=1e-6) and end == pytest.approx(389 / fps, abs=1e-6)
        assert record["clip_window"] == {"start_s": pytest.approx(80 / fps, abs=1e-6), "end_s": pytest.approx(552 / fps, abs=1e-6)}
        assert record["media"]["uri"] == str(fixtures_dir / "vidstg" / "5804131706.mp4")
        assert record["media"]["num_frames"] == 553 and record["media"]["width"] == 640
        # no trajectory files: the ground truth is temporal only, so is the record
        assert record["task"] == "temporal" and record["answer"] is None
    question = next(r for r in first if json.loads(r["meta"])["sentence_type"] == "interrogative")
    assert question["question"] == "who next to adult? When does this happen in the video?"
    assert len({r["id"] for r in rows}) == len(rows)


def test_vidstg_partitions_cover_every_sentence_once(fixtures_dir: Path, tmp_path: Path) -> None:
    config = vidstg_config(fixtures_dir)
    stage = SourceStage(config)
    ids = []
    for p in range(stage.plan()):
        ids += stage.process(None, unit_context(tmp_path, partition=p)).table.column("id").to_pylist()
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())
    assert len(ids) == len(set(ids)) == sum(len(e["captions"]) + len(e["questions"]) for e in entries)


def test_vidstg_trajectories_give_track_and_key_frames(fixtures_dir: Path, tmp_path: Path) -> None:
    """A VidOR trajectory file (written here in the published layout) adds the target's boxes."""
    trajectories = tmp_path / "vidor" / "0000"
    trajectories.mkdir(parents=True)
    frames = [[{"tid": 0, "bbox": {"xmin": 64, "ymin": 48, "xmax": 320, "ymax": 480}},
               {"tid": 3, "bbox": {"xmin": 0, "ymin": 0, "xmax": 10, "ymax": 10}}] for _ in range(553)]
    (trajectories / "5804131706.json").write_text(json.dumps({"video_id": "5804131706", "trajectories": frames}))
    _, result = build(vidstg_config(fixtures_dir, trajectories_dir=str(tmp_path / "vidor")), tmp_path)
    record = next(r for r in result.table.to_pylist() if r["source_id"] == "5804131706#0")
    track = record["ground_truth"]["objects"][0]["track"]
    assert record["ground_truth"]["objects"][0]["name"] == "adult"
    assert len(track) == 389 - 104
    assert track[0]["box"] == pytest.approx([0.1, 0.1, 0.5, 1.0])
    assert [kf["t_s"] for kf in record["key_frames"]] == [track[0]["t_s"], track[len(track) // 2]["t_s"], track[-1]["t_s"]]


# -- HC-STVG ----------------------------------------------------------------------------------------
def test_hcstvg_boxes_are_converted_from_xywh_pixels(fixtures_dir: Path, tmp_path: Path) -> None:
    path = fixtures_dir / "hcstvg" / "test_subset.json"
    raw = json.loads(path.read_text())
    _, result = build({"adapter": "hcstvg", "annotations": str(path), "video_dir": str(tmp_path / "none")}, tmp_path)
    rows = {r["source_id"]: r for r in result.table.to_pylist()}
    assert set(rows) == set(raw)
    entry = raw["65_xp67EC-Hvwk.mp4"]
    record = rows["65_xp67EC-Hvwk.mp4"]
    fps = entry["img_num"] / 20
    assert record["media"]["fps"] == pytest.approx(30.0)
    assert record["answer_span"] == pytest.approx([entry["st_time"], entry["ed_time"]], abs=1e-6)
    track = record["ground_truth"]["objects"][0]["track"]
    assert len(track) == len(entry["bbox"]) == 93
    assert track[0]["t_s"] == pytest.approx((entry["st_frame"] - 1) / fps)
    x, y, w, h = entry["bbox"][0]
    assert track[0]["box"] == pytest.approx([x / 480, y / 360, (x + w) / 480, (y + h) / 360], abs=1e-6)
    # the first video's boxes read as xyxy would have x2 < x1; as xywh every box has positive area
    boxes = np.array([p["box"] for p in rows["14_wfEOx36N4jA.mp4"]["ground_truth"]["objects"][0]["track"]])
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_hcstvg_v2_key_names(tmp_path: Path) -> None:
    v2 = {"v2clip.mp4": {"trajectory": [[10, 20, 30, 40], [12, 20, 30, 40]], "English": "A man waves.",
                         "img_hw": [360, 640], "img_num": 400, "st_frame": 21, "ed_frame": 22}}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(v2))
    _, result = build({"adapter": "hcstvg", "annotations": str(path), "video_dir": str(tmp_path)}, tmp_path)
    (record,) = result.table.to_pylist()
    assert result.rejections == []
    assert record["media"]["width"] == 640 and record["media"]["height"] == 360
    assert record["answer_span"] == pytest.approx([1.0, 1.1])  # frames 21..22 (1-based, inclusive) at 20 fps
    expected = pixels_to_normalised(xywh_to_xyxy([10, 20, 30, 40]), 640, 360)[0]
    assert record["ground_truth"]["objects"][0]["track"][0]["box"] == pytest.approx(expected.tolist(), abs=1e-6)


# -- bad input: the file vs one entry ----------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    ('[{"vid": "1",', r"not valid JSON at line 1, column 14"),
    ('{"vid": "1"}', r"expected a JSON list of VidSTG entries at the top level \(position 0\), got dict"),
    ("[]", r"holds no entries"),
])
def test_malformed_annotation_file_is_an_input_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(content)
    stage = SourceStage({"adapter": "vidstg", "annotations": str(path), "video_dir": str(tmp_path)})
    with pytest.raises(InputError, match=message) as info:
        stage.plan()
    assert str(path) in str(info.value)


def test_missing_annotation_file_is_an_input_error(tmp_path: Path) -> None:
    stage = SourceStage({"adapter": "vidstg", "annotations": str(tmp_path / "nope.json"), "video_dir": str(tmp_path)})
    with pytest.raises(InputError, match="nope.json: cannot read annotation file"):
        stage.plan()


def test_malformed_entries_go_to_the_ledger_and_the_rest_is_built(fixtures_dir: Path, tmp_path: Path) -> None:
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())[:3]
    del entries[1]["temporal_gt"]
    entries[2]["temporal_gt"] = {"begin_fid": 300, "end_fid": 200}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    _, result = build({"adapter": "vidstg", "annotations": str(path), "video_dir": str(fixtures_dir / "vidstg")}, tmp_path)
    assert {r["source_id"] for r in result.table.to_pylist()} == {"5804131706#0"}
    missing, reversed_ = result.rejections
    assert missing.rule == reversed_.rule == "malformed_record"
    assert missing.file == str(path) and missing.record == "entry 1 (vid 5804131706)"
    assert "field 'temporal_gt'" in missing.reason and "Field required" in missing.reason
    assert "entry 2" in reversed_.reason and "end_fid (200) must be greater than begin_fid (300)" in reversed_.reason


# -- synthetic ----------------------------------------------------------------------------------------
SYNTHETIC = {"adapter": "synthetic", "num_videos": 4, "seed": 7, "fps": 10, "width": 160, "height": 120,
             "duration_s": [6.0, 8.0], "num_objects": [2, 4], "object_size": [16, 26], "tasks": list(TASKS),
             "records_per_partition": 2}


def test_synthetic_config_is_validated() -> None:
    assert SourceStage.validate_config(SYNTHETIC) == []
    problems = SourceStage.validate_config({**SYNTHETIC, "width": 161, "tasks": ["dance"], "duration_s": [5, 1]})
    assert any(p.startswith("width: must be even") for p in problems)
    assert any(p.startswith("tasks:") for p in problems)
    assert any(p.startswith("duration_s:") for p in problems)


def test_synthetic_records_are_exact_and_deterministic(tmp_path: Path) -> None:
    import decord

    stage, first = build(SYNTHETIC, tmp_path / "a")
    assert stage.plan() == 2 and first.rejections == []
    rows = first.table.to_pylist()
    assert first.table.schema == RECORD_SCHEMA
    assert {r["task"] for r in rows} >= {"spatio_temporal", "spatial", "general_mcq", "general_free"}
    _, again = build(SYNTHETIC, tmp_path / "b")
    assert again.table.drop_columns(["media"]).equals(first.table.drop_columns(["media"]))
    uris = sorted({r["media"]["uri"] for r in rows})
    assert len(uris) == 2
    assert [Path(u).read_bytes() for u in uris] == [Path(u.replace("/a/", "/b/")).read_bytes() for u in uris]
    assert not list((tmp_path / "a").rglob(".tmp-*"))

    record = next(r for r in rows if r["task"] == "spatial")
    reader = decord.VideoReader(record["media"]["uri"])
    assert len(reader) == record["media"]["num_frames"]
    (kf,) = record["key_frames"]
    (obj,) = kf["objects"]
    assert record["answer"] == "[" + ", ".join(f"{v:.3f}" for v in obj["box"]) + "]"
    # the ground-truth box holds the shape: its colour fills the box centre, the background surrounds it
    frame = reader[round(kf["t_s"] * 10)].asnumpy().astype(int)
    x1, y1, x2, y2 = (np.array(obj["box"]) * [160, 120, 160, 120]).round().astype(int)
    centre = frame[(y1 + y2) // 2, (x1 + x2) // 2]
    background = frame[0:2, 0:2].reshape(-1, 3).mean(axis=0) if (x1 > 3 or y1 > 3) else frame[-2:, -2:].reshape(-1, 3).mean(axis=0)
    assert np.abs(centre - background).max() > 60
    track = next(o for o in record["ground_truth"]["objects"] if o["name"] == obj["name"])["track"]
    assert next(p["box"] for p in track if p["t_s"] == kf["t_s"]) == obj["box"]


def test_synthetic_answers_agree_with_the_ground_truth(tmp_path: Path) -> None:
    _, result = build({**SYNTHETIC, "num_videos": 8, "records_per_partition": 8}, tmp_path)
    rows = result.table.to_pylist()
    assert len(rows) >= 8 * 4
    for record in rows:
        spans = {(s["start_s"], s["end_s"]) for s in record["ground_truth"]["spans"]}
        if record["task"] in ("spatio_temporal", "temporal", "temporal_mcq"):
            start, end = record["answer_span"]
            assert start < end
            stop = (start, end) in spans
            visible = any(o["track"][0]["t_s"] == start for o in record["ground_truth"]["objects"])
            assert stop or visible, record["question"]
        if record["task"] in ("spatio_temporal", "temporal"):
            assert json.loads(record["answer"]) == pytest.approx(record["answer_span"], abs=0.01)
        if record["task"] in ("temporal_mcq", "general_mcq"):
            letters = [o.split(". ", 1)[0] for o in record["options"]]
            assert record["answer"] in letters and len(set(record["options"])) == len(record["options"])
        for kf in record["key_frames"]:
            for obj in kf["objects"]:
                track = _owner(record, obj["name"])["track"]
                assert {"t_s": kf["t_s"], "box": obj["box"]} in track


def _owner(record: dict, name: str) -> dict:
    """The ground-truth object a key-frame name refers to: a key frame names an object as it looks
    there ("blue circle that was yellow"), the track keeps its identity ("yellow circle")."""
    (owner,) = [o for o in record["ground_truth"]["objects"] if o["name"] == name or name_agrees(name, o["name"])]
    return owner


def test_synthetic_ground_truth_lists_the_subject_first(tmp_path: Path) -> None:
    _, result = build(SYNTHETIC, tmp_path)
    for record in result.table.to_pylist():
        named = [_owner(record, o["name"])["name"] for kf in record["key_frames"] for o in kf["objects"]]
        assert record["ground_truth"]["objects"][0]["name"] == named[0]
        first = record["ground_truth"]["spans"][0]
        if record["task"] in ("spatio_temporal", "temporal", "temporal_mcq"):
            assert [first["start_s"], first["end_s"]] == record["answer_span"] and named[0] in first["label"]
