"""`stgr build` / `stgr resume`: validate, take the run's lease, connect to Ray, run what is not
committed (again after damaged units were invalidated), put published products in place, report."""
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
from pipeline.fingerprint import plan_digest
from pipeline.lease import DEFAULT_TTL_S, Lease, acquire
from pipeline.progress import Progress
from pipeline.rundir import CorruptUnit, RunDir, Unit, invalidate, is_committed, read_commit, read_verified_table
from pipeline.stage import Stage, UnitContext

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

    Exit code (pipeline.errors): 0 when every unit committed, 1 when one failed or was blocked (or the
    run directory itself failed: full, read-only, unreachable), 3 when all committed but a stage
    reported its product unusable (an empty dataset). Raises ConfigError/InputError (exit 2) before
    anything is written when the config or an input file is unusable, and LeaseHeld (exit 2) when a
    live build of another plan holds the run directory.
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
    ttl = config.get("lease_ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        raise ConfigError(f"lease_ttl_s: expected a positive number of seconds, got {ttl!r}")
    try:
        return _leased_build(run, plan, states, build_id, config, float(ttl), interactive)
    except OSError as exc:
        print(f"stgr: error: storage: {exc} (run directory {run.uri}); "
              f"`stgr resume {run.uri}` continues once it is fixed", file=sys.stderr, flush=True)
        return EXIT_FAILED_UNITS


def _leased_build(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str, config: dict[str, Any],
                  ttl: float, interactive: bool | None) -> int:
    """Take the run's lease, write config and plan, run the passes, release, print the summary."""
    run.makedirs("")
    digest = plan_digest({n: (s.fingerprint, s.partitions) for n, s in states.items()})
    lease = acquire(run, digest, build_id, ttl).start()
    fresh: dict[Unit, dict[str, Any]] = {}
    try:
        run.write_text("config.yaml", to_yaml(config))
        write_plan(run, states, build_id)
        started = connect(config.get("cluster") or {}, plan)
        try:
            with Progress({n: s.partitions for n, s in states.items()}, interactive) as progress:
                outcome = execute_passes(run, plan, states, build_id, progress, fresh)
        finally:
            if started:
                ray.shutdown()
    finally:
        lease.release()
    return summarise(run, states, outcome, fresh, lease)


def execute_passes(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str, progress: Progress,
                   fresh: dict[Unit, dict[str, Any]]) -> Outcome:
    """Execute the plan, then publish what committed units publish; again while that invalidated units.

    A unit that finds a damaged input invalidates it and fails; so does the publication of a unit
    whose own output is damaged. Another pass recomputes what was invalidated and then what failed
    for it. Each pass repairs one more level of a chain of damaged units, so the number of nodes
    bounds the passes. The outcome: units committed in any pass, units reused from before the build
    (and not recomputed), and the failures and blocked units of the last pass.
    """
    seen: set[Unit] = set()

    def on_commit(unit: Unit, summary: dict[str, Any], reused: bool) -> None:
        if not reused:
            fresh[unit] = summary
        if unit not in seen:  # a later pass reuses it, or recomputes it after an invalidation
            seen.add(unit)
            progress.update(unit, summary, reused)

    committed: set[Unit] = set()
    reused: set[Unit] | None = None
    for _ in range(len(plan.order) + 1):
        outcome = execute(run, plan, states, build_id, on_commit, {"env_vars": worker_env(plan)})
        committed |= outcome.committed
        reused = outcome.reused if reused is None else reused
        damaged = [u for u, error in outcome.failed.items() if error.startswith(f"{CorruptUnit.__name__}:")]
        if not publish_products(run, plan, states, build_id) and not damaged:
            break
        log.warning("damaged units were invalidated: running the build again to recompute them")
    settled = committed - set(outcome.failed) - outcome.pending
    return Outcome(committed=settled, reused=(reused or set()) - committed, failed=outcome.failed,
                   pending=outcome.pending)


def publish_products(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str) -> bool:
    """Put in place the products of committed units that publish one (shard's dataset) where they are
    missing or not this plan's, from the unit's verified output. True if a damaged unit was invalidated."""
    fingerprints = {n: s.fingerprint for n, s in states.items()}
    invalidated = False
    for node in plan.order:
        spec = plan.nodes[node]
        if spec.stage_cls.published is Stage.published:
            continue
        stage = spec.stage_cls(spec.config)
        for partition in range(states[node].partitions):
            unit = Unit(node, fingerprints[node], partition)
            if not is_committed(run, unit):
                continue
            ctx = UnitContext(stage=node, partition=partition, num_partitions=states[node].partitions, attempt=0,
                              fingerprint=unit.fingerprint, run_uri=run.uri, run_path=run.path, filesystem=run.fs,
                              build_id=build_id, fingerprints=fingerprints)
            if stage.published(ctx):
                continue
            try:
                table, _ = read_verified_table(run, unit)
                stage.publish(table, ctx)
            except CorruptUnit as exc:
                invalidate(run, exc.unit, str(exc))
                invalidated = True
                continue
            log.info("%s: its product was missing or not this plan's; republished from the committed unit", unit.key())
    return invalidated


def summarise(run: RunDir, states: dict[str, NodeState], outcome: Outcome, fresh: dict[Unit, dict[str, Any]],
              lease: Lease) -> int:
    """Print what failed and why, the counts and the stages' reports; the build's exit code."""
    for unit, error in sorted(outcome.failed.items(), key=lambda kv: kv[0].key()):
        print(f"FAILED {unit.key()}: {error.splitlines()[0]}", file=sys.stderr)
    if outcome.pending:
        print(f"{len(outcome.pending)} unit(s) not run because an input failed", file=sys.stderr)
    print(f"{run.uri}: {len(outcome.committed)} unit(s) committed, {len(outcome.reused)} reused, "
          f"{len(outcome.failed)} failed, {len(outcome.pending)} blocked", file=sys.stderr, flush=True)
    if not outcome.ok:
        print(f"`stgr resume {run.uri}` runs the failed and blocked units again once their cause is fixed",
              file=sys.stderr, flush=True)
    if lease.lost:
        print(f"stgr: this build lost the lease of {run.uri} to {lease.lost}: another build may have replaced "
              "what it wrote; check `stgr status` and resume", file=sys.stderr, flush=True)
    reports = collect_reports(run, states, outcome, fresh)
    for report in reports:
        for line in report.get("summary") or []:
            print(line, flush=True)
    failures = [r["failure"] for r in reports if r.get("failure")]
    for line in failures:
        print(line, file=sys.stderr, flush=True)
    if not outcome.ok or lease.lost:
        return EXIT_FAILED_UNITS
    return EXIT_UNUSABLE if failures else EXIT_OK
