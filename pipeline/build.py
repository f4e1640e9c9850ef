"""`stgr build` / `stgr resume`: validate, take the run's lease, connect to Ray, run what is not
committed (again after damaged units were invalidated), put published products in place, report.

A run whose every unit is committed is settled without Ray (starting it costs tens of seconds to say
that nothing is left). Ctrl-C ends the build with one line saying what is committed and the exact
`stgr resume` command, exit 130: committed units are safe by construction (rundir's commit protocol),
so an interrupt is a normal way to stop a build. `--dry-run` and `--print-config` say what a build
would do and with which config, writing nothing and starting nothing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import ray

from pipeline.config import BuildPlan, compose_plan, from_yaml, to_yaml, validate
from pipeline.errors import EXIT_FAILED_UNITS, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNUSABLE, ConfigError
from pipeline.executor import NodeState, Outcome, execute, resolve_nodes, write_plan
from pipeline.scheduler import unit_inputs
from pipeline.fingerprint import plan_digest
from pipeline.lease import DEFAULT_TTL_S, Lease, acquire
from pipeline.progress import Progress, format_seconds
from pipeline.redact import secret_names
from pipeline.rundir import CorruptUnit, RunDir, Unit, invalidate, is_committed, part_name, read_commit
from pipeline.stored import read_input
from pipeline.stage import Stage, UnitContext
from pipeline.status import open_run

log = logging.getLogger("stgr")


#: The driver's variables every Ray worker gets, build stages and `stgr train` workers alike: offline
#: hub flags and cache, Ray's auth mode, the fixtures root, tokenizer threading.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "STGR_FIXTURES", "HF_HOME",
                 "TOKENIZERS_PARALLELISM")


def worker_env() -> dict[str, str]:
    """Environment every worker gets: the driver's import path (plugins) and the offline flags. It
    travels in Ray's runtime env, which Ray's runtime-env agent logs, so it holds no secret: the
    variables the stages name (API keys) go to the units in their tasks (pipeline.redact)."""
    paths = [os.getcwd(), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    for key in FORWARDED_ENV:
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def job_env(plan: BuildPlan | None) -> dict[str, str]:
    """`worker_env` plus the secret variables the plan names: the environment of a `--submit`ted
    driver, which runs on the cluster and has no other way to get them (docs/annotators.md)."""
    return {**worker_env(), **{name: os.environ[name] for name in secret_names(plan) if name in os.environ}}


def connect(cluster: dict[str, Any]) -> bool:
    """Join `cluster.address` / RAY_ADDRESS, or start an embedded local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = cluster.get("address") or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
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


def load_plan(run_dir: str, overrides: Sequence[str] = (), resume: bool = False, config_dir: str | None = None,
              config_name: str = "build") -> tuple[RunDir, dict[str, Any], BuildPlan]:
    """The run directory, the resolved config (the stored one for a resume) and the validated plan;
    ConfigError/InputError (exit 2) before anything is written."""
    run = open_run(run_dir)
    if not resume:
        plan = compose_plan(overrides, config_name, config_dir)
        return run, plan.config, plan
    if not run.exists("config.yaml"):
        raise ConfigError(f"run: {run.uri} has no config.yaml; start it with `stgr build --run {run_dir}`")
    if overrides:
        raise ConfigError("overrides: `stgr resume` reuses the stored config; use `stgr build` to change it")
    config = from_yaml(run.read_text("config.yaml"))
    return run, config, validate(config)


