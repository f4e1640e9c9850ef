"""`stgr build` / `stgr resume`: validate, connect to Ray, run what is not committed, report."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import ray
from omegaconf import OmegaConf

from pipeline.config import BuildPlan, compose, from_yaml, to_yaml, validate
from pipeline.errors import EXIT_FAILED_UNITS, EXIT_OK, EXIT_UNUSABLE, ConfigError
from pipeline.executor import NodeState, Outcome, execute, resolve_nodes, write_plan
from pipeline.progress import Progress
from pipeline.rundir import RunDir, Unit, read_commit

log = logging.getLogger("stgr")


#: The driver's variables every Ray worker gets, build stages and `stgr train` workers alike: offline
#: hub flags and cache, Ray's auth mode, the fixtures root, tokenizer threading.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "STGR_FIXTURES", "HF_HOME",
                 "TOKENIZERS_PARALLELISM")


def forwarded_env_names(plan: BuildPlan | None) -> list[str]:
    """Variables named by the stages' `env_keys` (e.g. `annotator.api_key_env`), for the workers."""
    if plan is None:
        return []
    names = []
    for spec in plan.nodes.values():
        for key in spec.stage_cls.env_keys:
            name = spec.config.get(key)
            if isinstance(name, str) and name:
                names.append(name)
    return names


def worker_env(plan: BuildPlan | None = None) -> dict[str, str]:
    """Environment every worker gets: the driver's import path (plugins), offline flags, and the
    variables the stages name (API keys). It travels in Ray's runtime env, never in the run directory."""
    paths = [os.getcwd(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for key in (*FORWARDED_ENV, *forwarded_env_names(plan)):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def connect(cluster: dict[str, Any], plan: BuildPlan | None = None) -> bool:
    """Join `cluster.address` / RAY_ADDRESS, or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = cluster.get("address") or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env(plan)}
    if address:
        # A Ray Job's driver already runs in the job's runtime env (set by `--submit`); Ray refuses a second.
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env=None if in_job else runtime_env, log_to_driver=True)
        return True
    kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": runtime_env}
    if cluster.get("num_cpus"):
        kwargs["num_cpus"] = int(cluster["num_cpus"])
    if cluster.get("temp_dir"):
        kwargs["_temp_dir"] = str(cluster["temp_dir"])
    ray.init(**kwargs)
    return True


def collect_reports(run: RunDir, states: dict[str, NodeState], outcome: Outcome,
                    fresh: dict[Unit, dict[str, Any]]) -> list[dict[str, Any]]:
    """The `StageReport`s of the committed units, in DAG order.

    A unit committed by this build returned its commit record to the driver (`fresh`); a reused one,
    or one a straggler committed first, is read back from the run directory, so a resumed build
    reports exactly what the first one did.
    """
    order = {node: i for i, node in enumerate(states)}
    reports = []
    for unit in sorted(outcome.committed | outcome.reused, key=lambda u: (order[u.node], u.partition)):
        record = fresh.get(unit)
        if record is None or record.get("skipped"):
            record = read_commit(run, unit) or {}
        if record.get("report"):
            reports.append(record["report"])
    return reports


def run_build(run_dir: str, overrides: Sequence[str] = (), resume: bool = False,
              interactive: bool | None = None, config_dir: str | None = None, config_name: str = "build") -> int:
    """Build (or continue) the run in `run_dir` and print its summary.

    Exit code (pipeline.errors): 0 when every unit committed, 1 when one failed or was blocked, 3 when
    all committed but a stage reported its product unusable (an empty dataset). Raises
    ConfigError/InputError (exit 2) before anything is written when the config or an input file is
    unusable.
    """
    run = RunDir.open(run_dir)
    if resume:
        if not run.exists("config.yaml"):
            raise ConfigError(f"run: {run.uri} has no config.yaml; start it with `stgr build --run {run_dir}`")
        config = from_yaml(run.read_text("config.yaml"))
        if overrides:
            raise ConfigError("overrides: `stgr resume` reuses the stored config; use `stgr build` to change it")
    else:
        config = OmegaConf.to_container(compose(overrides, config_name, Path(config_dir).resolve() if config_dir else None), resolve=True)
    plan = validate(config)
    states = resolve_nodes(plan)
    build_id = config.get("build_id") or Path(run.path).name
    run.makedirs("")
    run.write_text("config.yaml", to_yaml(config))
    write_plan(run, states, build_id)
    started = connect(config.get("cluster") or {}, plan)
    fresh: dict[Unit, dict[str, Any]] = {}
    try:
        totals = {n: s.partitions for n, s in states.items()}
        with Progress(totals, interactive) as progress:
            def on_commit(unit: Unit, summary: dict[str, Any], reused: bool) -> None:
                if not reused:
                    fresh[unit] = summary
                progress.update(unit, summary, reused)

            outcome = execute(run, plan, states, build_id, on_commit, {"env_vars": worker_env(plan)})
    finally:
        if started:
            ray.shutdown()
    for unit, error in sorted(outcome.failed.items(), key=lambda kv: kv[0].key()):
        print(f"FAILED {unit.key()}: {error.splitlines()[0]}", file=sys.stderr)
    if outcome.pending:
        print(f"{len(outcome.pending)} unit(s) not run because an input failed", file=sys.stderr)
    print(f"{run.uri}: {len(outcome.committed)} unit(s) committed, {len(outcome.reused)} reused, "
          f"{len(outcome.failed)} failed, {len(outcome.pending)} blocked", file=sys.stderr, flush=True)
    reports = collect_reports(run, states, outcome, fresh)
    for report in reports:
        for line in report.get("summary") or []:
            print(line, flush=True)
    failures = [r["failure"] for r in reports if r.get("failure")]
    for line in failures:
        print(line, file=sys.stderr, flush=True)
    if not outcome.ok:
        return EXIT_FAILED_UNITS
    return EXIT_UNUSABLE if failures else EXIT_OK
