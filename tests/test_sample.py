"""The `sample` stage on real decord: exact frames and timestamps, clip windows, and the ledger for
every kind of broken input (each generated here), with the good records still built."""
from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing import unit_context
from stages.lib.media import encode_jpeg
from stages.lib.schema import RECORD_SCHEMA, record_id, to_table
from stages.sample import SampleStage
from stages.source import SourceStage
from stages.sources.synthetic_world import encode_mp4

SAMPLE = {"fps": 2.0, "max_frames": 32, "min_frames": 4, "clip_max_s": 120.0, "clip_padding_s": 2.0,
          "embed_jpeg": True, "jpeg_quality": 90, "jpeg_max_side": 640}


def seeds(config: dict, tmp_path: Path):
    stage = SourceStage(config)
    result = stage.process(None, unit_context(tmp_path / "run", stage="source"))
    return result


def test_vidstg_frames_are_the_pixels_decord_gives_for_those_indices(fixtures_dir: Path, tmp_path: Path) -> None:
    import decord

    trajectories = tmp_path / "vidor"
    trajectories.mkdir()
    frames = [[{"tid": 0, "bbox": {"xmin": 64, "ymin": 48, "xmax": 320, "ymax": 480}}] for _ in range(553)]
    (trajectories / "5804131706.json").write_text(json.dumps({"trajectories": frames}))
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())[:1]
    annotations = tmp_path / "one.json"
    annotations.write_text(json.dumps(entries))
    seed = seeds({"adapter": "vidstg", "annotations": str(annotations), "video_dir": str(fixtures_dir / "vidstg"),
                  "trajectories_dir": str(trajectories)}, tmp_path)
    stage = SampleStage(SAMPLE)
    result = stage.process(seed.table.slice(0, 1), unit_context(tmp_path / "run", stage="sample"))
    assert result.rejections == []
    (record,) = result.table.to_pylist()
    assert result.table.schema == RECORD_SCHEMA
    fps = 30000 / 1001
    assert record["media"]["num_frames"] == 553 and record["media"]["fps"] == pytest.approx(fps)
    assert (record["media"]["width"], record["media"]["height"]) == (640, 480)
    assert record["clip_window"] == {"start_s": pytest.approx(80 / fps, abs=1e-4), "end_s": pytest.approx(552 / fps, abs=1e-4)}
    indices = [f["index"] for f in record["frames"]]
    assert indices == sorted(set(indices)) and len(indices) <= 32
    key_indices = {round(kf["t_s"] * fps) for kf in record["key_frames"]}
    assert key_indices == {104, 246, 388} and key_indices <= set(indices)  # first, middle, last box of the track
    reader = decord.VideoReader(str(fixtures_dir / "vidstg" / "5804131706.mp4"), num_threads=1)
    stamps = reader.get_frame_timestamp(np.array(indices))[:, 0]
    assert [f["t_s"] for f in record["frames"]] == pytest.approx(stamps.tolist(), abs=1e-5)
    for frame in record["frames"][::4]:
        pixels = reader[frame["index"]].asnumpy()
        assert frame["image"]["bytes"] == encode_jpeg(pixels, SAMPLE["jpeg_max_side"], SAMPLE["jpeg_quality"]), \
            f"frame {frame['index']} differs from decord's"
    uniform = [f["t_s"] for f in record["frames"] if f["index"] not in key_indices]
    spacing = (552 - 80) / fps / (32 - 3)  # 2 fps would want 32 frames; the cap leaves 29 beside the key frames
    assert np.diff(uniform).max() < spacing + 1.01 / fps and len(indices) == 32


def make_video(path: Path, num_frames: int = 20, fps: float = 10.0, size: tuple[int, int] = (64, 48)) -> bytes:
    frames = np.stack([np.full((size[1], size[0], 3), 10 * i % 256, np.uint8) for i in range(num_frames)])
    encode_mp4(frames, fps, str(path))
    return path.read_bytes()


def test_broken_inputs_end_in_the_ledger_with_the_right_reasons(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    data = make_video(videos / "good.mp4")
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "text.mp4").write_text("this is not a video\n" * 40)
    box = [[8, 8, 20, 16]] * 5
    entry = {"bbox": box, "st_frame": 3, "st_time": 0.2, "ed_time": 0.7, "img_num": 20, "caption": "x", "width": 64,
             "height": 48}
    annotations = {
        "good.mp4": entry,
        "empty.mp4": entry,
        "truncated.mp4": entry,
        "text.mp4": entry,
        "missing.mp4": entry,
        "late.mp4": {**entry, "st_time": 5.0, "ed_time": 6.0},  # the video lasts 2 s
        "wide.mp4": {**entry, "bbox": [[50, 8, 30, 16]] * 5},  # x + w = 80 > 64
        "broken.mp4": {k: v for k, v in entry.items() if k != "caption"},
    }
    for name in ("late.mp4", "wide.mp4"):
        (videos / name).symlink_to(videos / "good.mp4")
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(annotations))
    config = {"adapter": "hcstvg", "annotations": str(path), "video_dir": str(videos), "clip_seconds": 2.0}
    seed = seeds(config, tmp_path)
    assert [(r.rule, r.record) for r in seed.rejections] == [("malformed_record", "entry 7 (broken.mp4)")]
    assert "field 'caption'" in seed.rejections[0].reason and seed.rejections[0].file == str(path)
    result = SampleStage(SAMPLE).process(seed.table, unit_context(tmp_path / "run", stage="sample"))
    assert result.table.column("source_id").to_pylist() == ["good.mp4"]
    rules = {r.record: r.rule for r in result.rejections}
    assert rules == {"empty.mp4": "empty_media", "truncated.mp4": "truncated_media", "text.mp4": "unreadable_media",
                     "missing.mp4": "missing_media", "late.mp4": "gt_time_outside_video", "wide.mp4": "box_outside_frame"}
    by_record = {r.record: r for r in result.rejections}
    for name, rejection in by_record.items():
        assert rejection.file == str(videos / name) and name in rejection.reason
        assert rejection.id is not None
    assert "[0, 2.000] s" in by_record["late.mp4"].reason
    assert "no such file" in by_record["missing.mp4"].reason
    (good,) = result.table.to_pylist()
    assert [f["index"] for f in good["frames"]][:1] == [0] and good["media"]["num_frames"] == 20


