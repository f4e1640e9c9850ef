"""`filter`: keep the records whose traces agree with the ground truth; ledger every reason for the rest.

Each rule (`stages.lib.rules`) is a small named object in `RULES` with a threshold from config
(`filter.rules.<name>`) and a reason string, and can be switched off (`enabled: false`). Every rule
runs on every record, so a rejected record gets one ledger row per rule it failed: the ledger tells
which rules are too strict for a model, not just which rule happened to be checked first. Rules read `scores` (written
by `align`, and `verify` where it ran) and are vectorised over the partition with pyarrow/numpy:
thresholds change often, so re-filtering a large build must stay cheap.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.stage import Rejection, Stage, StageResult, UnitContext
from stages.lib.rules import RULES, Batch, configured_rules
from stages.lib.schema import conform


@register_stage
class FilterStage(Stage):
    """Run every enabled rule on every record; keep the records that pass them all."""

    name = "filter"
    version = "1"
    key_types = {"rules": dict}

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        problems = super().validate_config(config)
        rules = config.get("rules") or {}
        if not isinstance(rules, Mapping):
            return problems
        for name, entry in rules.items():
            if name not in RULES:
                problems.append(f"rules.{name}: unknown rule; known: {sorted(RULES)}")
                continue
            if not isinstance(entry, Mapping):
                problems.append(f"rules.{name}: expected a mapping with enabled/threshold, got {entry!r}")
                continue
            extra = sorted(set(entry) - {"enabled", "threshold"})
            if extra:
                problems.append(f"rules.{name}: unknown key(s) {extra}; a rule takes enabled and threshold")
            if "enabled" in entry and not isinstance(entry["enabled"], bool):
                problems.append(f"rules.{name}.enabled: expected true or false, got {entry['enabled']!r}")
            if "threshold" in entry:
                problem = RULES[name].validate_threshold(entry["threshold"])
                if problem:
                    problems.append(f"rules.{name}.threshold: {problem}")
        return problems

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table)
        batch = Batch(table)
        keep = np.ones(table.num_rows, dtype=bool)
        rejections: list[Rejection] = []
        for rule in configured_rules(self.config):
            outcome = rule.check(batch)
            keep &= ~outcome.failed
            for i in np.flatnonzero(outcome.failed):
                rejections.append(Rejection(
                    id=batch.ids[i], rule=rule.name, reason=outcome.reasons[i], value=outcome.values.get(i),
                    threshold=rule.threshold_for(batch.tasks[i]), record=batch.source_ids[i] or batch.ids[i],
                ))
        rejections.sort(key=lambda r: (r.id or "", r.rule))
        return StageResult(table.filter(pa.array(keep)), rejections)
