"""Progress of a build: on a terminal a bar per stage and an overall bar with an ETA (rich); otherwise
(CI, Ray Jobs, a pipe) one log line per committed unit carrying the same overall count and ETA.

The overall bar counts the units this build has to run: a unit reused from an earlier build leaves
it (its stage's bar still shows it done), so the ETA is the time the remaining units will take at the
pace of the units run so far, not a figure diluted by work that cost nothing.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pipeline.rundir import Unit, part_name

log = logging.getLogger("stgr")

OVERALL = "all stages"


def format_seconds(seconds: float) -> str:
    """`4.2 s`, `42 s`, `3m05s`, `2h07m`: short enough for a progress line."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts committed units per stage and overall; `update` is called once per unit."""

    def __init__(self, totals: dict[str, int], interactive: bool | None = None) -> None:
        self.totals = totals
        self.counts = {node: 0 for node in totals}
        self.to_run = sum(totals.values())
        self.ran = 0
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.started = time.monotonic()
        self._rich: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "Progress":
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn
            from rich.text import Text

            class OverallEta(TimeRemainingColumn):
                """The remaining time on the overall bar only: a stage's own pace says little."""

                def render(self, task: Any) -> Text:
                    return Text("ETA ") + super().render(task) if task.fields.get("overall") else Text("")

            width = max([len(OVERALL), *map(len, self.totals)])
            self._rich = RichProgress(TextColumn(f"{{task.description:>{width}}}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), OverallEta(), transient=False)
            self._rich.__enter__()
            self._tasks = {node: self._rich.add_task(node, total=total) for node, total in self.totals.items()}
            self._tasks[OVERALL] = self._rich.add_task(OVERALL, total=self.to_run, overall=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def eta(self) -> float | None:
        """Seconds left at the pace of the units run so far; None before the first one."""
        if not self.ran:
            return None
        return (time.monotonic() - self.started) / self.ran * (self.to_run - self.ran)

    def update(self, unit: Unit, summary: dict[str, Any], reused: bool) -> None:
        """Count one committed unit (`reused`: committed by an earlier build, so not one to run)."""
        self.counts[unit.node] += 1
        if reused:
            self.to_run -= 1
        else:
            self.ran += 1
        if self._rich is not None:
            self._rich.update(self._tasks[unit.node], completed=self.counts[unit.node])
            self._rich.update(self._tasks[OVERALL], completed=self.ran, total=self.to_run)
        elif not reused:
            eta = self.eta()
            left = f", ETA {format_seconds(eta)}" if eta is not None and self.ran < self.to_run else ""
            log.info("%s %s committed (%d/%d; %d/%d units to run%s): %s in, %s out, %s rejected, %.2f s", unit.node,
                     part_name(unit.partition), self.counts[unit.node], self.totals[unit.node], self.ran,
                     self.to_run, left, summary.get("rows_in"), summary.get("rows_out"),
                     summary.get("rows_rejected"), summary.get("seconds", 0.0))
