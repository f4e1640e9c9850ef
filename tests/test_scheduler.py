"""The driver's scheduling core (pipeline/scheduler.py) on the engine's DAG shapes, without Ray:
dependency order, later stages first, slots, retries to `max_attempts`, failures that block only
their dependents, and a barrier that waits for every input."""
from __future__ import annotations

from collections import deque

import pytest

from pipeline.scheduler import NodeState, Scheduler, unit_inputs

Key = tuple[str, int]


def _dag(partitions: int, actor: str | None = None) -> dict[str, NodeState]:
    """The engine test DAG's shape: source -> map -> map -> barrier (`actor` names an actor node)."""
    shape = [("numbers", [], False), ("scale", ["numbers"], False), ("threshold", ["scale"], False),
             ("total", ["threshold"], True)]
    return {name: NodeState(name, f"test_{name}", f"fp-{name}", 1 if barrier else partitions, after, name == actor, barrier)
            for name, after, barrier in shape}


def _inputs(states: dict[str, NodeState], key: Key) -> set[Key]:
    return {(u.node, u.partition) for u in unit_inputs(states, *key)}


def _keys(sched: Scheduler, numbers: list[int]) -> list[Key]:
    return [sched.key(i) for i in numbers]


def _run(sched: Scheduler, fails: dict[Key, int] | None = None) -> list[tuple[str, int, int]]:
    """Run the build to its end, units finishing in the order they started; unit (node, p) fails its
    first `fails[(node, p)]` attempts. Returns (node, partition, attempt) in start order."""
    fails = fails or {}
    started: list[tuple[str, int, int]] = []
    running: deque[int] = deque()
    while True:
        for i in sched.dispatch():
            started.append((*sched.key(i), sched.attempt(i)))
            running.append(i)
        if not running:
            return started
        i = running.popleft()
        if fails.get(sched.key(i), 0) >= sched.attempt(i):
            sched.fail(i)
        else:
            sched.finished(i)


def test_one_slot_runs_later_stages_first_in_dependency_order() -> None:
    """With one slot, each partition goes through every map stage before the next partition is read;
    the barrier runs last, once everything it reads is done."""
    order = [(n, p) for n, p, _ in _run(Scheduler(_dag(3), 1, {}, 3))]
    assert order == [("numbers", 0), ("scale", 0), ("threshold", 0),
                     ("numbers", 1), ("scale", 1), ("threshold", 1),
                     ("numbers", 2), ("scale", 2), ("threshold", 2), ("total", 0)]


def test_every_unit_starts_after_its_inputs_and_slots_are_never_exceeded() -> None:
    states = _dag(8)
    sched = Scheduler(states, 3, {}, 3)
    finished: set[Key] = set()
    running: deque[int] = deque()
    while True:
        for i in sched.dispatch():
            assert _inputs(states, sched.key(i)) <= finished, sched.key(i)
            running.append(i)
        assert len(running) <= 3 and len(sched.running()) == len(running)
        if not running:
            break
        i = running.popleft()
        sched.finished(i)
        finished.add(sched.key(i))
    assert len(finished) == 3 * 8 + 1 and not sched.pending() and not sched.open_nodes()


def test_ready_units_of_one_stage_go_by_partition_and_later_stages_first() -> None:
    sched = Scheduler(_dag(4), 2, {}, 3)
    first = sched.dispatch()
    assert _keys(sched, first) == [("numbers", 0), ("numbers", 1)]
    sched.finished(first[1])
    sched.finished(first[0])
    # scale 0 and 1 are ready, and so are numbers 2 and 3: the later stage takes both slots.
    assert _keys(sched, sched.dispatch()) == [("scale", 0), ("scale", 1)]
    assert sched.ready_nodes() == {"numbers"}


