"""`stgr tiny-model OUT`: write a tiny random Qwen2.5-VL for smoke tests and offline demos."""
from __future__ import annotations

import argparse

from stages.testing.tiny_model import HIDDEN_SIZE

#: The head sizes `build_tiny_qwen25vl` accepts (multiples of 16 that divide the hidden size), offered
#: as choices so a wrong one is refused by argparse (exit 2) before anything is written.
HEAD_DIMS = tuple(d for d in range(16, HIDDEN_SIZE + 1, 16) if HIDDEN_SIZE % d == 0)


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
    parser.add_argument("--head-dim", type=int, default=16, choices=HEAD_DIMS,
                        help="attention head size of the language model (default 16); vLLM's CPU attention "
                        "needs 32 or more")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stages.testing.tiny_model import build_tiny_qwen25vl

    out = build_tiny_qwen25vl(args.out, seed=args.seed, head_dim=args.head_dim)
    print(f"wrote tiny Qwen2.5-VL to {out} (head_dim {args.head_dim})")
    return 0
