"""`stgr inspect PATH`: what a dataset or stage output holds, and why records were rejected.

PATH may be a run directory, its dataset/, one split folder, a stage output folder or a Parquet file.
Prints rows, counts per split/task/source, a few numbers from the alignment scores, and the ledger
(rows per stage and rule with an example reason). `--json` prints the same summary for scripts.

`--verify` re-hashes every shard against the manifest and finds files in the split folders that the
manifest does not list; for a dataset inside a run directory it also checks that the dataset is the
run's plan's (the manifest's shard fingerprint is plan.json's), and given the run directory itself it
re-hashes every committed unit's data and ledger files against their commit records.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.rundir import RunDir, Unit, verify_committed
from stages.commands._records import Located, locate
from stages.lib.dataset import count_rows, ledger_counts, listing, unlisted_files

SUMMARY_COLUMNS = ["id", "split", "task", "source", "scores"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="summary of a dataset or stage output: rows, tasks, sources, ledger reasons",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, dataset/, split folder, stage output folder or Parquet file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's size and sha256 against manifest.json, the dataset against the run's "
                        "plan, and (given a run directory) every committed unit's files against their records")
    p.set_defaults(func=handler)


def _score_stats(table: pa.Table) -> dict[str, Any]:
    scores = table.column("scores")
    aligned = len(scores) - scores.null_count
    if aligned == 0:
        return {"aligned": 0}
    combined = scores.combine_chunks()
    out: dict[str, Any] = {"aligned": int(aligned)}
    for name in ("mean_iou", "answer_score"):
        values = pc.struct_field(combined, name)
        out[f"{name}_avg"] = pc.mean(values).as_py()
    out["format_ok"] = int(pc.sum(pc.cast(pc.fill_null(pc.struct_field(combined, "format_ok"), False), pa.int64())).as_py() or 0)
    out["claims"] = int(pc.sum(pc.struct_field(combined, "num_claims")).as_py() or 0)
    return out


def verify_shards(located: Located) -> list[str]:
    """Problems found re-hashing the shards listed in the manifest (empty: all match)."""
    problems = []
    for name, info in (located.manifest or {}).get("splits", {}).items():
        for shard in info.get("shards", []):
            path = posixpath.join(located.path, shard["path"])
            try:
                with located.fs.open_input_stream(path) as stream:
                    data = stream.read()
            except FileNotFoundError:
                problems.append(f"{shard['path']}: listed in manifest.json but missing")
                continue
            if len(data) != shard["bytes"]:
                problems.append(f"{shard['path']}: {len(data)} bytes, manifest says {shard['bytes']}")
            elif hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{shard['path']}: sha256 differs from manifest.json")
    problems += [f"{rel}: not listed in manifest.json" for rel in unlisted_files(listing(located.fs, located.path),
                                                                                  located.manifest)]
    return problems


def _plan(located: Located) -> dict[str, Any] | None:
    if located.run_path is None:
        return None
    with located.fs.open_input_stream(posixpath.join(located.run_path, "plan.json")) as stream:
        return json.loads(stream.read())


def verify_plan(located: Located) -> list[str]:
    """Whether a dataset inside a run directory is the one the run's plan makes: its manifest was
    written by the plan's publish unit (another config built in between leaves another dataset), from
    every input (a partial dataset is not)."""
    plan, manifest = _plan(located), located.manifest or {}
    if plan is None:
        return []
    nodes = plan.get("nodes", {})
    node = manifest.get("node") or next((n for n, info in nodes.items() if info.get("stage") == "publish"), None)
    expected = (nodes.get(node) or {}).get("fingerprint")
    run = located.run_path
    if manifest.get("partial"):  # published from what committed while units failed (docs/sources.md)
        return [f"manifest.json: a partial dataset, built without {', '.join(manifest['partial']['missing_units'])}, "
                f"which did not commit (`stgr resume {run}` completes it once their cause is fixed)"]
    if expected is None or manifest.get("fingerprint") == expected:
        return []
    return [f"manifest.json: written by {node} fingerprint {manifest.get('fingerprint')}, but the run's plan.json has "
            f"{expected}: the dataset does not match the run's plan (`stgr resume {run}` puts the plan's dataset in place)"]


def verify_units(located: Located) -> list[str]:
    """Every committed unit of the run's plan, its data and ledger re-hashed against its commit record."""
    plan = _plan(located)
    run = RunDir(located.run_path or "", located.fs, located.run_path or "")
    units = [Unit(node, info["fingerprint"], p) for node, info in (plan or {}).get("nodes", {}).items()
             for p in range(int(info["partitions"]))]
    return verify_committed(run, units)


