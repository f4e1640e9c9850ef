"""SFT on a tiny Qwen2.5-VL: the loss on a small fixed set falls by half, a rerun resumes, configs are checked."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from tests.train_toy import write_toy_dataset
from train.common import load_config, prepare_run_dir, read_log



def _stgr_train(argv: list[str]) -> int:
    from train import commands

    parser = argparse.ArgumentParser(prog="stgr")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_sft_memorises_and_resumes(tiny_model_dir: Path, tmp_path: Path, caplog):
    data = write_toy_dataset(tmp_path / "data", n=4, tasks=("general_mcq",))
    run = tmp_path / "sft"
    common = ["model=tiny", f"model.path={tiny_model_dir}", f"data.dir={data}", "data.max_frames=1",
              "trainer.learning_rate=1e-2", "trainer.lr_scheduler_type=constant", "trainer.warmup=0",
              "trainer.gradient_accumulation_steps=1", "trainer.per_device_train_batch_size=4",
              "trainer.logging_steps=5", "trainer.save_steps=10"]
    with caplog.at_level(logging.INFO, logger="stgr.train"):
        assert _stgr_train(["train", "sft", "--run", str(run), *common, "trainer.max_steps=20"]) == 0
        assert "starting a new run" in caplog.text
        assert (run / "checkpoints" / "checkpoint-20").is_dir() and (run / "final" / "config.json").exists()
        caplog.clear()
        # "Stop" after 20 steps, then rerun with a larger budget: it continues from step 20.
        assert _stgr_train(["train", "sft", "--run", str(run), *common, "trainer.max_steps=40"]) == 0
    assert "resuming from checkpoint" in caplog.text and "at step 20, training to step 40" in caplog.text
    losses = [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r]
    steps = [s for s, _ in losses]
    assert steps == sorted(steps) and steps[-1] == 40 and 25 in steps and steps.count(20) == 1
    loss_at = dict(losses)
    # The rerun continues from the memorised weights, not from step 0's: five steps after the
    # resume the loss is far below where it was five steps after the start.
    assert loss_at[25] < 0.5 * loss_at[5], loss_at
    first, last = losses[0][1], losses[-1][1]
    print(f"SFT loss on 4 fixed examples: step {losses[0][0]} {first:.3f} -> step {losses[-1][0]} {last:.3f}")
    assert last <= 0.5 * first


def test_config_errors_name_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match="data.dir"):
        load_config("sft", tmp_path, ["model=tiny", "model.path=/m"])
    with pytest.raises(ConfigError, match="model.path"):
        load_config("sft", tmp_path, ["model=tiny", "data.dir=/d"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config("sft", tmp_path, ["model=tiny", "model.path=/m", "data.dir=/d", "trainer.max_steps=0"])
    with pytest.raises(ConfigError, match="multiple of rl.num_generations"):
        load_config("rl", tmp_path, ["model=tiny", "model.path=/m", "data.dir=/d", "rl.num_generations=3"])
    cfg = load_config("sft", tmp_path, ["model=tiny", "model.path=/m", "data.dir=/d"])
    prepare_run_dir("sft", tmp_path / "run", cfg)
    rl_cfg = load_config("rl", tmp_path, ["model=tiny", "model.path=/m", "data.dir=/d"])
    with pytest.raises(ConfigError, match="holds a 'sft' run"):
        prepare_run_dir("rl", tmp_path / "run", rl_cfg)