def run_build(run_dir: str, overrides: Sequence[str] = (), resume: bool = False,
              interactive: bool | None = None, config_dir: str | None = None, config_name: str = "build") -> int:
    """Build (or continue) the run in `run_dir` and print its summary.

    Exit code (pipeline.errors): 0 when every unit committed, 1 when one failed or was blocked (or the
    run directory itself failed: full, read-only, unreachable), 3 when all committed but a stage
    reported its product unusable (an empty dataset), 130 when interrupted (Ctrl-C). Raises
    ConfigError/InputError (exit 2) before anything is written when the config or an input file is
    unusable, and LeaseHeld (exit 2) when a live build of another plan holds the run directory.
    """
    began = time.monotonic()
    run, config, plan = load_plan(run_dir, overrides, resume, config_dir, config_name)
    states = resolve_nodes(plan)
    build_id = config.get("build_id") or Path(run.path).name
    ttl = config.get("lease_ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        raise ConfigError(f"lease_ttl_s: expected a positive number of seconds, got {ttl!r}")
    try:
        return _leased_build(run, plan, states, build_id, config, float(ttl), interactive, began)
    except OSError as exc:
        print(f"stgr: error: storage: {exc} (run directory {run.uri}); "
              f"`stgr resume {run.uri}` continues once it is fixed", file=sys.stderr, flush=True)
        return EXIT_FAILED_UNITS


def all_units(states: dict[str, NodeState]) -> list[Unit]:
    """Every unit of the plan, node by node."""
    return [Unit(n, s.fingerprint, p) for n, s in states.items() for p in range(s.partitions)]


def _leased_build(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str, config: dict[str, Any],
                  ttl: float, interactive: bool | None, began: float) -> int:
    """Take the run's lease, write config and plan, run the passes, release, print the summary."""
    run.makedirs("")
    digest = plan_digest({n: (s.fingerprint, s.partitions) for n, s in states.items()})
    lease = acquire(run, digest, build_id, ttl).start()
    fresh: dict[Unit, dict[str, Any]] = {}
    owned = not ray.is_initialized()
    try:
        run.write_text("config.yaml", to_yaml(config))
        write_plan(run, states, build_id)
        try:
            outcome = settle_complete(run, plan, states, build_id)
            if outcome is None:
                connect(config.get("cluster") or {})
                with Progress({n: s.partitions for n, s in states.items()}, interactive) as progress:
                    outcome = execute_passes(run, plan, states, build_id, progress, fresh)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            outcome = None
        finally:
            if owned and ray.is_initialized():
                ray.shutdown()
    finally:
        lease.release()
    if outcome is None:
        return report_interrupt(run, states)
    return summarise(run, states, outcome, fresh, lease, time.monotonic() - began)


def settle_complete(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str) -> Outcome | None:
    """The outcome of a run whose every unit is already committed, reached without Ray (putting missing
    products in place from the committed units); None when something is left to run."""
    units = all_units(states)
    if not all(is_committed(run, unit) for unit in units) or publish_products(run, plan, states, build_id):
        return None
    log.info("all %d units of %s are committed: nothing to run (Ray not started)", len(units), run.uri)
    return Outcome(reused=set(units))


def report_interrupt(run: RunDir, states: dict[str, NodeState]) -> int:
    """One line: what is committed (read from the run directory, so a straggler's commit counts too)
    and the command that continues the build."""
    per_node = [(node, sum(is_committed(run, Unit(node, s.fingerprint, p)) for p in range(s.partitions)), s.partitions)
                for node, s in states.items()]
    done = sum(d for _, d, _ in per_node)
    total = sum(t for _, _, t in per_node)
    stages = ", ".join(f"{node} {d}/{t}" for node, d, t in per_node)
    print(f"stgr: interrupted: {done} of {total} units committed ({stages}); "
          f"`stgr resume {shlex.quote(run.uri)}` continues from there", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def dry_run(run_dir: str, overrides: Sequence[str] = (), resume: bool = False, config_dir: str | None = None,
            config_name: str = "build") -> int:
    """Print the plan a build would carry out: per node its units, how many would be reused and which
    would run and why (never built, failed before, a new fingerprint). Writes nothing, starts no Ray."""
    run, _, plan = load_plan(run_dir, overrides, resume, config_dir, config_name)
    states = resolve_nodes(plan)
    previous = _stored_plan(run)
    rows = [("node", "stage", "units", "reused", "to run", "why")]
    to_run = 0
    for node, state in states.items():
        pending = [p for p in range(state.partitions) if not is_committed(run, Unit(node, state.fingerprint, p))]
        to_run += len(pending)
        rows.append((node, state.stage, str(state.partitions), str(state.partitions - len(pending)), str(len(pending)),
                     _why(run, node, state, pending, previous)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"dry run of {run.uri}: nothing is written and Ray is not started")
    for r in rows:
        print("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), *(c.rjust(w) for c, w in zip(r[2:5], widths[2:])),
                         r[5]]).rstrip())
    total = sum(s.partitions for s in states.values())
    print(f"{total - to_run} of {total} units would be reused, {to_run} would run")
    return EXIT_OK


def _stored_plan(run: RunDir) -> dict[str, Any]:
    """The nodes of the plan the last build wrote (empty for a new run)."""
    if not run.exists("plan.json"):
        return {}
    return json.loads(run.read_text("plan.json")).get("nodes", {})


def _why(run: RunDir, node: str, state: NodeState, pending: list[int], previous: dict[str, Any]) -> str:
    """Why the node's `pending` units would run: a fingerprint other than the last build's (its config
    or an upstream node's changed), a failure before, or never built."""
    if not pending:
        return "all committed"
    before = previous.get(node)
    if before and before.get("fingerprint") != state.fingerprint:
        kept = state.partitions - len(pending)
        return (f"rerun: new fingerprint {state.fingerprint[:12]} (was {before['fingerprint'][:12]}: its config or "
                "an upstream node's changed)" + (f"; {kept} committed under it by an earlier build" if kept else ""))
    failed = [p for p in pending if run.exists(Unit(node, state.fingerprint, p).error)]
    shown = ", ".join(part_name(p) for p in pending[:4]) + (", ..." if len(pending) > 4 else "")
    reason = "failed before, " if failed and len(failed) == len(pending) else \
        f"{len(failed)} failed before, " if failed else ""
    return f"{reason}not committed: {shown}"


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
        outcome = execute(run, plan, states, build_id, on_commit, {"env_vars": worker_env()})
        committed |= outcome.committed
        reused = outcome.reused if reused is None else reused
        damaged = [u for u, error in outcome.failed.items() if error.startswith(f"{CorruptUnit.__name__}:")]
        if not publish_products(run, plan, states, build_id) and not damaged:
            break
        log.warning("units with damaged or missing files were invalidated: running the build again to recompute them")
    settled = committed - set(outcome.failed) - outcome.pending
    return Outcome(committed=settled, reused=(reused or set()) - committed, failed=outcome.failed,
                   pending=outcome.pending, partial=publish_partial(run, plan, states, outcome.pending, build_id))


def publish_partial(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], pending: set[Unit],
                    build_id: str) -> list[dict[str, Any]]:
    """Run each publishing barrier (shard) that failed units blocked on the inputs that did commit,
    on the driver and without committing it; returns the reports of what ran.

    One failed partition must not cost the whole dataset: the records that made it are published,
    marked partial (`UnitContext.missing_inputs`, which shard writes into the manifest), and the build
    still exits 1 naming the failed units. The barrier's unit stays uncommitted, so once the cause
    is fixed `stgr resume` runs it on every input and replaces the partial product.
    """
    fingerprints = {n: s.fingerprint for n, s in states.items()}
    reports = []
    for unit in sorted(pending, key=lambda u: u.key()):
        spec, state = plan.nodes[unit.node], states[unit.node]
        if not state.barrier or spec.stage_cls.published is Stage.published:
            continue
        inputs = unit_inputs(states, unit.node, unit.partition)
        done = [u for u in inputs if is_committed(run, u)]
        if not done:
            continue
        ctx = UnitContext(stage=unit.node, partition=unit.partition, num_partitions=state.partitions, attempt=0,
                          fingerprint=unit.fingerprint, run_uri=run.uri, run_path=run.path, filesystem=run.fs,
                          build_id=build_id, fingerprints=fingerprints,
                          missing_inputs=tuple(u.key() for u in inputs if u not in done))
        try:
            table = pa.concat_tables([read_input(run, u, None).table for u in done], promote_options="default")
            result = spec.stage_cls(spec.config).process(table, ctx)
        except Exception as exc:  # noqa: BLE001 - the failed units are reported anyway; this is a bonus
            log.warning("%s: not run on the %d input units that committed: %s: %s", unit.key(), len(done),
                        type(exc).__name__, exc)
            continue
        if result.report is not None:
            reports.append(dataclasses.asdict(result.report))
    return reports


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
                stage.publish(read_input(run, unit, None).table, ctx)
            except CorruptUnit as exc:
                invalidate(run, exc.unit, str(exc))
                invalidated = True
                continue
            log.info("%s: its product was missing or not this plan's; republished from the committed unit", unit.key())
    return invalidated


