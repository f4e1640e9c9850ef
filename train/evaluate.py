"""`stgr eval`: a checkpoint on a V-STaR file, a multiple-choice video benchmark (Video-MME,
WorldSense, VideoMMMU, or a generic file) or an STGR split -> per-sample JSON + Markdown report.

    OUT/results.json     every per-sample score and what was parsed from each answer, plus aggregates
    OUT/report.md        the V-STaR, benchmark or STGR table with the benchmark's breakdowns
    OUT/config.yaml      the resolved config of the latest run
    OUT/completions/     every model call's completion, one file each (see train/eval/store.py)

The run has three phases, each resumable on its own: answers (and N sampled answers for test-time
scaling), then crop checks of the samples' cited evidence, then judge scores of free-form answers.
A rerun with the same config skips every stored call; the report is always recomputed from the
stored completions, so it is cheap to regenerate and identical each time.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.config import compose
from pipeline.errors import ConfigError, InputError
from stages.backends import make_backend
from stages.lib.cost import unit_cost, unpriced
from stages.lib.render import FramePolicy
from train.eval.judge import JudgeCalls
from train.eval.mcq_data import FORMATS as MCQ_FORMATS, detect_format as detect_mcq_format
from train.eval.report import vstar_groups, vstar_markdown
from train.eval.runner import Runner
from train.eval.store import CompletionStore, fingerprint
from train.eval.vstar import VStarEval
from train.eval.vstar_data import is_vstar_file, load_vstar

log = logging.getLogger("stgr.eval")

FORMATS = ("auto", "vstar", "stgr", *MCQ_FORMATS)


def load_config(model: str, data: str, overrides: Sequence[str] = ()) -> DictConfig:
    """conf/eval/default.yaml with the Hydra overrides; --model and --data win over overrides."""
    cfg = compose([*overrides, f"model.path={model}", f"data.path={data}"], config_name="eval/default")
    if cfg.data.format not in FORMATS:
        raise ConfigError(f"data.format: expected one of {list(FORMATS)}, got {cfg.data.format!r}")
    if int(cfg.tts.num_samples) < 1:
        raise ConfigError(f"tts.num_samples: must be >= 1, got {cfg.tts.num_samples}")
    for key in ("data.max_frames", "generation.batch_size", "generation.max_new_tokens", "tts.max_crops"):
        if int(OmegaConf.select(cfg, key)) < 1:
            raise ConfigError(f"{key}: must be >= 1, got {OmegaConf.select(cfg, key)}")
    if float(cfg.data.fps) <= 0:
        raise ConfigError(f"data.fps: must be > 0, got {cfg.data.fps}")
    return cfg


def _model_stamp(path: str) -> Any:
    """What identifies the weights: file names, sizes and mtimes of a local checkpoint directory
    (a retrained checkpoint at the same path must not reuse old completions), else the hub id."""
    p = Path(path)
    if not p.is_dir():
        return path
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())


def model_backend_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    model = cfg["model"]
    return {"backend": cfg["backend"], "model": model["path"], "revision": model.get("revision"),
            "dtype": model.get("dtype"), "attn_implementation": model.get("attn_implementation"),
            **dict(cfg.get("backend_options") or {})}


def judge_backend_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    judge = cfg["judge"]
    if not judge.get("backend"):
        return None
    return {"backend": judge["backend"], "model": judge.get("model"), **dict(judge.get("options") or {})}


def detect_format(cfg: Mapping[str, Any]) -> str:
    """`data.format`, or for `auto`: a benchmark in its published layout, a V-STaR file, else an
    STGR split (the generic multiple-choice format `mcq` is never guessed: it needs `mcq.fields`)."""
    fmt = cfg["data"]["format"]
    if fmt != "auto":
        return fmt
    path = cfg["data"]["path"]
    return detect_mcq_format(path) or ("vstar" if is_vstar_file(path) else "stgr")


def run_eval(model: str, data: str, out: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate; returns the result written to OUT/results.json."""
    cfg_node = load_config(model, data, overrides)
    cfg = OmegaConf.to_container(cfg_node, resolve=True)
    assert isinstance(cfg, dict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node))
    fmt = detect_format(cfg)
    policy = FramePolicy.from_config(cfg["model"], cfg["data"])
    if fmt == "vstar":
        items = load_vstar(cfg["data"]["path"])
        if cfg["data"].get("max_records") is not None:
            items = items[: int(cfg["data"]["max_records"])]
        if not cfg["data"].get("video_dir"):
            raise ConfigError("data.video_dir: required for a V-STaR file (clips are read as <video_dir>/<vid>.mp4)")
        if not Path(cfg["data"]["video_dir"]).is_dir():
            raise InputError(f"data.video_dir: {cfg['data']['video_dir']} is not a directory")
        evaluation: Any = VStarEval(items, cfg, policy)
    elif fmt in MCQ_FORMATS:
        from train.eval.mcq import McqEval

        evaluation = McqEval.from_config(fmt, cfg, policy)
    else:
        from train.eval.stgr import StgrEval

        evaluation = StgrEval.from_config(cfg, policy)

    model_key = {"model": _model_stamp(cfg["model"]["path"]), "backend": unpriced(model_backend_config(cfg)),
                 "frames": {k: cfg["model"].get(k) for k in ("box_frame", "min_pixels", "max_pixels")},
                 "data": {k: cfg["data"].get(k) for k in ("fps", "max_frames", "system_prompt", "instruction")},
                 "generation": {"max_new_tokens": cfg["generation"]["max_new_tokens"]},
                 "vstar": cfg["vstar"], "tts": cfg["tts"]}
    if fmt in MCQ_FORMATS:
        model_key["mcq"] = {k: cfg["mcq"].get(k) for k in ("instruction", "hints")}
    backend = make_backend(model_backend_config(cfg), "backend")
    runner = Runner(backend, CompletionStore(out, fingerprint(model_key)), int(cfg["generation"]["batch_size"]))
    judge_config = judge_backend_config(cfg)
    judge_backend = backend if judge_config is None else make_backend(judge_config, "judge.backend")
    judge_key = {"judge": {**cfg["judge"], "options": unpriced(cfg["judge"].get("options") or {})},
                 "model": model_key if judge_config is None else unpriced(judge_config)}
    judge_runner = Runner(judge_backend, CompletionStore(out, "judge-" + fingerprint(judge_key)),
                          int(cfg["generation"]["batch_size"]))
    judge = JudgeCalls(judge_runner, cfg["judge"])
    try:
        runner.run(evaluation.answer_calls())
        runner.run(evaluation.crop_calls(runner))
        judge_runner.run(evaluation.judge_calls(runner, judge))
    finally:
        backend.close()
        if judge_backend is not backend:
            judge_backend.close()
    samples = evaluation.score(runner, judge)
    result: dict[str, Any] = {
        "format": fmt, "model": cfg["model"]["path"], "backend": cfg["backend"], "data": cfg["data"]["path"],
        "judge": (judge_config or {}).get("model") or f"{cfg['model']['path']} (the model under test)",
        "calls": {"generated": runner.generated + judge_runner.generated, "reused": runner.reused + judge_runner.reused},
        "cost": {"model": unit_cost(runner.meter, backend), "judge": unit_cost(judge_runner.meter, judge_backend)},
    }
    if fmt == "vstar":
        result["summary"] = vstar_groups(samples)
        result["samples"] = samples
        markdown = vstar_markdown(result)
    elif fmt in MCQ_FORMATS:
        from train.eval.mcq import mcq_markdown

        result.update(summary=evaluation.summary(samples), skipped=evaluation.data.skipped, samples=samples)
        markdown = mcq_markdown(result)
    else:
        from train.eval.stgr import stgr_markdown, stgr_summary

        result["summary"] = stgr_summary(samples)
        result["samples"] = samples
        markdown = stgr_markdown(result)
    _write(out / "results.json", json.dumps(result, indent=1, ensure_ascii=False))
    _write(out / "report.md", markdown + "\n")
    log.info("eval: wrote %s and %s", out / "results.json", out / "report.md")
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
