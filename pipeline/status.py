"""`stgr status DIR`: what is done, failed and pending, read from the run directory alone.

Needs no stage code and no Ray: plan.json names each node's fingerprint and partition count, and
the commit/error records say the rest, so it works from any machine that sees the run directory.
A stage's report (`StageReport`, kept in the commit record) is listed too: its failure line, such as
an empty dataset, is shown under the table; so is the build holding the run's lease, and a unit
withdrawn because its files were damaged (its error note starts with `invalidated:`) counts as pending.
What the model calls cost (the records' `cost`, summed by `pipeline.cost`) is a column, and a line
under the table gives the total, the cost per kept row and what the response cache saved.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

from pipeline.cost import add_costs, per_row, usd_text
from pipeline.errors import UserError
from pipeline.lease import LEASE, describe, is_stale
from pipeline.rundir import RunDir, Unit


def open_run(uri: str, built: bool = False) -> RunDir:
    """The run directory at `uri`; UserError (one line, exit 2) when it is a file, or, with `built`,
    when it holds no plan.json (no build ever ran there)."""
    run = RunDir.open(uri)
    kind = run.fs.get_file_info(run.path).type
    if kind == pafs.FileType.File:
        raise UserError(f"{run.uri}: is a file, not a run directory; give a directory (new or of an earlier build)")
    if built and (kind == pafs.FileType.NotFound or not run.exists("plan.json")):
        what = "does not exist" if kind == pafs.FileType.NotFound else "holds no plan.json"
        raise UserError(f"{run.uri}: not a run directory ({what}); `stgr build --run {uri}` starts one")
    return run


def run_status(run: RunDir) -> dict[str, Any]:
    plan = json.loads(run.read_text("plan.json"))
    nodes = []
    for node, info in plan["nodes"].items():
        names = set(run.list_dir(Unit(node, info["fingerprint"], 0).stage_dir))
        row: dict[str, Any] = {"node": node, "stage": info["stage"], "fingerprint": info["fingerprint"],
                               "partitions": info["partitions"], "done": 0, "failed": 0, "retrying": 0,
                               "pending": 0, "rows_in": 0, "rows_out": 0, "rows_rejected": 0,
                               "seconds": 0.0, "errors": [], "reports": []}
        costs = []
        for p in range(info["partitions"]):
            unit = Unit(node, info["fingerprint"], p)
            if posixpath.basename(unit.record) in names:
                record = json.loads(run.read_text(unit.record))
                row["done"] += 1
                for key in ("rows_in", "rows_out", "rows_rejected", "seconds"):
                    row[key] += record.get(key, 0)
                if record.get("report"):
                    row["reports"].append(record["report"])
                if record.get("cost"):
                    costs.append(record["cost"])
            elif posixpath.basename(unit.error) in names:
                error = json.loads(run.read_text(unit.error))
                row["failed" if error.get("final") else "retrying"] += 1
                row["errors"].append({"partition": p, "unit": unit.key(), "attempt": error.get("attempt"),
                                      "error": error.get("error", "")})
            else:
                row["pending"] += 1
        row["seconds"] = round(row["seconds"], 3)
        row["cost"] = add_costs(costs) if costs else None
        nodes.append(row)
    complete = all(n["done"] == n["partitions"] for n in nodes)
    return {"run": run.uri, "build_id": plan.get("build_id"), "complete": complete, "stages": nodes,
            "cost": _cost(plan["nodes"], nodes, complete), "lease": _lease(run)}


def _cost(plan_nodes: dict[str, Any], nodes: list[dict[str, Any]], complete: bool) -> dict[str, Any] | None:
    """The committed units' cost, per kept row once the build is complete (the kept rows are the
    rows out of the last nodes, those no node reads: the dataset); None without a model call."""
    costs = [n["cost"] for n in nodes if n["cost"]]
    if not costs:
        return None
    total = add_costs(costs)
    read = {u for info in plan_nodes.values() for u in info.get("after") or []}
    kept = sum(n["rows_out"] for n in nodes if n["node"] not in read) if complete else None
    return {"usd": total["usd"], "saved_usd": total["saved_usd"], "calls": total["calls"], "cached": total["cached"],
            "unmetered": total["unmetered"], "kept_rows": kept, "per_kept_row_usd": per_row(total["usd"], kept)}


def _lease(run: RunDir) -> dict[str, Any] | None:
    """The lease record, with whether it is stale and a line saying who holds it; None when free."""
    try:
        record = json.loads(run.read_text(LEASE))
    except (FileNotFoundError, ValueError):
        return None
    stale = is_stale(record)
    return {**record, "stale": stale, "holder": describe(record) + (" (stale)" if stale else "")}


def cost_line(cost: dict[str, Any]) -> str:
    """`cost: $0.0123 for 6 calls, $0.0021 per kept row (6 rows); 4 cached calls saved $0.0080`."""
    if cost["kept_rows"] is None:
        per = "per kept row once the build is complete"
    else:
        per = f"{usd_text(cost['per_kept_row_usd'])} per kept row ({cost['kept_rows']} rows)"
    line = (f"cost: {usd_text(cost['usd'])} for {cost['calls']} model calls, {per}; "
            f"{cost['cached']} cached calls saved {usd_text(cost['saved_usd'])}")
    if cost["unmetered"]:
        line += f"; {cost['unmetered']} calls reported no token count (counted as 0 tokens)"
    return line


def format_status(status: dict[str, Any]) -> str:
    header = ("stage", "done", "failed", "pending", "rows in", "rows out", "rejected", "seconds", "cost")
    rows = [header]
    for n in status["stages"]:
        pending = n["pending"] + n["retrying"]
        rows.append((n["node"], f"{n['done']}/{n['partitions']}", str(n["failed"]), str(pending), str(n["rows_in"]),
                     str(n["rows_out"]), str(n["rows_rejected"]), f"{n['seconds']:.1f}",
                     usd_text(n["cost"]["usd"]) if n.get("cost") else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"run {status['run']} ({'complete' if status['complete'] else 'incomplete'})"]
    if status.get("lease"):
        lines.append(f"held by {status['lease']['holder']}")
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if status.get("cost"):
        lines.append(cost_line(status["cost"]))
    for n in status["stages"]:
        for e in n["errors"]:
            first = e["error"].strip().splitlines()[0] if e["error"].strip() else ""
            if first.startswith("invalidated: "):
                lines.append(f"INVALIDATED {e['unit']} (recomputed by the next build or resume): {first[13:]}")
            else:
                lines.append(f"FAILED {e['unit']} (attempt {e['attempt']}): {first}")
        lines.extend(r["failure"] for r in n["reports"] if r.get("failure"))
    return "\n".join(lines)
