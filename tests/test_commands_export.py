"""`stgr export`: upstream Open-o3 STGR json with key-frame JPEGs, and verl RL Parquet."""
from __future__ import annotations

import io
import json
import math
import os

import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from stages.commands._records import locate
from stages.commands.export import OPEN_O3_TASKS, question_text, training_view
from stages.lib.chat import content_text
from stages.lib.geometry import CANONICAL
from stages.lib.render import render_example
from stages.lib.schema import TASKS
from stages.lib.targets import frame_from_dict
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
    assert entry["source"] == "STR_stgr" and entry["answer"] == "[0.0, 5.0]"
    assert entry["stgr"] == {"source": "synthetic", "task": "spatio_temporal", "answer": "[0.0, 5.0]",
                             "answer_span": [0.0, 5.0]}
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
    assert main(["export", str(path / "dataset"), "--format", "verl", "--out", str(out), "--split", "stgr-rl"]) == 0
    frame = pd.read_parquet(out)
    rl_ids = pd.read_parquet(path / "dataset" / "stgr-rl")["id"].tolist()
    assert sorted(e["id"] for e in frame["extra_info"]) == sorted(rl_ids)
    row = frame.iloc[0]
    assert row["reward_model"]["style"] == "rule"
    truth = json.loads(row["reward_model"]["ground_truth"])
    assert truth["id"] == row["extra_info"]["id"] and truth["task"] == "spatio_temporal"
    assert truth["answer"] == "[0.0, 5.0]" and truth["answer_span"] == [0.0, 5.0]
    assert truth["key_frames"] == [{"t_s": 2.0, "objects": [{"name": "red circle", "box": circle_box(2.0)},
                                                            {"name": "blue square", "box": SQUARE_BOX}]}]
    # the prompt is what `stgr train rl` renders (conf/train/rl.yaml: Qwen2.5-VL's pixel grid, no system turn)
    policy, data = training_view()
    record = locate(str(path / "dataset")).record(row["extra_info"]["id"])
    example = render_example(record, policy, data["instruction"], data["system_prompt"])
    assert frame_from_dict(truth["frame"]) == example.frame and example.frame.name == "qwen2.5-vl"
    assert [m["role"] for m in row["prompt"]] == ["user"]
    user = row["prompt"][0]["content"]
    assert user == content_text(example.prompt()[0]["content"], "<image>")
    assert user.count("<image>") == len(row["images"]) == 12
    assert "\nFrame 1 at 0 s: <image>\nFrame 2 at 0.5 s: <image>\n" in user
    assert "<image>\nWhere is the red circle when it passes the middle?\nBoxes are [x1,y1,x2,y2] on a" in user
    Image.open(io.BytesIO(row["images"][0]["bytes"])).verify()
    assert row["ability"] == "spatio_temporal" and row["data_source"] == "stgr/synthetic"
    assert json.loads(row["extra_info"]["key_frames"])[0]["t_s"] == 2.0
    assert list(row["extra_info"]["answer_span"]) == [0.0, 5.0]


def test_verl_prompts_follow_training_overrides(run, tmp_path):
    """`--train` overrides change the prompt as they change training's: the frame count, the box grid
    (and with it the reward target's frame) and the system turn."""
    path, _ = run
    out = tmp_path / "verl.parquet"
    assert main(["export", str(path), "--format", "verl", "--out", str(out), "--train", "data.max_frames=4",
                 "model.box_frame=normalised", "data.system_prompt=You ground your answers."]) == 0
    row = pd.read_parquet(out).iloc[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][0]["content"] == "You ground your answers."
    assert row["prompt"][1]["content"].count("<image>") == len(row["images"]) == 4
    assert "on a 1 x 1 grid" in row["prompt"][1]["content"]
    assert frame_from_dict(json.loads(row["reward_model"]["ground_truth"])["frame"]) == CANONICAL
    assert main(["export", str(path), "--format", "open-o3", "--out", str(tmp_path / "o3"), "--train", "data.max_frames=4"]) == 2


def test_verl_ground_truth_scores_with_compute_score(run, tmp_path):
    """verl passes `reward_model.ground_truth` to the custom reward as it is: our `compute_score` must
    score the exported rows unchanged, full marks for a grounded correct completion, little for a wrong one."""
    from train.rewards import COMPONENTS, compute_score

    path, _ = run
    out = tmp_path / "verl.parquet"
    assert main(["export", str(path), "--format", "verl", "--out", str(out), "--train", "model.box_frame=normalised"]) == 0
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


