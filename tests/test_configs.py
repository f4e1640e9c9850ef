"""One home per setting: typed configs, what conf/ resolves to, the one registry.

Every stage, adapter, backend and filter rule declares its settings once (a `Config` dataclass, see
pipeline/settings.py); the yaml files under conf/ name those defaults in their `defaults:` list and keep
only what differs. These tests compose the real conf/ with Hydra and hold the two to each other, check
the one-line errors a typed config gives, and the one registry's behaviour (idempotent by
module.qualname, a clash names both, an unknown name names the key that asked).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from pipeline.config import compose, compose_plan
from pipeline.errors import ConfigError
from pipeline.registry import STAGES, Registry, UnknownName, load_plugins

REPO = Path(__file__).resolve().parents[1]
load_plugins()

#: The config groups that hold a stage's block, and the stage each block configures (the default
#: DAG's `config:` keys; verify is the optional node of stages/verify.py).
STAGE_GROUPS = {"source": "source", "sample": "sample", "annotator": "annotate", "align": "align",
                "filter": "filter", "shard": "shard", "verify": "verify"}
OPTIONS = [(group, path.stem) for group in STAGE_GROUPS for path in sorted((REPO / "conf" / group).glob("*.yaml"))]


def _block(group: str, option: str) -> dict[str, Any]:
    """The stage block `group=option` resolves to in the build config (verify is added with `+`)."""
    override = f"+verify={option}" if group == "verify" else f"{group}={option}"
    return OmegaConf.to_container(compose([override])[group], resolve=True)


def _own_keys(group: str, option: str) -> dict[str, Any]:
    """What the yaml file itself sets: its keys, and what its defaults list places under a key of its
    own (`/prompts@prompts: v1`); the settings nodes it names (`@_here_`) are the defaults."""
    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{option}.yaml"), resolve=False) or {}
    own = {k: v for k, v in data.items() if k != "defaults"}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            (name, choice), = entry.items()
            own[name.split("@")[-1]] = f"{name}: {choice}"
    return own


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_each_setting_resolves_to_its_one_default_unless_the_yaml_differs(group: str, option: str) -> None:
    """What conf/ resolves to, per stage block: every declared setting and nothing else; where the
    yaml file is silent, the dataclass default; where it speaks, a value that differs from it."""
    cls = STAGES[STAGE_GROUPS[group]]
    block, own = _block(group, option), _own_keys(group, option)
    defaults: dict[str, Any] = {}
    for _, part in cls.config_parts(block):
        defaults.update(part.defaults())
    assert set(block) == set(defaults), f"conf/{group}/{option}.yaml: keys no setting declares or settings missing"
    for key, default in defaults.items():
        if key in own:
            assert own[key] != default, f"conf/{group}/{option}.yaml: {key}: {own[key]!r} is the default: leave it out"
        else:
            assert block[key] == default, f"{group}.{key}: conf/ resolves to {block[key]!r}, the default is {default!r}"


def test_the_default_build_is_valid_and_every_node_reads_its_typed_config() -> None:
    plan = compose_plan()
    for name in plan.order:
        spec = plan.nodes[name]
        stage = spec.stage_cls(spec.config)
        assert isinstance(stage.cfg, spec.stage_cls.Config)
        assert stage.cfg.as_dict().items() <= spec.config.items()


def test_a_setting_only_the_dataclass_declares_is_overridable() -> None:
    """align.gt_tolerance_s is in no yaml file, yet Hydra overrides it, and the typo helper knows it."""
    assert "gt_tolerance_s" not in (REPO / "conf" / "align" / "default.yaml").read_text()
    assert compose_plan(["align.gt_tolerance_s=0.5"]).nodes["align"].config["gt_tolerance_s"] == 0.5
    with pytest.raises(ConfigError, match=r"did you mean align\.gt_tolerance_s\?"):
        compose(["align.gt_tolerence_s=0.5"])


@pytest.mark.parametrize(("override", "expected"), [
    ("sample.fps=fast", "sample.fps: expected float, got str 'fast'"),
    ("sample.fps=0", "sample.fps: must be > 0, got 0"),
    ("shard.rl_fraction=1.5", "shard.rl_fraction: must lie in [0, 1], got 1.5"),
    ("sample.min_frames=64", "sample.min_frames: must be <= max_frames (32), got 64"),
    ("align.gt_tolerance_s=-1", "align.gt_tolerance_s: must be >= 0, got -1"),
    ("sample.embed_jpeg=null", "sample.embed_jpeg: expected true or false, got null"),
    ("filter.rules.claim_iou.threshold=high", "filter.rules.claim_iou.threshold: expected float, got str 'high'"),
    ("annotator.backend=nope", "annotator.backend: unknown backend 'nope' (known: "),
    ("source.adapter=nope", "source.adapter: unknown adapter 'nope' (known: "),
    ("source=vidstg", "source.annotations: required by source adapter 'vidstg' but missing"),
])
def test_a_bad_setting_is_one_line_naming_the_dotted_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_plan([override])
    assert str(info.value).startswith(expected), str(info.value)


def test_a_key_nothing_declares_is_refused_with_the_closest_setting() -> None:
    from stages.sample import SampleStage

    (problem,) = SampleStage.validate_config({"max_frame": 16})
    assert problem == "max_frame: unknown key for stage 'sample' (did you mean max_frames?)"
    (problem,) = SampleStage.validate_config({"colour": "red"})
    assert problem.startswith("colour: unknown key for stage 'sample'; it takes ") and "jpeg_max_side" in problem


def test_the_backend_and_adapter_settings_come_with_the_one_they_name() -> None:
    """annotator=openai: the stage's settings plus the openai backend's (and its how-to-run ones stay
    out of the fingerprint); source=vidstg: the stage's plus the adapter's (its paths made absolute)."""
    from stages.annotate import AnnotateStage

    block = _block("annotator", "openai")
    assert {"concurrency", "api_key_env", "base_url", "batch_size", "image_max_side", "prompts"} <= set(block)
    excluded = set(AnnotateStage.excluded_keys(block))
    assert {"concurrency", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "api_key_env", "batch_size",
            "num_cpus", "num_gpus", "num_actors", "memory", "price"} == excluded
    assert AnnotateStage.marked_keys(block, "env") == ("api_key_env",)
    plan = compose_plan(["source=vidstg", "source.annotations=anno.json", "source.video_dir=videos"])
    config = plan.nodes["source"].config
    assert config["annotations"] == os.path.abspath("anno.json") and config["trajectories_dir"] is None
    assert config["key_frames_per_track"] == 3 and config["allow_outside_video_dir"] is False


def test_a_partial_rule_entry_means_its_whole_entry() -> None:
    from stages.filter import FilterStage
    from stages.lib.rules import rule_defaults

    partial = FilterStage({"rules": {"claim_iou": {"threshold": 0.6}}}).cfg.rules
    assert partial == {**rule_defaults(), "claim_iou": {"enabled": True, "threshold": 0.6}}
    assert FilterStage({}).cfg.rules == rule_defaults() == compose_plan().nodes["filter"].config["rules"]


# --- the one registry ----------------------------------------------------------------------------------


def test_registering_the_same_class_again_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ray's workers do, importing a module again makes new class objects of the same module.qualname:
    the registry keeps the newest; another class under the name is an error naming both."""
    (tmp_path / "plugin_a.py").write_text("from tests.test_configs import THINGS\n\n"
                                          "@THINGS.register\nclass Thing:\n    name = 'thing'\n")
    (tmp_path / "plugin_b.py").write_text("from tests.test_configs import THINGS\n\n"
                                          "@THINGS.register\nclass Other:\n    name = 'thing'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = importlib.import_module("plugin_a").Thing
    again = importlib.reload(sys.modules["plugin_a"]).Thing
    assert again is not first and THINGS["thing"] is again and list(THINGS) == ["thing"]
    with pytest.raises(ValueError, match=r"thing' is taken by plugin_a\.Thing; plugin_b\.Other cannot register"):
        importlib.import_module("plugin_b")
    with pytest.raises(UnknownName, match=r"^things\.kind: unknown thing 'nope' \(known: thing\)$"):
        THINGS.lookup("nope", "things.kind")


THINGS: Registry[Any] = Registry("thing")


def test_an_unknown_backend_names_the_key_of_whoever_asked() -> None:
    from stages.backends import make_backend

    for key in ("annotator.backend", "verify.backend", "judge.backend"):
        with pytest.raises(UnknownName, match=rf"^{re.escape(key)}: unknown backend 'nope'"):
            make_backend({"backend": "nope"}, key)
    with pytest.raises(ConfigError, match=r"^model: required by backend 'openai' but missing$"):
        make_backend({"backend": "openai"}, "judge.backend")


def test_one_definition_of_each_fact() -> None:
    """The default of gt_tolerance_s and the registry class each stand in one place of the tree."""
    listed = subprocess.run(["git", "ls-files", "pipeline", "stages", "train", "conf"], cwd=REPO, text=True,
                            capture_output=True, check=True).stdout.split()

    def places(pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [path for path in listed if path.endswith((".py", ".yaml"))
                for line in (REPO / path).read_text().splitlines() if regex.search(line)]

    assert places(r"gt_tolerance_s.*0\.25|0\.25.*gt_tolerance") == ["stages/lib/truth.py"]
    assert places(r"^class Registry\b") == ["pipeline/registry.py"]
    # every registry of names is that class: no module keeps its own dict of classes by name
    assert places(r"^[A-Z_]+: dict\[str, (type\[|Writer)") == []


# --- the examples of docs/stages.md -----------------------------------------------------------------------

EXERCISE = """
import json, sys
import pyarrow as pa
from pipeline.registry import STAGES
from pipeline.testing import unit_context
from stages.backends import make_backend
from stages.filter import FilterStage
from stages.lib.chat import ChatRequest
from stages.lib.rules import rule_defaults
from stages.source import SourceStage
from tests.record_factory import make_record
from stages.lib.schema import to_table

run, annotations = sys.argv[1], sys.argv[2]
stage = STAGES["min_duration"]
media = [{"uri": "a.mp4", "duration_s": 1.0}, {"uri": "b.mp4", "duration_s": 9.0}]
kept = stage({}).process(pa.table({"id": ["a", "b"], "media": media}), unit_context(run)).table
seeds = SourceStage({"adapter": "spans", "annotations": annotations, "video_dir": run})
(echo,) = make_backend({"backend": "echo", "words": 2}).generate([ChatRequest(prompt="one two three")])
claims = FilterStage({"rules": {"enough_claims": {"enabled": True}}}).process(
    to_table([make_record(0, scores={"num_claims": 0, "problems": [], "times": [], "claims": []})]), unit_context(run))
print(json.dumps({"validate": stage.validate_config({"seconds": 0}), "kept": kept.column("id").to_pylist(),
                  "seeds": seeds.process(None, unit_context(run)).table.column("answer_span").to_pylist(),
                  "echo": echo, "rule": rule_defaults()["enough_claims"],
                  "rejected": sorted({r.rule for r in claims.rejections})}))
"""


def test_the_examples_of_the_stage_guide_run(tmp_path: Path) -> None:
    """docs/stages.md's stage, adapter, backend and rule, as written there, in a fresh interpreter."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "stages.md").read_text(), re.S)
    assert len(blocks) == 4
    (tmp_path / "guide.py").write_text("\n\n".join(blocks))
    annotations = tmp_path / "spans.json"
    annotations.write_text(json.dumps([{"video": "v1", "start": 1.0, "end": 2.5}]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", "import guide\n" + EXERCISE, str(tmp_path), str(annotations)],
                          cwd=REPO, env=env, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["validate"] == ["seconds: must be > 0, got 0"]
    assert result["kept"] == ["b"] and result["seeds"] == [[1.0, 2.5]]
    assert result["echo"] == "<think>one two</think><answer></answer>"
    assert result["rule"] == {"enabled": False, "threshold": 1} and "enough_claims" in result["rejected"]


# --- fingerprints across a refactor ----------------------------------------------------------------------

BASE = os.environ.get("STGR_FINGERPRINT_BASE")
#: Nodes whose own settings (or version) are meant to differ from the base revision's, comma-separated.
CHANGED = set(filter(None, os.environ.get("STGR_FINGERPRINT_CHANGED", "").split(",")))
DUMP = """
import json
from pipeline.config import compose_plan
from pipeline.fingerprint import stage_fingerprint
plan, out, fps = compose_plan(), {}, {}
for name in plan.order:
    spec = plan.nodes[name]
    cls, excluded = spec.stage_cls, set(spec.stage_cls.excluded_keys(spec.config))
    fps[name] = stage_fingerprint(cls.name, cls.version, spec.config, [fps[u] for u in spec.after], excluded)
    out[name] = {"fingerprint": fps[name], "version": cls.version, "after": spec.after,
                 "config": {k: v for k, v in spec.config.items() if k not in excluded}}
print(json.dumps(out, default=str))
"""


def _fingerprints(tree: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", DUMP], cwd=tree, env=env, text=True, capture_output=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not BASE, reason="set STGR_FINGERPRINT_BASE=<git revision> to compare with that revision")
def test_the_default_build_keeps_the_fingerprints_of_the_base_revision(tmp_path: Path) -> None:
    """The default synthetic build's plan, here and at STGR_FINGERPRINT_BASE (checked out in a temporary
    worktree): the same nodes, less the new ones, which STGR_FINGERPRINT_CHANGED must name; every node
    has the same version and fingerprinted settings, except the nodes named in STGR_FINGERPRINT_CHANGED,
    and the same fingerprint unless one of those, or a node upstream, changed."""
    base = tmp_path / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), str(BASE)], cwd=REPO, check=True,
                   capture_output=True)
    try:
        before, after = _fingerprints(base), _fingerprints(REPO)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=True)
    added = [node for node in after if node not in before]
    assert [node for node in after if node in before] == list(before) and set(added) <= CHANGED, \
        f"nodes removed, reordered or added without naming them in STGR_FINGERPRINT_CHANGED: {list(before)} -> {list(after)}"
    moved: set[str] = set(added)
    for node, now in after.items():
        if node in added:
            continue
        own = (now["version"], now["config"]) != (before[node]["version"], before[node]["config"])
        assert not own or node in CHANGED, f"{node}: its settings or version changed: {before[node]} -> {now}"
        if now["fingerprint"] != before[node]["fingerprint"]:
            assert own or moved & set(now["after"]), f"{node}: a new fingerprint with the same settings and upstream"
            moved.add(node)