def summarise(run: RunDir, states: dict[str, NodeState], outcome: Outcome, fresh: dict[Unit, dict[str, Any]],
              lease: Lease, seconds: float = 0.0) -> int:
    """Print what failed and why, the counts and wall time, the stages' reports (the dataset's path,
    rows per set and task, the ledger's top rules) and where to look next; the build's exit code."""
    for unit, error in sorted(outcome.failed.items(), key=lambda kv: kv[0].key()):
        print(f"FAILED {unit.key()}: {error.splitlines()[0]}", file=sys.stderr)
    if outcome.pending:
        print(f"{len(outcome.pending)} unit(s) not run because an input failed", file=sys.stderr)
    print(f"{run.uri}: {len(outcome.committed)} unit(s) committed, {len(outcome.reused)} reused, "
          f"{len(outcome.failed)} failed, {len(outcome.pending)} blocked in {format_seconds(seconds)}",
          file=sys.stderr, flush=True)
    if not outcome.ok:
        print(f"`stgr resume {run.uri}` runs the failed and blocked units again once their cause is fixed",
              file=sys.stderr, flush=True)
    if lease.lost:
        print(f"stgr: this build lost the lease of {run.uri} to {lease.lost}: another build may have replaced "
              "what it wrote; check `stgr status` and resume", file=sys.stderr, flush=True)
    reports = collect_reports(run, states, outcome, fresh) + outcome.partial
    for report in reports:
        for line in report.get("summary") or []:
            print(line, flush=True)
    failures = [r["failure"] for r in reports if r.get("failure")]
    for line in failures:
        print(line, file=sys.stderr, flush=True)
    where = shlex.quote(run.uri)
    if outcome.ok and not failures:
        print(f"next: `stgr view {where}` to look through it, `stgr inspect {where}` for counts and rejections, "
              f"`stgr status {where}` per stage", flush=True)
    else:
        print(f"next: `stgr status {where}` names each failed unit and its error; `stgr inspect {where}` "
              "lists the ledger's rules", flush=True)
    if not outcome.ok or lease.lost:
        return EXIT_FAILED_UNITS
    return EXIT_UNUSABLE if failures else EXIT_OK
