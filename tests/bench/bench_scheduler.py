"""The driver's scheduling core alone (pipeline/scheduler.py, no Ray) at N and 10N simulated units.

A DAG of the engine test's shape (a source, a CPU map, an actor-pool map, a barrier) of P
partitions, 3P + 1 units, run to its end by a simulated cluster: `--slots` CPU task slots and an
actor pool of `--actors`, units finishing after a random duration (so completions come back out of
order), one unit in `--fail-every` failing its first attempt. Timed: building the core (numbering
the units, counting their inputs, indexing their readers) and every dispatch / finished / fail
call; the simulated cluster's own event queue is timed too (a heap, as cheap as the core's). A
linear core gives a ratio near 10. It also prints the core's memory for the default DAG's shape at 6N
and 60N units (tracemalloc peak of building it: what the driver holds per unit).

    python tests/bench/bench_scheduler.py [--units 10000] [--factor 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import heapq
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.scheduler import NodeState, Scheduler  # noqa: E402


def simulate(units: int, slots: int, actors: int, fail_every: int, seed: int = 0) -> tuple[float, int, int]:
    """(CPU seconds, units committed, failed attempts) of one simulated build of about `units` units."""
    partitions = max(1, (units - 1) // 3)
    shape = [("source", [], False, False), ("sample", ["source"], False, False),
             ("annotate", ["sample"], True, False), ("shard", ["annotate"], False, True)]
    states = {n: NodeState(n, n, f"fp-{n}", 1 if barrier else partitions, after, actor, barrier)
              for n, after, actor, barrier in shape}
    rng = random.Random(seed)
    started = time.process_time()
    sched = Scheduler(states, slots, {"annotate": actors}, max_attempts=3)
    clock, events, seq, failures = 0.0, [], 0, 0
    while True:
        for unit in sched.dispatch():
            seq += 1
            fails = seq % fail_every == 0 and sched.attempt(unit) == 1
            heapq.heappush(events, (clock + rng.random(), seq, unit, fails))
        if not events:
            break
        clock, _, unit, fails = heapq.heappop(events)
        if fails:
            failures += 1
            sched.fail(unit)
        else:
            sched.finished(unit)
    cpu = time.process_time() - started
    done = len(sched.done())
    if sched.pending() or sched.failed() or done != sum(s.partitions for s in states.values()):
        raise SystemExit(f"the simulated build did not finish: {done} units done")
    return cpu, done, failures


def state_bytes(units: int) -> int:
    """tracemalloc peak of building the core for a default-shaped DAG of about `units` units (source,
    five maps, the publish barrier): what the driver holds per unit before any runs."""
    partitions = max(1, (units - 1) // 6)
    names = ["source", "sample", "annotate", "align", "filter", "shard"]
    states = {n: NodeState(n, n, f"fp-{n}", partitions, names[i - 1:i], n == "annotate", False)
              for i, n in enumerate(names)}
    states["publish"] = NodeState("publish", "publish", "fp-publish", 1, ["shard"], False, True)
    tracemalloc.start()
    sched = Scheduler(states, 64, {"annotate": 8}, max_attempts=3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del sched
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=10_000, help="N: units of the smaller build")
    parser.add_argument("--factor", type=int, default=10, help="the larger build has factor * N units")
    parser.add_argument("--slots", type=int, default=64, help="CPU task slots of the simulated cluster")
    parser.add_argument("--actors", type=int, default=8, help="actors in the simulated pool")
    parser.add_argument("--fail-every", type=int, default=97, help="one unit in this many fails its first attempt")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; the fastest counts")
    args = parser.parse_args()
    results = {}
    for units in (args.units, args.factor * args.units):
        results[units] = min(simulate(units, args.slots, args.actors, args.fail_every) for _ in range(args.repeats))
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.slots} task slots, "
          f"{args.actors} actors, one unit in {args.fail_every} retried")
    for units, (cpu, done, failures) in results.items():
        print(f"units={done:8d}  CPU {cpu:7.3f} s  {1e6 * cpu / done:6.1f} us/unit  ({failures} failed attempts)")
    small, large = results[args.units][0], results[args.factor * args.units][0]
    print(f"ratio CPU {args.factor}N/N: {large / small:.2f}")
    for units in (6 * args.units, 6 * args.factor * args.units):
        peak = state_bytes(units)
        print(f"default DAG, {units:8d} units: core state {peak / 2**20:6.1f} MiB peak, {peak / units:.0f} B/unit")


if __name__ == "__main__":
    main()
