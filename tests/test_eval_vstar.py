"""V-STaR evaluation with canned completions (the `replay` backend): every number of the report is
checked against a hand computation, including missing videos, empty, unreadable and malformed
answers, and a rerun reuses every stored completion."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.errors import InputError
from train.eval.vstar_data import load_vstar
from train.evaluate import run_eval

A, B = "5587257558", "5804131706"  # real V-STaR demo clips: 640x360 and 640x480, 29.97 fps


def _item(vid, domain, question, timestamps, boxes, width=640, height=360, fps=29.97, frame_count=540):
    return {"vid": vid, "domain": domain, "fps": fps, "width": width, "height": height, "frame_count": frame_count,
            "question": question, "answer": "a red ball", "temporal_question": f"When is it? ({question})",
            "timestamps": timestamps, "spatial_question": "Where is it?", "spatial_question_2": "Where is it then?",
            "bboxes": [{"timestamp": t, "frame_index": round(t * fps), "xmin": b[0], "ymin": b[1], "xmax": b[2],
                        "ymax": b[3]} for t, b in boxes]}


ITEMS = [
    # A: right answer; chain 1 partly right; chain 2 spatial unreadable, temporal exact.
    _item(A, "dom-a", "What is thrown?", [2, 6], [(2, [0, 0, 320, 180]), (3, [320, 180, 640, 360]), (4, [0, 0, 640, 360])]),
    # B: empty answer; temporal_1 without a span; JSON in a code block with an unclosed brace, two boxes at 2 s.
    _item(B, "dom-b", "What rolls?", [1.5, 3.5], [(2, [0, 0, 320, 240]), (3, [0, 0, 320, 240])], height=480, frame_count=553),
    # C: its video is missing: every answer missing, a long video (200 s).
    _item("missing_clip", "dom-a", "What falls?", [10, 20], [(12, [0, 0, 10, 10])], fps=30, frame_count=6000),
    # D: the judge's reply is no score; reversed span; empty JSON; chain 2 with a full-frame box.
    _item(A, "dom-b", "What is held?", [2, 6], [(2, [0, 0, 320, 180])]),
]


def _canned(keys):
    a, b, _, d = keys
    lines = [
        ({"key": a, "kind": "vqa"}, "<think>The <obj>ball</obj><box>[0,0,500,500]</box>at<t>2</t>s flies.</think><answer>a red ball</answer>"),
        ({"key": a, "kind": "temporal_1"}, "<answer>From <t>3</t>s to <t>7</t>s</answer>"),
        ({"key": a, "kind": "spatial_1"}, '<answer>{"2": [0, 0, 500, 500], "3": [500, 500, 1000, 750]}</answer>'),
        ({"key": a, "kind": "spatial_2"}, "<answer>the ball is in the top left</answer>"),
        ({"key": a, "kind": "temporal_2"}, "<answer>[2, 6]</answer>"),
        ({"key": b, "kind": "vqa"}, ""),
        ({"key": b, "kind": "temporal_1"}, "I do not know."),
        ({"key": b, "kind": "spatial_1"}, '```json\n{"2": [[0,0,250,500],[0,0,500,500]], "3": [0, 0, 500, 500]\n```'),
        ({"key": b, "kind": "spatial_2"}, "<answer><obj>ball</obj><box>[0,0,500,250]</box>at<t>2</t>s</answer>"),
        ({"key": b, "kind": "temporal_2"}, "<answer>From <t>2.5</t>s to <t>4.5</t>s</answer>"),
        ({"key": d, "kind": "vqa"}, "<answer>A cup.</answer>"),
        ({"key": d, "kind": "temporal_1"}, "<answer>[6, 2]</answer>"),
        ({"key": d, "kind": "spatial_1"}, "<answer>{}</answer>"),
        ({"key": d, "kind": "spatial_2"}, '<answer>{"2": [0, 0, 1000, 1000]}</answer>'),
        ({"key": d, "kind": "temporal_2"}, "<answer>From <t>0</t>s to <t>18</t>s</answer>"),
        ({"kind": "judge", "candidate": "a red ball"}, "3"),
        ({"kind": "judge", "candidate": "A cup."}, "two"),
    ]
    return "".join(json.dumps({"match": m, "completion": c}) + "\n" for m, c in lines)


@pytest.fixture()
def vstar_case(tmp_path: Path, fixtures_dir: Path):
    data = tmp_path / "vstar.json"
    data.write_text(json.dumps(ITEMS))
    keys = [item.key for item in load_vstar(data)]
    canned = tmp_path / "canned.jsonl"
    canned.write_text(_canned(keys))
    overrides = ["model=tiny", "model.box_frame=0-1000", "backend=replay", f"+backend_options.completions={canned}",
                 f"data.video_dir={fixtures_dir / 'vidstg'}", "data.max_frames=4"]
    return data, overrides, tmp_path / "out"


def _lgm(*xs):
    return -sum(math.log(1 - x) for x in xs) / 3


def test_canned_completions_reproduce_hand_computed_vstar_figures(vstar_case):
    data, overrides, out = vstar_case
    result = run_eval("tiny-model-unused", str(data), out, overrides)
    o = result["summary"]["overall"]
    approx = lambda x: pytest.approx(x, abs=1e-9)  # noqa: E731

    # What: A judged 3 (correct), B empty (not judged), C no video, D judge reply "two" (unreadable).
    assert [s["judge"] for s in result["samples"]] == [3, -1, -1, -1]
    assert o["acc"] == approx(1 / 4) and o["judge_mean"] == approx(3 / 4) and o["judge_invalid"] == 3
    # Chain 1 when: A [3,7] vs [2,6] = 3/5; B no span; C missing; D reversed span scores 0.
    c1, c2 = o["chain1"], o["chain2"]
    assert c1["m_tiou"] == approx(0.6 / 4)
    assert c1["R"] == {"0.3": approx(1 / 4), "0.5": approx(1 / 4), "0.7": approx(0.0)}
    # Chain 1 where: A ious [1, 0.5, 0]; B [1, 1] (best of two boxes at 2 s, repaired JSON); C, D 0.
    assert [s["chain1"]["ious"] for s in result["samples"]] == [approx([1, 0.5, 0]), approx([1, 1]), [0.0], [0.0]]
    assert c1["m_viou"] == approx((0.5 + 1) / 4)
    assert c1["AP"] == {"0.1": approx((2 / 3 + 1) / 4), "0.3": approx((2 / 3 + 1) / 4), "0.5": approx((2 / 3 + 1) / 4),
                        "0.7": approx((1 / 3 + 1) / 4), "0.9": approx((1 / 3 + 1) / 4)}
    # Chain 2 when: A exact; B [2.5,4.5] vs [1.5,3.5] = 1/3; D [0,18] vs [2,6] = 4/18.
    assert c2["m_tiou"] == approx((1 + 1 / 3 + 4 / 18) / 4)
    assert c2["R"] == {"0.3": approx(2 / 4), "0.5": approx(1 / 4), "0.7": approx(1 / 4)}
    # Chain 2 where: A unreadable; B grounded claim at 2 s = 0.5, none at 3 s; D full frame vs quarter = 0.25.
    assert c2["m_viou"] == approx((0.25 + 0.25) / 4)
    assert c2["AP"] == {"0.1": approx((0.5 + 1) / 4), "0.3": approx(0.5 / 4), "0.5": approx(0.5 / 4),
                        "0.7": approx(0.0), "0.9": approx(0.0)}
    am1 = (0.25 + c1["m_tiou"] + c1["m_viou"]) / 3
    am2 = (0.25 + c2["m_tiou"] + c2["m_viou"]) / 3
    assert o["AM_1"] == approx(am1) and o["AM_2"] == approx(am2) and o["mAM"] == approx((am1 + am2) / 2)
    lgm1, lgm2 = _lgm(0.25, 0.15, 0.375), _lgm(0.25, c2["m_tiou"], 0.125)
    assert o["mLGM"] == approx((lgm1 + lgm2) / 2)

    # Breakdowns: domains {A, C} and {B, D}; durations: C is the only long video.
    assert result["summary"]["by_domain"]["dom-a"]["acc"] == approx(0.5)
    assert result["summary"]["by_domain"]["dom-b"]["chain2"]["m_viou"] == approx(0.25)
    assert {k: v["n"] for k, v in result["summary"]["by_duration"].items()} == {"short (<60 s)": 3, "long (>=180 s)": 1}
    problems = result["samples"][2]["problems"]
    assert any("video not found" in p for p in problems)
    assert any("spatial_2: no boxes" in p for p in result["samples"][0]["problems"])

    report = (out / "report.md").read_text()
    assert "| 1: what -> when -> where | 25.0 | 15.0 | 25.0 | 25.0 | 0.0 | 37.5 |" in report
    assert f"**mAM {100 * (am1 + am2) / 2:.1f}**" in report
    assert "## By domain" in report and "## By video duration" in report and "video not found" in report
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))


def test_rerun_reuses_stored_completions_and_redoes_only_missing_ones(vstar_case):
    data, overrides, out = vstar_case
    first = run_eval("tiny-model-unused", str(data), out, overrides)
    assert first["calls"]["generated"] == 3 * 5 + 2 and first["calls"]["reused"] == 0
    again = run_eval("tiny-model-unused", str(data), out, overrides)
    assert again["calls"] == {"generated": 0, "reused": 17}
    assert again["summary"] == first["summary"]
    # Lose one stored answer (a crash before it was written): only that call runs again.
    store = next((out / "completions").glob("[!j]*"))
    victim = next(store.glob("*/temporal_2.json"))
    victim.unlink()
    third = run_eval("tiny-model-unused", str(data), out, overrides)
    assert third["calls"]["generated"] == 1 and third["summary"] == first["summary"]


def test_bad_vstar_records_name_file_record_and_field(tmp_path: Path):
    bad = dict(ITEMS[0], timestamps=[5, 2])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([ITEMS[1], bad]))
    with pytest.raises(InputError, match=r"bad\.json: record 1 \(vid '5587257558'\): field 'timestamps'"):
        load_vstar(path)
    box = dict(ITEMS[0], bboxes=[{"timestamp": 2, "frame_index": 60, "xmin": 0, "ymin": 0, "xmax": "wide", "ymax": 5}])
    path.write_text(json.dumps([box]))
    with pytest.raises(InputError, match=r"record 0 .*field 'bboxes\[0\]\.xmax': expected a number"):
        load_vstar(path)
    path.write_text(json.dumps([{k: v for k, v in ITEMS[0].items() if k != "spatial_question_2"}]))
    with pytest.raises(InputError, match=r"field 'spatial_question_2': missing"):
        load_vstar(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: not JSON \(line 1"):
        load_vstar(path)
    # The dataset card's spelling of the boxes loads too.
    card = dict(ITEMS[0], bboxes=[{"2_60": {"xmin": 0, "ymin": 0, "xmax": 320, "ymax": 180}}])
    path.write_text(json.dumps([card]))
    (item,) = load_vstar(path)
    assert item.bboxes[0].timestamp == 2.0 and item.bboxes[0].frame_index == 60


@pytest.mark.parametrize("answer, span", [
    # the official prompt's own format, and the two spellings docs/evaluation.md names
    ("<think>The ball is thrown at <t>40</t>s.</think><answer>From <t>41.2</t>s to <t>46.5</t>s</answer>", (41.2, 46.5)),
    ("between 41.2 and 46 seconds", (41.2, 46.0)),
    ("Start: 41.2s, End: 46.5s", (41.2, 46.5)),  # the official reads 41 and 46 (no word boundary before "s")
    # whatever holds exactly two numbers, as the official's `extract_timestamps`
    ("The event starts at 41.2 and ends at 46.5.", (41.2, 46.5)),
    ("41.2 seconds until 46.5 seconds", (41.2, 46.5)),
    ("[41.2, 46.5]", (41.2, 46.5)),
    ("41.2-46.5", (41.2, 46.5)),
    ("41 46", (41.0, 46.0)),
    # m:ss clock times become seconds (the official: m * 60 + s)
    ("From 0:41 to 0:46", (41.0, 46.0)),
    ("It happens between 1:05 and 1:10.", (65.0, 70.0)),
    # only the <answer> content counts, as the official's
    ("<think>Frames 3, 4 and 5 show it.</think><answer>between 41.2 and 46 seconds</answer>", (41.2, 46.0)),
    # numbers with a unit the official cannot see ("12s"): read here, a superset
    ("Start: 41s, End: 46s", (41.0, 46.0)),
    # a third number with a glued unit: counted as the official counts, which does not see "5s"
    ("Start: 41.2 s, End: 46.5 s, about 5s in all", (41.2, 46.5)),
    # a written span among other numbers: read here, rejected by the official (three numbers)
    ("from 41 to 46 s, about 5 s", (41.0, 46.0)),
])
def test_vstar_span_reads_every_official_spelling(answer, span):
    from train.eval.vstar import parse_span

    assert parse_span(answer) == pytest.approx(span)


@pytest.mark.parametrize("answer", ["about 41 seconds", "I do not know.", "", None,
                                    "at 1, 2 or 3 seconds", "<think>from 41 to 46</think><answer>the whole video</answer>"])
def test_vstar_span_needs_exactly_two_numbers_when_no_span_is_written(answer):
    from train.eval.vstar import parse_span

    assert parse_span(answer) is None
