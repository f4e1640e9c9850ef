"""The adapters without fixtures here, each on a small file written in its exact published format:
Charades-STA, ActivityNet Captions, V-STaR, the released STGR json, and the generic JSON Lines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.testing import unit_context
from stages.source import SourceStage


def run(adapter: str, annotations: Path, video_dir: Path, **extra):
    stage = SourceStage({"adapter": adapter, "annotations": str(annotations), "video_dir": str(video_dir), **extra})
    assert stage.plan() == 1
    result = stage.process(None, unit_context(video_dir / "run", stage="source"))
    return result.table.to_pylist(), result.rejections


def test_charades_sta(tmp_path: Path) -> None:
    (tmp_path / "Charades_v1_480").mkdir()
    (tmp_path / "Charades_v1_480" / "3MSZA.mp4").write_bytes(b"")
    path = tmp_path / "charades_sta_test.txt"
    path.write_text("3MSZA 24.3 30.4##person turn a light on.\n"
                    "3MSZA 30.4 24.3##person reversed.\n"
                    "\n"
                    "AO8RW 0.0 6.9 person is putting a book on a shelf.\n")
    rows, rejected = run("charades_sta", path, tmp_path)
    (record,) = rows
    assert record["task"] == "temporal" and record["answer_span"] == [24.3, 30.4]
    assert record["source_id"] == "3MSZA#1" and record["media"]["uri"] == str(tmp_path / "Charades_v1_480" / "3MSZA.mp4")
    assert record["ground_truth"]["spans"][0]["label"] == "person turn a light on."
    assert [(r.rule, r.record) for r in rejected] == [("malformed_record", "line 2"), ("malformed_record", "line 4")]
    assert "0 <= start < end" in rejected[0].reason and "##" in rejected[1].reason
    wrong = tmp_path / "wrong.txt"
    wrong.write_text('{"v_1": {"duration": 3}}\n')
    with pytest.raises(InputError, match=r"wrong.txt: line 1: not the Charades-STA format"):
        SourceStage({"adapter": "charades_sta", "annotations": str(wrong), "video_dir": str(tmp_path)}).plan()


def test_activitynet_captions(tmp_path: Path) -> None:
    (tmp_path / "QOlSCBRmfWY.mkv").write_bytes(b"")
    path = tmp_path / "val_1.json"
    path.write_text(json.dumps({
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                          "sentences": ["A young woman is seen standing in a room.", " She then begins dancing."]},
        "v_bad": {"duration": 10.0, "timestamps": [[1.0, 2.0]], "sentences": []},
    }))
    rows, rejected = run("activitynet", path, tmp_path)
    assert [r["answer_span"] for r in rows] == [[0.83, 19.86], [17.37, 60.81]]
    assert rows[0]["media"]["uri"] == str(tmp_path / "QOlSCBRmfWY.mkv")  # found without the v_ prefix
    assert rows[0]["media"]["duration_s"] == 82.73 and rows[1]["question"] == 'When does this happen: "She then begins dancing."?'
    (bad,) = rejected
    assert bad.record == "entry 1 (v_bad)" and "1 timestamps for 0 sentences" in bad.reason


def test_vstar_both_box_layouts(tmp_path: Path) -> None:
    entry = {"vid": "5587257558", "domain": "Life Record", "fps": 29.97002997002997, "width": 640, "height": 360,
             "frame_count": 540, "question": "What does the man in black use?", "answer": "A camera.",
             "temporal_question": "When does the man in black use the camera?", "timestamps": [0.0, 7.84],
             "spatial_question": "Where is the camera?", "spatial_question_2": "Where is the camera then?",
             "object": "camera",
             "bboxes": [{"timestamp": 2, "frame_index": 60, "xmin": 64, "ymin": 36, "xmax": 320, "ymax": 180}]}
    keyed = {**entry, "bboxes": [{"4_120": {"xmin": 0, "ymin": 0, "xmax": 640, "ymax": 360}}]}
    path = tmp_path / "V_STaR_test.json"
    path.write_text(json.dumps([entry, keyed, {**entry, "fps": "fast"}]))
    rows, rejected = run("vstar", path, tmp_path)
    assert [r["task"] for r in rows] == ["general_free", "temporal", "spatial"] * 2
    spatial = rows[2]
    (kf,) = spatial["key_frames"]
    assert kf["t_s"] == pytest.approx(60 / 29.97002997002997, abs=1e-6)
    assert kf["objects"] == [{"name": "camera", "box": pytest.approx([0.1, 0.1, 0.5, 0.5])}]
    assert rows[1]["answer_span"] == [0.0, 7.84] and rows[0]["answer"] == "A camera."
    assert rows[5]["key_frames"][0]["t_s"] == pytest.approx(120 / 29.97002997002997, abs=1e-6)
    assert rows[5]["key_frames"][0]["objects"][0]["box"] == [0.0, 0.0, 1.0, 1.0]
    (bad,) = rejected
    assert bad.rule == "malformed_record" and "field 'fps'" in bad.reason


def test_stgr_json_tasks_answers_and_boxes(tmp_path: Path) -> None:
    entries = [
        {"task": "temporal-spatial free-form QA", "question": "What does the man hold?", "answer": "A cup.",
         "video_path": "plm/abc.mp4", "source": "STR_plm_rdcap",
         "key_frames": [{"idx": 1, "time": 2.5, "path": "abc/1.jpg"}, {"idx": 2, "time": 4.0, "path": "abc/2.jpg"}],
         "key_items": {"1": {"cup": [[0.1, 0.2, 0.3, 0.4]]}, "2": {"cup": [[0.2, 0.2, 0.4, 0.4]], "man": [[0.5, 0.1, 0.9, 1.0]]}},
         "reasoning_process": "The <obj>cup</obj><box>[0.1,0.2,0.3,0.4]</box>at<t>2.5</t>s is held."},
        {"task": "temporal QA", "question": "When does the dog jump?", "answer": "[3.2, 5.0]", "video_path": "tvg/d.mp4"},
        {"task": "temporal QA (MCQ)", "question": "When does the dog jump?\nA. 0-2 s\nB. 3-5 s\nC. 6-8 s",
         "answer": "B\n[3.2, 5.0]", "video_path": "tvg/d.mp4"},
        {"task": "General video QA MCQ", "question": "What colour is the car?\n(A) red\n(B) blue", "answer": "A",
         "video_path": "videor1/c.mp4"},
        {"task": "visual QA", "question": "Where is the cat?", "answer": "<box>[1,2,3,4]</box>", "image_path": "x.jpg"},
        {"task": "temporal QA", "question": "When?", "answer": "soon", "video_path": "tvg/e.mp4"},
        {"task": "temporal-spatial free-form QA", "question": "What?", "answer": "A dog.", "video_path": "str/f.mp4",
         "key_frames": [{"idx": 0, "time": 1.0, "path": "f/0.jpg"}], "key_items": {"0": {"dog": [[120, 40, 300, 200]]}}},
        {"task": "General video QA MCQ", "question": "Which one?", "answer": "A", "video_path": "videor1/g.mp4"},
    ]
    path = tmp_path / "STGR-SFT.json"
    path.write_text(json.dumps(entries))
    rows, rejected = run("stgr_json", path, tmp_path)
    assert [r["task"] for r in rows] == ["spatio_temporal", "temporal", "temporal_mcq", "general_mcq"]
    st, tg, mcq, general = rows
    assert st["media"]["uri"] == str(tmp_path / "plm" / "abc.mp4")
    assert st["key_frames"] == [{"t_s": 2.5, "objects": [{"name": "cup", "box": [0.1, 0.2, 0.3, 0.4]}]},
                                {"t_s": 4.0, "objects": [{"name": "cup", "box": [0.2, 0.2, 0.4, 0.4]},
                                                          {"name": "man", "box": [0.5, 0.1, 0.9, 1.0]}]}]
    assert [o["name"] for o in st["ground_truth"]["objects"]] == ["cup", "man"] and st["reasoning"].startswith("The <obj>cup")
    assert st["answer"] == "A cup." and st["answer_span"] is None and json.loads(st["meta"])["source"] == "STR_plm_rdcap"
    assert tg["answer"] == "[3.2, 5.0]" and tg["answer_span"] == [3.2, 5.0]
    # the released answer kept whole: the letter and the span are both ground truth (both are scored)
    assert mcq["answer"] == "B\n[3.2, 5.0]" and mcq["answer_span"] == [3.2, 5.0]
    assert mcq["options"] == ["A. 0-2 s", "B. 3-5 s", "C. 6-8 s"] and mcq["question"] == "When does the dog jump?"
    assert general["options"] == ["A. red", "B. blue"] and general["answer"] == "A"
    assert [(r.rule, r.record) for r in rejected] == [
        ("unsupported_task", "entry 4"), ("malformed_record", "entry 5 (tvg/e.mp4)"),
        ("malformed_record", "entry 6 (str/f.mp4)"), ("malformed_record", "entry 7 (videor1/g.mp4)")]
    assert "'visual QA' is an image task" in rejected[0].reason and "field 'answer'" in rejected[1].reason
    assert "field 'key_items.0'" in rejected[2].reason and "normalised to [0, 1]" in rejected[2].reason
    assert "field 'question'" in rejected[3].reason and "option lines" in rejected[3].reason


def test_stgr_json_nulls_and_the_task_the_ground_truth_supports(tmp_path: Path) -> None:
    """`null` key_frames/key_items (and nulls inside them) as `datasets.Dataset.from_json` fills missing
    keys, which the released RL trainer deletes again; a released task name gives the STGR task its
    ground truth supports."""
    entries = [
        {"task": "temporal QA", "question": "When does the dog jump?", "answer": "[3.2, 5.0]", "video_path": "d.mp4",
         "key_frames": None, "key_items": None, "reasoning_process": None},
        {"task": "temporal-spatial free-form QA", "question": "What does the man hold?", "answer": "A cup.",
         "video_path": "a.mp4", "key_frames": [{"idx": 0, "time": 1.0, "path": "a/0.jpg"}, None,
                                               {"idx": 1, "time": 2.0, "path": None}],
         "key_items": {"0": {"cup": [[0.1, 0.2, 0.3, 0.4], None], "man": None}, "1": None, "2": None}},
        {"task": "temporal-spatial free-form QA", "question": "What does the man hold?", "answer": "A cup.",
         "video_path": "b.mp4", "key_frames": None, "key_items": None},
        {"task": "temporal-spatial free-form QA", "question": "When does the man hold the cup?", "answer": "[1.0, 2.5]",
         "video_path": "c.mp4", "key_frames": [{"idx": 0, "time": 1.0}], "key_items": {"0": None}},
        {"task": "temporal QA (MCQ)", "question": "When does it jump?\nA. early\nB. late", "answer": "B",
         "video_path": "e.mp4", "key_frames": None, "key_items": None},
        {"task": "General video QA Free-form", "question": "What happens?", "answer": "It jumps.", "video_path": "f.mp4",
         "key_frames": None, "key_items": None},
    ]
    path = tmp_path / "STGR-RL.json"
    path.write_text(json.dumps(entries))
    rows, rejected = run("stgr_json", path, tmp_path)
    assert rejected == []
    temporal, grounded, ungrounded, span_answer, letter_only, free = rows
    assert temporal["task"] == "temporal" and temporal["key_frames"] == [] and temporal["answer_span"] == [3.2, 5.0]
    # the key frame without boxes stays: its time is ground truth for the temporal reward
    assert grounded["task"] == "spatio_temporal"
    assert grounded["key_frames"] == [{"t_s": 1.0, "objects": [{"name": "cup", "box": [0.1, 0.2, 0.3, 0.4]}]},
                                      {"t_s": 2.0, "objects": []}]
    assert ungrounded["task"] == "general_free" and ungrounded["answer"] == "A cup."
    assert span_answer["task"] == "temporal" and span_answer["answer_span"] == [1.0, 2.5]
    assert letter_only["task"] == "general_mcq" and letter_only["answer"] == "B"
    assert free["task"] == "general_free"


def test_jsonl_generic(tmp_path: Path) -> None:
    good = {"video": "clips/a.mp4", "task": "spatio_temporal", "id": "a-1", "question": "When and where?",
            "answer_span": [2.0, 4.5], "key_frames": [{"t_s": 2.0, "objects": [{"name": "cup", "box": [0.41, 0.52, 0.48, 0.63]}]}],
            "objects": [{"name": "cup", "track": [{"t_s": 2.0, "box": [0.41, 0.52, 0.48, 0.63]}]}],
            "spans": [{"label": "the man picks up the cup", "start_s": 2.0, "end_s": 4.5}], "meta": {"k": 1}}
    lines = [json.dumps(good), '{"video": "b.mp4", "task": "dance"}', '{"video": "c.mp4", "task": "temporal", "answer_spam": 1}',
             '{"video": "d.mp4", "task"']
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, rejected = run("jsonl", path, tmp_path)
    (record,) = rows
    assert record["source_id"] == "a-1" and record["media"]["uri"] == str(tmp_path / "clips" / "a.mp4")
    assert record["key_frames"][0]["objects"][0]["box"] == [0.41, 0.52, 0.48, 0.63]
    assert record["ground_truth"]["spans"][0]["label"] == "the man picks up the cup" and json.loads(record["meta"])["k"] == 1
    assert [r.record for r in rejected] == ["line 2", "line 3", "line 4"]
    assert "unknown task 'dance'" in rejected[0].reason
    assert "field 'answer_spam'" in rejected[1].reason and "not valid JSON" in rejected[2].reason
