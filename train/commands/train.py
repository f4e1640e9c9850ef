"""`stgr train sft|rl --run DIR [overrides]`: SFT or RL on an STGR dataset, resumable in DIR."""
from __future__ import annotations

import argparse
import json
import logging

from train.common import KINDS

HELP = {
    "sft": "cold-start SFT on stgr-cot (TRL SFTTrainer, loss on assistant tokens only)",
    "rl": "RL on stgr-rl with the paper's rewards (TRL GRPOTrainer; GSPO by default)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on an STGR dataset (sft | rl)",
        description="Config: conf/train/<kind>.yaml with Hydra overrides, e.g. `stgr train sft --run runs/sft "
        "data.dir=runs/demo model.path=Qwen/Qwen2.5-VL-7B-Instruct trainer.max_steps=2000`. Checkpoints "
        "go to DIR/checkpoints; running again in DIR resumes from the newest one.",
    )
    kinds = parser.add_subparsers(dest="train_kind", required=True, metavar="{sft,rl}")
    for kind in KINDS:
        sub = kinds.add_parser(kind, help=HELP[kind])
        sub.add_argument("--run", required=True, help="training run directory (created; resumed if it exists)")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny model.path=DIR data.dir=RUN")
        sub.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from train.common import load_config, prepare_run_dir
    from train.ray_train import run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("stgr").setLevel(logging.INFO)
    cfg = load_config(args.train_kind, args.run, args.overrides)
    run = prepare_run_dir(args.train_kind, args.run, cfg)
    result = run_training(args.train_kind, cfg, run)
    print(json.dumps(result, indent=2, default=str))
    return 0
