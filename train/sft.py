"""Cold-start SFT on STGR-CoT with TRL's SFTTrainer, loss on the assistant's tokens only.

The reference trains on the whole sequence (prompt tokens included); here `assistant_only_loss`
masks the system turn, the frame labels, the visual tokens and the question, so the model learns to
write grounded reasoning, not to predict its own prompt. The mask comes from the chat template's
`{% generation %}` markers (train/common.py puts them in when a checkpoint's template lacks them).
"""
from __future__ import annotations

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


def build_trainer(cfg: DictConfig | dict[str, Any], run: Path, callbacks: list | None = None):
    """The configured SFTTrainer (not yet trained); Ray Train workers call this too."""
    from trl import SFTConfig, SFTTrainer

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    model, trainer = c["model"], c["trainer"]
    processor = load_processor(model)
    dataset = build_dataset("sft", c["data"], model, run / "cache")
    args = SFTConfig(
        **training_arguments(trainer, run, use_gpu(trainer)),
        assistant_only_loss=True,
        max_length=trainer.get("max_length"),
        activation_checkpointing=bool(model.get("gradient_checkpointing")),
        model_init_kwargs=model_init_kwargs(model),
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    return SFTTrainer(
        model=model["path"],
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[JsonlLogger(run / "log.jsonl"), *(callbacks or [])],
    ), processor


def run_sft(cfg: DictConfig | dict[str, Any], run: Path, callbacks: list | None = None) -> dict[str, Any]:
    """Train (or resume) in `run`; returns the final step, the output folder and the last metrics."""
    trainer, processor = build_trainer(cfg, run, callbacks)
    return train_and_finish(trainer, processor, run, cfg)
