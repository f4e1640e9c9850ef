"""`stgr diff A B`: what changed from build A (old) to build B (new).

A and B are run directories or dataset folders (`<run>/dataset/`, or a copy of one), in any mix and on
any pyarrow filesystem. Rows are matched by `id`; the report lists the rows added, dropped and changed
(for changed rows: which columns, with a few examples of the values that differ, old -> new), the ledger
rules whose counts moved per stage, the rows per set and task and per set and source, the config
difference as dotted keys, the stages whose fingerprint differs, and the cost (`manifest.json`'s
`cost`: total and per kept row, or "no cost ledger"). `--json` prints the same as one object (below).

Exit: 0 identical, 1 they differ, 2 a path that is neither a run directory nor a dataset folder.
The cost is measured (wall time, GPU seconds), so it is reported but does not decide the exit code.

How rows are compared, and why this stays small in memory: each side is scanned once, one batch of
rows at a time, through the Parquet files its manifest lists (`stages.commands._records.locate`),
and every column of every row is reduced to a 64-bit digest with vectorised numpy over the Arrow
buffers (strings and binaries by pandas' C hash; lists and structs by combining their children's
digests with their positions). What stays in memory is one id and one digest per column per row
(two 10^5-row datasets: a few tens of MB, whatever their frames weigh); frame bytes are never
compared or printed as such. Only the few example rows are read back whole, by id, to show their
values (bytes as size and sha256, long values cut). Two fields say which build wrote a row, not what
is in it, and are left out: `provenance.build_id` and `provenance.stage_fingerprints` (the
fingerprints are compared per stage instead). `media.uri` is compared from its last `/media/` on
(a source that renders videos puts them in `<run>/media/<source>/`), so two run directories of one
config, each with its own copy of the rendered videos, compare equal; the frames, compared by their
bytes, still tell two different videos apart.

`--json` structure (keys always present; lists sorted):
  old, new          {path, what, rows}
  identical         true when nothing below differs (cost aside)
  rows              {added: [id], dropped: [id], changed: [id]}
  columns           {only_old: [name], only_new: [name],
                     changed: [{column, rows, examples: [{id, changes: [{path, old, new}], more}]}]}
  ledger            [{stage, rule, old, new}]          rules whose count moved (0 where absent)
  counts            {task: [{split, task, old, new}], source: [{split, source, old, new}]}  (all)
  config            [{key, old, new}]                  a side's value is left out where it lacks the key
  fingerprints      [{node, old, new}]                 null where a side lacks the node
  cost              {old: {total_usd, per_kept_row_usd} | null, new: ... | null}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipeline.errors import InputError
from stages.commands._records import Located, locate
from stages.lib.dataset import count_rows, ledger_counts

#: Rows per scanned batch: bounds the memory a batch of frames takes.
BATCH_ROWS = 256
#: provenance fields that name the build that wrote a row, not what the row holds.
BUILD_FIELDS = ("build_id", "stage_fingerprints")
#: Longest value an example prints (characters) before it is cut.
MAX_VALUE = 120
#: Differing values shown per example row.
CHANGES_PER_EXAMPLE = 3
COUNT_KEYS = ("split", "task", "source")

_NULL = np.uint64(0x5BD1E9955BD1E995)
_K = np.uint64(0x9E3779B97F4A7C15)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("diff", help="what changed between two builds: rows, ledger rules, counts, config, cost",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="run directory or dataset folder (the old build)")
    p.add_argument("new", help="run directory or dataset folder (the new build)")
    p.add_argument("--json", action="store_true", help="print the difference as JSON (structure above)")
    p.add_argument("--examples", type=int, default=3, metavar="N", help="example rows per changed column (default 3)")
    p.set_defaults(func=handler)


# -- digests ------------------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise: spreads every input bit over the whole digest."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _list_digest(array: pa.Array) -> np.ndarray:
    """Each list's digest: its elements' digests mixed with their positions, summed per list (through
    a running sum, so no Python loop), mixed with the list's length."""
    values = digest(array.flatten())
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    positions = np.arange(len(values), dtype=np.int64) - np.repeat(starts, lengths)
    elements = _mix(values + _mix(positions.astype(np.uint64) + np.uint64(1)))
    running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(elements, dtype=np.uint64)])
    return _mix(running[ends] - running[starts] + lengths.astype(np.uint64) * _K)


