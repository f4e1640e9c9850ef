"""What SFT and RL share: the composed config, the run directory, the model and processor, resume.

Run directory of `stgr train sft|rl --run DIR`:

    DIR/config.yaml                 resolved config of the latest invocation
    DIR/checkpoints/checkpoint-N/   Trainer checkpoints (model, optimizer, scheduler, RNG, state)
    DIR/log.jsonl                   every logged metric, one JSON object per logging step
    DIR/final/                      the trained model + processor (`model.path=DIR/final` for the next stage)
    DIR/cache/                      rendered datasets (keyed by a fingerprint of shards and options)

A rerun in the same DIR resumes from the newest checkpoint (Trainer restores optimizer, scheduler,
RNG and step), so raising `trainer.max_steps` continues a finished run rather than restarting it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.config import compose
from pipeline.errors import ConfigError

log = logging.getLogger("stgr.train")

KINDS = ("sft", "rl")
#: Keys a rerun may change without warning (they extend or observe a run, they do not redefine it).
RESUMABLE_KEYS = {"trainer.max_steps", "trainer.logging_steps", "trainer.save_steps", "trainer.save_total_limit"}


def load_config(kind: str, run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/train/<kind>.yaml with Hydra overrides and check the keys every run needs."""
    if kind not in KINDS:
        raise ConfigError(f"train: unknown kind {kind!r}; known: {list(KINDS)}")
    cfg = compose(overrides, config_name=f"train/{kind}")
    for key in ("model.path", "data.dir", "trainer.max_steps", "trainer.num_workers"):
        if OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"{key}: required (pass {key}=...)")
    if int(cfg.trainer.max_steps) < 1:
        raise ConfigError(f"trainer.max_steps: must be >= 1, got {cfg.trainer.max_steps}")
    if int(cfg.trainer.num_workers) < 1:
        raise ConfigError(f"trainer.num_workers: must be >= 1, got {cfg.trainer.num_workers}")
    if kind == "rl":
        batch = int(cfg.trainer.per_device_train_batch_size) * int(cfg.trainer.gradient_accumulation_steps)
        if batch % int(cfg.rl.num_generations):
            raise ConfigError(
                f"trainer.per_device_train_batch_size x gradient_accumulation_steps ({batch}) must be a multiple "
                f"of rl.num_generations ({cfg.rl.num_generations})"
            )
    return cfg


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run_dir(kind: str, run_dir: str | Path, cfg: DictConfig) -> Path:
    """Create DIR, refuse to mix SFT and RL in one DIR, warn on config changes across reruns, store the config."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    stored_path = run / "config.yaml"
    new = OmegaConf.to_container(cfg, resolve=True)
    if stored_path.exists():
        old = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True)
        if old.get("kind") != kind:
            raise ConfigError(f"--run {run}: holds a '{old.get('kind')}' run; use another directory for '{kind}'")
        a, b = _flatten(old), _flatten(new)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS)
        if changed:
            log.warning("config differs from the stored run in %s; resuming with the new values", ", ".join(changed))
    OmegaConf.save(OmegaConf.create(new), stored_path)
    return run


def last_checkpoint(run: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = run / "checkpoints"
    return get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None


def announce_resume(run: Path, max_steps: int) -> str | None:
    """The checkpoint to resume from (or None), logged so a user sees the run continue."""
    ckpt = last_checkpoint(run)
    if ckpt is None:
        log.info("starting a new run in %s (max_steps=%d)", run, max_steps)
        return None
    step = json.loads((Path(ckpt) / "trainer_state.json").read_text()).get("global_step", 0)
    if step >= max_steps:
        log.info("resuming from %s: already at step %d >= trainer.max_steps=%d, nothing to train", ckpt, step, max_steps)
    else:
        log.info("resuming from checkpoint %s at step %d, training to step %d", ckpt, step, max_steps)
    return ckpt


def restore_weights(trainer: Any, checkpoint: str | None, cfg: Any) -> None:
    """Load the checkpoint's weights into `trainer.model` the way `from_pretrained` does.

    Trainer's resume loads a checkpoint's state dict by raw key names, but Qwen2.5-VL checkpoints are
    saved in the legacy key layout (`visual.*`, `model.layers.*`) that only `from_pretrained` maps
    back: left to Trainer, a resumed run silently restarts from the initial weights with a restored
    optimizer (seen on an H100 and on CPU: the loss went back to its step-0 value). Trainer still
    warns about those keys afterwards; with the weights already in place, its load changes nothing.
    """
    if checkpoint is None:
        return
    from omegaconf import DictConfig, OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    loaded = type(trainer.model).from_pretrained(checkpoint, **model_init_kwargs(config["model"]))
    trainer.model.load_state_dict(loaded.state_dict())
    log.info("weights restored from %s (Trainer's own key-by-key load may warn about legacy key names)", checkpoint)


def use_gpu(trainer: Mapping[str, Any]) -> bool:
    import torch

    flag = trainer.get("use_gpu", "auto")
    return torch.cuda.is_available() if flag == "auto" else bool(flag)


def model_init_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """`from_pretrained` kwargs from `model.*`, for the policy and (RL) the reference model alike."""
    import torch

    dtype = model.get("dtype") or "auto"
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if model.get("attn_implementation"):
        kwargs["attn_implementation"] = model["attn_implementation"]
    if model.get("revision"):
        kwargs["revision"] = model["revision"]
    return kwargs


def load_processor(model: Mapping[str, Any]):
    """The model's processor with the configured pixel bounds (they fix the box frame) and a chat
    template that marks assistant turns with `{% generation %}` (needed for assistant-only loss)."""
    from transformers import AutoProcessor

    from stages.lib.chat import chat_template

    kwargs = {"revision": model["revision"]} if model.get("revision") else {}
    processor = AutoProcessor.from_pretrained(model["path"], **kwargs)
    size = {"shortest_edge": int(model["min_pixels"]), "longest_edge": int(model["max_pixels"])}
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        if sub is not None:
            sub.size = size
            for attr, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
                if hasattr(sub, attr):
                    setattr(sub, attr, value)
    if "{% generation" not in (processor.chat_template or "").replace("{%- generation", "{% generation"):
        processor.chat_template = chat_template()
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def training_arguments(trainer: Mapping[str, Any], run: Path, gpu: bool) -> dict[str, Any]:
    """TrainingArguments fields common to SFTConfig and GRPOConfig, from `trainer.*`."""
    import torch

    bf16 = trainer.get("bf16", "auto")
    bf16 = (gpu and torch.cuda.is_bf16_supported()) if bf16 == "auto" else bool(bf16) and gpu
    args = {
        "output_dir": str(run / "checkpoints"),
        "max_steps": int(trainer["max_steps"]),
        "per_device_train_batch_size": int(trainer["per_device_train_batch_size"]),
        "gradient_accumulation_steps": int(trainer["gradient_accumulation_steps"]),
        "learning_rate": float(trainer["learning_rate"]),
        "lr_scheduler_type": trainer["lr_scheduler_type"],
        "warmup_steps": trainer["warmup"],
        "weight_decay": float(trainer["weight_decay"]),
        "max_grad_norm": float(trainer["max_grad_norm"]),
        "logging_steps": int(trainer["logging_steps"]),
        "save_strategy": "steps",
        "save_steps": int(trainer["save_steps"]),
        "save_total_limit": trainer.get("save_total_limit"),
        "seed": int(trainer["seed"]),
        "data_seed": int(trainer["seed"]),
        "bf16": bf16,
        "use_cpu": not gpu,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    if trainer.get("fsdp"):
        args["fsdp"] = trainer["fsdp"]
        args["fsdp_config"] = dict(trainer.get("fsdp_config") or {})
    args.update(dict(trainer.get("extra") or {}))
    return args


class JsonlLogger:
    """A TrainerCallback writing every log entry (loss, rewards, lr, step) to DIR/log.jsonl.

    Built lazily from transformers.TrainerCallback so importing this module stays light."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class _Logger(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 (HF signature)
                if logs and state.is_world_process_zero:
                    with open(path, "a") as fh:
                        fh.write(json.dumps({"step": state.global_step, **logs}, default=float) + "\n")

        return _Logger()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """DIR/log.jsonl as a list of dicts (what tests and users plot)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_and_finish(trainer: Any, processor: Any, run: Path, cfg: Any) -> dict[str, Any]:
    """Train (or resume) in `run` to `trainer.max_steps`, then save DIR/final: the one loop SFT and RL share."""
    resume = announce_resume(run, int(trainer.args.max_steps))
    restore_weights(trainer, resume, cfg)
    trainer.train(resume_from_checkpoint=resume)
    return finish(trainer, processor, run)


def finish(trainer, processor, run: Path) -> dict[str, Any]:
    """Save the final model + processor to DIR/final and return the last logged metrics."""
    final = run / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(final))
    history = trainer.state.log_history
    return {"global_step": trainer.state.global_step, "final": str(final), "last_log": history[-1] if history else {}}
