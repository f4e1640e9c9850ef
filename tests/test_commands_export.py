"""`stgr export`: upstream Open-o3 STGR json with key-frame JPEGs, and verl RL Parquet."""
from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from stages.commands.export import OPEN_O3_TASKS, question_text
from stages.geometry import CANONICAL
from stages.schema import TASKS
from stages.targets import frame_from_dict
from tests.record_factory import SQUARE_BOX, build_run, circle_box


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "run"
    return path, build_run(path, n=9)


def test_open_o3_json_and_key_frames(run, tmp_path, capsys):
    path, fates = run
    out = tmp_path / "o3"
    assert main(["export", str(path), "--format", "open-o3", "--out", str(out)]) == 0
    entries = json.loads((out / "STGR-SFT.json").read_text()) + json.loads((out / "STGR-RL.json").read_text())
    assert sorted(e["id"] for e in entries) == sorted(fates["kept"])
    entry = entries[0]
    assert entry["task"] == "temporal-spatial free-form QA" and entry["video_path"].endswith(".mp4")
    assert entry["reasoning_process"].startswith("The <obj>red circle</obj>")  # no <think> wrapper
    assert entry["key_frames"] == [{"idx": 0, "time": 2.0, "path": f"{entry['id']}/0.jpg"}]
    assert entry["key_items"] == {"0": {"red circle": [circle_box(2.0)], "blue square": [SQUARE_BOX]}}
    # the key frame written is the sampled frame at 2.0 s: the circle is where the ground truth says
    image = Image.open(out / "kfs" / entry["key_frames"][0]["path"]).convert("RGB")
    x1, y1, x2, y2 = circle_box(2.0)
    r, g, b = image.getpixel((int((x1 + x2) / 2 * image.width), int((y1 + y2) / 2 * image.height)))
    assert r > 150 and g < 100 and b < 100


def test_verl_parquet(run, tmp_path, capsys):
    path, fates = run
    out = tmp_path / "verl" / "rl.parquet"
    assert main(["export", str(path / "dataset"), "--format", "verl", "--out", str(out), "--split", "rl"]) == 0
    frame = pd.read_parquet(out)
    rl_ids = pd.read_parquet(path / "dataset" / "stgr-rl")["id"].tolist()
    assert sorted(e["id"] for e in frame["extra_info"]) == sorted(rl_ids)
    row = frame.iloc[0]
    assert row["reward_model"]["style"] == "rule"
    truth = json.loads(row["reward_model"]["ground_truth"])
    assert truth["id"] == row["extra_info"]["id"] and truth["task"] == "spatio_temporal"
    assert truth["answer"] == "It is in the middle of the frame." and truth["answer_span"] == [0.0, 5.0]
    assert truth["key_frames"] == [{"t_s": 2.0, "objects": [{"name": "red circle", "box": circle_box(2.0)},
                                                            {"name": "blue square", "box": SQUARE_BOX}]}]
    assert frame_from_dict(truth["frame"]) == CANONICAL  # what VERL_SYSTEM asks the model to write
    user = row["prompt"][1]["content"]
    assert row["prompt"][0]["role"] == "system" and user.count("<image>") == len(row["images"]) == 12
    assert user.startswith("Frame 1 at 0 s: <image>\nFrame 2 at 0.5 s: <image>\n")
    assert user.endswith("<image>\nWhere is the red circle when it passes the middle?")
    Image.open(io.BytesIO(row["images"][0]["bytes"])).verify()
    assert row["ability"] == "spatio_temporal" and row["data_source"] == "stgr/synthetic"
    assert json.loads(row["extra_info"]["key_frames"])[0]["t_s"] == 2.0
    assert list(row["extra_info"]["answer_span"]) == [0.0, 5.0]


def test_verl_ground_truth_scores_with_compute_score(run, tmp_path):
    """verl passes `reward_model.ground_truth` to the custom reward as it is: our `compute_score` must
    score the exported rows unchanged, full marks for a grounded correct completion, little for a wrong one."""
    from train.rewards import COMPONENTS, compute_score

    path, _ = run
    out = tmp_path / "verl.parquet"
    assert main(["export", str(path), "--format", "verl", "--out", str(out)]) == 0
    rows = pd.read_parquet(out)
    assert len(rows) > 0
    x1, y1, x2, y2 = circle_box(2.0)
    right = (f"<think>The <obj>red circle</obj><box>[{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}]</box>at<t>2</t>s "
             f"passes the middle.</think><answer>[0.0, 5.0]</answer>")
    wrong = ("<think>The <obj>red circle</obj><box>[0.700,0.600,0.900,0.950]</box>at<t>5.5</t>s "
             "is on the right.</think><answer>[4.5, 5.5]</answer>")
    for _, row in rows.iterrows():
        kwargs = {"data_source": row["data_source"], "ground_truth": row["reward_model"]["ground_truth"],
                  "extra_info": row["extra_info"]}
        good, bad = compute_score(solution_str=right, **kwargs), compute_score(solution_str=wrong, **kwargs)
        assert good == pytest.approx({"score": 4.0, **{name: 1.0 for name in COMPONENTS}})
        assert bad["format"] == 1.0 and bad["spatial"] == 0.0  # cited 3.5 s from the key frame: gated out
        assert bad["accuracy"] == pytest.approx(0.5 / 5.5)  # tIoU([0, 5], [4.5, 5.5])
        assert bad["temporal"] == pytest.approx(math.exp(-(3.5**2) / (2 * 4.0**2)))  # sigma 4 at the start
        assert bad["score"] < good["score"] - 2


def test_every_task_has_an_upstream_name_and_options_are_lettered():
    assert set(OPEN_O3_TASKS) == set(TASKS)
    record = {"question": "What happens?", "options": ["it stops", "B. it turns"]}
    assert question_text(record) == "What happens?\nA. it stops\nB. it turns"


def test_open_o3_export_reads_back_with_the_stgr_json_adapter(tmp_path):
    """What we export is what the project's reader of the released files reads back."""
    from pipeline.testing import unit_context
    from stages.commands.export import export_open_o3
    from stages.sources.stgr_json import STGRJsonAdapter
    from tests.record_factory import make_record

    records = [
        make_record(0, with_jpeg=True, split="sft", reasoning="The <obj>red circle</obj><box>[0.3,0.2,0.5,0.5]</box>at<t>2</t>s"),
        make_record(1, with_jpeg=True, split="sft", task="temporal", answer="[1.5, 4.0]", answer_span=[1.5, 4.0],
                    reasoning="It stops at <t>1.5</t>s and moves at <t>4</t>s."),
        make_record(2, with_jpeg=True, split="sft", task="temporal_mcq", options=["A. 0-1 s", "B. 1.5-4 s"],
                    answer="B", answer_span=[1.5, 4.0], reasoning="From <t>1.5</t>s to <t>4</t>s."),
    ]
    export_open_o3(records, str(tmp_path / "o3"))
    adapter = STGRJsonAdapter({"annotations": str(tmp_path / "o3" / "STGR-SFT.json"), "video_dir": "/"})
    ctx = unit_context(tmp_path / "run", stage="source")
    for position, (entry, original) in enumerate(zip(adapter.entries(), records)):
        (seed,) = adapter.seed(entry, position, ctx)
        for column in ("task", "question", "options", "answer", "answer_span", "reasoning", "key_frames"):
            assert seed[column] == original[column], column
        assert seed["media"]["uri"] == original["media"]["uri"]
