"""`filter`: each rule on hand-made scores, every failed rule ledgered, rules switchable and configurable."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pipeline.config import compose
from pipeline.testing import unit_context
from stages.align import AlignStage
from stages.filter import FilterStage
from stages.lib.rules import RULES
from stages.lib.schema import to_table
from tests.record_factory import circle_box, make_record

#: The filter block of the default build, as Hydra composes it from conf/ (the rules' own defaults).
CONF = OmegaConf.to_container(compose()["filter"], resolve=True)


def _claim(box, iou=1.0, t=1.0, name="red circle"):
    return {"name": name, "t_s": t, "t_snapped": t, "box": box, "gt_name": name if iou else None,
            "iou": iou, "dt": 0.0, "verified": None}


def _scores(claims=(), problems=(), times=None, answer_score=1.0, verify=None):
    ious = [c["iou"] for c in claims if c["iou"] is not None]
    return {"format_ok": not problems, "num_claims": len(claims), "mean_iou": sum(ious) / len(ious) if ious else None,
            "min_iou": min(ious) if ious else None, "answer_ok": None, "claims": list(claims), "verify": verify,
            "problems": list(problems), "num_matched": len(ious), "answer_pred": "B",
            "answer_score": answer_score, "times": [c["t_s"] for c in claims] if times is None else times}


GOOD = [0.3, 0.2, 0.5, 0.5]


def _run(records, config=None, tmp_path=Path("/tmp")):
    return FilterStage(config or CONF).process(to_table(records), unit_context(tmp_path, stage="filter"))


def test_each_rule_rejects_what_it_names(tmp_path):
    cases = {
        "good": make_record(0, scores=_scores([_claim(GOOD)])),
        "format_valid": make_record(1, scores=_scores([_claim(GOOD)], problems=["unbalanced_tag: <obj> at 3"])),
        "time_in_clip": make_record(2, scores=_scores([_claim(GOOD, t=5.5)], times=[5.5, 7.25])),
        "claim_iou": make_record(3, scores=_scores([_claim(GOOD), _claim(GOOD, iou=0.31, t=2.0)])),
        "box_degenerate": make_record(4, scores=_scores([_claim([0.5, 0.2, 0.4, 0.5], iou=None)])),
        "box_too_large": make_record(5, scores=_scores([_claim([0.0, 0.0, 1.0, 0.9], iou=None)])),
        "answer_agrees": make_record(6, task="temporal_mcq", scores=_scores([_claim(GOOD)], answer_score=0.0)),
    }
    result = _run(list(cases.values()), tmp_path=tmp_path)
    assert result.table.column("id").to_pylist() == [cases["good"]["id"]]
    by_id = {r.id: r for r in result.rejections}
    assert len(result.rejections) == len(cases) - 1
    for rule, record in cases.items():
        if rule != "good":
            assert by_id[record["id"]].rule == rule
    assert by_id[cases["time_in_clip"]["id"]].value == [7.25]
    assert "7.25 s" in by_id[cases["time_in_clip"]["id"]].reason and "[0, 5.5]" in by_id[cases["time_in_clip"]["id"]].reason
    claim = by_id[cases["claim_iou"]["id"]]
    assert claim.value == 0.31 and claim.threshold == 0.5 and "IoU 0.310 < 0.5" in claim.reason and "at 2 s" in claim.reason
    assert by_id[cases["answer_agrees"]["id"]].threshold == 0.75  # per-task threshold for temporal MCQ
    assert by_id[cases["box_too_large"]["id"]].value == 0.9
    assert all(r.record == cases_source(cases, r.id) for r in result.rejections)


def cases_source(cases, record_id):
    return next(c["source_id"] for c in cases.values() if c["id"] == record_id)


def test_every_failed_rule_is_ledgered_not_only_the_first(tmp_path):
    bad = make_record(0, scores=_scores([_claim([0.0, 0.0, 1.0, 1.0], iou=0.1, t=9.0)],
                                         problems=["box_arity: [1,2]"], answer_score=0.0))
    result = _run([bad], tmp_path=tmp_path)
    assert result.table.num_rows == 0
    assert sorted(r.rule for r in result.rejections) == [
        "answer_agrees", "box_too_large", "claim_iou", "format_valid", "time_in_clip"]


def test_rules_can_be_switched_off_and_thresholds_changed(tmp_path):
    rec = make_record(0, scores=_scores([_claim(GOOD, iou=0.4)]))
    assert _run([rec], tmp_path=tmp_path).table.num_rows == 0
    off = {"rules": {"claim_iou": {"enabled": False}}}
    assert _run([rec], off, tmp_path).table.num_rows == 1
    looser = {"rules": {"claim_iou": {"threshold": 0.3}}}
    assert _run([rec], looser, tmp_path).table.num_rows == 1


def test_missing_scores_and_verification(tmp_path):
    unaligned = make_record(0)
    result = _run([unaligned], tmp_path=tmp_path)
    assert [r.rule for r in result.rejections] == ["format_valid"]
    assert "no alignment scores" in result.rejections[0].reason
    # the verify rule is off by default; switched on, it needs the verify stage's score
    config = {"rules": {"verified": {"enabled": True}}}
    recs = [make_record(1, scores=_scores([_claim(GOOD)])), make_record(2, scores=_scores([_claim(GOOD)], verify=0.25)),
            make_record(3, scores=_scores([_claim(GOOD)], verify=1.0))]
    result = _run(recs, config, tmp_path)
    assert result.table.column("id").to_pylist() == [recs[2]["id"]]
    reasons = sorted(r.reason for r in result.rejections)
    assert "add the verify stage" in reasons[0] and "25%" in reasons[1]


def test_unverifiable_claims_and_answers_pass(tmp_path):
    # no ground truth to compare with (iou and answer_score null) is not evidence of a wrong trace
    rec = make_record(0, task="general_free", scores=_scores([_claim(GOOD, iou=None)], answer_score=None))
    assert _run([rec], tmp_path=tmp_path).table.num_rows == 1


def test_config_defaults_match_the_rules_and_validation(tmp_path):
    assert set(CONF["rules"]) == set(RULES)
    for name, entry in CONF["rules"].items():
        defaults = RULES[name].Config()
        assert entry["threshold"] == defaults.threshold and entry["enabled"] == defaults.enabled
    assert FilterStage.validate_config(CONF) == []
    problems = FilterStage.validate_config({"rules": {"nope": {}, "claim_iou": {"threshold": "high", "enable": True},
                                                 "answer_agrees": {"threshold": {"temporal": "x", "talk": 1}}}})
    assert any(p.startswith("rules.nope: unknown rule") for p in problems)
    assert any(p.startswith("rules.claim_iou.enable: unknown key") and "did you mean enabled?" in p for p in problems)
    assert any(p.startswith("rules.claim_iou.threshold: expected float, got str 'high'") for p in problems)
    assert any(p.startswith("rules.answer_agrees.threshold: expected float or a mapping to float") for p in problems)
    problems = FilterStage.validate_config({"rules": {"answer_agrees": {"threshold": {"temporal": 0.5, "talk": 1}}}})
    assert any(p.startswith("rules.answer_agrees.threshold: unknown task(s) ['talk']") for p in problems)


def test_align_then_filter_on_real_traces(tmp_path):
    def box(b):
        return "[" + ",".join(f"{v:.3f}" for v in b) + "]"
    good = f"<think><obj>red circle</obj><box>{box(circle_box(1.0))}</box>at<t>1</t>s</think><answer>[0, 5]</answer>"
    wrong = f"<think><obj>red circle</obj><box>{box(circle_box(4.0))}</box>at<t>1</t>s</think><answer>[0, 5]</answer>"
    records = [make_record(0, answer=None, answer_span=[0.0, 5.0], response=good),
               make_record(1, answer=None, answer_span=[0.0, 5.0], response=wrong),
               make_record(2, answer=None, answer_span=[0.0, 5.0], response="I cannot see the video.")]
    aligned = AlignStage({}).process(to_table(records), unit_context(tmp_path, stage="align")).table
    result = FilterStage(CONF).process(aligned, unit_context(tmp_path, stage="filter"))
    assert result.table.column("id").to_pylist() == [records[0]["id"]]
    rules = {(r.id, r.rule) for r in result.rejections}
    assert (records[1]["id"], "claim_iou") in rules
    assert {(records[2]["id"], "format_valid"), (records[2]["id"], "answer_agrees")} <= rules
