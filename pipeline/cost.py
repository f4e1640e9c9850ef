"""Summing the cost ledger: the `cost` dicts of commit records, per stage and for the whole build.

A model stage's unit writes what its calls cost (`StageResult.cost`, built by `stages.lib.cost`) into
its commit record. `stgr status` sums those records without importing any stage code (it must work
from any machine that sees the run directory, and start fast), and the dataset's manifest sums the
same records: both add them up here, so the two totals cannot disagree.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

#: The counts of one cost dict that add up across units (every other key describes the unit's backend).
#: `calls`: the model calls the unit paid for, `recovered` of them by an earlier attempt of the same
#: unit that died before committing (their responses were cached); `cached`: requests answered by a
#: response another unit paid for, and `saved_*` what they would have cost; `unmetered`: calls whose
#: endpoint or backend reported no token count (their tokens count as 0).
COUNTS = ("calls", "recovered", "cached", "unmetered", "input_tokens", "output_tokens", "images", "wall_s", "accelerator_s",
          "usd", "saved_input_tokens", "saved_output_tokens", "saved_usd")
#: Counts that are seconds or dollars (rounded when stored), the others are whole numbers.
REAL = frozenset({"wall_s", "accelerator_s", "usd", "saved_usd"})


def empty_cost() -> dict[str, Any]:
    """A cost with nothing counted."""
    return {key: 0.0 if key in REAL else 0 for key in COUNTS}


def add_costs(costs: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """The sum of the counts of `costs` (None, a unit without model calls, adds nothing); a count a
    record lacks (written by an older version) adds 0."""
    total = empty_cost()
    for cost in costs:
        for key in COUNTS:
            total[key] += (cost or {}).get(key) or 0
    return rounded(total)


def rounded(cost: Mapping[str, Any]) -> dict[str, Any]:
    """The counts as stored: seconds to the millisecond, dollars to 1e-9 (a token of a cheap model)."""
    out = dict(cost)
    for key in REAL & set(out):
        out[key] = round(float(out[key]), 9 if key.endswith("usd") else 3)
    return out


def per_row(usd: float, rows: int | None) -> float | None:
    """Dollars per kept row; None when there is no row to divide by."""
    return usd / rows if rows else None


def usd_text(usd: float | None) -> str:
    """Dollars for a terminal or a card: `$0.0123`, `$1.23e-07`, `-` for none."""
    if usd is None:
        return "-"
    if usd == 0 or abs(usd) >= 0.0001:
        return f"${usd:,.4f}"
    return f"${usd:.3g}"
