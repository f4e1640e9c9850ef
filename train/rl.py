"""RL on STGR-RL with TRL's GRPOTrainer and the paper's rewards; GSPO by sequence-level ratios.

Group size, KL weight (beta > 0 makes TRL load a frozen reference copy of the starting model), clip
range, importance-sampling level (token = GRPO, sequence = GSPO), advantage scaling and the
learning-rate schedule all come from conf/train/rl.yaml. Each reward component is a separate
reward function, so TRL logs rewards/accuracy/mean, rewards/format/mean, ... on their own, and
the configured weights combine them. Rollouts use vLLM when it is importable and a GPU is present
(`rl.use_vllm=auto`), HF `generate` otherwise.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.common import (
    JsonlLogger,
    load_processor,
    model_init_kwargs,
    train_and_finish,
    training_arguments,
    use_gpu,
)
from train.data import build_dataset
from train.rewards import RewardConfig, make_reward_funcs


def vllm_enabled(rl: dict[str, Any], gpu: bool) -> bool:
    flag = rl.get("use_vllm", "auto")
    if flag == "auto":
        return gpu and importlib.util.find_spec("vllm") is not None
    return bool(flag)


def build_trainer(cfg: DictConfig | dict[str, Any], run: Path, callbacks: list | None = None):
    """The configured GRPOTrainer (not yet trained); Ray Train workers call this too."""
    from trl import GRPOConfig, GRPOTrainer

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    model, trainer, rl = c["model"], c["trainer"], c["rl"]
    gpu = use_gpu(trainer)
    processor = load_processor(model)
    dataset = build_dataset("rl", c["data"], model, run / "cache")
    reward_cfg = RewardConfig.from_config(c.get("rewards") or {})
    funcs = make_reward_funcs(reward_cfg)
    use_vllm = vllm_enabled(rl, gpu)
    args = GRPOConfig(
        **training_arguments(trainer, run, gpu),
        num_generations=int(rl["num_generations"]),
        beta=float(rl["beta"]),
        epsilon=float(rl["epsilon"]),
        epsilon_high=None if rl.get("epsilon_high") is None else float(rl["epsilon_high"]),
        importance_sampling_level=rl["importance_sampling_level"],
        loss_type=rl["loss_type"],
        scale_rewards=rl["scale_rewards"],
        num_iterations=int(rl["num_iterations"]),
        temperature=float(rl["temperature"]),
        top_p=float(rl["top_p"]),
        max_completion_length=int(rl["max_completion_length"]),
        reward_weights=[reward_cfg.weights[f.__name__] for f in funcs],
        use_vllm=use_vllm,
        **({"vllm_mode": rl["vllm_mode"], "vllm_gpu_memory_utilization": float(rl["vllm_gpu_memory_utilization"])}
           if use_vllm else {}),
        activation_checkpointing=bool(model.get("gradient_checkpointing")),
        model_init_kwargs=model_init_kwargs(model),
        remove_unused_columns=False,
    )
    return GRPOTrainer(
        model=model["path"],
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[JsonlLogger(run / "log.jsonl"), *(callbacks or [])],
    ), processor


def run_rl(cfg: DictConfig | dict[str, Any], run: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume) in `run`; returns the final step, the output folder and the last metrics."""
    trainer, processor = build_trainer(cfg, run, callbacks)
    return train_and_finish(trainer, processor, run, cfg)
