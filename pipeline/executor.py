"""The driver's executor: streams units through the DAG on Ray, retries, and records failures.

Which unit runs next is decided by the scheduling core (pipeline/scheduler.py): a unit becomes
ready when the units it reads have committed, ready units of later stages go first (so partition 3
is annotated while partition 9 is still being sampled), and a `UnitTask` is built only when a slot
is free. This module turns those decisions into Ray calls and Ray's answers into "finished" and
"failed" events. CPU stages run as Ray tasks; `actor = True` stages run in a pool of actors that
load their model once. Every failure (an exception, a dead worker, a lost node) costs the unit one
attempt; after `max_attempts` the unit is marked failed and everything that does not depend on it
still finishes.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from pipeline.config import BuildPlan
from pipeline.fingerprint import stage_fingerprint
from pipeline.redact import Secrets, install, secret_names
from pipeline.rundir import RunDir, Unit, is_committed, record_failure
from pipeline.scheduler import NodeState, Scheduler, unit_inputs
from pipeline.worker import StageActor, UnitTask, run_unit

log = logging.getLogger("stgr")


def resolve_nodes(plan: BuildPlan) -> dict[str, NodeState]:
    """Fingerprints and partition counts for every node, in topological order (runs source plan())."""
    states: dict[str, NodeState] = {}
    for name in plan.order:
        spec = plan.nodes[name]
        cls = spec.stage_cls
        upstream = [states[u].fingerprint for u in spec.after]
        fp = stage_fingerprint(cls.name, cls.version, spec.config, upstream, cls.excluded_keys(spec.config))
        specs: tuple[Any, ...] = ()
        if cls.source:
            stage = cls(spec.config)
            partitions = int(stage.plan())
            specs = tuple(stage.partition_specs() or ())
            if specs and len(specs) != partitions:
                raise ValueError(f"stage '{cls.name}': partition_specs() gave {len(specs)} for {partitions} partitions")
        elif cls.needs_all_input:
            partitions = 1
        else:
            partitions = sum(states[u].partitions for u in spec.after)
        states[name] = NodeState(name, cls.name, fp, partitions, list(spec.after), cls.actor, cls.needs_all_input, specs)
    return states


@dataclass
class Outcome:
    committed: set[Unit] = field(default_factory=set)
    reused: set[Unit] = field(default_factory=set)
    failed: dict[Unit, str] = field(default_factory=dict)
    pending: set[Unit] = field(default_factory=set)
    partial: list[dict[str, Any]] = field(default_factory=list)  # reports of `pipeline.build.publish_partial`

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending


class ActorPool:
    """Actors for one node, created on demand; one unit in flight per actor.

    The scheduler never has more than `size` of the node's units running, so `acquire` always finds
    an idle actor or room for a new one.
    """

    def __init__(self, node: str, resources: dict[str, Any], size: int, runtime_env: dict[str, Any] | None) -> None:
        self.node = node
        self.size = max(1, size)
        self.options = {**resources, "max_restarts": 0, "runtime_env": runtime_env}
        self.idle: list[Any] = []

    def acquire(self) -> Any:
        if self.idle:
            return self.idle.pop()
        return ray.remote(StageActor).options(**{k: v for k, v in self.options.items() if v is not None}).remote()

    def release(self, actor: Any, alive: bool) -> None:
        if alive:
            self.idle.append(actor)
        else:
            ray.kill(actor, no_restart=True)

    def shrink(self) -> None:
        """Kill the idle actors, giving their resources back to the cluster."""
        for actor in self.idle:
            ray.kill(actor, no_restart=True)
        self.idle.clear()


def _release_idle_actors(pools: dict[str, ActorPool], open_nodes: set[str], ready_nodes: set[str],
                         states: dict[str, NodeState]) -> None:
    """Give back idle actors that would otherwise starve the tasks they wait for.

    An actor holds its CPUs while idle. When its stage has no ready unit, the unit it waits for may
    itself need those CPUs (annotate waiting on sample on a 1-CPU machine): a deadlock. So an idle
    actor with nothing ready is released when its stage has no work left at all, or when tasks are
    waiting and the cluster has no free CPU. With spare CPUs the actor (and its model) stays.
    `open_nodes` are the nodes with a unit neither done nor failed.
    """
    idle_nodes = [n for n, pool in pools.items() if pool.idle and n not in ready_nodes]
    if not idle_nodes:
        return
    tasks_waiting = any(not states[n].actor for n in open_nodes)
    starved = tasks_waiting and ray.available_resources().get("CPU", 0.0) < 1.0
    for node in idle_nodes:
        if node not in open_nodes or starved:
            pools[node].shrink()


def execute(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str,
            on_commit: Callable[[Unit, dict[str, Any], bool], None] | None = None,
            runtime_env: dict[str, Any] | None = None) -> Outcome:
    """Run every uncommitted unit; return what committed, what was reused, what failed."""
    outcome = Outcome()
    fingerprints = {n: s.fingerprint for n, s in states.items()}
    for node in plan.order:
        for partition in range(states[node].partitions):
            unit = Unit(node, states[node].fingerprint, partition)
            if is_committed(run, unit):
                outcome.reused.add(unit)
                if on_commit:
                    on_commit(unit, {}, True)
    settings = {n: plan.nodes[n].stage_cls.Config.build(plan.nodes[n].config) for n in plan.order}
    pools = {n: ActorPool(n, settings[n].ray_options(), settings[n].num_actors, runtime_env)
             for n in plan.order if states[n].actor}
    remote_fns = {
        n: ray.remote(run_unit).options(max_retries=0, **settings[n].ray_options())
        for n in plan.order if not states[n].actor
    }
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    schedule = Scheduler({n: states[n] for n in plan.order}, 2 * cluster_cpus,
                         {n: pool.size for n, pool in pools.items()}, plan.max_attempts,
                         done=[(u.node, u.partition) for u in outcome.reused])
    plugins = tuple(plan.config.get("plugins") or [])
    secrets = Secrets.from_env(secret_names(plan))  # to each unit in its task, never in the runtime env
    install(secrets)  # what the driver writes is scrubbed too
    inflight: dict[Any, tuple[int, Unit, Any]] = {}
    while True:
        ready_nodes = schedule.ready_nodes()
        for number in schedule.dispatch():
            node, partition = schedule.key(number)
            unit = Unit(node, states[node].fingerprint, partition)
            task = UnitTask(run.uri, unit, states[node].stage, plan.nodes[node].config,
                            unit_inputs(states, node, partition), states[node].partitions, schedule.attempt(number),
                            build_id, plugins, fingerprints, secrets,
                            states[node].specs[partition] if states[node].specs else None)
            if states[node].actor:
                actor = pools[node].acquire()
                inflight[actor.run.remote(task)] = (number, unit, actor)
            else:
                inflight[remote_fns[node].remote(task)] = (number, unit, None)
        _release_idle_actors(pools, schedule.open_nodes(), ready_nodes, states)
        if not inflight:
            break
        for ref in _completed(list(inflight)):
            number, unit, actor = inflight.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any failure costs one attempt
                final = schedule.fail(number)
                attempts = schedule.attempts(number)
                error = _error_text(exc)
                record_failure(run, unit, attempts, error, final)
                alive = not isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError))
                if actor is not None:
                    pools[unit.node].release(actor, alive)
                log.warning("%s attempt %d failed: %s", unit.key(), attempts, error.splitlines()[0])
                if final:
                    outcome.failed[unit] = error
                continue
            if actor is not None:
                pools[unit.node].release(actor, True)
            schedule.finished(number)
            outcome.committed.add(unit)
            if on_commit:
                on_commit(unit, summary, False)
    outcome.pending = {Unit(n, states[n].fingerprint, p) for n, p in schedule.pending()}
    for pool in pools.values():
        pool.shrink()
    return outcome


def _completed(refs: list[Any]) -> list[Any]:
    """The in-flight refs that have finished: the first within a second (so idle actors are looked
    at again even when nothing finishes), then every other one already done, so that on a large
    cluster one pass over the in-flight list serves all the units that finished meanwhile."""
    ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
    if ready and rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return ready


def _error_text(exc: BaseException) -> str:
    """The most useful line first: the stage's own exception, not Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if cause is not None and str(cause):
        return str(cause)
    text = str(exc)
    for line in text.splitlines():
        if line.startswith("pipeline.worker.UnitFailed:"):
            return text[text.index(line) + len("pipeline.worker.UnitFailed: "):]
    return f"{type(exc).__name__}: {text}"


def write_plan(run: RunDir, states: dict[str, NodeState], build_id: str) -> None:
    payload = {"build_id": build_id, "written_at": time.time(),
               "nodes": {n: {k: v for k, v in vars(s).items() if k != "specs"} for n, s in states.items()},
               "python": sys.version.split()[0]}
    run.write_text("plan.json", json.dumps(payload, indent=2))
