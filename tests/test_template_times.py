"""The template annotator never makes the filter reject its own trace (issue 10, point 3).

A template trace restates the ground truth, so `format_valid`, `time_in_clip` and `answer_agrees`
must keep it: times are written inside the clip (the clip end 18.018 s becomes 18.01, never 18.02),
the time check allows exactly the rounding of the written digits (one tolerance,
`CANONICAL.time_tolerance()`), and the answer is the record's own answer, so it scores full through
the one answer scorer (stages/lib/answers.py) whatever its kind: span, text, letter, letter + span, box.

The stages run for real in this process (source, sample with decord, annotate, align, filter) on the
real VidSTG fixture clips (../shared/fixtures/vidstg), with the configs a build composes from conf/.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from pipeline.registry import get_stage, load_plugins
from pipeline.testing import unit_context
from stages.lib import evidence
from stages.lib.answers import record_answer_kind, score_record_answer
from stages.backends.template import written_time
from stages.lib.rules import Batch, TimeInClip
from stages.lib.geometry import CANONICAL
from stages.lib.schema import to_table
from stages.source import SourceStage

REPO = Path(__file__).resolve().parents[1]
FPS = 30000 / 1001
SELF_INFLICTED = {"format_valid", "time_in_clip", "answer_agrees"}
load_plugins()  # the built-in stages, registered as a build registers them


def _config(**overrides: str) -> dict[str, Any]:
    """The build config composed by Hydra from conf/build.yaml, as `stgr build` resolves it."""
    from omegaconf import OmegaConf

    from pipeline.config import compose

    return OmegaConf.to_container(compose([f"{k}={v}" for k, v in overrides.items()]), resolve=True)


def _judge(config: dict[str, Any], table: Any, run: Path) -> tuple[list[dict], list[Any]]:
    """annotate -> align -> filter on sampled records: (annotated rows with scores, filter rejections)."""
    rows, rejections = table, []
    for stage_name, key in (("annotate", "annotator"), ("align", "align"), ("filter", "filter")):
        stage = get_stage(stage_name)(config[key])
        result = stage.process(rows, unit_context(run, stage=stage_name))
        assert stage_name == "filter" or result.rejections == [], result.rejections
        if stage_name == "filter":
            rejections = result.rejections
        else:
            rows = result.table
    return rows.to_pylist(), rejections


def _sampled(config: dict[str, Any], run: Path) -> Any:
    """Every seed record of the source, sampled (decord on the real clips), as one table."""
    source = SourceStage(config["source"])
    sample = get_stage("sample")(config["sample"])
    tables = []
    for partition in range(source.plan()):
        seeds = source.process(None, unit_context(run, stage="source", partition=partition,
                                                  num_partitions=source.plan()))
        assert seeds.rejections == []
        sampled = sample.process(seeds.table, unit_context(run, stage="sample", partition=partition))
        assert sampled.rejections == []
        tables.append(sampled.table)
    return pa.concat_tables(tables)


def test_vidstg_fixture_template_traces_are_never_rejected(fixtures_dir: Path, tmp_path: Path) -> None:
    config = _config(**{"source": "vidstg",
                        "source.annotations": str(fixtures_dir / "vidstg" / "test_annotations_subset.json"),
                        "source.video_dir": str(fixtures_dir / "vidstg"), "sample.embed_jpeg": "false"})
    rows, rejections = _judge(config, _sampled(config, tmp_path), tmp_path)
    assert len(rows) == 26
    assert not {r.rule for r in rejections} & SELF_INFLICTED, [r.reason for r in rejections]
    at_clip_end = [r for r in rows if r["answer_span"][1] == pytest.approx(r["clip_window"]["end_s"])]
    assert at_clip_end, "the fixture has spans that end at the clip's end (18.018 s)"
    for row in rows:
        trace = evidence.parse_trace(row["response"])
        assert all(row["clip_window"]["start_s"] <= t <= row["clip_window"]["end_s"] for t in trace.times), (row["clip_window"], trace.times)
        assert row["scores"]["answer_score"] == pytest.approx(1.0), (row["answer"], row["response"])
        assert ".." not in row["response"]


# -- one record per kind of answer, on the real clip 5587257558 (18.018 s, 29.97 fps) ------------------

CLIP = {"start_s": 11.5115, "end_s": 18.018}  # the fixture's entry 8: its span ends at the clip's end
TIMES = [round(k / FPS, 6) for k in range(345, 540, 15)] + [18.018]  # sampled frames, the last at the end


def _record(rid: str, task: str, fixtures_dir: Path, **columns: Any) -> dict[str, Any]:
    box = lambda t: [round(0.2 + 0.01 * t, 6), 0.3, round(0.4 + 0.01 * t, 6), 0.7]  # noqa: E731 - a moving target
    record = {
        "id": rid, "source": "test", "source_id": f"5587257558#{rid}", "task": task,
        "media": {"uri": str(fixtures_dir / "vidstg" / "5587257558.mp4"), "kind": "video", "fps": FPS,
                  "num_frames": 540, "duration_s": 18.018, "width": 640, "height": 360},
        "clip_window": CLIP,
        "frames": [{"t_s": t, "index": min(539, round(t * FPS))} for t in TIMES],
        "ground_truth": {"objects": [{"name": "adult", "track": [{"t_s": t, "box": box(t)} for t in TIMES]}],
               "spans": [{"label": "an adult uses a camera", "start_s": 15.2152, "end_s": 18.018}]},
        "key_frames": [{"t_s": t, "objects": [{"name": "adult", "box": box(t)}]} for t in (TIMES[0], TIMES[6], TIMES[-1])],
    }
    record.update(columns)
    return record


def _kinds(fixtures_dir: Path) -> list[dict[str, Any]]:
    options = ["A. from 11.5 s to 13 s", "B. from 15.22 s to 18.02 s", "C. from 12 s to 14 s"]
    return [
        _record("span", "temporal", fixtures_dir, question="When does the adult use the camera?",
                answer="[15.22, 18.02]", answer_span=[15.2152, 18.018], key_frames=[]),
        _record("text", "spatio_temporal", fixtures_dir, question="who uses the camera?",
                answer="an adult wearing a black hat uses a camera.", answer_span=[15.2152, 18.018]),
        _record("option_span", "temporal_mcq", fixtures_dir, question="When does the adult use the camera?",
                options=options, answer="B\n[15.22, 18.02]", key_frames=[]),
        _record("option", "general_mcq", fixtures_dir, question="What does the adult hold?",
                options=["A. a cup", "B. a camera"], answer="B"),
        _record("box", "spatial", fixtures_dir, question="Where is the adult at 18.02 s?",
                answer=CANONICAL.format_box([0.2 + 0.18018, 0.3, 0.4 + 0.18018, 0.7]).replace(",", ", "),
                key_frames=[{"t_s": 18.018, "objects": [{"name": "adult", "box": [0.2 + 0.18018, 0.3, 0.4 + 0.18018, 0.7]}]}]),
    ]


def test_each_kind_of_answer_is_written_inside_the_clip_and_scores_full(fixtures_dir: Path, tmp_path: Path) -> None:
    records = _kinds(fixtures_dir)
    assert [record_answer_kind(r) for r in records] == ["span", "text", "option_span", "option", "box"]
    rows, rejections = _judge(_config(), to_table(records), tmp_path)
    assert rejections == [], [(r.id, r.rule, r.reason) for r in rejections]
    by_id = {r["id"]: r for r in rows}
    for rid, row in by_id.items():
        response = row["response"]
        trace = evidence.parse_trace(response)
        assert trace.ok and ".." not in response, response
        assert all(CLIP["start_s"] <= t <= CLIP["end_s"] for t in trace.times), (rid, trace.times)
        # the answer is the record's own, and scores full through the one scorer
        assert evidence.split_sections(response).answer == row["answer"]
        assert score_record_answer(response, row) == pytest.approx(1.0), (rid, response)
        assert row["scores"]["answer_score"] == pytest.approx(1.0)
        # every claim snaps to the sampled frame it cites, and its box is that frame's box
        for claim in trace.claims:
            cited = min(TIMES, key=lambda t: abs(t - claim.t))
            assert abs(cited - claim.t) <= 2 * CANONICAL.time_tolerance() + 1e-9
            assert [c["t_snapped"] for c in row["scores"]["claims"] if c["t_s"] == claim.t][0] == pytest.approx(cited)
    # the clip end is written 18.01 (inward), the answer keeps its own writing
    assert "<t>18.01</t>" in by_id["span"]["response"] and "<t>18.02</t>" not in by_id["span"]["response"]
    option_span = evidence.parse_trace(by_id["option_span"]["response"])
    assert {15.22, 18.01} <= set(option_span.times)  # the letter's span, written inside the clip
    closer = option_span.think.rsplit(". ", 1)[-1]
    assert " B" in closer and "15.22 s to 18.02 s" in closer, closer  # the closer restates letter and span
    assert by_id["text"]["response"].count("uses a camera.") == 2  # closer and answer, one full stop each


@pytest.mark.parametrize("seconds, clip, written", [
    (18.018, (11.5115, 18.018), 18.01),   # rounding up would leave the clip: round inward
    (11.5115, (11.5115, 18.018), 11.52),  # rounding down would leave the clip: round inward
    (17.9179, (0.0, 18.018), 17.92),      # inside: plain rounding
    (19.0, (0.0, 18.018), 18.01),         # a time past the clip is written at its end
])
def test_written_time_is_never_outside_the_clip(seconds: float, clip: tuple[float, float], written: float) -> None:
    value = written_time(seconds, {"clip_start_s": clip[0], "clip_end_s": clip[1]})
    assert value == written and clip[0] <= value <= clip[1]
    assert float(CANONICAL.format_time(value)) == value


def test_time_check_allows_exactly_the_rounding_of_the_written_digits(tmp_path: Path) -> None:
    """A trace written by hand (not by the template) with the clip end 18.018 s written as 18.02 is
    inside the clip; 18.03 is not. The slack is `CANONICAL.time_tolerance()`, plus the configured one."""
    records = []
    for rid, t in (("end-rounded", "18.02"), ("past-end", "18.03"), ("start-rounded", "11.51")):
        response = (f"<think>I can see <obj>adult</obj><box>[0.2,0.3,0.4,0.7]</box>at<t>{t}</t>s.</think>"
                    "<answer>an adult</answer>")
        records.append({"id": rid, "task": "general_free", "clip_window": CLIP, "frames": [{"t_s": 18.018}],
                        "answer": "an adult", "response": response})
    table = get_stage("align")(_config()["align"]).process(to_table(records), unit_context(tmp_path)).table
    outcome = TimeInClip(TimeInClip.Config()).check(Batch(table))
    assert dict(zip(table.column("id").to_pylist(), outcome.failed.tolist())) == {
        "end-rounded": False, "past-end": True, "start-rounded": False}
    assert CANONICAL.time_tolerance() == pytest.approx(0.005)
    # a configured slack adds to it: 18.03 s is 0.012 s past the end, inside 0.01 + 0.005
    assert TimeInClip(TimeInClip.Config(threshold=0.01)).check(Batch(table)).failed.tolist() == [False, False, False]