def digest(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One 64-bit digest per element of `array`, equal for equal values (nulls included), from the
    Arrow buffers with numpy: no Python object per element except for strings and binaries, which
    pandas hashes in C."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    if pa.types.is_null(kind):
        return np.full(len(array), _NULL, dtype=np.uint64)
    if pa.types.is_struct(kind):
        out = np.full(len(array), np.uint64(kind.num_fields), dtype=np.uint64)
        for child in array.flatten():
            out = _mix(out * _K + digest(child))
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        out = _list_digest(array)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        out = pd.util.hash_array(array.to_numpy(zero_copy_only=False), categorize=False)
    elif pa.types.is_boolean(kind):
        out = pc.cast(pc.fill_null(array, False), pa.uint8()).to_numpy().astype(np.uint64)
    elif pa.types.is_floating(kind):
        out = _mix(pc.cast(pc.fill_null(array, 0), pa.float64()).to_numpy().view(np.uint64))
    elif pa.types.is_integer(kind) or pa.types.is_temporal(kind):
        target = pa.uint64() if pa.types.is_unsigned_integer(kind) else pa.int64()
        out = _mix(pc.cast(pc.fill_null(pc.cast(array, target), 0), target).to_numpy().view(np.uint64))
    else:  # decimals and the like: by their text
        out = digest(pc.cast(array, pa.string()))
    if array.null_count:
        out[array.is_null().to_numpy(zero_copy_only=False)] = _NULL
    return out


# -- one side -----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One build as `stgr diff` reads it."""

    located: Located
    config: dict[str, Any]
    fingerprints: dict[str, str]

    @cached_property
    def columns(self) -> list[str]:
        """The columns of its rows (those of its first file, as every reader of a dataset takes them)."""
        return self.located.dataset().schema.names if self.located.files else []

    def describe(self, rows: int) -> dict[str, Any]:
        return {"path": self.located.uri, "what": self.located.label, "rows": rows}

    def rule_counts(self) -> dict[tuple[str, str], int]:
        """Ledger rows per (stage, rule): from the run's ledger files, else the manifest's counts."""
        ledger = self.located.ledger()
        rows = ledger_counts(ledger) if ledger.num_rows else (self.located.manifest or {}).get("ledger", [])
        return {(r["stage"], r["rule"]): int(r["rows"]) for r in rows}

    def cost(self) -> dict[str, Any] | None:
        cost = (self.located.manifest or {}).get("cost")
        if not isinstance(cost, Mapping) or "total_usd" not in cost:
            return None
        return {"total_usd": cost["total_usd"], "per_kept_row_usd": cost.get("per_kept_row_usd")}


def _fs_path(uri: str) -> str:
    _, path = pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
    return path.rstrip("/") or "/"


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def open_side(uri: str) -> Side:
    """The build at `uri`; InputError naming it when it is neither a run directory nor a dataset folder."""
    located = locate(uri)
    is_run = located.run_path is not None and located.run_path == _fs_path(uri)
    if located.kind != "dataset" and not is_run:
        raise InputError(f"{uri}: neither a run directory nor a dataset folder ({located.label}); "
                         "stgr diff compares two builds: give their run directories or dataset/ folders")
    manifest = located.manifest or {}
    config, fingerprints = manifest.get("config"), manifest.get("stage_fingerprints")
    if located.run_path is not None and (config is None or fingerprints is None):
        fs, run = located.fs, located.run_path
        text = _read_text(fs, posixpath.join(run, "config.yaml"))
        config = config if config is not None else (yaml.safe_load(text) if text else {})
        plan = json.loads(_read_text(fs, posixpath.join(run, "plan.json")) or "{}")
        fingerprints = fingerprints if fingerprints is not None else {
            node: info["fingerprint"] for node, info in plan.get("nodes", {}).items()}
    return Side(located, dict(config or {}), dict(fingerprints or {}))


def _comparable(columns: Mapping[str, pa.Array]) -> dict[str, pa.Array]:
    """The columns as compared: without the provenance fields that name the build, and with media
    uris from their last `/media/` on (see the module's doc)."""
    out = dict(columns)
    for name, keep in (("provenance", lambda f: f not in BUILD_FIELDS), ("media", lambda f: True)):
        array = out.get(name)
        if array is None or not pa.types.is_struct(array.type):
            continue
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        children = dict(zip(names, array.flatten()))
        if name == "media" and "uri" in children:
            children["uri"] = pc.replace_substring_regex(children["uri"], r"^.*/media/", "<run>/media/")
        kept = [n for n in names if keep(n)]
        out[name] = pa.StructArray.from_arrays([children[n] for n in kept], names=kept, mask=array.is_null())
    return out


def _batches(side: Side, columns: list[str], ids: list[str] | None = None) -> Iterator[dict[str, pa.Array]]:
    """`columns` of the side's rows (only those with one of `ids`, where given), a batch at a time, file
    by file in the manifest's order. A column a file lacks reads as nulls."""
    fs = side.located.fs
    for path in side.located.files:
        try:
            with fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                present = [c for c in columns if c in reader.schema_arrow.names]
                for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=present):
                    if ids is not None:
                        batch = batch.filter(pc.is_in(batch.column("id"), value_set=pa.array(ids, pa.string())))
                    yield {c: batch.column(c) if c in present else pa.nulls(batch.num_rows) for c in columns}
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{side.located.uri}: cannot read {path} ({exc}); `stgr inspect --verify` checks "
                             "a dataset's shards against its manifest") from None


