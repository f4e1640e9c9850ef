"""The annotate stage with the template backend, the response cache and the prompt sets.

Runs the real stage (`process` on Arrow tables, as a worker would), real decord on the real fixture
clips, the real evidence grammar on what the stage writes, and the real Hydra composition of
conf/annotator/*.yaml.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.backends.template import PHRASES_SHA, TemplateBackend
from stages.lib import evidence
from stages.lib.media import FrameReader
from stages.lib.prompts import PromptSet, record_context
from stages.lib.response_cache import ResponseCache
from stages.lib.schema import TASKS, frame_image, to_table

REPO = Path(__file__).resolve().parents[1]


def annotator_config(name: str, **overrides) -> dict:
    """conf/annotator/<name>.yaml composed by Hydra (prompts included), as a build resolves it."""
    from omegaconf import OmegaConf

    from pipeline.config import compose

    config = OmegaConf.to_container(compose(config_name=f"annotator/{name}"), resolve=True)["annotator"]
    config.update(overrides)
    return config


def jpeg(seed: int, size: tuple[int, int] = (96, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def seed_record(rid: str, task: str, **columns) -> dict:
    """A record as `sample` hands it on: frames with JPEGs, a ground-truth track and event."""
    times = [0.5 * k for k in range(1, 11)]
    track = [{"t_s": round(t, 2), "box": [0.1 + 0.02 * t, 0.2, 0.3 + 0.02 * t, 0.5]} for t in np.arange(1.0, 4.01, 0.1)]
    record = {
        "id": rid, "source": "synthetic", "source_id": f"video-{rid}", "task": task,
        "media": {"uri": "unused.mp4", "kind": "video", "fps": 10.0, "num_frames": 60, "duration_s": 6.0,
                  "width": 96, "height": 64},
        "clip_window": {"start_s": 0.0, "end_s": 5.5},
        "frames": [{"t_s": t, "index": int(t * 10), "image": frame_image(jpeg(i))} for i, t in enumerate(times)],
        "ground_truth": {"objects": [{"name": "red circle", "track": track}],
               "spans": [{"label": "the red circle crosses the frame", "start_s": 1.0, "end_s": 4.0}]},
    }
    record.update(columns)
    return record


def all_tasks() -> list[dict]:
    mcq = {"question": "Which shape moves first?", "options": ["A. the blue square", "B. the red circle"], "answer": "B"}
    return [
        seed_record("st", "spatio_temporal"),
        seed_record("tm", "temporal"),
        seed_record("tq", "temporal_mcq", **mcq),
        seed_record("sp", "spatial"),
        seed_record("gm", "general_mcq", **mcq),
        seed_record("gf", "general_free", question="What colour is the circle?", answer="red"),
    ]


def test_template_annotates_every_task_with_exact_evidence(tmp_path):
    stage = AnnotateStage(annotator_config("template"))
    assert AnnotateStage.validate_config(stage.config) == []
    ctx = unit_context(tmp_path, stage="annotate", fingerprint="a" * 16)
    result = stage.process(to_table(all_tasks()), ctx)
    assert result.rejections == []
    rows = {r["id"]: r for r in result.table.to_pylist()}
    assert set(rows) == {"st", "tm", "tq", "sp", "gm", "gf"}
    assert {r["task"] for r in rows.values()} == set(TASKS)
    for row in rows.values():
        trace = evidence.parse_trace(row["response"])
        assert trace.ok, (row["id"], trace.problems)
        assert evidence.format_score(evidence.check_format(row["response"]), row["task"]) == 1.0
        assert row["reasoning"] == trace.think
        assert row["question"]
        # every cited box is the ground truth at the cited time (to the 3 written decimals)
        for claim in trace.claims:
            (box,) = claim.boxes
            expected = [0.1 + 0.02 * claim.t, 0.2, 0.3 + 0.02 * claim.t, 0.5]
            assert np.allclose(box, expected, atol=5e-4)
        prov = row["provenance"]
        assert prov["annotator"] == "template"
        assert prov["prompt_sha"] == PHRASES_SHA
        assert prov["build_id"] == ctx.build_id
        assert {"stage": "annotate", "fingerprint": "a" * 16} in prov["stage_fingerprints"]
    # answers are the ground truth, and the response agrees with them
    assert rows["st"]["answer_span"] == pytest.approx([1.0, 4.0])
    assert evidence.parse_time_span(rows["tm"]["response"]) == pytest.approx((1.0, 4.0))
    assert rows["tq"]["answer"] == "B" and evidence.parse_option_letter(rows["tq"]["response"]) == "B"
    assert evidence.split_sections(rows["gf"]["response"]).answer == "red"
    sp_box = evidence.parse_box_answer(rows["sp"]["response"])
    assert sp_box == pytest.approx(evidence.parse_box_answer(rows["sp"]["answer"]))
    # seed questions are kept; missing ones are written from ground truth
    assert rows["tq"]["question"] == "Which shape moves first?"
    assert "red circle" in rows["sp"]["question"]


def test_template_is_deterministic_per_id_and_varies_across_ids(tmp_path):
    stage = AnnotateStage(annotator_config("template"))
    records = [seed_record(f"r{i}", "spatio_temporal") for i in range(24)]
    first = stage.process(to_table(records), unit_context(tmp_path / "a")).table.to_pylist()
    again = stage.process(to_table(list(reversed(records))), unit_context(tmp_path / "b")).table.to_pylist()
    by_id = {r["id"]: r["response"] for r in again}
    assert all(by_id[r["id"]] == r["response"] for r in first)
    assert len({r["question"] for r in first}) > 1
    assert len({r["reasoning"].split(".")[0] for r in first}) > 1


def test_records_that_cannot_be_annotated_go_to_the_ledger_with_reasons(tmp_path):
    stage = AnnotateStage(annotator_config("template"))
    records = [
        seed_record("ok", "temporal"),
        seed_record("noq", "general_mcq", options=["A. x", "B. y"], answer="A"),
        seed_record("noopt", "temporal_mcq", question="Which first?", answer="A"),
        seed_record("noans", "general_free", question="Why?"),
        seed_record("noframes", "temporal", frames=[]),
        seed_record("badtask", "dance"),
    ]
    result = stage.process(to_table(records), unit_context(tmp_path))
    assert [r["id"] for r in result.table.to_pylist()] == ["ok"]
    reasons = {r.id: r.reason for r in result.rejections}
    assert set(reasons) == {"noq", "noopt", "noans", "noframes", "badtask"}
    assert "field 'question'" in reasons["noq"]
    assert "field 'options'" in reasons["noopt"]
    assert "no ground-truth answer" in reasons["noans"]
    assert "field 'frames'" in reasons["noframes"]
    assert "field 'task'" in reasons["badtask"]
    assert {r.rule for r in result.rejections} == {"exception", "annotate_request_failed"}


def test_frames_are_decoded_from_the_video_when_not_embedded(tmp_path, fixtures_dir, monkeypatch):
    import decord

    clip = fixtures_dir / "vidstg" / "5587257558.mp4"
    indices = [0, 45, 90, 300]
    record = seed_record("v", "spatial", frames=[{"t_s": i / 29.97, "index": i, "image": None} for i in indices],
                         media={"uri": str(clip), "kind": "video", "fps": 29.97, "num_frames": 540,
                                "duration_s": 18.0, "width": 640, "height": 360})
    images = FrameReader(max_side=None, quality=95).images(record)
    assert [im.label for im in images] == ["Frame 1 at 0 s:", "Frame 2 at 1.5 s:", "Frame 3 at 3 s:",
                                           "Frame 4 at 10.01 s:"]
    truth = decord.VideoReader(str(clip), ctx=decord.cpu(0)).get_batch(indices).asnumpy()
    for image, expected in zip(images, truth):
        decoded = np.asarray(Image.open(io.BytesIO(image.jpeg)).convert("RGB")).astype(float)
        assert decoded.shape == expected.shape
        assert np.abs(decoded - expected).mean() < 3.0  # JPEG at quality 95 of the same pixels
    small = FrameReader(max_side=160).images(record)
    assert Image.open(io.BytesIO(small[0].jpeg)).size == (160, 90)

    beyond = dict(record, id="far", task="temporal", frames=[{"t_s": 9.0, "index": 9999, "image": None}])
    monkeypatch.setattr(TemplateBackend, "needs_pixels", True)  # as a backend that reads the frames
    result = AnnotateStage(annotator_config("template")).process(to_table([record, beyond]), unit_context(tmp_path))
    assert [r["id"] for r in result.table.to_pylist()] == ["v"]
    (rejection,) = result.rejections
    assert rejection.id == "far" and "frame index 9999" in rejection.reason and str(clip) in rejection.reason


def test_response_cache_is_write_once_and_lists_by_prefix(tmp_path):
    cache = ResponseCache.for_run(pafs.LocalFileSystem(), str(tmp_path))
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20)]
    for key in keys[:10]:
        cache.put(key, "m@main", f"response {key[:6]}")
    cache.put(keys[0], "m@main", "a different response")
    assert cache.get(keys[0]).response == f"response {keys[0][:6]}"
    assert cache.get(keys[15]) is None
    found = cache.get_many(keys)
    assert set(found) == set(keys[:10]) and len(cache) == 10
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    corrupt = tmp_path / "cache" / "annotate" / keys[1][:2] / f"{keys[1]}.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match=str(corrupt)):
        cache.get(keys[1])
    with pytest.raises(ValueError, match="hex digest"):
        cache.get("../../etc/passwd")


def test_prompts_render_ground_truth_and_hash_per_task():
    config = annotator_config("transformers", model="unused")
    prompts = PromptSet(config["prompts"])
    context = record_context(seed_record("st", "spatio_temporal"))
    context.update(question="When is the red circle visible?", answer="[1, 4]")
    system, prompt = prompts.render("spatio_temporal", context)
    assert "normalised to [0, 1]" in system
    assert "red circle: visible from 1.00 s to 4.00 s" in prompt
    assert "at 1.00 s: red circle [0.120, 0.200, 0.320, 0.500]" in prompt
    assert "Correct answer: [1, 4]" in prompt and prompt.rstrip().endswith("</answer>")
    shas = {task: prompts.sha(task) for task in TASKS}
    assert len(set(shas.values())) == len(TASKS)


# Released prompt sets are immutable (a changed prompt must be a new version, or committed dataset
# units would be reused under a prompt that no longer produced them). Bump by adding v2, not editing.
RELEASED_PROMPT_SHAS = {
    "v1": "6647c4e9766816f1972fdefb244809970ced7dfd683c5e5b7757ca61ce97db63",
}


def test_released_prompt_sets_are_unchanged():
    import yaml

    for version, expected in RELEASED_PROMPT_SHAS.items():
        spec = yaml.safe_load((REPO / "conf" / "prompts" / f"{version}.yaml").read_text())
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        assert digest == expected, f"conf/prompts/{version}.yaml changed: write a new version instead"


def test_config_validation_names_the_key():
    base = annotator_config("template")
    assert any(p.startswith("api_key:") for p in AnnotateStage.validate_config({**base, "api_key": "sk-123"}))
    assert any(p.startswith("backend: unknown backend 'nope'")
               for p in AnnotateStage.validate_config({**base, "backend": "nope"}))
    broken = {**base["prompts"], "tasks": {k: v for k, v in base["prompts"]["tasks"].items() if k != "spatial"}}
    (problem,) = AnnotateStage.validate_config({**base, "prompts": broken})
    assert problem.startswith("prompts:") and "spatial" in problem
    bad_jinja = {**base["prompts"], "common": "{% if %}"}
    assert "syntax error" in AnnotateStage.validate_config({**base, "prompts": bad_jinja})[0]
    typo = {**base["prompts"], "tasks": {**base["prompts"]["tasks"], "temporal": "When? {{ questoin }}"}}
    (problem,) = AnnotateStage.validate_config({**base, "prompts": typo})
    assert problem.startswith("prompts:") and "temporal" in problem and "questoin" in problem
