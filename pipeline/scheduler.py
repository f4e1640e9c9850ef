"""Which unit runs next: the driver's scheduling core, in linear time and without Ray.

The executor (pipeline/executor.py) turns Ray's "finished" and "failed" events into calls here and
runs what `dispatch` hands back. It is kept apart from Ray so it can be tested and benchmarked
without a cluster, and so its cost stays linear in the number of units: at 10^5 units (10^6 clips)
a driver that rescans every waiting unit after each completion spends hours of CPU on nothing else.

Units are numbered once, node after node in plan order, partitions in order. Each keeps the count
of its inputs not yet done, and each the numbers of the units that read it (one flat array); a
finished unit decrements its readers' counts and a count that reaches zero makes that reader ready.
Ready units wait in one heap per node, by partition; `dispatch` visits the nodes later stages first
(so partition 3 is annotated while partition 9 is still being sampled) and starts a unit only while
its slot group has a free slot: CPU tasks share one group, each actor stage's pool is a group of its
own. Every failure costs one attempt; after `max_attempts` the unit is failed, and the units that
read it (directly or not) stay pending while everything else still runs.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from pipeline.rundir import Unit

_WAITING, _READY, _RUNNING, _DONE, _FAILED = range(5)
TASKS = "tasks"


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
    #: A source node's per-partition descriptors from `Stage.plan()` (empty: none), handed to each
    #: unit as `UnitContext.spec`; not written to plan.json (they follow from the config and files).
    specs: tuple[Any, ...] = field(default=(), repr=False)


def input_segments(states: Mapping[str, NodeState], node: str) -> Iterator[tuple[str, int, int]]:
    """(upstream, first partition of `node`, count): `node`'s partitions first..first+count-1 read
    the upstream's partitions 0..count-1. A node with several inputs has their partitions one after
    another (input A's, then B's). Not for a barrier, whose one unit reads everything."""
    first = 0
    for upstream in states[node].after:
        count = min(states[upstream].partitions, states[node].partitions - first)
        if count <= 0:
            return
        yield upstream, first, count
        first += count


def unit_inputs(states: Mapping[str, NodeState], node: str, partition: int) -> tuple[Unit, ...]:
    """The upstream units a unit reads: all of them for a barrier, else the one it maps to."""
    state = states[node]
    if state.barrier:
        return tuple(Unit(u, states[u].fingerprint, p) for u in state.after for p in range(states[u].partitions))
    for upstream, first, count in input_segments(states, node):
        if first <= partition < first + count:
            return (Unit(upstream, states[upstream].fingerprint, partition - first),)
    return ()


class Scheduler:
    """The state of every unit of one build: waiting for inputs, ready, running, done or failed.

    `states` are the build's nodes in plan (topological) order: a later node's ready units go
    first. CPU-task nodes share `task_slots` slots; an actor node has `actors[node]` (at least 1)
    of its own. `done` are the (node, partition) units already committed: they never run.
    Units are handed out and reported back by number (`dispatch`, `finished`, `fail`); `key` turns
    a number into its (node, partition) and `number` back.
    """

    def __init__(self, states: Mapping[str, NodeState], task_slots: int, actors: Mapping[str, int],
                 max_attempts: int, done: Iterable[tuple[str, int]] = ()) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected at least 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self._names = list(states)
        self._offset: dict[str, int] = {}
        self._node_of: list[int] = []
        for k, name in enumerate(self._names):
            self._offset[name] = len(self._node_of)
            self._node_of.extend([k] * states[name].partitions)
        total = len(self._node_of)
        pools = [n for n in self._names if states[n].actor]
        self._free = [max(1, int(task_slots)), *(max(1, int(actors.get(n, 1))) for n in pools)]
        self._group = [1 + pools.index(n) if states[n].actor else 0 for n in self._names]
        self._state = bytearray(total)
        for node, partition in done:
            self._state[self.number(node, partition)] = _DONE
        self._attempts = [0] * total
        self._unmet = [0] * total
        self._start, self._readers = self._index_readers(states)
        self._open = [0] * len(self._names)
        self._ready: list[list[int]] = [[] for _ in self._names]
        state, unmet = self._state, self._unmet
        # Appended in ascending order, so each list is already a valid heap.
        for i in range(total):
            if state[i] != _DONE:
                self._open[self._node_of[i]] += 1
                if not unmet[i]:
                    state[i] = _READY
                    self._ready[self._node_of[i]].append(i)

    def number(self, node: str, partition: int) -> int:
        """The number of unit (node, partition)."""
        return self._offset[node] + partition

    def key(self, number: int) -> tuple[str, int]:
        """The (node, partition) of unit `number`."""
        node = self._names[self._node_of[number]]
        return node, number - self._offset[node]

    def ready_nodes(self) -> set[str]:
        """The nodes with a unit ready to start (not counting those already running)."""
        return {self._names[k] for k, heap in enumerate(self._ready) if heap}

    def open_nodes(self) -> set[str]:
        """The nodes with a unit neither done nor failed: running, ready or still waiting for inputs."""
        return {self._names[k] for k, count in enumerate(self._open) if count}

    def dispatch(self) -> list[int]:
        """Mark running, and return, every ready unit a free slot can take: later stages first,
        lower partitions first within a stage. A unit whose group is full is passed over, not
        waited for, so a busy actor pool never holds back the CPU tasks."""
        started: list[int] = []
        free, state = self._free, self._state
        for k in range(len(self._names) - 1, -1, -1):
            heap, group = self._ready[k], self._group[k]
            while heap and free[group] > 0:
                i = heapq.heappop(heap)
                free[group] -= 1
                state[i] = _RUNNING
                started.append(i)
        return started

    def attempt(self, number: int) -> int:
        """The attempt the next (or current) run of unit `number` is: 1 for the first."""
        return self._attempts[number] + 1

    def finished(self, number: int) -> None:
        """The unit committed: free its slot and make ready the units whose last unmet input it was."""
        self._stop(number)
        self._state[number] = _DONE
        self._open[self._node_of[number]] -= 1
        unmet = self._unmet
        for reader in self._readers[self._start[number]:self._start[number + 1]]:
            unmet[reader] -= 1
            if not unmet[reader]:
                self._state[reader] = _READY
                heapq.heappush(self._ready[self._node_of[reader]], reader)

    def fail(self, number: int) -> bool:
        """One attempt of the unit failed: free its slot, count the attempt, and queue it again unless
        it has used its `max_attempts`. True when this was the last attempt (the unit is failed)."""
        self._stop(number)
        self._attempts[number] += 1
        if self._attempts[number] >= self.max_attempts:
            self._state[number] = _FAILED
            self._open[self._node_of[number]] -= 1
            return True
        self._state[number] = _READY
        heapq.heappush(self._ready[self._node_of[number]], number)
        return False

    def running(self) -> list[tuple[str, int]]:
        return self._in_state(_RUNNING)

    def done(self) -> list[tuple[str, int]]:
        """Committed units: reused ones and those finished in this build."""
        return self._in_state(_DONE)

    def failed(self) -> list[tuple[str, int]]:
        """Units that used all their attempts."""
        return self._in_state(_FAILED)

    def pending(self) -> list[tuple[str, int]]:
        """Units neither done nor failed: after a build, those that waited on a failed input."""
        return [self.key(i) for i, s in enumerate(self._state) if s not in (_DONE, _FAILED)]

    def attempts(self, number: int) -> int:
        """The failed attempts of unit `number` so far."""
        return self._attempts[number]

    def _in_state(self, wanted: int) -> list[tuple[str, int]]:
        return [self.key(i) for i, s in enumerate(self._state) if s == wanted]

    def _stop(self, number: int) -> None:
        if not 0 <= number < len(self._state) or self._state[number] != _RUNNING:
            raise ValueError(f"unit {number}: reported back but not running")
        self._free[self._group[self._node_of[number]]] += 1

    def _index_readers(self, states: Mapping[str, NodeState]) -> tuple[list[int], list[int]]:
        """Count each unit's unmet inputs and lay out its readers as one flat array (CSR): the
        readers of unit j are readers[start[j]:start[j + 1]]. Edges from committed inputs, and to
        committed readers, are left out: they never change anything."""
        state, unmet = self._state, self._unmet
        inputs: list[int] = []
        readers: list[int] = []
        for j, i in self._edges(states):
            if state[j] != _DONE and state[i] != _DONE:
                inputs.append(j)
                readers.append(i)
        start = [0] * (len(state) + 1)
        for j, i in zip(inputs, readers):
            start[j + 1] += 1
            unmet[i] += 1
        for k in range(len(state)):
            start[k + 1] += start[k]
        fill = start[:-1]
        flat = [0] * len(readers)
        for j, i in zip(inputs, readers):
            flat[fill[j]] = i
            fill[j] += 1
        return start, flat

    def _edges(self, states: Mapping[str, NodeState]) -> Iterator[tuple[int, int]]:
        """(input, reader) numbers of every edge of the unit graph, as `unit_inputs` draws it."""
        for name in self._names:
            base = self._offset[name]
            if states[name].barrier:
                for i in range(base, base + states[name].partitions):
                    for upstream in states[name].after:
                        first = self._offset[upstream]
                        for j in range(first, first + states[upstream].partitions):
                            yield j, i
                continue
            for upstream, first, count in input_segments(states, name):
                shift = self._offset[upstream] - first
                for i in range(base + first, base + first + count):
                    yield i - base + shift, i