def summarise(located: Located) -> dict[str, Any]:
    """The summary `stgr inspect` prints, as plain data."""
    columns = [c for c in SUMMARY_COLUMNS if not located.files or c in located.dataset().schema.names]
    table = located.read(columns)
    for name in SUMMARY_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    ledger = located.ledger()
    summary: dict[str, Any] = {
        "path": located.uri, "kind": located.kind, "what": located.label, "rows": table.num_rows,
        "files": len(located.files),
        "split": count_rows(table, ["split"]), "task": count_rows(table, ["task"]),
        "source": count_rows(table, ["source"]),
        "scores": _score_stats(table) if table.schema.field("scores").type != pa.null() else {"aligned": 0},
        "ledger": ledger_counts(ledger) if ledger.num_rows else list((located.manifest or {}).get("ledger", [])),
    }
    return summary


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "  (none)"
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    widths[-1] = min(widths[-1], 100)
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  " + "  ".join(v[:w].ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    parts = [f"{summary['path']}: {summary['what']}", f"rows: {summary['rows']} in {summary['files']} file(s)"]
    for key in ("split", "task", "source"):
        if any(r[key] is not None for r in summary[key]):
            parts += [f"\nper {key}:", _table(summary[key], [key, "rows"])]
    scores = summary["scores"]
    if scores.get("aligned"):
        avg_iou = "-" if scores.get("mean_iou_avg") is None else f"{scores['mean_iou_avg']:.3f}"
        avg_answer = "-" if scores.get("answer_score_avg") is None else f"{scores['answer_score_avg']:.3f}"
        parts.append(f"\nalignment: {scores['aligned']} aligned, {scores['format_ok']} well formed, "
                     f"{scores['claims']} claims, mean claim IoU {avg_iou}, mean answer score {avg_answer}")
    parts += ["\nrejected (ledger; a record counts once per rule it failed):",
              _table(summary["ledger"], ["stage", "rule", "rows", "example"])]
    if "verify" in summary:
        parts.append("\nshards: all sizes and sha256 match manifest.json")
    return "\n".join(parts)


def verify(located: Located, whole_run: bool) -> list[str]:
    """Everything `--verify` checks (see the module's doc); `whole_run`: the path was the run directory."""
    problems = verify_units(located) if whole_run else []
    if located.manifest:
        return problems + verify_plan(located) + verify_shards(located)
    if whole_run:
        return problems + ["dataset/manifest.json: missing: the run has no dataset (`stgr resume` publishes it)"]
    return ["no manifest.json here: nothing to verify against"]


def handler(args: argparse.Namespace) -> int:
    located = locate(args.path)
    if args.verify:
        # before reading anything: a damaged shard would otherwise fail the summary with a decoder error
        whole_run = located.run_path is not None and RunDir.open(args.path).path == located.run_path
        problems = verify(located, whole_run)
        if problems:
            print(json.dumps({"path": located.uri, "verify": problems}, indent=2) if args.json
                  else "shard problems:\n" + "\n".join(f"  {p}" for p in problems))
            return 1
    summary = summarise(located)
    if args.verify:
        summary["verify"] = []
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0
