"""Build configuration: compose with Hydra, validate the DAG before anything runs.

Every mistake is reported as one ConfigError line naming the key (`dag.sample.after`, `sample.fps`)
so the CLI can print it and exit 2 without touching the run directory. An override of a key that
does not exist names the closest key that does (`did you mean source.num_videos?`) instead of Hydra's
hint to add it with `+`, because following that hint builds with a key no stage reads; for the same
reason `+key=...` is refused when the config already has a key one typo away.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.registry import STAGES, Registry, load_plugins
from pipeline.stage import Stage

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Hydra's messages for an override of a key the config lacks (change or delete), and for a group option
#: that has no file.
_UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'|Could not delete from config\. '([^']+)' does not exist")
_UNKNOWN_OPTION = re.compile(r"Could not find '([^']+)'")
#: How alike a key must be to the one written to be offered as "did you mean" (difflib's ratio).
SIMILARITY = 0.75


def _hydra_compose(overrides: Sequence[str], config_name: str, conf_dir: Path) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def compose(overrides: Sequence[str] = (), config_name: str = "build", conf_dir: Path | None = None) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides; Hydra's own errors become one
    ConfigError line, an unknown key with the closest valid one."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir or CONF_DIR)
    _load_plugins(_named_plugins(overrides, conf_dir / f"{config_name}.yaml"))
    store_schemas()
    try:
        cfg = _hydra_compose(overrides, config_name, conf_dir)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config: {_explain(exc, overrides, config_name, conf_dir)}") from exc
    _refuse_added_typos(cfg, overrides)
    return cfg


def _named_plugins(overrides: Sequence[str], primary: Path) -> list[str]:
    """The `plugins:` modules of the primary config file (or of a `plugins=[...]` override), imported
    before composing so that their entries' settings nodes exist for the yaml files that name them.
    Anything unusable here is left to the composed config's own check (`validate`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    named: Any = None
    try:
        for override in OverridesParser.create().parse_overrides([o for o in overrides if o.startswith("plugins=")]):
            named = override.value()
        if named is None and primary.is_file():
            named = (OmegaConf.to_container(OmegaConf.load(primary), resolve=False) or {}).get("plugins")
    except Exception:  # noqa: BLE001 - a malformed file or override is reported by Hydra, with its key
        return []
    return [str(m) for m in named] if isinstance(named, list) else []


def _load_plugins(modules: Sequence[str]) -> None:
    try:
        load_plugins(modules)
    except ImportError as exc:
        raise ConfigError(f"plugins: cannot import {exc.name or exc}") from exc


def store_schemas() -> None:
    """Publish every registered entry's settings defaults to Hydra as `stgr/<schema>/<name>`
    (`stgr/stage/sample`, `stgr/adapter/vidstg`, `stgr/backend/openai`): a yaml file's `defaults:` list
    names them, so it keeps only what differs, and an override of any declared setting finds its key."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for registry in Registry.instances:
        if not registry.schema:
            continue
        for name, entry in registry.primary().items():
            settings = getattr(entry, "Config", None)
            if settings is not None:
                store.store(group=f"stgr/{registry.schema}", name=name, node=settings.defaults())


def _explain(exc: Exception, overrides: Sequence[str], config_name: str, conf_dir: Path) -> str:
    """Hydra's error in one line, naming the valid key or option closest to the one written."""
    text = " ".join(str(exc).split())
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        others = [o for o in overrides if _override_key(o) != key]
        try:
            base = _hydra_compose(others, config_name, conf_dir)
        except Exception:  # noqa: BLE001 - another override is wrong too: suggest from the defaults
            base = _hydra_compose([], config_name, conf_dir)
        return unknown_key(key, base)
    option = _UNKNOWN_OPTION.search(text)
    if option and "/" in option.group(1):
        group, name = option.group(1).rsplit("/", 1)
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        hint = difflib.get_close_matches(name, options, n=1, cutoff=SIMILARITY)
        said = f" (did you mean {group}={hint[0]}?)" if hint else ""
        return f"{group}={name}: no such option{said}; options: {', '.join(options) or 'none'}"
    if "missing EQUAL" in text:
        bad = re.search(r"override '([^']+)'", text)
        return f"override '{bad.group(1) if bad else text}' has no '=': write KEY=VALUE"
    return text.split(" Config search path:")[0]


def _override_key(override: str) -> str | None:
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        return OverridesParser.create().parse_overrides([override])[0].key_or_group
    except Exception:  # noqa: BLE001 - an unparsable override has no key; Hydra reports it
        return None


def closest_key(key: str, cfg: DictConfig, exclude: str | None = None) -> str | None:
    """The existing key most like `key`, correcting each part that is not there to its closest sibling
    (`filter.rules.claim_iuo.threshold` -> `filter.rules.claim_iou.threshold`); None when a part has none."""
    node: Any = cfg
    path: list[str] = []
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None
        names = [str(k) for k in node.keys() if ".".join([*path, str(k)]) != exclude]
        if part not in names:
            hit = difflib.get_close_matches(part, names, n=1, cutoff=SIMILARITY)
            if not hit:
                return None
            part = hit[0]
        path.append(part)
        node = node._get_node(part)
    corrected = ".".join(path)
    return corrected if corrected != key else None