def _keyed(ids: pd.Series) -> pd.MultiIndex:
    """(id, occurrence) per row: a repeated id is matched to the same occurrence on the other side."""
    return pd.MultiIndex.from_arrays([ids.to_numpy(), ids.groupby(ids).cumcount().to_numpy()], names=["id", "n"])


def scan(side: Side, columns: list[str]) -> tuple[pd.DataFrame, pa.Table]:
    """One pass over a side: a digest per compared column per row (indexed by id and occurrence), and
    the split, task and source of every row for the counts."""
    count_columns = [c for c in COUNT_KEYS if c in side.columns]
    digests: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    ids, counted = [], []
    for batch in _batches(side, sorted({"id", *columns, *count_columns})):
        arrays = _comparable(batch)
        ids.append(arrays["id"].to_numpy(zero_copy_only=False))
        counted.append(pa.table({c: arrays[c] for c in count_columns}))
        for name in columns:
            try:
                digests[name].append(digest(arrays[name]))
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
                raise InputError(f"{side.located.uri}: column {name!r} ({arrays[name].type}) cannot be compared: {exc}") from None
    id_series = pd.Series(np.concatenate(ids) if ids else np.array([], dtype=object), dtype=object)
    frame = pd.DataFrame({c: np.concatenate(d) if d else np.array([], np.uint64) for c, d in digests.items()},
                         index=_keyed(id_series))
    table = pa.concat_tables(counted) if counted else pa.table({c: pa.array([], pa.string()) for c in count_columns})
    for name in COUNT_KEYS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return frame, table


