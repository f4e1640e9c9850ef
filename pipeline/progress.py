"""Progress per stage: a bar each on a terminal, one log line per unit otherwise (CI, Ray Jobs)."""
from __future__ import annotations

import logging
import sys
from typing import Any

from pipeline.rundir import Unit

log = logging.getLogger("stgr")


class Progress:
    def __init__(self, totals: dict[str, int], interactive: bool | None = None) -> None:
        self.totals = totals
        self.counts = {node: 0 for node in totals}
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._rich: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "Progress":
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._rich = RichProgress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), transient=False)
            self._rich.__enter__()
            self._tasks = {node: self._rich.add_task(node, total=total) for node, total in self.totals.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def update(self, unit: Unit, summary: dict[str, Any], reused: bool) -> None:
        self.counts[unit.node] += 1
        if self._rich is not None:
            self._rich.update(self._tasks[unit.node], completed=self.counts[unit.node])
        elif not reused:
            log.info("%s %s committed (%d/%d): %s in, %s out, %s rejected, %.2f s", unit.node,
                     f"part-{unit.partition:05d}", self.counts[unit.node], self.totals[unit.node],
                     summary.get("rows_in"), summary.get("rows_out"), summary.get("rows_rejected"),
                     summary.get("seconds", 0.0))
