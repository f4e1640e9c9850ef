"""`stgr eval` end to end with a tiny local Qwen2.5-VL (random weights, real transformers path):
on a V-STaR-format file built from synthetic videos and on an STGR split. A random model writes
garbage; the point is that every call is made, stored, parsed and scored, and the report written."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from stages.lib.schema import record_id, to_table
from stages.sources.synthetic_world import encode_mp4, render, simulate

SCENE = dict(width=160, height=120, fps=10.0, duration_s=(4.0, 5.0), num_objects=(2, 2), object_size=(30, 40))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.testing.tiny_model import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory):
    videos = tmp_path_factory.mktemp("videos")
    out = []
    for index in range(2):
        scene = simulate(3, index, **SCENE)
        encode_mp4(render(scene), scene.fps, str(videos / f"syn{index}.mp4"))
        out.append(scene)
    return videos, out


def _vstar_item(vid: str, scene) -> dict:
    """A V-STaR record about the scene's first object: when it is visible, where at each second."""
    obj = next(o for o in scene.objects if o.visible.any())
    frames = [i for i in range(scene.num_frames) if obj.visible[i]]
    start, end = scene.time(frames[0]), scene.time(frames[-1])
    seconds = [s for s in range(int(start) + 1, int(end) + 1) if obj.visible[scene.frame_at(s)]] or [frames[0] / scene.fps]
    return {
        "vid": vid, "domain": "synthetic", "fps": scene.fps, "width": scene.width, "height": scene.height,
        "frame_count": scene.num_frames, "question": f"What shape is the {obj.name}?", "answer": f"a {obj.shape}",
        "temporal_question": f"When is the {obj.name} visible?", "timestamps": [start, end],
        "spatial_question": f"Where is the {obj.name}?", "spatial_question_2": f"Where is the {obj.shape}?",
        "bboxes": [dict(zip(("xmin", "ymin", "xmax", "ymax"), map(float, obj.boxes[scene.frame_at(s)])),
                        timestamp=s, frame_index=scene.frame_at(s)) for s in seconds],
    }


def test_stgr_eval_runs_tiny_model_on_a_vstar_file_from_synthetic_videos(tiny_model, scenes, tmp_path, capsys):
    videos, scene_list = scenes
    data = tmp_path / "vstar.json"
    data.write_text(json.dumps([_vstar_item(f"syn{i}", s) for i, s in enumerate(scene_list)]))
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "model=tiny",
            f"data.video_dir={videos}", "data.max_frames=3", "generation.max_new_tokens=8", "tts.num_samples=2"]
    assert main(argv) == 0
    assert "V-STaR: 2 items" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["format"] == "vstar" and len(result["samples"]) == 2
    for sample in result["samples"]:
        assert set(sample["completions"]) == {"vqa", "temporal_1", "spatial_1", "spatial_2", "temporal_2"}
        assert all(isinstance(c, str) for c in sample["completions"].values())  # the model answered all five
        assert 0.0 <= sample["chain1"]["tiou"] <= 1.0 and 0.0 <= sample["chain2"]["viou"] <= 1.0
        assert len(sample["tts"]["samples"]) == 2
    # 2 items x (5 answers + 2 samples) + judge calls for non-empty answers; crops only where cited.
    assert result["calls"]["generated"] >= 14 and result["calls"]["reused"] == 0
    report = (out / "report.md").read_text()
    assert "| 1: what -> when -> where |" in report and "## Test-time scaling" in report
    # A rerun does not call the model again and reports the same numbers.
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["calls"]["generated"] == 0 and again["summary"] == result["summary"]


def _stgr_records(videos: Path, scene) -> list[dict]:
    """One STGR record per answer kind over a synthetic video, frames at 2 fps (no embedded JPEGs)."""
    obj = next(o for o in scene.objects if o.visible.any())
    t_box = next(i for i in range(scene.num_frames) if obj.visible[i])
    box = scene.normalised_box(obj, t_box)
    step = int(scene.fps // 2)
    frames = [{"t_s": scene.time(i), "index": i} for i in range(0, scene.num_frames, step)]
    media = {"uri": str(videos / "syn0.mp4"), "kind": "video", "fps": scene.fps, "num_frames": scene.num_frames,
             "duration_s": scene.duration_s, "width": scene.width, "height": scene.height}
    key_frames = [{"t_s": scene.time(t_box), "objects": [{"name": obj.name, "box": box}]}]
    common = {"source": "synthetic", "source_id": "syn0", "media": media, "clip_window": {"start_s": 0.0, "end_s": scene.duration_s},
              "frames": frames, "key_frames": key_frames, "split": "stgr-rl", "reasoning": ""}
    rows = [
        {"task": "general_mcq", "question": "How many shapes appear?", "options": ["A. 1", "B. 2", "C. 3"], "answer": "B"},
        {"task": "temporal", "question": f"When is the {obj.name} visible?", "answer": "[0, 2]", "answer_span": [0.0, 2.0]},
        {"task": "spatial", "question": f"Where is the {obj.name}?", "answer": "[" + ",".join(f"{v:.3f}" for v in box) + "]"},
        {"task": "general_free", "question": f"What does the {obj.name} do?", "answer": f"The {obj.name} moves."},
    ]
    return [{**common, **row, "id": record_id("synthetic", "syn0", row["task"])} for row in rows]


def test_stgr_eval_runs_tiny_model_on_an_stgr_split(tiny_model, scenes, tmp_path, capsys):
    videos, scene_list = scenes
    split = tmp_path / "dataset" / "stgr-rl"
    split.mkdir(parents=True)
    pq.write_table(to_table(_stgr_records(videos, scene_list[0])), split / "part-00000.parquet")
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model), "--data", str(tmp_path), "--out", str(out), "model=tiny",
            "data.max_frames=3", "generation.max_new_tokens=8", "tts.num_samples=2"]
    assert main(argv) == 0
    assert "STGR: 4 records" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["format"] == "stgr"
    assert {r["task"] for r in result["samples"]} == {"general_mcq", "temporal", "spatial", "general_free"}
    by_task = {r["task"]: r for r in result["samples"]}
    assert "tiou" in by_task["temporal"] and "iou" in by_task["spatial"] and "judge" in by_task["general_free"]
    assert "tts" in by_task["general_mcq"] and "tts" in by_task["general_free"] and "tts" not in by_task["temporal"]
    for row in result["samples"]:
        assert set(row["reward"]) == {"accuracy", "format", "temporal", "spatial"}
    report = (out / "report.md").read_text()
    assert "# STGR evaluation" in report and "| general_mcq | 1 |" in report
