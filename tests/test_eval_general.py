"""General video benchmarks (Video-MME, WorldSense, VideoMMMU, generic multiple choice) in `stgr eval`.

With canned completions (the `replay` backend) over the real V-STaR demo clips every number of the
report is checked against a hand computation: per duration, domain, sub-category and task type,
with unparsed and out-of-options answers, missing videos and bad records; the two test-time-scaling
votes are checked where they must differ and where they must agree. The tiny local Qwen2.5-VL runs
the Video-MME file end to end through the real transformers path, and a rerun makes no new call.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError, InputError
from stages.lib.render import FramePolicy
from train.eval.mcq import McqEval, parse_choice
from train.eval.mcq_data import detect_format, lettered_options, load_mcq
from train.evaluate import load_config, run_eval

A, B = "5804131706", "5587257558"  # real clips: 640x480, 18.45 s and 640x360, 18.02 s
OPTIONS = ["A. a cat", "B. a ball", "C. a dog", "D. a car"]
BASE = ["model=tiny", "model.box_frame=0-1000", "backend=replay", "data.max_frames=4"]


def _q(qid, video, duration, domain, sub, task, answer, options=OPTIONS):
    return {"video_id": qid[:3], "duration": duration, "domain": domain, "sub_category": sub, "url": "https://y/x",
            "videoID": video, "question_id": qid, "task_type": task, "question": f"Question {qid}?",
            "options": options, "answer": answer}


QUESTIONS = [
    _q("001-1", A, "short", "Knowledge", "Humanity & History", "Temporal Perception", "B"),  # right
    _q("001-2", A, "short", "Knowledge", "Humanity & History", "Object Recognition", "C"),  # wrong letter
    _q("002-1", B, "medium", "Sports Competition", "Basketball", "Temporal Perception", "A"),  # out of options
    _q("002-2", B, "medium", "Sports Competition", "Basketball", "Counting Problem", "D"),  # no letter
    _q("003-1", "no_such_clip", "long", "Knowledge", "Humanity & History", "Object Recognition", "A"),  # no video
    _q("004-1", B, "long", "Sports Competition", "Football", "Object Recognition", "A"),  # right, no tags
    _q("005-1", A, "short", "Knowledge", "Humanity & History", "OCR Problems", "Z"),  # bad: answer no option
    _q("005-2", A, "short", "Knowledge", "Humanity & History", "OCR Problems", "A", options=[]),  # bad: no options
]

CANNED = {
    "001-1": "<think>The <obj>ball</obj><box>[100,100,500,500]</box>at<t>2</t>s flies.</think><answer>B</answer>",
    "001-2": "<think>Something furry.</think><answer>(A) a cat</answer>",
    "002-1": "<think>It is none of them.</think><answer>E</answer>",
    "002-2": "<think>I cannot tell.</think><answer>I am not sure</answer>",
    "004-1": "Answer: A",
}


def _canned(path: Path, lines: list[tuple[dict[str, Any], str]]) -> str:
    path.write_text("".join(json.dumps({"match": m, "completion": c}) + "\n" for m, c in lines))
    return f"+backend_options.completions={path}"


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture()
def videomme(tmp_path: Path, fixtures_dir: Path) -> Path:
    """The published layout: <root>/videomme/test-00000-of-00001.parquet, videos in <root>/data."""
    root = tmp_path / "Video-MME"
    _write_parquet(root / "videomme" / "test-00000-of-00001.parquet", QUESTIONS)
    (root / "data").mkdir()
    for vid in (A, B):
        (root / "data" / f"{vid}.mp4").symlink_to(fixtures_dir / "vidstg" / f"{vid}.mp4")
    return root


def test_videomme_replay_gives_hand_computed_breakdowns_and_a_rerun_makes_no_call(videomme, tmp_path):
    replay = _canned(tmp_path / "canned.jsonl", [({"qid": q, "kind": "answer"}, c) for q, c in CANNED.items()])
    out = tmp_path / "out"
    result = run_eval("unused", str(videomme), out, [*BASE, replay])
    assert result["format"] == "videomme"  # detected from the folder; videos found in <root>/data
    rows = {r["qid"]: r for r in result["samples"]}
    assert [r["parsed"] for r in rows.values()] == ["ok", "ok", "out_of_options", "unparsed", "missing", "ok"]
    assert [r["pred"] for r in rows.values()] == ["B", "A", None, None, None, "A"]
    assert rows["001-1"]["grounded_format"] and rows["001-1"]["claims"] == 1
    assert not rows["004-1"]["grounded_format"] and rows["004-1"]["correct"]
    assert any("video not found: no_such_clip" in p for p in rows["003-1"]["problems"])
    assert any("'E' is not one of the options A-D" in p for p in rows["002-1"]["problems"])

    o = result["summary"]["overall"]
    # Six questions count (the two bad records are skipped): right 001-1 and 004-1.
    assert (o["n"], o["correct"], o["acc"]) == (6, 2, pytest.approx(2 / 6))
    assert (o["unparsed"], o["out_of_options"], o["missing"]) == (2, 1, 1)
    by = result["summary"]["by"]
    acc = {name: {v: (g["n"], g["correct"], g["unparsed"]) for v, g in groups.items()} for name, groups in by.items()}
    assert acc["duration"] == {"short": (2, 1, 0), "medium": (2, 0, 2), "long": (2, 1, 0)}
    assert acc["domain"] == {"Knowledge": (3, 1, 0), "Sports Competition": (3, 1, 2)}
    assert acc["sub_category"] == {"Basketball": (2, 0, 2), "Football": (1, 1, 0), "Humanity & History": (3, 1, 0)}
    assert acc["task_type"] == {"Counting Problem": (1, 0, 1), "Object Recognition": (3, 1, 0),
                                "Temporal Perception": (2, 1, 1)}
    assert [s["field"] for s in result["skipped"]] == ["answer", "options"]
    assert "record 6 (question_id '005-1'): field 'answer': 'Z' is not one of the options A-D" in \
        result["skipped"][0]["message"]

    report = (out / "report.md").read_text()
    assert "| 6 | 33.3 | 2 | 2 | 1 | 1 | 66.7 | 0.2 |" in report
    assert "| medium | 2 | 0.0 | 2 |" in report and "| Temporal Perception | 2 | 50.0 | 1 |" in report
    assert "## By sub category" in report and "## Skipped records" in report and "video not found" in report

    assert result["calls"] == {"generated": 5, "reused": 0}
    again = run_eval("unused", str(videomme), out, [*BASE, replay])
    assert again["calls"] == {"generated": 0, "reused": 5} and again["summary"] == result["summary"]
    next((out / "completions").glob("*/002-2-*/answer.json")).unlink()  # lost in a crash: only it is redone
    third = run_eval("unused", str(videomme), out, [*BASE, replay])
    assert third["calls"] == {"generated": 1, "reused": 4} and third["summary"] == result["summary"]


def _cite(name: str, box: str, t: int) -> str:
    return f"<obj>{name}</obj><box>{box}</box>at<t>{t}</t>s"


def test_majority_and_confidence_votes_differ_where_evidence_is_unconfirmed_and_agree_otherwise(tmp_path, fixtures_dir):
    data = _write_parquet(tmp_path / "videomme" / "test-00000-of-00001.parquet", [
        _q("t-1", A, "short", "Knowledge", "Humanity & History", "Object Recognition", "B"),
        _q("t-2", B, "short", "Knowledge", "Humanity & History", "Object Recognition", "C"),
        _q("t-3", A, "long", "Knowledge", "Humanity & History", "Object Recognition", "A"),
    ])
    cat, ball = _cite("cat", "[0,0,500,500]", 2), _cite("ball", "[500,500,1000,1000]", 3)
    lines = [
        ({"kind": "answer"}, "<answer>A</answer>"),
        # t-1: two samples say A, one citing a crop the model rejects (0), one citing nothing; one says
        # B citing a crop it confirms (2). Majority A (2 votes) is wrong; confidence B (1.0 > 0.2 + 0.2).
        ({"qid": "t-1", "sample": 0}, f"<think>{cat}</think><answer>A</answer>"),
        ({"qid": "t-1", "sample": 1}, "<think>Looks like a cat.</think><answer>A</answer>"),
        ({"qid": "t-1", "sample": 2}, f"<think>{ball}</think><answer>B</answer>"),
        ({"qid": "t-1", "kind": "crop", "sample": 0}, "0"),
        ({"qid": "t-1", "kind": "crop", "sample": 2}, "2"),
        # t-2: no evidence anywhere: C, E (no option: no vote), A; the tie goes to the first sampled, C.
        ({"qid": "t-2", "sample": 0}, "<answer>C</answer>"),
        ({"qid": "t-2", "sample": 1}, "<answer>E</answer>"),
        ({"qid": "t-2", "sample": 2}, "<answer>A</answer>"),
        # t-3: every crop rated alike (1): the votes agree on D (wrong). (The crop line comes first:
        # it has as many keys as the sample lines, which would also match the crops.)
        ({"qid": "t-3", "kind": "crop"}, "1"),
        ({"qid": "t-3", "sample": 0}, f"<think>{cat}</think><answer>D</answer>"),
        ({"qid": "t-3", "sample": 1}, f"<think>{ball}</think><answer>D</answer>"),
        ({"qid": "t-3", "sample": 2}, f"<think>{cat}</think><answer>A</answer>"),
    ]
    out = tmp_path / "out"
    overrides = [*BASE, _canned(tmp_path / "canned.jsonl", lines), f"data.video_dir={fixtures_dir / 'vidstg'}",
                 "tts.num_samples=3"]
    result = run_eval("unused", str(data), out, overrides)
    t1, t2, t3 = (r["tts"] for r in result["samples"])
    assert [s["confidence"] for s in t1["samples"]] == pytest.approx([0.2, 0.2, 1.0])
    assert t1["majority"]["tally"] == {"A": 2.0, "B": 1.0} and t1["confidence"]["tally"] == pytest.approx({"A": 0.4, "B": 1.0})
    assert (t1["majority"]["key"], t1["majority"]["correct"], t1["confidence"]["key"], t1["confidence"]["correct"]) == \
        ("A", False, "B", True)
    assert [s["key"] for s in t2["samples"]] == ["C", None, "A"]
    assert t2["majority"]["key"] == t2["confidence"]["key"] == "C" and t2["confidence"]["correct"]
    assert [s["confidence"] for s in t3["samples"]] == pytest.approx([0.6, 0.6, 0.6])
    assert t3["majority"]["key"] == t3["confidence"]["key"] == "D" and not t3["majority"]["correct"]

    tts = result["summary"]["overall"]["tts"]
    assert (tts["majority_acc"], tts["confidence_acc"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert tts["picks_differ"] == 1
    assert tts["differ"] == {"majority_right": 0, "confidence_right": 1, "neither_right": 0}
    short = result["summary"]["by"]["duration"]["short"]["tts"]
    assert (short["majority_acc"], short["confidence_acc"]) == (0.5, 1.0)
    report = (out / "report.md").read_text()
    assert "| short | 2 | 0.0 | 0 | 50.0 | 100.0 |" in report
    assert "Where they differ: majority right on 0, confidence-weighted right on 1, neither on 0." in report
    # 3 greedy answers + 9 samples + 5 crops (t-1: one per citing sample, t-3: three).
    assert result["calls"]["generated"] == 17
    assert run_eval("unused", str(data), out, overrides)["calls"] == {"generated": 0, "reused": 17}


def test_worldsense_published_json_layout(tmp_path, fixtures_dir):
    root = tmp_path / "WorldSense"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / f"{A}.mp4").symlink_to(fixtures_dir / "vidstg" / f"{A}.mp4")
    task = {"question": "What is heard?", "candidates": ["A. a bark", "B. a bell", "C. music", "D. speech"],
            "task_domain": "Recognition", "task_type": "Audio Recognition"}
    (root / "worldsense_qa.json").write_text(json.dumps({
        A: {"video_id": A, "duration": "<1min", "domain": "Daily Life", "sub_category": "Cooking",
            "audio_class": ["Speech", "Event"],
            "task1": {**task, "answer": "D"},
            "task2": {**task, "question": "What is seen?", "answer": "A", "task_type": "Scene Recognition"},
            "task3": {**task, "answer": "F"}},
    }))
    assert detect_format(root) == detect_format(root / "worldsense_qa.json") == "worldsense"
    replay = _canned(tmp_path / "c.jsonl", [({"kind": "answer"}, "<answer>D</answer>")])
    result = run_eval("unused", str(root), tmp_path / "out", [*BASE, replay])
    assert [r["qid"] for r in result["samples"]] == [f"{A}_task1", f"{A}_task2"]
    by = result["summary"]["by"]
    assert {v: g["correct"] for v, g in by["task_type"].items()} == {"Audio Recognition": 1, "Scene Recognition": 0}
    assert {v: g["n"] for v, g in by["audio_class"].items()} == {"Event": 2, "Speech": 2}  # a list: counted in each
    assert list(by) == ["duration", "domain", "sub_category", "task_domain", "task_type", "audio_class"]
    assert result["skipped"][0]["message"].endswith(f"video '{A}' task3: field 'answer': 'F' is not one of the options A-D")

    # The same questions as the released script reads them: WorldSense.tsv, lists written as Python literals.
    tsv = tmp_path / "tsv" / "WorldSense.tsv"
    tsv.parent.mkdir()
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerow(["index", "video", "question", "candidates", "answer", "duration", "domain", "sub_category",
                         "task_domain", "task_type", "audio_class"])
        for index, (question, answer, task_type) in enumerate([("What is heard?", "D", "Audio Recognition"),
                                                               ("What is seen?", "A", "Scene Recognition")]):
            writer.writerow([index, A, question, repr(task["candidates"]), answer, "<1min", "Daily Life", "Cooking",
                             "Recognition", task_type, "['Speech', 'Event']"])
    assert detect_format(tsv) == "worldsense"
    from_tsv = load_mcq("worldsense", tsv.parent, {})
    from_json = load_mcq("worldsense", root, {})
    assert [(i.question, i.options, i.answer, i.groups) for i in from_tsv.items] == \
        [(i.question, i.options, i.answer, i.groups) for i in from_json.items]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_videommmu_tracks_hints_image_and_open_questions(tmp_path, fixtures_dir):
    root = tmp_path / "VideoMMMU"
    (root / "Art").mkdir(parents=True)
    (root / "Art" / "validation_Art_1.mp4").symlink_to(fixtures_dir / "vidstg" / f"{B}.mp4")  # one folder per discipline

    def row(qid, answer, qtype="multiple-choice", options=("x", "y", "z", "w", "v")):
        return {"id": qid, "question": "Which?", "options": list(options), "answer": answer, "question_type": qtype}

    _write_parquet(root / "Perception" / "test-00000-of-00001.parquet",
                   [row("validation_Art_1", "E"), row("validation_Art_2", "3.5", qtype="open")])
    _write_parquet(root / "Adaptation" / "test-00000-of-00001.parquet",
                   [{**row("validation_Art_1", "B"), "image": {"bytes": _png(), "path": "q.png"}}])
    assert detect_format(root) == detect_format(root / "Perception") == "videommmu"
    cfg = _config(root)
    evaluation = McqEval.from_config("videommmu", cfg, FramePolicy.from_config(cfg["model"], cfg["data"]))
    perception, adaptation = evaluation.items
    assert perception.options == ("A. x", "B. y", "C. z", "D. w", "E. v") and perception.answer == "E"
    assert (perception.groups["track"], perception.groups["discipline"], perception.groups["subject"]) == \
        (("Perception",), ("Art and Design",), ("Art",))
    assert perception.key != adaptation.key  # the same id in two tracks: two questions
    assert "open" in evaluation.data.skipped[0]["reason"]
    requests = {c.key: c.make() for c in evaluation.answer_calls()}
    seen, with_image = requests[perception.key], requests[adaptation.key]
    assert "ignore the quiz question" in seen.prompt and "(A, B, C, D, or E)" in seen.prompt
    assert len(with_image.images) == len(seen.images) + 1 and with_image.images[-1].label == "The image of the question:"
    assert "Some key" in with_image.prompt


def test_generic_format_reads_fields_named_in_the_config(tmp_path, fixtures_dir):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"uid": "q1", "clip": f"{A}.mp4", "q": "Which?", "choices": ["red", "blue"], "gt": "blue", "level": ["easy"]},
        {"uid": "q2", "clip": B, "q": "Which?", "choices": "['A. red', 'B. blue']", "gt": "A", "level": "hard"},
        {"uid": "q3", "clip": B, "q": "", "choices": ["red", "blue"], "gt": "A"},
    ]))
    fields = ["mcq.fields.qid=uid", "mcq.fields.video=clip", "mcq.fields.question=q", "mcq.fields.options=choices",
              "mcq.fields.answer=gt", "mcq.group_by=[level]"]
    assert detect_format(data) is None  # never guessed
    replay = _canned(tmp_path / "c.jsonl", [({"kind": "answer"}, "<answer>B</answer>")])
    result = run_eval("unused", str(data), tmp_path / "out", [*BASE, replay, "data.format=mcq",
                                                                f"data.video_dir={fixtures_dir / 'vidstg'}", *fields])
    assert [(r["qid"], r["truth"], r["correct"]) for r in result["samples"]] == [("q1", "B", True), ("q2", "A", False)]
    assert {v: g["acc"] for v, g in result["summary"]["by"]["level"].items()} == {"easy": 1.0, "hard": 0.0}
    assert result["skipped"][0]["message"] == f"{data}: record 2 (uid 'q3'): field 'q': empty"
    assert "# Multiple-choice evaluation" in (tmp_path / "out" / "report.md").read_text()


def _config(path: Path, *overrides: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(load_config("unused", str(path), [*BASE, *overrides]), resolve=True)
    assert isinstance(cfg, dict)
    return cfg


def test_format_detection_and_bad_input(videomme, tmp_path):
    parquet = videomme / "videomme" / "test-00000-of-00001.parquet"
    assert detect_format(videomme) == detect_format(videomme / "videomme") == detect_format(parquet) == "videomme"
    stgr_like = _write_parquet(tmp_path / "split" / "part-00000.parquet", [{"id": "x", "task": "general_mcq"}])
    vstar = tmp_path / "vstar.json"
    vstar.write_text(json.dumps([{"vid": "v", "temporal_question": "?", "spatial_question": "?"}]))
    assert detect_format(stgr_like.parent) is None and detect_format(stgr_like) is None and detect_format(vstar) is None

    broken = _write_parquet(tmp_path / "b" / "videomme" / "test-00000-of-00001.parquet",
                            [{k: v for k, v in QUESTIONS[0].items() if k != "answer"}])
    with pytest.raises(InputError, match=r"test-00000-of-00001\.parquet: missing column\(s\) \['answer'\]"):
        load_mcq("videomme", broken, {})
    lonely = _write_parquet(tmp_path / "c" / "vmme.parquet", QUESTIONS[:1])  # no data/ folder beside it
    with pytest.raises(ConfigError, match="data.video_dir: required for Video-MME"):
        McqEval.from_config("videomme", _config(lonely), FramePolicy())
    with pytest.raises(ConfigError, match="data.format"):
        load_config("unused", str(parquet), ["data.format=videomm"])


def test_answers_and_options_are_read_as_the_benchmarks_write_them():
    assert parse_choice("<think>…</think><answer>C</answer>", 4) == ("C", "ok")
    assert parse_choice("<answer>(B) a ball</answer>", 4) == ("B", "ok")
    assert parse_choice("<answer>E</answer>", 4) == (None, "out_of_options")
    assert parse_choice("<answer>A man throws it.</answer>", 4) == (None, "unparsed")  # the article is no option
    assert parse_choice("", 4) == (None, "unparsed") and parse_choice(None, 4) == (None, "missing")
    assert lettered_options(["A. x", "B. y"]) == ("A. x", "B. y")
    assert lettered_options(["x", "y"]) == ("A. x", "B. y")
    assert lettered_options(["B. x", "A. y"]) == ("A. B. x", "B. A. y")  # letters out of order are text


def test_stgr_eval_runs_the_tiny_model_on_a_videomme_parquet_and_a_rerun_makes_no_call(tiny_model_dir, videomme,
                                                                                       tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(videomme / "videomme" / "test-00000-of-00001.parquet"),
            "--out", str(out), "model=tiny", "data.max_frames=3", "generation.max_new_tokens=8", "tts.num_samples=2"]
    assert main(argv) == 0
    assert "Video-MME: 6 questions" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["format"] == "videomme" and len(result["samples"]) == 6
    answered = [r for r in result["samples"] if r["parsed"] != "missing"]
    assert len(answered) == 5 and all(isinstance(r["completion"], str) for r in answered)
    assert all(len(r["tts"]["samples"]) == 2 for r in result["samples"])
    assert result["calls"]["generated"] >= 15 and result["calls"]["reused"] == 0  # 5 x (1 + 2) at least
    report = (out / "report.md").read_text()
    assert "# Video-MME evaluation" in report and "## By task type" in report and "## Test-time scaling" in report
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["calls"]["generated"] == 0 and again["summary"] == result["summary"]
