"""Where a training run executes: in this process, or on Ray Train workers of the build's cluster.

`trainer.num_workers == 1` runs the TRL trainer here. `> 1` starts a Ray Train `TorchTrainer` with
that many workers (one per GPU with `use_gpu`, gloo on CPUs otherwise) on the cluster the build
used, joined as the build joins it (`pipeline.build.connect`: `cluster.address` or RAY_ADDRESS, else
an embedded local Ray; the workers get the build's worker environment). Each worker builds the same
TRL trainer; Ray sets up torch.distributed, Accelerate shards the batches, rank 0 writes checkpoints
into the run directory (which must therefore be on storage every node sees, as for builds), and
resuming works exactly as in a single process. `RayTrainReportCallback` hands each saved
checkpoint and its metrics to Ray as well.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: Training entry points by kind, as "module:function" so heavy modules load only when used.
RUNNERS = {"sft": "train.sft:run_sft", "rl": "train.rl:run_rl"}


def _runner(kind: str):
    module, fn = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


def run_training(kind: str, cfg: DictConfig, run: Path) -> dict[str, Any]:
    """Run SFT or RL as configured; returns the final step, output folder and last metrics."""
    if int(cfg.trainer.num_workers) > 1:
        return run_distributed(kind, cfg, run)
    return _runner(kind)(cfg, run)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the same trainer as a single process, prepared for Ray."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    kind, cfg, run = config["kind"], config["cfg"], Path(config["run"])
    module, _ = RUNNERS[kind].split(":")
    build = importlib.import_module(module).build_trainer
    from train.common import train_and_finish

    trainer, processor = build(cfg, run, [RayTrainReportCallback()])
    train_and_finish(prepare_trainer(trainer), processor, run, cfg)


def _cluster_gpu(trainer: dict[str, Any]) -> bool:
    """`use_gpu: auto` on a cluster means "the cluster has GPUs" (the driver itself may have none)."""
    import ray

    flag = trainer.get("use_gpu", "auto")
    return ray.cluster_resources().get("GPU", 0) > 0 if flag == "auto" else bool(flag)


def run_distributed(kind: str, cfg: DictConfig, run: Path) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.build import connect
    from train.common import read_log

    c = OmegaConf.to_container(cfg, resolve=True)
    trainer_cfg = c["trainer"]
    connect(c.get("cluster") or {})  # the build's cluster and worker environment (pipeline.build)
    gpu = _cluster_gpu(trainer_cfg)
    trainer_cfg["use_gpu"] = gpu  # the workers must agree with the placement, whatever the driver has
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"kind": kind, "cfg": c, "run": str(run.resolve())},
        scaling_config=ScalingConfig(
            num_workers=int(trainer_cfg["num_workers"]),
            use_gpu=gpu,
            resources_per_worker=trainer_cfg.get("resources_per_worker"),
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(storage_path=str((run / "ray").resolve()), name="train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    log = read_log(run)
    return {"global_step": log[-1]["step"] if log else 0, "final": str(run / "final"),
            "last_log": log[-1] if log else {}, "ray_metrics": result.metrics}
