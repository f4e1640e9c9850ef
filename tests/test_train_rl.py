"""RL with TRL's GRPOTrainer on a tiny Qwen2.5-VL: GSPO and GRPO run, beta > 0 loads a reference
model, each reward is logged on its own, and on a toy task the reward rises (slow test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.train_toy import write_toy_dataset
from train.common import load_config, prepare_run_dir, read_log


SMALL = ["model=tiny", "data.max_frames=1", "trainer.per_device_train_batch_size=2", "rl.num_generations=2",
         "rl.max_completion_length=12", "trainer.logging_steps=1", "trainer.save_steps=100"]


@pytest.mark.parametrize("level,beta", [("sequence", 0.04), ("token", 0.0)])
def test_gspo_and_grpo_run(level: str, beta: float, tiny_model_dir: Path, tmp_path: Path):
    from train.rl import build_trainer

    data = write_toy_dataset(tmp_path / "data", n=2)
    run = tmp_path / "rl"
    cfg = load_config("rl", run, [*SMALL, f"model.path={tiny_model_dir}", f"data.dir={data}", "trainer.max_steps=2",
                                  f"rl.importance_sampling_level={level}", f"rl.beta={beta}"])
    trainer, _ = build_trainer(cfg, prepare_run_dir("rl", run, cfg))
    assert trainer.args.importance_sampling_level == level
    assert (trainer.ref_model is not None) == (beta > 0)
    assert trainer.args.use_vllm is False  # no vllm / no GPU here: HF generate
    assert [f.__name__ for f in trainer.reward_funcs] == ["accuracy", "format", "temporal", "spatial"]
    trainer.train()
    logged = read_log(run)
    assert logged[0]["step"] == 1 and {f"rewards/{n}/mean" for n in ("accuracy", "format", "temporal", "spatial")} <= set(logged[0])
    if beta > 0:
        assert "kl" in logged[0]


@pytest.mark.slow
def test_reward_rises_on_a_toy_task(tiny_model_dir: Path, tmp_path: Path):
    """Short SFT warm start (so completions have the grammar now and then), then GRPO: the mean total
    reward of the last steps is clearly above that of the first steps. Seeded; prints the numbers."""
    from train.rl import run_rl
    from train.sft import run_sft

    data = write_toy_dataset(tmp_path / "data", n=4, tasks=("general_mcq",))
    sft_run = tmp_path / "sft"
    sft = load_config("sft", sft_run, ["model=tiny", f"model.path={tiny_model_dir}", f"data.dir={data}",
                                       "data.max_frames=1", "trainer.max_steps=60", "trainer.learning_rate=1e-2",
                                       "trainer.lr_scheduler_type=constant", "trainer.warmup=0",
                                       "trainer.gradient_accumulation_steps=1", "trainer.per_device_train_batch_size=4",
                                       "trainer.save_steps=100", "trainer.logging_steps=10"])
    run_sft(sft, prepare_run_dir("sft", sft_run, sft))
    rl_run = tmp_path / "rl"
    # 100 steps: the released-style rewards already credit the warm-started completions (first 10
    # steps about 1.9 of 4), so the rise needs longer than the 60 steps it took before
    rl = load_config("rl", rl_run, ["model=tiny", f"model.path={sft_run / 'final'}", f"data.dir={data}",
                                    "data.max_frames=1", "trainer.max_steps=100", "trainer.learning_rate=1e-3",
                                    "trainer.lr_scheduler_type=constant", "trainer.per_device_train_batch_size=8",
                                    "trainer.logging_steps=1", "trainer.save_steps=100", "rl.num_generations=8",
                                    "rl.max_completion_length=60", "rl.beta=0.0", "rl.importance_sampling_level=token",
                                    "rl.epsilon=0.2", "rl.epsilon_high=0.28"])
    run_rl(rl, prepare_run_dir("rl", rl_run, rl))
    rewards = [r["reward"] for r in read_log(rl_run) if "reward" in r]
    first, last = float(np.mean(rewards[:10])), float(np.mean(rewards[-10:]))
    print(f"RL mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f} (of {len(rewards)} steps; max 4.0)")
    assert last > first + 0.3