def _every_task(split: str = "stgr-rl") -> list[dict]:
    """One record of each task, as a build leaves them (answers as the template annotator writes them)."""
    from tests.record_factory import make_record

    rows = [
        dict(task="spatio_temporal", answer="[0.0, 5.0]", answer_span=[0.0, 5.0],
             reasoning="The <obj>red circle</obj><box>[0.3,0.2,0.5,0.5]</box>at<t>2</t>s"),
        dict(task="spatio_temporal", answer="It is in the middle of the frame."),
        dict(task="spatial", answer="[0.3, 0.2, 0.5, 0.5]"),
        dict(task="temporal", answer="[1.5, 4.0]", answer_span=[1.5, 4.0], key_frames=[],
             reasoning="It stops at <t>1.5</t>s and moves at <t>4</t>s."),
        dict(task="temporal_mcq", options=["A. 0-1 s", "B. 1.5-4 s"], answer="B", answer_span=[1.5, 4.0], key_frames=[],
             reasoning="From <t>1.5</t>s to <t>4</t>s."),
        dict(task="general_mcq", options=["A. one", "B. two"], answer="B", key_frames=[]),
        dict(task="general_free", answer="The circle moves right.", key_frames=[]),
    ]
    return [make_record(i, with_jpeg=True, split=split, **row) for i, row in enumerate(rows)]


def _read_back(path, tmp_path) -> list[dict]:
    from pipeline.testing import unit_context
    from stages.sources.stgr_json import STGRJsonAdapter

    adapter = STGRJsonAdapter({"annotations": str(path), "video_dir": str(tmp_path / "o3")})  # video_path is relative to it
    ctx = unit_context(tmp_path / "run", stage="source")
    return [seed for position, entry in enumerate(adapter.entries()) for seed in adapter.seed(entry, position, ctx)]


GROUND_TRUTH = ("task", "question", "options", "answer", "answer_span", "reasoning", "key_frames")


def test_open_o3_export_reads_back_with_the_stgr_json_adapter(tmp_path):
    """What we export is what the project's reader of the released files reads back: the same ground
    truth, so each record's own answer scores the same (full marks) before and after the round trip
    (a spatio-temporal span answer used to lose its span and drop from 1.0 to 0.0)."""
    from stages.lib.answers import score_record_answer
    from stages.commands.export import export_open_o3

    records = _every_task()
    export_open_o3(records, str(tmp_path / "o3"))
    seeds = _read_back(tmp_path / "o3" / "STGR-RL.json", tmp_path)
    assert len(seeds) == len(records)
    for seed, original in zip(seeds, records):
        for column in GROUND_TRUTH:
            assert seed[column] == original[column], (original["task"], column)
        assert os.path.normpath(seed["media"]["uri"]) == original["media"]["uri"]
        assert json.loads(seed["meta"])["stgr_source"] == "synthetic"
        completion = f"<think>{original['reasoning'] or ''}</think><answer>{original['answer']}</answer>"
        assert score_record_answer(completion, seed) == score_record_answer(completion, original) == 1.0


def test_open_o3_rows_survive_the_released_loader_and_read_back(tmp_path):
    """The released trainers load the JSON with `datasets.Dataset.from_json`, which gives every entry
    every key of every other (missing ones as None, `key_items` a struct of all indices and names):
    the file that dataset saves reads back with the same ground truth (`stgr_json` drops the nulls)."""
    from datasets import Dataset

    from stages.commands.export import export_open_o3

    records = _every_task()
    export_open_o3(records, str(tmp_path / "o3"))
    loaded = Dataset.from_json(str(tmp_path / "o3" / "STGR-RL.json")).to_list()
    assert loaded[3]["key_items"] == {"0": None} or all(v is None for v in loaded[3]["key_items"].values())
    assert loaded[0]["key_items"]["0"]["red circle"] and loaded[0]["key_items"]["0"].get("It") is None
    resaved = tmp_path / "resaved.json"
    resaved.write_text(json.dumps(loaded))

    def rounded(key_frames):  # pyarrow's JSON reader parses 0.3 as 0.30000000000000004
        return [(kf["t_s"], [(o["name"], [round(v, 9) for v in o["box"]]) for o in kf["objects"]]) for kf in key_frames]

    for seed, original in zip(_read_back(resaved, tmp_path), records):
        for column in GROUND_TRUTH:
            if column == "key_frames":
                assert rounded(seed[column]) == rounded(original[column]), original["task"]
            else:
                assert seed[column] == original[column], (original["task"], column)


