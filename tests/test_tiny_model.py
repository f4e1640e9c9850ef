"""The tiny Qwen2.5-VL loads through the real `from_pretrained` path and runs images end to end."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.testing.tiny_model import build_tiny_qwen25vl


def _messages() -> list[dict]:
    return [
        {"role": "user", "content": [
            {"type": "text", "text": "The video is 2.0 s long.\nFrame 1 at 0.5 s:"}, {"type": "image"},
            {"type": "text", "text": "Frame 2 at 1.5 s:"}, {"type": "image"},
            {"type": "text", "text": "Where is the red circle?"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text":
            "<think>The <obj>red circle</obj><box>[10,20,40,50]</box>at<t>0.5</t>s</think><answer>A</answer>"}]},
    ]


def _frames(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)) for _ in range(n)]


def _cli(argv: list[str]) -> argparse.Namespace:
    from stages import commands

    parser = argparse.ArgumentParser(prog="stgr")
    commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_loads_and_runs_images(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2_5_vl"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = processor.apply_chat_template(_messages(), tokenize=False)
    batch = processor(text=[text], images=_frames(), return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    prompt = processor.apply_chat_template(_messages()[:1], tokenize=False, add_generation_prompt=True)
    gen_in = processor(text=[prompt], images=_frames(), return_tensors="pt")
    generated = model.generate(**gen_in, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > gen_in["input_ids"].shape[1]


def test_chat_template_marks_only_assistant_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    enc = tok.apply_chat_template(_messages(), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(marked) == _messages()[1]["content"][0]["text"] + "<|im_end|>"
    # The prompt of a generation ends exactly where the assistant's rendered turn begins.
    full = tok.apply_chat_template(_messages(), tokenize=False)
    prompt = tok.apply_chat_template(_messages()[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)


def test_same_seed_same_model_and_cli(tmp_path: Path, tiny_model_dir: Path) -> None:
    args = _cli(["tiny-model", str(tmp_path / "cli"), "--seed", "0"])
    assert args.func(args) == 0
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert json.loads((tmp_path / "cli" / "stgr_tiny.json").read_text())["seed"] == 0
    other = build_tiny_qwen25vl(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_head_dim_32_variant_for_vllm_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """vLLM's CPU attention needs head size >= 32: `stgr tiny-model OUT --head-dim 32` builds 2 heads of 32
    that load and run."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "hd32"
    args = _cli(["tiny-model", str(out), "--head-dim", "32"])
    assert args.func(args) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (2, 1)
    assert text.hidden_size // text.num_attention_heads == 32
    assert model.model.language_model.layers[0].self_attn.head_dim == 32
    assert sum(text.rope_parameters["mrope_section"]) == 16  # head_dim / 2 rotary pairs
    processor = AutoProcessor.from_pretrained(out)
    batch = processor(text=[processor.apply_chat_template(_messages(), tokenize=False)], images=_frames(),
                      return_tensors="pt")
    assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
    assert json.loads((out / "stgr_tiny.json").read_text())["head_dim"] == 32
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_qwen25vl(tmp_path / "bad", head_dim=24)
    with pytest.raises(SystemExit) as exited:
        _cli(["tiny-model", str(tmp_path / "bad"), "--head-dim", "24"])
    assert exited.value.code == 2 and "invalid choice: 24" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
