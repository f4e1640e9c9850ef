"""The `stgr` command. The engine's own subcommands live here; `stages` and `train` add theirs
through the `stgr.commands` entry points, so this module never imports them."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from pipeline.errors import UserError
from pipeline.registry import load_entry_points
from pipeline.rundir import RunDir


def _build(args: argparse.Namespace) -> int:
    if args.follow and not args.submit:
        from pipeline.jobs import follow

        return follow(RunDir.open(args.run))
    if args.submit:
        from pipeline.jobs import submit

        from omegaconf import OmegaConf

        from pipeline.config import compose, validate

        conf_dir = os.path.abspath(args.config_dir) if args.config_dir else None
        plan = validate(OmegaConf.to_container(compose(args.overrides, args.config_name, conf_dir), resolve=True))
        job_id = submit(args.run, build_args(args), args.address, plan)
        print(job_id)
        if args.follow:
            from pipeline.jobs import follow

            return follow(RunDir.open(args.run))
        return 0
    from pipeline.build import run_build

    return run_build(args.run, args.overrides, config_dir=args.config_dir, config_name=args.config_name)


def _resume(args: argparse.Namespace) -> int:
    from pipeline.build import run_build

    return run_build(args.run, resume=True)


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import format_status, run_status

    run = RunDir.open(args.run)
    if not run.exists("plan.json"):
        raise UserError(f"{args.run}: not a run directory (no plan.json)")
    status = run_status(run)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if status["complete"] else 1


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stgr", description="Build STGR datasets on Ray and train grounded video reasoners.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build (or continue) the run in DIR")
    p.add_argument("--run", required=True, help="run directory (local path or pyarrow filesystem URI)")
    p.add_argument("--submit", action="store_true", help="submit the build as a Ray Job to RAY_ADDRESS and print its id")
    p.add_argument("--follow", action="store_true", help="attach to the log of the build's Ray Job")
    p.add_argument("--address", default=None, help="Ray Jobs address for --submit (default: RAY_ADDRESS)")
    p.add_argument("--config-dir", default=None, help="a directory of Hydra configs to use instead of the packaged conf/")
    p.add_argument("--config-name", default="build", help="the config file in it, without .yaml (default: build)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. source.num_videos=200")
    p.set_defaults(func=_build)

    p = sub.add_parser("resume", help="redo what is not committed, with the config stored in DIR")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=_resume)

    p = sub.add_parser("status", help="per stage: partitions done / failed / pending, rows, seconds, errors")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    for register in load_entry_points("stgr.commands").values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"stgr: error: {exc}", file=sys.stderr)
        return exc.exit_code


def build_args(args: argparse.Namespace) -> list[str]:
    """The arguments after `--run DIR` that a submitted job must repeat (config location, overrides)."""
    extra = []
    if args.config_dir:
        extra += ["--config-dir", os.path.abspath(args.config_dir)]
    if args.config_name != "build":
        extra += ["--config-name", args.config_name]
    return [*extra, *args.overrides]


if __name__ == "__main__":
    sys.exit(main())
