"""Build configuration: compose with Hydra, validate the DAG before anything runs.

Every mistake is reported as one ConfigError line naming the key (`dag.sample.after`, `sample.fps`)
so the CLI can print it and exit 2 without touching the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.registry import STAGES, load_plugins
from pipeline.stage import Stage

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), config_name: str = "build", conf_dir: Path | None = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides; Hydra's own errors become ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir or CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config: {' '.join(str(exc).split())}") from exc
    return cfg


@dataclass
class StageSpec:
    """One node of the DAG: which stage class runs, on which config key, after which nodes."""

    node: str
    stage_cls: type[Stage]
    config_key: str
    config: dict[str, Any]
    after: list[str] = field(default_factory=list)


@dataclass
class BuildPlan:
    """A validated DAG in topological order."""

    nodes: dict[str, StageSpec]
    order: list[str]
    max_attempts: int
    config: dict[str, Any]

    def downstream(self, node: str) -> list[str]:
        return [n for n in self.order if node in self.nodes[n].after]


def _as_dict(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def validate(cfg: DictConfig | Mapping[str, Any]) -> BuildPlan:
    """Check the DAG and every stage's config; return the plan or raise ConfigError naming the key."""
    config = _as_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    plugins = config.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"plugins: expected a list of module names, got {type(plugins).__name__}")
    try:
        load_plugins(plugins)
    except ImportError as exc:
        raise ConfigError(f"plugins: cannot import {exc.name or exc}") from exc
    max_attempts = config.get("max_attempts", 3)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise ConfigError(f"max_attempts: expected a positive int, got {max_attempts!r}")
    dag = config.get("dag")
    if not isinstance(dag, dict) or not dag:
        raise ConfigError("dag: missing or empty; it maps node names to {stage, config, after}")
    nodes: dict[str, StageSpec] = {}
    for node, spec in dag.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"dag.{node}: expected a mapping with keys stage, config, after")
        stage_name = spec.get("stage")
        if stage_name is None:
            raise ConfigError(f"dag.{node}.stage: missing")
        if stage_name not in STAGES:
            known = ", ".join(sorted(STAGES)) or "none"
            raise ConfigError(f"dag.{node}.stage: unknown stage '{stage_name}' (known: {known})")
        after = spec.get("after") or []
        if not isinstance(after, list):
            raise ConfigError(f"dag.{node}.after: expected a list of node names, got {after!r}")
        for upstream in after:
            if upstream not in dag:
                raise ConfigError(f"dag.{node}.after: unknown node '{upstream}'")
        config_key = spec.get("config", node)
        stage_cfg = config.get(config_key)
        if stage_cfg is None:
            stage_cfg = {}
        if not isinstance(stage_cfg, dict):
            raise ConfigError(f"{config_key}: expected a mapping, got {type(stage_cfg).__name__}")
        cls = STAGES[stage_name]
        if cls.source and after:
            raise ConfigError(f"dag.{node}.after: source stage '{stage_name}' takes no input")
        if not cls.source and not after:
            raise ConfigError(f"dag.{node}.after: stage '{stage_name}' needs an upstream node")
        problems = cls.validate_config(stage_cfg)
        if problems:
            raise ConfigError(f"{config_key}.{problems[0]}")
        for key in cls.path_keys:
            value = stage_cfg.get(key)
            if isinstance(value, str) and value and value != "???" and "://" not in value:
                stage_cfg[key] = os.path.abspath(os.path.expanduser(value))
        nodes[node] = StageSpec(node, cls, config_key, stage_cfg, list(after))
    try:
        order = list(TopologicalSorter({n: s.after for n, s in nodes.items()}).static_order())
    except CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise ConfigError(f"dag: cycle {cycle}") from exc
    sources = [n for n in order if nodes[n].stage_cls.source]
    if not sources:
        raise ConfigError("dag: no source stage")
    return BuildPlan(nodes=nodes, order=order, max_attempts=max_attempts, config=config)


def to_yaml(config: Mapping[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dict(config)))


def from_yaml(text: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
