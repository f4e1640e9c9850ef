"""A tiny random Qwen2.5-VL (model, tokenizer, processor) built locally, for tests and smoke runs.

No weights can be downloaded in tests or CI, yet annotation, training and evaluation must run the
real code path (`from_pretrained(dir)`, the real processor, the real chat template). This module
builds a ~200k-parameter Qwen2.5-VL with the real architecture and the Qwen special tokens, a small
byte-level BPE vocabulary trained on STGR-like text (so traces tokenise into few tokens), and the
project's chat template whose assistant turns are wrapped in `{% generation %}` (so TRL's
`assistant_only_loss` can mask everything else). It writes garbage, which is the point: parsing,
rejection and reward code must cope with it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from stages.lib.chat import chat_template

#: Qwen2.5-VL's special tokens, in the order of the real vocabulary (ids follow the BPE vocabulary here).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Image/video processor geometry: 14-pixel patches merged 2x2, so the model sees 28-pixel cells.
#: Small pixel bounds keep a frame to a handful of visual tokens on CPU.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 64

_WORDS = (
    "the a an of in on at to is are was and or with by from which what where when who how why "
    "object person man woman child dog cat car ball box red green blue yellow black white circle "
    "square triangle moving left right up down appears frame frames video clip second seconds time "
    "question answer options option first last before after during between while moves enters "
    "leaves stops starts visible near far top bottom center large small shape color holds lifts "
    "camera table chair door walks runs jumps sits stands looks points evidence because therefore "
    "so then finally think reasoning total length duration"
).split()
_TAGS = ("<think>", "</think>", "<answer>", "</answer>", "<obj>", "</obj>", "<box>", "</box>", "<t>", "</t>")


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    """STGR-like text: words, grammar tags, box coordinates and timestamps in several spellings."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        box = [rng.randint(0, 640) for _ in range(4)]
        norm = [round(rng.random(), 3) for _ in range(4)]
        t = round(rng.uniform(0, 60), 1)
        out.append(
            f"<think>The <obj>{rng.choice(_WORDS)}</obj><box>[{box[0]},{box[1]},{box[2]},{box[3]}]</box>"
            f"at<t>{t}</t>s {words}.</think><answer>{rng.choice('ABCD')}</answer>"
        )
        out.append(f"Frame {rng.randint(1, 32)} at {t} s: The video is {t} seconds long. {words}? "
                   f"[{norm[0]}, {norm[1]}, {norm[2]}, {norm[3]}] " + " ".join(rng.sample(_TAGS, 3)))
    return out


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """A byte-level BPE with the Qwen special tokens, trained in memory (no file, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    tok = Qwen2Tokenizer(tokenizer_object=bpe) if _accepts_tokenizer_object(Qwen2Tokenizer) else None
    if tok is None:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "left"
    tok.chat_template = chat_template()
    return tok


def _accepts_tokenizer_object(cls) -> bool:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return "tokenizer_object" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


#: Width of the tiny language model; its attention heads split it into `HIDDEN_SIZE // head_dim` heads.
HIDDEN_SIZE = 64


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's multimodal rotary split (time, height, width) of `head_dim / 2` rotary pairs, in
    the real model's proportions 2 : 3 : 3 ([16, 24, 24] for its head_dim 128); it must sum to
    head_dim / 2, so head_dim must be a multiple of 16."""
    half = head_dim // 2
    return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


def build_tiny_qwen25vl(out_dir: str | Path, seed: int = 0, head_dim: int = 16) -> Path:
    """Write a tiny random Qwen2.5-VL to `out_dir` and return it; `from_pretrained(out_dir)` loads it.

    Saves the model (safetensors), the tokenizer, the processor (image + video processors with small
    pixel bounds) and the chat template. The same `seed` (and `head_dim`) gives the same weights and
    vocabulary. `head_dim` is the language model's attention head size: 16 gives 4 heads (2 key/value
    heads) over the hidden size 64; 32 gives 2 heads (1 key/value head), which vLLM's CPU attention
    needs (it supports head sizes 32, 64, 80, ... only); 64 gives one head.
    """
    if head_dim <= 0 or head_dim % 16 or HIDDEN_SIZE % head_dim:
        raise ValueError(f"head_dim: must be a multiple of 16 that divides the hidden size {HIDDEN_SIZE} "
                         f"(16, 32 or 64), got {head_dim}")
    num_heads = HIDDEN_SIZE // head_dim
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    ids = {name: tok.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=HIDDEN_SIZE,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section(head_dim)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]

    geometry = dict(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, patch_size=14,
                    temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry),
        video_processor=Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=False),
        tokenizer=tok,
        chat_template=chat_template(),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    built = {"seed": seed, "head_dim": head_dim, "builder": "stages.testing.tiny_model"}
    (out / "stgr_tiny.json").write_text(json.dumps(built) + "\n")
    return out
