"""`verify`: crops of the claimed boxes go to a VLM backend; yes/no verdicts land in scores."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.testing import unit_context
from stages.align import AlignStage
from stages.filter import FilterStage
from stages.lib.media import crop
from stages.lib.schema import to_table
from stages.verify import VerifyStage, read_yes_no
from tests.record_factory import circle_box, grounded_response, jpeg, make_record

PROMPT = "Is this a {object}? Answer yes or no."


def _aligned(tmp_path, n=2):
    records = [make_record(i, with_jpeg=True, answer=None, answer_span=[0.0, 5.0], response=grounded_response(1.0)) for i in range(n)]
    return AlignStage({}).process(to_table(records), unit_context(tmp_path, stage="align")).table


def test_crop_cuts_the_claimed_box():
    image = Image.open(io.BytesIO(crop(jpeg(2.0), circle_box(2.0), padding=0.0, min_side=8))).convert("RGB")
    pixels = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert pixels[0] > 180 and pixels[1] < 80 and pixels[2] < 80  # all red circle
    assert image.size == (64, 72)  # 0.2 x 0.3 of 320 x 240
    grown = Image.open(io.BytesIO(crop(jpeg(2.0), circle_box(2.0), padding=0.25, min_side=8)))
    assert grown.size == (96, 108)
    tiny = Image.open(io.BytesIO(crop(jpeg(2.0), [0.5, 0.5, 0.51, 0.51], padding=0.0, min_side=28)))
    assert min(tiny.size) == 28


def test_yes_no_reading():
    assert read_yes_no("Yes.") and read_yes_no("yes, it is a red circle")
    assert not read_yes_no("No, it is a square") and not read_yes_no("") and not read_yes_no("yesterday")
    assert not read_yes_no("No. Yes.")


def test_verdicts_feed_the_filter(tmp_path):
    completions = tmp_path / "completions.jsonl"
    completions.write_text("\n".join(json.dumps(line) for line in [
        {"match": {"task": "verify", "object": "red circle"}, "completion": "Yes."},
        {"match": {"task": "verify", "object": "blue square"}, "completion": "No, that is a door."},
    ]))
    config = {"backend": "replay", "completions": str(completions), "prompt": PROMPT}
    assert VerifyStage.validate_config(config) == []
    result = VerifyStage(config).process(_aligned(tmp_path), unit_context(tmp_path, stage="verify"))
    assert result.rejections == [] and result.table.num_rows == 2
    scores = result.table.column("scores").to_pylist()
    assert [c["verified"] for c in scores[0]["claims"]] == [True, False]
    assert scores[0]["verify"] == 0.5 and scores[0]["claims"][0]["iou"] == pytest.approx(1.0, abs=1e-3)
    strict = {"rules": {"verified": {"enabled": True, "threshold": 0.75}}}
    filtered = FilterStage(strict).process(result.table, unit_context(tmp_path, stage="filter"))
    assert filtered.table.num_rows == 0 and {r.rule for r in filtered.rejections} == {"verified"}


def test_a_real_tiny_vlm_answers_about_the_crops(tmp_path, tiny_model_dir):
    config = {"backend": "transformers", "model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
              "prompt": PROMPT, "max_new_tokens": 4}
    run = tmp_path / "run"
    result = VerifyStage(config).process(_aligned(tmp_path, n=1), unit_context(run, stage="verify"))
    claims = result.table.column("scores").to_pylist()[0]["claims"]
    assert all(isinstance(c["verified"], bool) for c in claims)  # a random model's words are read, not trusted
    cached = list((run / "cache" / "verify").rglob("*.json"))
    assert len(cached) == len(claims)


def test_config_validation():
    problems = VerifyStage.validate_config({"backend": "replay", "completions": "c.jsonl", "prompt": "Is it there?",
                                            "api_key": "x"})
    assert [p.split(":")[0] for p in problems] == ["prompt", "api_key"]
    assert VerifyStage.validate_config({"prompt": PROMPT})[0].startswith("backend: required")
