"""Ray Jobs: `stgr build --submit` runs the driver on the cluster, so the user's terminal may go.

The job id and address are written to `<run>/job.json`; `--follow` reads them back, so any machine
that sees the run directory can attach to the log.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from typing import Sequence

from pipeline.config import BuildPlan
from pipeline.errors import UserError
from pipeline.rundir import RunDir


def _address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--submit: no cluster address; set RAY_ADDRESS (e.g. http://head:8265) or pass --address")
    if "://" not in address:
        address = f"http://{address}"
    return address


def command_line(run: str, arguments: Sequence[str]) -> str:
    """The `stgr build` command a Ray Job runs for `--submit`."""
    return shlex.join(["stgr", "build", "--run", run, *arguments])


def submit(run_dir: str, arguments: Sequence[str], address: str | None = None, plan: BuildPlan | None = None) -> str:
    """Submit `stgr build --run DIR ARGUMENTS` as a Ray Job; `plan` (validated here first) names the
    variables its workers need."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.build import job_env

    address = _address(address)
    run = RunDir.open(run_dir)

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=command_line(run.uri, arguments),
                               runtime_env={"env_vars": job_env(plan)},
                               metadata={"stgr_run": run.uri})
    run.makedirs("")
    run.write_text("job.json", json.dumps({"job_id": job_id, "address": address, "submitted_at": time.time(),
                                           "arguments": list(arguments)}, indent=2))
    return job_id


def follow(run: RunDir) -> int:
    """Print the job's log until it ends; the build's own exit code (3 for an empty dataset, 1 for
    failed units), so a script that follows a submitted build reads what a local build would say;
    1 when the job failed without one (stopped, or its driver died)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not run.exists("job.json"):
        raise UserError(f"--follow: {run.uri} has no job.json; submit the build with --submit first")
    job = json.loads(run.read_text("job.json"))
    client = JobSubmissionClient(job["address"])

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job["job_id"]):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    info = client.get_job_info(job["job_id"])
    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = info.driver_exit_code
    return code if isinstance(code, int) and code > 0 else 1