def released_rl_video_root(source: str) -> str:
    """The branch the released RL trainer takes for an entry's `source`: a transcription of the rule in
    marinero4972/Open-o3-Video `src/r1-v/src/open_r1/trainer/grpo_trainer.py`, `compute_loss`
    (exact names first, then substrings in this order; anything else raises `Invalid source`)."""
    exact = {"videoespresso_train_video": "VIDEO_ESPRESSO_ROOT", "timerft": "TIMERFT_ROOT", "gqa": "GQA_ROOT"}
    if source in exact:
        return exact[source]
    if "STR" in source:
        return "STR_PLM_DATA" if "STR_plm" in source else "STR_DATA"
    if "TVG" in source:
        return "TVG_ROOT"
    if "videor1" in source:
        return "GENERAL_VIDEO_ROOT"
    raise ValueError(f"Invalid source: {source}")


def test_every_exported_rl_row_is_accepted_by_the_released_rl_trainer(tmp_path):
    """Each row's source takes the branch whose video root the released SFT script uses for the same
    task (STR for spatio-temporal, also the key-frame root; TVG for temporal; videor1 for general QA),
    and each answer parses the way the released rewards parse it."""
    import ast

    from stages.commands.export import export_open_o3

    export_open_o3(_every_task(), str(tmp_path / "o3"))
    entries = json.loads((tmp_path / "o3" / "STGR-RL.json").read_text())
    assert len(entries) == 7
    expected = {"temporal-spatial free-form QA": "STR_DATA", "temporal QA": "TVG_ROOT",
                "temporal QA (MCQ)": "TVG_ROOT", "General video QA MCQ": "GENERAL_VIDEO_ROOT",
                "General video QA Free-form": "GENERAL_VIDEO_ROOT"}
    for entry in entries:
        assert released_rl_video_root(entry["source"]) == expected[entry["task"]], entry["task"]
        if entry["task"] == "temporal QA":
            assert ast.literal_eval(entry["answer"]) == [1.5, 4.0]
        if entry["task"] == "temporal QA (MCQ)":
            letter, span = entry["answer"].split("\n")
            assert letter == "B" and ast.literal_eval(span) == [1.5, 4.0]
        if entry["task"] == "General video QA MCQ":
            assert entry["answer"] == "B"
        for key_frame in entry["key_frames"]:
            assert str(key_frame["idx"]) in entry["key_items"]  # the spatial reward indexes key_items by it
    with pytest.raises(ValueError, match="Invalid source: synthetic"):
        released_rl_video_root("synthetic")  # what every exported row said before


def test_export_names_the_record_whose_answer_the_released_layout_cannot_hold(tmp_path):
    from pipeline.errors import InputError
    from stages.commands.export import export_open_o3
    from tests.record_factory import make_record

    with pytest.raises(InputError, match=r"record \w+: task 'temporal' needs a time span: field 'answer_span'"):
        export_open_o3([make_record(0, task="temporal", answer="soon")], str(tmp_path / "a"))
    with pytest.raises(InputError, match=r"field 'answer' \('the red one'\) holds no option letter"):
        export_open_o3([make_record(0, task="general_mcq", options=["A. x", "B. y"], answer="the red one")],
                       str(tmp_path / "b"))


def test_export_for_the_released_sft_script_leaves_out_temporal_mcq(tmp_path, capsys):
    """The released SFT script has no `temporal QA (MCQ)` branch (`sft_multi_task.py`,
    `prepare_dataset` raises `Unknown task`): `--tasks` exports an SFT file it can read."""
    import pyarrow.parquet as pq

    from stages.lib.schema import to_table

    pq.write_table(to_table(_every_task(split="stgr-cot")), tmp_path / "records.parquet")
    keep = [t for t in TASKS if t != "temporal_mcq"]
    out = tmp_path / "o3"
    assert main(["export", str(tmp_path / "records.parquet"), "--format", "open-o3", "--split", "stgr-cot",
                 "--out", str(out), "--tasks", *keep]) == 0
    entries = json.loads((out / "STGR-SFT.json").read_text())
    assert sorted(e["stgr"]["task"] for e in entries) == sorted(r["task"] for r in _every_task() if r["task"] in keep)
    assert "temporal QA (MCQ)" not in {e["task"] for e in entries}
    assert f"{out}: STGR-SFT.json: 6 records" in capsys.readouterr().out
