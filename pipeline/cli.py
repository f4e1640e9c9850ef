"""The `stgr` command. The engine's own subcommands live here; `stages` and `train` add theirs
through the `stgr.commands` entry points, so this module never imports them."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from pipeline.errors import EXIT_INTERRUPTED, UserError
from pipeline.status import open_run

#: What a Unix tool killed by SIGPIPE reports (128 + 13), e.g. `stgr status --json DIR | head -1`.
EXIT_BROKEN_PIPE = 128 + 13


def _build(args: argparse.Namespace) -> int:
    from pipeline.config import compose_plan, to_yaml

    if args.print_config:
        print(to_yaml(compose_plan(args.overrides, args.config_name, args.config_dir).config), end="")
        return 0
    if not args.run:
        raise UserError("build: --run DIR is required (only --print-config runs without one)")
    if args.dry_run:
        from pipeline.build import dry_run

        return dry_run(args.run, args.overrides, config_dir=args.config_dir, config_name=args.config_name)
    if args.follow and not args.submit:
        from pipeline.jobs import follow

        return follow(open_run(args.run))
    if args.submit:
        from pipeline.jobs import submit

        plan = compose_plan(args.overrides, args.config_name, args.config_dir)
        job_id = submit(args.run, build_args(args), args.address, plan)
        print(job_id)
        if args.follow:
            from pipeline.jobs import follow

            return follow(open_run(args.run))
        return 0
    from pipeline.build import run_build

    return run_build(args.run, args.overrides, config_dir=args.config_dir, config_name=args.config_name)


def _resume(args: argparse.Namespace) -> int:
    from pipeline.build import dry_run, run_build

    if args.dry_run:
        return dry_run(args.run, resume=True)
    return run_build(args.run, resume=True)


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import format_status, run_status

    status = run_status(open_run(args.run, built=True))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if status["complete"] else 1


BUILD_HELP = """Build (or continue) the run in DIR: validate the config, run on Ray every unit (stage x
partition) not yet committed, write the dataset to DIR/dataset/ and end with a summary (dataset path,
rows per set and task, the ledger's top rules, wall time, where to look next).

Overrides use Hydra syntax, e.g. `source.num_videos=200 annotator=vllm`; an unknown key is refused
with the closest valid one. `--print-config` prints the resolved config and builds nothing;
`--dry-run` prints the plan for DIR (units per stage, which would be reused and which would run) and
writes nothing. Ctrl-C stops the build; what committed stays, and `stgr resume DIR` continues.

Exit: 0 every unit committed and the dataset has rows; 1 a unit failed; 2 unusable config or input
(nothing written); 3 the dataset is empty (unless shard.allow_empty=true); 130 interrupted."""

RESUME_HELP = """Continue the build in DIR with the config stored there (DIR/config.yaml): run the units
that are not committed, reuse every one that is. On a run whose every unit is committed it only
checks the dataset and repeats the summary, without starting Ray. `--dry-run` says what would run."""

STATUS_HELP = """What the run in DIR has done, read from the run directory alone (no Ray, no stage code):
per stage the partitions done / failed / pending, rows in / out / rejected and seconds; then each
failed unit with its error and the build holding the run, if any. Exit 0 when complete, 1 otherwise.
`--json` gives the same as one JSON object, for scripts."""


def _subparser(sub: argparse._SubParsersAction, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


#: The engine's own subcommands. Running one loads no `stgr.commands` entry point, so `stgr status`
#: imports no stage or training code (most of its start-up time was those imports).
ENGINE_COMMANDS = frozenset({"build", "resume", "status"})


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (the global options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def make_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The `stgr` parser; with `plugins`, also the subcommands of the `stgr.commands` entry points."""
    parser = argparse.ArgumentParser(prog="stgr", description="Build STGR datasets on Ray and train grounded video reasoners.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _subparser(sub, "build", "build (or continue) the run in DIR", BUILD_HELP)
    p.add_argument("--run", default=None, metavar="DIR", help="run directory (local path or pyarrow filesystem URI)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit; builds nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan: units per stage, which would be reused and which would run; writes nothing")
    p.add_argument("--submit", action="store_true", help="submit the build as a Ray Job to RAY_ADDRESS and print its id")
    p.add_argument("--follow", action="store_true", help="attach to the log of the build's Ray Job")
    p.add_argument("--address", default=None, help="Ray Jobs address for --submit (default: RAY_ADDRESS)")
    p.add_argument("--config-dir", default=None, help="a directory of Hydra configs to use instead of the packaged conf/")
    p.add_argument("--config-name", default="build", help="the config file in it, without .yaml (default: build)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. source.num_videos=200")
    p.set_defaults(func=_build)

    p = _subparser(sub, "resume", "redo what is not committed, with the config stored in DIR", RESUME_HELP)
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--dry-run", action="store_true", help="print what would run and what would be reused; writes nothing")
    p.set_defaults(func=_resume)

    p = _subparser(sub, "status", "per stage: partitions done / failed / pending, rows, seconds, errors", STATUS_HELP)
    p.add_argument("run", metavar="DIR", help="run directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)

    if plugins:
        from pipeline.registry import load_entry_points

        for register in load_entry_points("stgr.commands").values():
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. A UserError is one line and its exit code (2); Ctrl-C outside a build is
    one line and 130 (a build says itself what committed); a reader that closes the pipe (`| head`)
    ends the command quietly, as for any Unix tool."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(plugins=_command(argv) not in ENGINE_COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except UserError as exc:
        print(f"stgr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"stgr: interrupted ({args.command})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


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