def test_full_actor_pool_does_not_hold_back_tasks() -> None:
    """A ready unit whose pool is busy is passed over, not waited for: tasks still fill their slots."""
    sched = Scheduler(_dag(4, actor="scale"), 2, {"scale": 1}, 3)
    for i in sched.dispatch():
        sched.finished(i)
    assert _keys(sched, sched.dispatch()) == [("scale", 0), ("numbers", 2), ("numbers", 3)]
    assert "scale" in sched.ready_nodes()


def test_retries_up_to_max_attempts_then_failed() -> None:
    sched = Scheduler(_dag(2), 1, {}, 3)
    started = _run(sched, fails={("scale", 1): 99})
    assert [a for n, p, a in started if (n, p) == ("scale", 1)] == [1, 2, 3]
    assert sched.failed() == [("scale", 1)]
    assert sched.attempts(sched.number("scale", 1)) == 3


def test_a_retry_that_succeeds_unblocks_its_dependents() -> None:
    sched = Scheduler(_dag(2), 1, {}, 3)
    started = _run(sched, fails={("scale", 1): 2})
    assert ("scale", 1, 3) in started and ("threshold", 1, 1) in started and ("total", 0, 1) in started
    assert not sched.failed() and not sched.pending()


def test_a_failed_unit_blocks_only_its_dependents() -> None:
    """scale 1 fails for good: threshold 1 and the barrier never run; every other unit still does."""
    sched = Scheduler(_dag(4), 2, {}, 2)
    started = {(n, p) for n, p, _ in _run(sched, fails={("scale", 1): 2})}
    assert started == {(n, p) for n in ("numbers", "scale", "threshold") for p in range(4)} - {("threshold", 1)}
    assert sched.failed() == [("scale", 1)]
    assert sched.pending() == [("threshold", 1), ("total", 0)]
    assert sched.open_nodes() == {"threshold", "total"}
    assert len(sched.done()) == 4 + 3 + 3


def test_barrier_waits_for_every_input_even_the_last_retry() -> None:
    sched = Scheduler(_dag(3), 4, {}, 3)
    started = _run(sched, fails={("threshold", 0): 2})
    assert started[-1] == ("total", 0, 1)
    assert ("threshold", 0, 3) in started[:-1]


def test_a_node_with_two_inputs_reads_their_partitions_one_after_another() -> None:
    states = {"a": NodeState("a", "s", "fa", 2, [], False, False), "b": NodeState("b", "s", "fb", 3, [], False, False),
              "both": NodeState("both", "m", "fm", 5, ["a", "b"], False, False)}
    sched = Scheduler(states, 1, {}, 3, done=[("b", 0), ("b", 1), ("b", 2)])
    (first,) = sched.dispatch()
    assert sched.key(first) == ("both", 2)
    sched.finished(first)
    assert _inputs(states, ("both", 3)) == {("b", 1)} and _inputs(states, ("both", 1)) == {("a", 1)}
    assert [(n, p) for n, p, _ in _run(sched)] == [("both", 3), ("both", 4), ("a", 0), ("both", 0), ("a", 1),
                                                    ("both", 1)]


def test_reused_units_never_run_and_their_dependents_are_ready() -> None:
    sched = Scheduler(_dag(2), 4, {}, 3, done=[("numbers", 0), ("numbers", 1), ("scale", 0)])
    first = sched.dispatch()
    assert _keys(sched, first) == [("threshold", 0), ("scale", 1)]
    for i in first:
        sched.finished(i)
    assert [(n, p) for n, p, _ in _run(sched)] == [("threshold", 1), ("total", 0)]


def test_reporting_a_unit_that_is_not_running_is_an_error() -> None:
    sched = Scheduler(_dag(1), 1, {}, 3)
    (i,) = sched.dispatch()
    sched.finished(i)
    with pytest.raises(ValueError, match=f"unit {i}: reported back but not running"):
        sched.finished(i)
    with pytest.raises(ValueError, match="max_attempts"):
        Scheduler(_dag(1), 1, {}, 0)