def unknown_key(key: str, cfg: DictConfig) -> str:
    """`unknown key 'source.num_vidoes' (did you mean source.num_videos?)`, or the keys that exist there."""
    hint = closest_key(key, cfg)
    if hint:
        return f"unknown key '{key}' (did you mean {hint}?)"
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:depth])
        node = OmegaConf.select(cfg, parent, throw_on_missing=False)
        if isinstance(node, DictConfig):
            return f"unknown key '{key}'; {parent} has: {', '.join(str(k) for k in node.keys())}"
    return f"unknown key '{key}'; top-level keys: {', '.join(str(k) for k in cfg.keys())}"


def _refuse_added_typos(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """`+source.num_vidoes=8` adds a key beside `source.num_videos`, which no stage reads: refuse it."""
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = _override_key(override)
        if not key or "." not in key:
            continue  # `+group=option` adds a config group
        hint = closest_key(key, cfg, exclude=key)
        if hint:
            raise ConfigError(f"config: {override.split('=', 1)[0]} adds a key the config does not have "
                              f"(did you mean {hint}?)")


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


def expand_dag(dag: Mapping[str, dict[str, Any]],
               config: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The DAG after each stage's plan-time rewrite of its part, and the config blocks the rewrites add.

    Each node's stage class is asked (`Stage.expand_dag(node, dag, config)`), which returns None
    (nothing to rewrite) or the whole rewritten DAG plus new config blocks by config key
    (`annotator.tiers.0`), which the new nodes name in `config:`. Why at plan time: the nodes a rewrite adds are ordinary nodes, so resume,
    fingerprints and exactly-once hold for each of them, while the stored config (config.yaml) keeps
    what the user wrote and a resume expands it again the same way (annotate's cascade: one annotate
    -> align -> filter chain per tier). Only the nodes of the DAG as written are asked; a node naming
    no known stage is left for `validate` to report.
    """
    out, blocks = dict(dag), {}
    for node, spec in dag.items():
        name = spec.get("stage")
        known = isinstance(name, str) and name in STAGES and node in out
        rewritten = STAGES[name].expand_dag(node, out, config) if known else None
        if rewritten is not None:
            out, added = rewritten
            blocks.update(added)
    return out, blocks


def validate(cfg: DictConfig | Mapping[str, Any]) -> BuildPlan:
    """Check the DAG and every stage's config; return the plan or raise ConfigError naming the key."""
    config = _as_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    plugins = config.get("plugins") or []
    if not isinstance(plugins, list):
        raise ConfigError(f"plugins: expected a list of module names, got {type(plugins).__name__}")
    _load_plugins(plugins)
    max_attempts = config.get("max_attempts", 3)
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
        raise ConfigError(f"max_attempts: expected a positive int, got {max_attempts!r}")
    dag = config.get("dag")
    if not isinstance(dag, dict) or not dag:
        raise ConfigError("dag: missing or empty; it maps node names to {stage, config, after}")
    for node, spec in dag.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"dag.{node}: expected a mapping with keys stage, config, after")
    dag, blocks = expand_dag(dag, config)
    nodes: dict[str, StageSpec] = {}
    for node, spec in dag.items():
        stage_name = spec.get("stage")
        if stage_name is None:
            raise ConfigError(f"dag.{node}.stage: missing")
        cls = STAGES.lookup(stage_name, f"dag.{node}.stage")
        after = spec.get("after") or []
        if not isinstance(after, list):
            raise ConfigError(f"dag.{node}.after: expected a list of node names, got {after!r}")
        for upstream in after:
            if upstream not in dag:
                raise ConfigError(f"dag.{node}.after: unknown node '{upstream}'")
        config_key = spec.get("config", node)
        stage_cfg = blocks[config_key] if config_key in blocks else config.get(config_key)
        if stage_cfg is None:
            stage_cfg = {}
        if not isinstance(stage_cfg, dict):
            raise ConfigError(f"{config_key}: expected a mapping, got {type(stage_cfg).__name__}")
        if cls.source and after:
            raise ConfigError(f"dag.{node}.after: source stage '{stage_name}' takes no input")
        if not cls.source and not after:
            raise ConfigError(f"dag.{node}.after: stage '{stage_name}' needs an upstream node")
        problems = cls.validate_config(stage_cfg)
        if problems:
            raise ConfigError(f"{config_key}.{problems[0]}")
        stage_cfg = cls.resolved_config(stage_cfg)
        for key in cls.marked_keys(stage_cfg, "path"):
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


def compose_plan(overrides: Sequence[str] = (), config_name: str = "build", conf_dir: str | Path | None = None) -> BuildPlan:
    """Compose and validate in one step: the plan of a new build (its `config` resolved, paths made absolute)."""
    cfg = compose(overrides, config_name, Path(conf_dir).resolve() if conf_dir else None)
    return validate(OmegaConf.to_container(cfg, resolve=True))


def to_yaml(config: Mapping[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dict(config)))


def from_yaml(text: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
