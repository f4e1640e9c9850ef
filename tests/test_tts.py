"""Confidence-aware test-time scaling: the votes, the crops, and both through `run_eval` with
canned completions, on a case where the two votes must differ and one where they must agree."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.lib.geometry import THOUSAND
from stages.lib.schema import record_id, to_table
from stages.sources.synthetic_world import COLOURS, encode_mp4, render, simulate
from train import tts
from train.eval.crops import citations, crop_jpeg
from train.evaluate import run_eval


def test_ratings_map_to_confidences_and_no_crop_counts_low():
    assert [tts.parse_rating(t) for t in ("2", " 1.", "<answer>0</answer>", "yes", "12", "")] == [2, 1, 0, None, None, None]
    assert tts.sample_confidence([2, 1, 0]) == pytest.approx((1.0 + 0.6 + 0.2) / 3)
    assert tts.sample_confidence([None]) == 0.2 and tts.sample_confidence([]) == tts.NO_EVIDENCE_CONFIDENCE == 0.2


def test_votes_differ_when_the_majority_cites_unconfirmed_evidence():
    votes = [tts.Vote("A", 0.2)] * 3 + [tts.Vote("B", 1.0)] * 2
    assert tts.majority_vote(votes).answer == "A"
    decision = tts.confidence_vote(votes)
    assert decision.answer == "B" and decision.tally == pytest.approx({"A": 0.6, "B": 2.0})


@pytest.mark.parametrize("confidence", [0.2, 0.6, 1.0])
def test_votes_agree_when_evidence_is_equally_good(confidence):
    votes = [tts.Vote(a, confidence) for a in "ABABA"] + [tts.Vote(None, 1.0)]
    assert tts.majority_vote(votes).answer == tts.confidence_vote(votes).answer == "A"
    # A tie goes to the answer sampled first, in both votes, whatever the float rounding.
    tie = [tts.Vote("B", 0.6), tts.Vote("A", 0.4), tts.Vote("A", 0.2)]
    assert tts.majority_vote(tie[:2]).answer == "B" and tts.confidence_vote(tie).answer == "B"
    assert tts.majority_vote([]).answer is None


def test_voting_keys():
    assert tts.voting_key("option", "<answer>(B)</answer>", 4) == tts.voting_key("option", "B. two", 4) == "B"
    assert tts.voting_key("text", "<answer>A red Ball.</answer>") == tts.voting_key("text", "a red  ball") == "a red ball"
    assert tts.voting_key("span", "[1, 2]") is None and tts.voting_key("text", "") is None


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos")
    scene = simulate(5, 0, width=200, height=150, fps=10.0, duration_s=(4.0, 4.5), num_objects=(2, 2), object_size=(40, 50))
    frames = render(scene)
    encode_mp4(frames, scene.fps, str(videos / "syn.mp4"))
    return videos / "syn.mp4", scene, frames


def test_crop_cuts_the_cited_box_at_the_cited_time(scene_video):
    _, scene, frames = scene_video
    obj = next(o for o in scene.objects if o.visible.all())
    i = scene.num_frames // 2
    box = scene.normalised_box(obj, i)
    written = THOUSAND.format_box(THOUSAND.from_canonical([box]))
    completion = f"<think><obj>{obj.name}</obj><box>{written}</box>at<t>{scene.time(i)}</t>s</think><answer>A</answer>"
    (cite,) = citations(completion, THOUSAND, scene.duration_s, 4)
    assert cite.valid and cite.t == pytest.approx(scene.time(i)) and cite.name == obj.name
    crop = np.asarray(Image.open(io.BytesIO(crop_jpeg(Image.fromarray(frames[i]), cite.box))).convert("RGB"), dtype=float)
    x1, y1, x2, y2 = (int(v) for v in obj.boxes[i])
    assert crop.shape[:2] == (y2 - y1, x2 - x1)
    centre = crop[crop.shape[0] // 2 - 2: crop.shape[0] // 2 + 2, crop.shape[1] // 2 - 2: crop.shape[1] // 2 + 2]
    colour = np.asarray(list(COLOURS.values())[obj.colours[i]], dtype=float)
    assert np.abs(centre.mean(axis=(0, 1)) - colour).max() < 30  # the shape's own colour (JPEG noise aside)
    outside = f"<obj>{obj.name}</obj><box>[1200,1200,1300,1300]</box>at<t>1</t>s"
    late = f"<obj>{obj.name}</obj><box>{written}</box>at<t>99</t>s"
    assert [c.valid for c in citations(outside + " " + late, THOUSAND, scene.duration_s, 4)] == [False, False]


def _claim(name, box, t):
    return f"<obj>{name}</obj><box>{box}</box>at<t>{t}</t>s"


def test_confidence_and_majority_through_run_eval(scene_video, tmp_path: Path):
    video, scene, _ = scene_video
    media = {"uri": str(video), "kind": "video", "fps": scene.fps, "num_frames": scene.num_frames,
             "duration_s": scene.duration_s, "width": scene.width, "height": scene.height}
    frames = [{"t_s": scene.time(i), "index": i} for i in range(0, scene.num_frames, 5)]
    base = {"source": "synthetic", "source_id": "syn", "media": media, "frames": frames, "key_frames": [],
            "options": ["A. one", "B. two", "C. three"], "answer": "B", "reasoning": ""}
    differ, agree = (record_id("synthetic", "syn", "general_mcq", v) for v in ("differ", "agree"))
    split = tmp_path / "stgr-rl"
    split.mkdir()
    pq.write_table(to_table([{**base, "id": differ, "task": "general_mcq", "question": "How many shapes?"},
                             {**base, "id": agree, "task": "general_mcq", "question": "How many shapes, again?"}]),
                   split / "part-00000.parquet")
    right, wrong = _claim("red thing", "[100,100,400,400]", 1), _claim("blue thing", "[500,500,700,700]", 2)
    lines = [({"id": differ, "kind": "answer"}, "<answer>A</answer>"),
             ({"id": agree, "kind": "answer"}, "<answer>B</answer>")]
    # differ: three samples say A citing evidence the model rejects, two say B with confirmed evidence.
    lines += [({"id": differ, "kind": "answer", "sample": n}, f"<think>{wrong}</think><answer>A</answer>") for n in range(3)]
    lines += [({"id": differ, "kind": "answer", "sample": n}, f"<think>{right}</think><answer>B</answer>") for n in (3, 4)]
    # agree: no sample cites anything checkable (every confidence 0.2): the votes are the majority.
    lines += [({"id": agree, "kind": "answer", "sample": n}, f"<answer>{a}</answer>") for n, a in enumerate("BCBCB")]
    lines += [({"kind": "crop", "name": "red thing"}, "2"), ({"kind": "crop", "name": "blue thing"}, "0")]
    canned = tmp_path / "canned.jsonl"
    canned.write_text("".join(json.dumps({"match": m, "completion": c}) + "\n" for m, c in lines))
    out = tmp_path / "out"
    result = run_eval("unused", str(split), out, ["model=tiny", "model.box_frame=0-1000", "backend=replay",
                                                  f"+backend_options.completions={canned}", "tts.num_samples=5"])
    rows = {r["id"]: r for r in result["samples"]}
    d, a = rows[differ]["tts"], rows[agree]["tts"]
    assert [s["ratings"] for s in d["samples"]] == [[0], [0], [0], [2], [2]]
    assert d["majority"]["key"] == "A" and not d["majority"]["correct"]
    assert d["confidence"]["key"] == "B" and d["confidence"]["correct"]
    assert d["confidence"]["tally"] == pytest.approx({"A": 0.6, "B": 2.0})
    assert a["majority"]["key"] == a["confidence"]["key"] == "B" and a["majority"]["correct"]
    summary = result["summary"]["overall"]["tts"]
    assert summary["majority_acc"] == 0.5 and summary["confidence_acc"] == 1.0 and summary["picks_differ"] == 1
    assert result["calls"]["generated"] == 2 + 10 + 5  # greedy answers, samples, one crop per citing sample
    report = (out / "report.md").read_text()
    assert "| majority | 50.0 |" in report and "| confidence-weighted | 100.0 |" in report
