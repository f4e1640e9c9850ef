"""`stgr tiny-model OUT`: write a tiny random Qwen2.5-VL for smoke tests and offline demos."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-model",
        help="write a tiny random Qwen2.5-VL (model, tokenizer, processor) to OUT; no download",
        description="Builds a ~200k-parameter Qwen2.5-VL with random weights, a small BPE vocabulary with "
        "the Qwen special tokens and a chat template with generation markers. It writes garbage: use it "
        "to exercise annotate/train/eval code paths, never to judge quality.",
    )
    parser.add_argument("out", help="output directory (created; existing files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the vocabulary")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stages.tiny_model import build_tiny_qwen25vl

    out = build_tiny_qwen25vl(args.out, seed=args.seed)
    print(f"wrote tiny Qwen2.5-VL to {out}")
    return 0
