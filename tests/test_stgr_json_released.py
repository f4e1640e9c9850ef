"""The released Open-o3 Video STGR JSON in, true rows out: records written here in the released layout
(`STGR-SFT.json`/`STGR-RL.json` as `src/r1-v/src/open_r1/sft_multi_task.py` and the RL trainer read
them) over the real fixture clips, built by a real `stgr build` (Ray, decord, the template annotator,
the real sample, align and filter stages). Each row's own answer, in the well-formed completion that
training renders for it, scores full accuracy in the filter (`answer_agrees`), in the RL accuracy
reward and in `stgr eval`: one scorer, three callers."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.engine_util import run_stgr

VIDEOS = "../shared/fixtures/vidstg"  # 5804131706.mp4: 640x480, 553 frames; 5587257558.mp4: 640x360, 540 frames

RELEASED = [
    {"task": "temporal-spatial free-form QA", "source": "STR_plm_rdcap", "video_path": "5804131706.mp4",
     "question": "What does the adult wearing a black hat do?",
     "answer": "An adult wearing a black hat uses a camera.",
     "reasoning_process": "The <obj>adult</obj><box>[0.30,0.15,0.62,0.98]</box>at<t>4.0</t>s holds a "
                          "<obj>camera</obj><box>[0.42,0.20,0.55,0.35]</box>at<t>4.0</t>s up to the face.",
     "key_frames": [{"idx": 0, "time": 4.0, "path": "5804131706/0.jpg"},
                    {"idx": 1, "time": 8.0, "path": "5804131706/1.jpg"}],
     "key_items": {"0": {"adult": [[0.30, 0.15, 0.62, 0.98]], "camera": [[0.42, 0.20, 0.55, 0.35]]},
                   "1": {"adult": [[0.34, 0.14, 0.66, 0.97]], "camera": None}}},
    {"task": "temporal QA", "source": "TVG_vidstg", "video_path": "5804131706.mp4",
     "question": "When does the adult wearing a black hat use the camera?", "answer": "[3.47, 12.98]",
     "reasoning_process": "The camera is raised at <t>3.5</t>s and lowered at <t>12.9</t>s.",
     "key_frames": None, "key_items": None},
    {"task": "temporal QA (MCQ)", "source": "TVG_vidstg", "video_path": "5587257558.mp4",
     "question": "When does the man in black use the camera?\nA. [10.0, 14.0]\nB. [0.0, 7.8]\nC. [15.2, 18.0]",
     "answer": "B\n[0.0, 7.8]", "key_frames": None, "key_items": None},
    {"task": "General video QA MCQ", "source": "videor1_vidstg", "video_path": "5587257558.mp4",
     "question": "What does the man in black hold?\nA. a camera\nB. a cup\nC. a phone\nD. a book",
     "answer": "A", "key_frames": None, "key_items": None},
]
TASKS = {"spatio_temporal", "temporal", "temporal_mcq", "general_mcq"}


def _split_rows(run: Path) -> dict[str, pd.DataFrame]:
    return {split.name: pd.concat([pd.read_parquet(f) for f in sorted(split.glob("*.parquet"))], ignore_index=True)
            for split in sorted((run / "dataset").iterdir()) if split.is_dir() and any(split.glob("*.parquet"))}


@pytest.fixture(scope="module")
def built(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    folder = tmp_path_factory.mktemp("released")
    annotations = folder / "STGR-SFT.json"
    annotations.write_text(json.dumps(RELEASED, indent=1))
    run = folder / "run"
    code, out = run_stgr("build", "--run", str(run), "source=stgr_json", f"source.annotations={annotations}",
                         f"source.video_dir={VIDEOS}", "cluster.num_cpus=2", timeout=600)
    assert code == 0, out[-3000:]
    return run, _split_rows(run)


def test_released_records_build_to_rows_that_pass_the_filter(built) -> None:
    run, splits = built
    rows = pd.concat(splits.values(), ignore_index=True)
    ledger_files = sorted((run / "ledger").rglob("*.parquet"))
    ledger = pd.concat([pd.read_parquet(f) for f in ledger_files]) if ledger_files else pd.DataFrame(columns=["rule"])
    assert set(rows.task) == TASKS and len(rows) == 4, ledger[["rule", "reason"]].to_string()
    by_task = {row.task: row for row in rows.itertuples()}
    assert by_task["spatio_temporal"].answer == "An adult wearing a black hat uses a camera."
    assert list(by_task["temporal"].answer_span) == [3.47, 12.98]
    assert by_task["temporal_mcq"].answer == "B\n[0.0, 7.8]" and list(by_task["temporal_mcq"].answer_span) == [0.0, 7.8]
    assert by_task["general_mcq"].answer == "A" and list(by_task["general_mcq"].options)[0] == "A. a camera"
    assert by_task["spatio_temporal"].media["width"] == 640 and by_task["spatio_temporal"].media["height"] == 480
    assert by_task["general_mcq"].media["num_frames"] == 540
    # the key frame times are sampled frames, and the trace cites the released boxes there
    frame_times = [f["t_s"] for f in by_task["spatio_temporal"].frames]
    assert all(min(abs(t - kf["t_s"]) for t in frame_times) < 1 / 29.97 for kf in by_task["spatio_temporal"].key_frames)
    # the filter scored each row's answer with the one scorer (stages.lib.answers) and it agreed fully
    for row in rows.itertuples():
        assert row.scores["answer_ok"] and row.scores["answer_score"] == pytest.approx(1.0), row.task


def test_each_rows_answer_scores_full_accuracy_as_reward_and_in_evaluation(built, tmp_path: Path) -> None:
    from stages.lib.render import FramePolicy, render_example
    from train.data import load_records
    from train.evaluate import load_config, run_eval
    from train.rewards import make_reward_funcs

    run, splits = built
    accuracy = make_reward_funcs()[0]
    for split in splits:
        records = load_records(run / "dataset", split)
        # RL: the rendered training target (the row's trace and answer, boxes on the model's grid) as the
        # completion, the reward target as the RL dataset carries it (JSON text)
        examples = [render_example(r, FramePolicy()) for r in records]
        scores = accuracy([[{"role": "assistant", "content": ex.target}] for ex in examples],
                          reward_target=[json.dumps(ex.reward_target) for ex in examples])
        assert scores == pytest.approx([1.0] * len(records)), [r["task"] for r in records]

        # evaluation: `stgr eval` on the split with a replay backend that answers with the same target
        overrides = ["model=tiny", "backend=replay"]
        cfg = load_config("unused", str(run / "dataset" / split), overrides)
        policy = FramePolicy.from_config(cfg.model, cfg.data)
        lines = [{"match": {"id": r["id"], "kind": "answer"}, "completion": render_example(r, policy).target}
                 for r in records] + [{"match": {"kind": "judge"}, "completion": "3"}]
        canned = tmp_path / f"{split}.jsonl"
        canned.write_text("".join(json.dumps(line) + "\n" for line in lines))
        result = run_eval("unused", str(run / "dataset" / split), tmp_path / f"eval-{split}",
                          [*overrides, f"+backend_options.completions={canned}"])
        assert len(result["samples"]) == len(records)
        for sample in result["samples"]:
            assert sample["reward"]["accuracy"] == pytest.approx(1.0), sample["task"]
            assert sample["correct"], sample["task"]


def test_the_built_rows_export_for_the_released_trainers_and_read_back(built, tmp_path: Path) -> None:
    """`stgr export --format open-o3` of these rows: every entry's source takes the released RL trainer's
    branch for its task, and `source=stgr_json` reads the files back with each row's ground truth."""
    from pipeline.cli import main
    from pipeline.testing import unit_context
    from stages.sources.stgr_json import STGRJsonAdapter
    from tests.test_commands_export import GROUND_TRUTH, released_rl_video_root

    run, splits = built
    assert main(["export", str(run), "--format", "open-o3", "--out", str(tmp_path / "o3")]) == 0
    rows = {r["id"]: r for r in pd.concat(splits.values(), ignore_index=True).to_dict("records")}
    read_back = 0
    for name in ("STGR-SFT.json", "STGR-RL.json"):
        path = tmp_path / "o3" / name
        if not path.exists():
            continue
        entries = json.loads(path.read_text())
        adapter = STGRJsonAdapter({"annotations": str(path), "video_dir": "/"})
        for position, entry in enumerate(entries):
            root = released_rl_video_root(entry["source"])
            assert root == {"spatio_temporal": "STR_DATA", "temporal": "TVG_ROOT", "temporal_mcq": "TVG_ROOT",
                            "general_mcq": "GENERAL_VIDEO_ROOT"}[entry["stgr"]["task"]]
            (seed,) = adapter.seed(entry, position, unit_context(tmp_path / "ctx", stage="source"))
            row = rows[entry["id"]]
            for column in GROUND_TRUTH:
                value = row[column]
                expected = value.tolist() if hasattr(value, "tolist") else value
                if column == "key_frames":
                    expected = [{"t_s": kf["t_s"], "objects": [{"name": o["name"], "box": list(o["box"])}
                                                               for o in kf["objects"]]} for kf in value]
                assert seed[column] == expected, (row["task"], column)
            read_back += 1
    assert read_back == len(rows) == 4
