"""Shards -> chat examples: labelled frames, boxes in the model's frame, and a loss on assistant tokens only."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from stages.lib import evidence
from stages.lib.geometry import CANONICAL
from stages.lib.render import FramePolicy, render_example, select_frames
from stages.lib.schema import to_table
from tests.train_toy import toy_record, write_toy_dataset
from train.data import iter_examples, load_records

TINY_MODEL_CFG = {"path": None, "min_pixels": 3136, "max_pixels": 50176, "box_frame": "qwen2.5-vl"}
POLICY = FramePolicy(max_frames=3, min_pixels=3136, max_pixels=50176)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n=8)


def test_render_labels_frames_and_moves_boxes_to_the_model_frame(toy: Path):
    for record in load_records(toy, "stgr-cot"):
        ex = render_example(record, POLICY, "Answer in the grammar.")
        content = ex.messages[0]["content"]
        assert content[0]["text"].startswith("The video is 2.5 s long. You see 3 frames")
        labels = [p["text"] for p in content if p["type"] == "text" and p["text"].startswith("Frame ")]
        assert labels[0].startswith("Frame 1 at ") and labels[0].endswith(" s: ")
        assert sum(p["type"] == "image" for p in content) == len(ex.images) == 3
        # 160 x 120 frames are fed to Qwen2.5-VL as 168 x 112: boxes are integer pixels of that.
        assert (ex.frame.width, ex.frame.height) == (168.0, 112.0)
        key_t = record["key_frames"][0]["t_s"]
        shown = [float(lab.split(" at ")[1].removesuffix(" s: ")) for lab in labels]
        assert key_t in shown  # the key frame is always among the frames shown
        canonical = evidence.parse_trace(record["reasoning"]).claims
        in_frame = evidence.parse_trace(ex.target, ex.frame).claims
        assert len(in_frame) == len(canonical) > 0
        for a, b in zip(canonical, in_frame):
            assert a.name == b.name and a.t == b.t
            assert np.allclose(a.boxes, b.boxes, atol=ex.frame.tolerance() + 1e-9)
        assert "0." not in evidence.split_sections(ex.target).think.split("<box>")[1].split("</box>")[0]
        if record["task"] == "spatial":
            box = evidence.parse_box_answer(ex.target, ex.frame)
            assert np.allclose(box, evidence.parse_box_answer(record["answer"]), atol=ex.frame.tolerance() + 1e-9)
            assert record["answer"] not in ex.target  # the restated canonical box in the prose was moved too
        assert ex.target.startswith("<think>") and ex.target.endswith("</answer>")
        assert ex.reward_target["frame"]["width"] == 168.0


def test_frame_matches_what_the_processor_feeds_the_model(toy: Path, tiny_model_dir: Path):
    from train.common import load_processor

    processor = load_processor({**TINY_MODEL_CFG, "path": str(tiny_model_dir)})
    ex = render_example(load_records(toy, "stgr-cot")[0], POLICY)
    grid = processor.image_processor(images=ex.images[:1], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert (grid[2] * 14, grid[1] * 14) == (ex.frame.width, ex.frame.height)


def test_select_frames_keeps_key_frames():
    times = [i * 0.5 for i in range(40)]
    chosen = select_frames(times, keys=[7.3, 19.4], max_frames=6)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    assert times.index(7.5) in chosen and times.index(19.5) in chosen
    assert select_frames(times[:4], [0.5], 6) == [0, 1, 2, 3]


def test_bad_shards_name_file_record_and_field(tmp_path: Path):
    root = write_toy_dataset(tmp_path / "ok", n=2)
    import random

    bad = toy_record(0, "general_mcq", random.Random(0))
    bad["question"] = ""
    folder = tmp_path / "bad" / "dataset" / "stgr-cot"
    folder.mkdir(parents=True)
    pq.write_table(to_table([bad]), folder / "train-00000-of-00001.parquet")
    with pytest.raises(InputError, match=r"train-00000-of-00001.parquet: record '[0-9a-f]+': field 'question'"):
        load_records(tmp_path / "bad", "stgr-cot")
    with pytest.raises(InputError, match="no 'stgr-xx' folder"):
        load_records(root, "stgr-xx")
    with pytest.raises(InputError, match="unknown task"):
        load_records(root, "stgr-cot", tasks=["dance"])
    assert len(load_records(root / "dataset", "stgr-cot", max_records=1)) == 1  # the dataset folder itself works


def test_traces_in_any_spelling_are_moved_to_the_model_frame(toy: Path):
    """Boxes written with ints, spaces, semicolons or parentheses are moved like the canonical spelling."""
    record = next(r for r in load_records(toy, "stgr-cot") if r["task"] == "spatial")
    (claim, *_) = evidence.parse_trace(record["reasoning"]).claims
    x1, y1, x2, y2 = claim.boxes[0]
    box_start = record["reasoning"].index("<box>")
    box_end = record["reasoning"].index("</box>") + len("</box>")
    reasoning = (record["reasoning"][:box_start] + f"<box>[ {x1:g} ,{y1:g} ;  {x2:g}, {y2:g} ]</box>"
                 + record["reasoning"][box_end:] + " The <obj>frame</obj><box>(0, 0, 1, 1)</box> at <t>1</t>s.")
    answer = "[" + " , ".join(f"{v:g}" for v in evidence.parse_box_answer(record["answer"])) + " ]"
    ex = render_example({**record, "reasoning": reasoning, "answer": answer}, POLICY)
    canonical = evidence.parse_trace(reasoning).claims
    moved = evidence.parse_trace(ex.target, ex.frame).claims
    assert [c.name for c in moved] == [c.name for c in canonical] and len(moved) == 2
    for a, b in zip(canonical, moved):
        assert a.t == b.t and np.allclose(a.boxes, b.boxes, atol=ex.frame.tolerance() + 1e-9)
    assert "<obj>frame</obj><box>[0,0,168,112]</box> at <t>1</t>s." in ex.target  # prose kept verbatim
    assert np.allclose(evidence.parse_box_answer(ex.target, ex.frame), evidence.parse_box_answer(answer),
                       atol=ex.frame.tolerance() + 1e-9)
    boxes = re.findall(r"<box>(.*?)</box>", ex.target) + [evidence.answer_text(ex.target)]
    assert len(boxes) == 3 and not any("." in box for box in boxes)  # integer pixels, none left normalised


def test_trace_that_cannot_be_moved_is_left_out_with_a_warning(toy: Path, caplog):
    records = load_records(toy, "stgr-cot")[:3]
    spatial = next(r for r in load_records(toy, "stgr-cot") if r["task"] == "spatial")
    overflow = {**records[0], "reasoning": records[0]["reasoning"] + " <obj>glitch</obj><box>[0, 0, 1e308, 1]</box>"}
    # a spatial question answered in words is a free-text answer (stages.lib.answers), not a broken box
    in_words = {**spatial, "answer": "on the left"}
    with caplog.at_level(logging.WARNING, logger="stgr.train.data"):
        out = list(iter_examples([overflow, records[1], in_words], POLICY, {}))
    assert [e.id for e in out] == [records[1]["id"], in_words["id"]]
    assert f"record {overflow['id']!r}: field 'reasoning'" in caplog.text and "frame qwen2.5-vl" in caplog.text
    assert "left out 1 of 3 records" in caplog.text


def test_training_and_evaluation_prompts_lay_out_frames_alike(toy: Path, tiny_model_dir: Path):
    """Evaluation sends the rendered training chat through a backend (`request_from_messages`, then the
    transformers backend's `chat_messages`): the text around every image must be the training text."""
    from transformers import AutoProcessor

    from stages.backends.transformers_backend import chat_messages
    from stages.lib.render import request_from_messages

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    ex = render_example(load_records(toy, "stgr-cot")[0], POLICY, "Answer in the grammar.", "You see videos.")
    request = request_from_messages(ex.prompt(), ex.images, max_new_tokens=8)
    trained = processor.apply_chat_template(ex.prompt(), tokenize=False, add_generation_prompt=True)
    evaluated = processor.apply_chat_template(chat_messages(request), tokenize=False, add_generation_prompt=True)
    assert evaluated == trained
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    labels = [p["text"] for p in ex.messages[-2]["content"] if p["type"] == "text" and p["text"].startswith("Frame ")]
    prompt = ex.messages[-2]["content"][-1]["text"]
    assert f"time.\n{labels[0]}{image}\n{labels[1]}{image}\n{labels[2]}{image}\n{prompt}<|im_end|>" in trained
    assert labels[0].endswith(" s: ")


def test_canonical_frame_keeps_the_trace_verbatim(toy: Path):
    record = load_records(toy, "stgr-cot")[0]
    ex = render_example(record, FramePolicy(max_frames=2, box_frame="normalised"))
    assert ex.frame == CANONICAL and record["reasoning"] in ex.target


def test_only_assistant_tokens_carry_loss(toy: Path, tiny_model_dir: Path, tmp_path: Path):
    """The SFT collator's labels: -100 everywhere except the assistant's target and its end token."""
    from train.common import load_config, prepare_run_dir
    from train.sft import build_trainer

    run = tmp_path / "run"
    cfg = load_config("sft", run, ["model=tiny", f"model.path={tiny_model_dir}", f"data.dir={toy}",
                                   "data.max_frames=2", "trainer.max_steps=1", "trainer.per_device_train_batch_size=2"])
    trainer, processor = build_trainer(cfg, prepare_run_dir("sft", run, cfg))
    batch = next(iter(trainer.get_train_dataloader()))
    targets = {e.target for e in iter_examples(load_records(toy, "stgr-cot"), FramePolicy.from_config(
        cfg.model, cfg.data), {})}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels[labels != -100]
        assert processor.tokenizer.decode(kept) in {t + "<|im_end|>" for t in targets}
        assert int((ids == trainer.model.config.image_token_id).sum()) > 0  # the frames are in the prompt
        assert (labels[ids == trainer.model.config.image_token_id] == -100).all()