def test_every_failed_rule_is_reported_not_only_the_first(tmp_path: Path) -> None:
    make_video(tmp_path / "v.mp4")
    record = {"id": record_id("t", "v", "spatial"), "source": "t", "source_id": "v", "task": "spatial",
              "media": {"uri": str(tmp_path / "v.mp4")}, "answer_span": [1.0, 9.0],
              "key_frames": [{"t_s": 0.5, "objects": [{"name": "a", "box": [0.5, 0.5, 1.4, 0.9]},
                                                     {"name": "b", "box": [0.5, 0.5, 0.5, 0.9]}]}]}
    result = SampleStage(SAMPLE).process(to_table([record]), unit_context(tmp_path, stage="sample"))
    assert result.table.num_rows == 0
    assert sorted(r.rule for r in result.rejections) == ["box_outside_frame", "degenerate_box", "gt_time_outside_video"]


def test_long_video_gets_a_window_around_the_evidence(tmp_path: Path) -> None:
    make_video(tmp_path / "v.mp4", num_frames=100)  # 10 s
    config = {**SAMPLE, "clip_max_s": 4.0, "clip_padding_s": 0.5}
    rows = []
    for k in range(6):
        rows.append({"id": record_id("t", "v", "temporal", k), "source": "t", "source_id": f"v{k}", "task": "temporal",
                     "media": {"uri": str(tmp_path / "v.mp4")}, "answer_span": [5.0, 6.0],
                     "key_frames": [{"t_s": 5.5, "objects": []}]})
    result = SampleStage(config).process(to_table(rows), unit_context(tmp_path, stage="sample"))
    assert result.rejections == []
    starts = []
    for record in result.table.to_pylist():
        clip = record["clip_window"]
        assert clip["end_s"] - clip["start_s"] == pytest.approx(4.0)
        assert clip["start_s"] <= 4.5 and clip["end_s"] >= 6.5
        assert 55 in [f["index"] for f in record["frames"]]
        assert all(clip["start_s"] - 1e-6 <= f["t_s"] <= clip["end_s"] for f in record["frames"])
        starts.append(clip["start_s"])
    assert len(set(starts)) > 1  # the evidence is not always at the same place in the window
    again = SampleStage(config).process(to_table(rows), unit_context(tmp_path, stage="sample"))
    assert again.table.equals(result.table)


def test_variable_frame_rate_uses_decoder_timestamps(tmp_path: Path) -> None:
    import av

    pts_ms = [0, 100, 200, 300, 800, 900, 1000, 2000, 2100, 2200, 2300, 2400]
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    record = {"id": "vfr", "source": "t", "source_id": "vfr", "task": "spatial", "media": {"uri": str(path)},
              "key_frames": [{"t_s": 2.0, "objects": [{"name": "a", "box": [0.1, 0.1, 0.2, 0.2]}]}]}
    result = SampleStage({**SAMPLE, "embed_jpeg": False}).process(to_table([record]), unit_context(tmp_path, stage="sample"))
    (row,) = result.table.to_pylist()
    by_index = {f["index"]: f["t_s"] for f in row["frames"]}
    assert by_index[7] == pytest.approx(2.0)  # index / average fps would say 7 / 4.8 = 1.46 s
    assert all(by_index[i] == pytest.approx(pts_ms[i] / 1000) for i in by_index)
    assert all(f["image"] is None for f in row["frames"])


def test_sample_config_is_validated() -> None:
    assert SampleStage.validate_config(SAMPLE) == []
    problems = SampleStage.validate_config({**SAMPLE, "fps": 0.0, "min_frames": 40, "jpeg_quality": 101})
    assert {p.split(":")[0] for p in problems} == {"fps", "min_frames", "jpeg_quality"}


def test_jpeg_frames_open_and_keep_the_aspect(tmp_path: Path) -> None:
    from PIL import Image

    make_video(tmp_path / "v.mp4", size=(96, 48))
    record = {"id": "a", "source": "t", "source_id": "a", "task": "general_free", "media": {"uri": str(tmp_path / "v.mp4")}}
    result = SampleStage({**SAMPLE, "jpeg_max_side": 32}).process(to_table([record]), unit_context(tmp_path, stage="sample"))
    (row,) = result.table.to_pylist()
    assert len(row["frames"]) == 4  # 2 s at 2 fps
    image = Image.open(io.BytesIO(row["frames"][1]["image"]["bytes"]))
    assert image.size == (32, 16)
