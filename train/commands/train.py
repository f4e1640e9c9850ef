"""`stgr train sft|rl --run DIR [overrides]`: SFT or RL on an STGR dataset, resumable in DIR."""
from __future__ import annotations

import argparse
import json
import logging

from pipeline.errors import InputError
from train.commands._inputs import check_model, check_output_dir
from train.common import KINDS

HELP = {
    "sft": "cold-start SFT on stgr-cot (TRL SFTTrainer, loss on assistant tokens only)",
    "rl": "RL on stgr-rl with the paper's rewards (TRL GRPOTrainer; GSPO by default)",
}
DESCRIPTION = {
    "sft": """Cold-start supervised fine-tuning on the dataset's SFT set (stgr-cot): each record rendered as a
chat (frames labelled `Frame k at t s:`, the grounded trace as the target, boxes in the model's
frame), loss on the assistant tokens only, with TRL's SFTTrainer in Ray Train workers.

Config: conf/train/sft.yaml with Hydra overrides; data.dir (a run directory of `stgr build` or its
dataset/) is required, model.path defaults to Qwen/Qwen2.5-VL-7B-Instruct (a checkpoint folder, or a
Hub id in the local cache). Checkpoints go to DIR/checkpoints, the model to DIR/final; running again in
DIR resumes from the newest checkpoint. Example: stgr train sft --run runs/sft data.dir=runs/demo
model=tiny model.path=DIR trainer.max_steps=10""",
    "rl": """Reinforcement learning on the dataset's RL set (stgr-rl) with the paper's rewards: answer accuracy,
format, temporal proximity (sigma annealed) and IoU gated by time, with TRL's GRPOTrainer (GSPO's
sequence-level importance sampling by default) in Ray Train workers.

Config: conf/train/rl.yaml with Hydra overrides; data.dir is required, model.path is usually the SFT
run's DIR/final. Checkpoints go to DIR/checkpoints; running again in DIR resumes from the newest one.
Example: stgr train rl --run runs/rl data.dir=runs/demo model.path=runs/sft/final""",
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
        sub = kinds.add_parser(kind, help=HELP[kind], description=DESCRIPTION[kind],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--run", required=True, help="training run directory (created; resumed if it exists)")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny model.path=DIR data.dir=RUN")
        sub.set_defaults(func=_run)


def check_dataset(data_dir: str, split: str) -> None:
    """The set to train on has shards and rows: an empty one (every record rejected) is one line."""
    import pyarrow.parquet as pq

    from train.data import shard_files

    files = shard_files(data_dir, split)
    if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
        raise InputError(f"data.dir: {files[0].parent} has no records (the build kept none of this set); "
                         f"`stgr inspect {data_dir}` lists the rules that rejected them")


def _run(args: argparse.Namespace) -> int:
    from train.common import load_config, prepare_run_dir
    from train.ray_train import run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("stgr").setLevel(logging.INFO)
    check_output_dir(args.run, "--run")
    cfg = load_config(args.train_kind, args.run, args.overrides)
    check_model(str(cfg.model.path), cfg.model.get("revision"), "model.path")
    check_dataset(str(cfg.data.dir), str(cfg.data.split))
    run = prepare_run_dir(args.train_kind, args.run, cfg)
    result = run_training(args.train_kind, cfg, run)
    print(json.dumps(result, indent=2, default=str))
    return 0
