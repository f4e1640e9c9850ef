"""Engine overhead: the same stage functions over the same partitions, plain Python loop vs `stgr build`
on an embedded local Ray with one CPU. Prints both wall times and their ratio (target <= 1.10 when a
partition holds at least a second of work).

    python tests/bench/bench_engine.py [--partitions 16] [--work 1.0]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.chdir(REPO)

from pipeline.build import run_build  # noqa: E402
from pipeline.config import compose, validate  # noqa: E402
from pipeline.testing import unit_context  # noqa: E402


def plain_loop(overrides: list[str], scratch: Path) -> float:
    """Every unit of the DAG in topological order in this process: the cost of the work alone."""
    from omegaconf import OmegaConf

    plan = validate(OmegaConf.to_container(compose(overrides, "engine", REPO / "tests" / "engine_conf"), resolve=True))
    started = time.perf_counter()
    outputs: dict[str, list] = {}
    for node in plan.order:
        spec = plan.nodes[node]
        stage = spec.stage_cls(spec.config)
        ctx = unit_context(scratch, stage=node)
        stage.setup(ctx)
        if spec.stage_cls.source:
            inputs = [None] * stage.plan()
        elif spec.stage_cls.needs_all_input:
            import pyarrow as pa

            inputs = [pa.concat_tables(outputs[spec.after[0]])]
        else:
            inputs = outputs[spec.after[0]]
        outputs[node] = []
        for p, table in enumerate(inputs):
            ctx = unit_context(scratch, stage=node, partition=p, num_partitions=len(inputs))
            outputs[node].append(stage.process(table, ctx).table)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of CPU work per partition in two stages")
    args = parser.parse_args()
    overrides = [f"numbers.partitions={args.partitions}", f"numbers.work_s={args.work}", f"scale.work_s={args.work}",
                 "cluster.num_cpus=1"]
    import ray

    from pipeline.build import worker_env

    with tempfile.TemporaryDirectory(prefix="stgr-bench-", dir="/tmp") as tmp:
        loop_s = plain_loop(overrides, Path(tmp) / "loop")
        started = time.perf_counter()
        ray.init(num_cpus=1, include_dashboard=False, _temp_dir=f"{tmp}/ray", runtime_env={"env_vars": worker_env()})
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        code = run_build(str(Path(tmp) / "run"), overrides, config_dir=str(REPO / "tests" / "engine_conf"),
                         config_name="engine", interactive=False)
        build_s = time.perf_counter() - started
        ray.shutdown()
    assert code == 0
    work = 2 * args.partitions * args.work
    print(f"partitions={args.partitions} work/partition/stage={args.work}s total work={work:.1f}s")
    print(f"plain loop:                         {loop_s:.2f} s")
    print(f"stgr build on local Ray, 1 CPU:     {build_s:.2f} s  (+ {start_s:.2f} s to start Ray)")
    print(f"ratio build/loop:                   {build_s / loop_s:.3f}")
    print(f"ratio incl. Ray start:              {(build_s + start_s) / loop_s:.3f}")


if __name__ == "__main__":
    main()
