"""The driver's scheduler: streams units through the DAG on Ray, retries, and records failures.

A unit becomes ready when the units it reads have committed; ready units of later stages go first,
so partition 3 is annotated while partition 9 is still being sampled. CPU stages run as Ray tasks;
`actor = True` stages run in a pool of actors that load their model once. Every failure (an
exception, a dead worker, a lost node) costs the unit one attempt; after `max_attempts` the unit is
marked failed and everything that does not depend on it still finishes.
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
from pipeline.rundir import RunDir, Unit, is_committed, record_failure
from pipeline.worker import StageActor, UnitTask, run_unit

log = logging.getLogger("stgr")


@dataclass
class NodeState:
    """Per-node plan facts written to plan.json, so `stgr status` needs no stage code."""

    node: str
    stage: str
    fingerprint: str
    partitions: int
    after: list[str]
    actor: bool
    barrier: bool


def resolve_nodes(plan: BuildPlan) -> dict[str, NodeState]:
    """Fingerprints and partition counts for every node, in topological order (runs source plan())."""
    states: dict[str, NodeState] = {}
    for name in plan.order:
        spec = plan.nodes[name]
        cls = spec.stage_cls
        upstream = [states[u].fingerprint for u in spec.after]
        fp = stage_fingerprint(cls.name, cls.version, spec.config, upstream, cls.fingerprint_exclude)
        if cls.source:
            partitions = int(cls(spec.config).plan())
        elif cls.needs_all_input:
            partitions = 1
        else:
            partitions = sum(states[u].partitions for u in spec.after)
        states[name] = NodeState(name, cls.name, fp, partitions, list(spec.after), cls.actor, cls.needs_all_input)
    return states


def unit_inputs(states: dict[str, NodeState], node: str, partition: int) -> tuple[Unit, ...]:
    """The upstream units a unit reads: all of them for a barrier, else the one it maps to.

    A node with several inputs has their partitions one after another (input A's, then B's).
    """
    state = states[node]
    if state.barrier:
        return tuple(Unit(u, states[u].fingerprint, p) for u in state.after for p in range(states[u].partitions))
    offset = partition
    for upstream in state.after:
        count = states[upstream].partitions
        if offset < count:
            return (Unit(upstream, states[upstream].fingerprint, offset),)
        offset -= count
    return ()


@dataclass
class Outcome:
    committed: set[Unit] = field(default_factory=set)
    reused: set[Unit] = field(default_factory=set)
    failed: dict[Unit, str] = field(default_factory=dict)
    pending: set[Unit] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending


class ActorPool:
    """Actors for one node, created on demand up to `num_actors`; one unit in flight per actor."""

    def __init__(self, node: str, resources: dict[str, Any], size: int, runtime_env: dict[str, Any] | None) -> None:
        self.node = node
        self.size = max(1, size)
        self.options = {**resources, "max_restarts": 0, "runtime_env": runtime_env}
        self.idle: list[Any] = []
        self.busy: dict[Any, Any] = {}
        self.created = 0

    def acquire(self) -> Any | None:
        if self.idle:
            return self.idle.pop()
        if self.created < self.size:
            self.created += 1
            return ray.remote(StageActor).options(**{k: v for k, v in self.options.items() if v is not None}).remote()
        return None

    def release(self, actor: Any, alive: bool) -> None:
        if alive:
            self.idle.append(actor)
        else:
            self.created -= 1
            ray.kill(actor, no_restart=True)

    def shrink(self) -> None:
        """Kill the idle actors, giving their resources back to the cluster."""
        for actor in self.idle:
            self.created -= 1
            ray.kill(actor, no_restart=True)
        self.idle.clear()


def _release_idle_actors(pools: dict[str, ActorPool], waiting: list[Unit], ready_nodes: set[str],
                         states: dict[str, "NodeState"]) -> None:
    """Give back idle actors that would otherwise starve the tasks they wait for.

    An actor holds its CPUs while idle. When its stage has no ready unit, the unit it waits for may
    itself need those CPUs (annotate waiting on sample on a 1-CPU machine): a deadlock. So an idle
    actor with nothing ready is released when its stage has no work left at all, or when tasks are
    waiting and the cluster has no free CPU. With spare CPUs the actor (and its model) stays.
    """
    idle_nodes = [n for n, pool in pools.items() if pool.idle and n not in ready_nodes]
    if not idle_nodes:
        return
    remaining = {u.node for u in waiting}
    tasks_waiting = any(not states[n].actor for n in remaining)
    starved = tasks_waiting and ray.available_resources().get("CPU", 0.0) < 1.0
    for node in idle_nodes:
        if node not in remaining or starved:
            pools[node].shrink()


def _resources(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"num_cpus": float(config.get("num_cpus", 1)), "num_gpus": float(config.get("num_gpus", 0))}
    if config.get("memory"):
        out["memory"] = int(config["memory"])
    return out


def execute(run: RunDir, plan: BuildPlan, states: dict[str, NodeState], build_id: str,
            on_commit: Callable[[Unit, dict[str, Any], bool], None] | None = None,
            runtime_env: dict[str, Any] | None = None) -> Outcome:
    """Run every uncommitted unit; return what committed, what was reused, what failed."""
    outcome = Outcome()
    fingerprints = {n: s.fingerprint for n, s in states.items()}
    all_units = [Unit(n, states[n].fingerprint, p) for n in plan.order for p in range(states[n].partitions)]
    depth = {n: i for i, n in enumerate(plan.order)}
    done: set[Unit] = set()
    for unit in all_units:
        if is_committed(run, unit):
            done.add(unit)
            outcome.reused.add(unit)
            if on_commit:
                on_commit(unit, {}, True)
    attempts: dict[Unit, int] = {}
    inflight: dict[Any, tuple[Unit, Any]] = {}
    pools = {n: ActorPool(n, _resources(plan.nodes[n].config), int(plan.nodes[n].config.get("num_actors", 1)), runtime_env)
             for n in plan.order if states[n].actor}
    remote_fns = {
        n: ray.remote(run_unit).options(max_retries=0, **_resources(plan.nodes[n].config))
        for n in plan.order if not states[n].actor
    }
    cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    max_tasks = 2 * cluster_cpus
    plugins = tuple(plan.config.get("plugins") or [])
    inputs_of = {u: unit_inputs(states, u.node, u.partition) for u in all_units}
    waiting = [u for u in all_units if u not in done]

    def ready(unit: Unit) -> bool:
        return all(i in done for i in inputs_of[unit])

    while True:
        inflight_units = {u for u, _ in inflight.values()}
        waiting = [u for u in waiting if u not in done and u not in outcome.failed]
        candidates = sorted(
            (u for u in waiting if u not in inflight_units and ready(u)),
            key=lambda u: (-depth[u.node], u.partition),
        )
        task_slots = max_tasks - sum(1 for u, actor in inflight.values() if actor is None)
        for unit in candidates:
            attempt = attempts.get(unit, 0) + 1
            task = UnitTask(run.uri, unit, states[unit.node].stage, plan.nodes[unit.node].config,
                            inputs_of[unit], states[unit.node].partitions, attempt, build_id, plugins, fingerprints)
            if states[unit.node].actor:
                actor = pools[unit.node].acquire()
                if actor is None:
                    continue
                inflight[actor.run.remote(task)] = (unit, actor)
            else:
                if task_slots <= 0:
                    continue
                task_slots -= 1
                inflight[remote_fns[unit.node].remote(task)] = (unit, None)
        _release_idle_actors(pools, waiting, {u.node for u in candidates}, states)
        if not inflight:
            break
        ready_refs, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready_refs:
            unit, actor = inflight.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any failure costs one attempt
                attempts[unit] = attempts.get(unit, 0) + 1
                error = _error_text(exc)
                final = attempts[unit] >= plan.max_attempts
                record_failure(run, unit, attempts[unit], error, final)
                alive = not isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError))
                if actor is not None:
                    pools[unit.node].release(actor, alive)
                log.warning("%s attempt %d failed: %s", unit.key(), attempts[unit], error.splitlines()[0])
                if final:
                    outcome.failed[unit] = error
                continue
            if actor is not None:
                pools[unit.node].release(actor, True)
            done.add(unit)
            outcome.committed.add(unit)
            if on_commit:
                on_commit(unit, summary, False)
    outcome.pending = {u for u in all_units if u not in done and u not in outcome.failed}
    for pool in pools.values():
        for actor in pool.idle:
            ray.kill(actor, no_restart=True)
    return outcome


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
               "nodes": {n: vars(s) for n, s in states.items()}, "python": sys.version.split()[0]}
    run.write_text("plan.json", json.dumps(payload, indent=2))