# -- examples -----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes sha256:{hashlib.sha256(value).hexdigest()[:12]}>"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def shown(value: Any) -> Any:
    """A value as an example prints it: numbers, booleans and null as they are, bytes as size and
    sha256, anything else as (compact JSON) text cut at MAX_VALUE characters."""
    value = _plain(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"


def leaf_changes(old: Any, new: Any, path: str, out: list[tuple[str, Any, Any]]) -> None:
    """Append (dotted path, old, new) for every leaf where `old` and `new` differ; dicts by key and
    lists of one length by position are descended into, anything else is one leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            leaf_changes(old.get(key), new.get(key), f"{path}.{key}", out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            leaf_changes(a, b, f"{path}[{i}]", out)
    elif old != new:
        out.append((path, old, new))


def _rows_by_id(side: Side, ids: list[str], columns: list[str]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for batch in _batches(side, ["id", *columns], ids):
        for row in pa.table(_comparable(batch)).to_pylist():
            rows.setdefault(row["id"], row)
    return rows


def examples(old: Side, new: Side, wanted: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Per changed column, its example rows' differing values (`wanted`: column -> example ids)."""
    ids = sorted({i for chosen in wanted.values() for i in chosen})
    columns = sorted(wanted)
    if not ids:
        return {}
    before, after = _rows_by_id(old, ids, columns), _rows_by_id(new, ids, columns)
    out: dict[str, list[dict[str, Any]]] = {}
    for column, chosen in wanted.items():
        out[column] = []
        for rid in chosen:
            changes: list[tuple[str, Any, Any]] = []
            leaf_changes(before[rid][column], after[rid][column], column, changes)
            out[column].append({"id": rid, "more": max(0, len(changes) - CHANGES_PER_EXAMPLE), "changes": [
                {"path": p, "old": shown(a), "new": shown(b)} for p, a, b in changes[:CHANGES_PER_EXAMPLE]]})
    return out


# -- the difference -----------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted key -> value (lists and empty mappings are values)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    a, b = flatten(old), flatten(new)
    rows = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b or a[key] != b[key]:
            rows.append({"key": key, **({"old": a[key]} if key in a else {}), **({"new": b[key]} if key in b else {})})
    return rows


def _merge_counts(old: pa.Table, new: pa.Table, key: str) -> list[dict[str, Any]]:
    a = {(r["split"], r[key]): r["rows"] for r in count_rows(old, ["split", key])}
    b = {(r["split"], r[key]): r["rows"] for r in count_rows(new, ["split", key])}
    return [{"split": s, key: k, "old": a.get((s, k), 0), "new": b.get((s, k), 0)}
            for s, k in sorted(set(a) | set(b), key=lambda p: tuple("" if v is None else str(v) for v in p))]


def compare(old_uri: str, new_uri: str, per_column: int = 3) -> dict[str, Any]:
    """The difference from the build at `old_uri` to the one at `new_uri` (the `--json` structure)."""
    old, new = open_side(old_uri), open_side(new_uri)
    common = [c for c in old.columns if c in set(new.columns) and c != "id"]
    a, counted_a = scan(old, common)
    b, counted_b = scan(new, common)
    shared = a.index.intersection(b.index)
    a_shared, b_shared = a.loc[shared], b.loc[shared]
    differs = pd.DataFrame({c: a_shared[c].to_numpy() != b_shared[c].to_numpy() for c in common}, index=shared)
    changed_ids = sorted(set(shared[differs.any(axis=1).to_numpy()].get_level_values("id"))) if common else []
    wanted = {c: sorted(set(shared[differs[c].to_numpy()].get_level_values("id")))[:per_column]
              for c in common if differs[c].any()}
    shown_examples = examples(old, new, wanted)
    rules_a, rules_b = old.rule_counts(), new.rule_counts()
    ledger = [{"stage": s, "rule": r, "old": rules_a.get((s, r), 0), "new": rules_b.get((s, r), 0)}
              for s, r in sorted(set(rules_a) | set(rules_b)) if rules_a.get((s, r), 0) != rules_b.get((s, r), 0)]
    nodes = sorted(set(old.fingerprints) | set(new.fingerprints))
    result: dict[str, Any] = {
        "old": old.describe(len(a)), "new": new.describe(len(b)),
        "identical": False,
        "rows": {"added": sorted(set(b.index.difference(a.index).get_level_values("id"))),
                 "dropped": sorted(set(a.index.difference(b.index).get_level_values("id"))),
                 "changed": changed_ids},
        "columns": {"only_old": sorted(set(old.columns) - set(new.columns)),
                    "only_new": sorted(set(new.columns) - set(old.columns)),
                    "changed": [{"column": c, "rows": int(differs[c].sum()), "examples": shown_examples.get(c, [])}
                                for c in common if c in wanted]},
        "ledger": ledger,
        "counts": {"task": _merge_counts(counted_a, counted_b, "task"),
                   "source": _merge_counts(counted_a, counted_b, "source")},
        "config": config_difference(old.config, new.config),
        "fingerprints": [{"node": n, "old": old.fingerprints.get(n), "new": new.fingerprints.get(n)}
                         for n in nodes if old.fingerprints.get(n) != new.fingerprints.get(n)],
        "cost": {"old": old.cost(), "new": new.cost()},
    }
    result["identical"] = not (any(result["rows"].values()) or result["columns"]["only_old"]
                               or result["columns"]["only_new"] or result["columns"]["changed"]
                               or ledger or result["config"] or result["fingerprints"])
    return result


# -- the terminal -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    text = "-" if value is None else value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"


def _ids(ids: list[str], limit: int = 8) -> str:
    return ", ".join(ids[:limit]) + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")


def _change(old: int, new: int) -> str:
    return "" if old == new else f"{new - old:+d}"


def render(result: dict[str, Any]) -> list[Any]:
    """The difference as rich renderables, one per section (a section with nothing to say is one line)."""
    from rich.table import Table
    from rich.text import Text

    def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False)
        for name in columns:
            t.add_column(name, justify="right" if name in ("old", "new", "change", "rows") else "left",
                         overflow="fold")
        for row in rows:
            t.add_row(*[v if isinstance(v, str) else _cell(v) for v in row])
        return t

    rows, columns, cost = result["rows"], result["columns"], result["cost"]
    lines = [f"{side}: {result[side]['path']} ({result[side]['what']}), {result[side]['rows']} rows"
             for side in ("old", "new")]
    moved = [f"rows: {len(rows['added'])} added, {len(rows['dropped'])} dropped, {len(rows['changed'])} changed"]
    moved += [f"  {name}: {_ids(rows[name])}" for name in ("added", "dropped", "changed") if rows[name]]
    moved += [f"  columns only in {side}: {', '.join(columns['only_' + side])}"
              for side in ("old", "new") if columns["only_" + side]]
    out: list[Any] = [Text("\n".join(lines)), Text("\n".join(moved))]
    if columns["changed"]:
        out.append(table("changed columns (examples)", ["column", "rows", "id", "value", "old -> new"],
                         [[c["column"], c["rows"], e["id"], ch["path"], f"{_cell(ch['old'])} -> {_cell(ch['new'])}"]
                          for c in columns["changed"] for e in c["examples"] for ch in e["changes"]]))
    out.append(table("ledger rules that moved", ["stage", "rule", "old", "new", "change"],
                     [[r["stage"], r["rule"], r["old"], r["new"], _change(r["old"], r["new"])] for r in result["ledger"]])
               if result["ledger"] else Text("ledger: no rule count moved"))
    out += [table(f"rows per set and {key}", ["split", key, "old", "new", "change"],
                  [[r["split"], r[key], r["old"], r["new"], _change(r["old"], r["new"])] for r in result["counts"][key]])
            for key in ("task", "source")]
    out.append(table("config", ["key", "old", "new"],
                     [[r["key"], _cell(r["old"]) if "old" in r else "(absent)", _cell(r["new"]) if "new" in r else "(absent)"]
                      for r in result["config"]]) if result["config"] else Text("config: the same"))
    out.append(table("stage fingerprints", ["node", "old", "new"],
                     [[r["node"], r["old"] or "(absent)", r["new"] or "(absent)"] for r in result["fingerprints"]])
               if result["fingerprints"] else Text("stage fingerprints: the same"))
    if cost["old"] and cost["new"]:
        out.append(table("cost (USD)", ["", "old", "new"],
                         [["total", cost["old"]["total_usd"], cost["new"]["total_usd"]],
                          ["per kept row", cost["old"]["per_kept_row_usd"], cost["new"]["per_kept_row_usd"]]]))
    else:
        out.append(Text(f"cost: no cost ledger ({' and '.join(s for s in ('old', 'new') if not cost[s])})"))
    out.append(Text("identical" if result["identical"] else "the builds differ"))
    return out


def handler(args: argparse.Namespace) -> int:
    if args.examples < 0:
        raise InputError(f"--examples {args.examples}: must be 0 or more")
    result = compare(args.old, args.new, args.examples)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 160  # a log or a pipe: long values wrap less than at rich's default 80
        for i, part in enumerate(render(result)):
            if i:
                console.line()
            console.print(part, soft_wrap=isinstance(part, Text))  # a line of ids is not cut into lines
    return 0 if result["identical"] else 1
