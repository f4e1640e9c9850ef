"""`filter`: keep the records whose traces agree with the ground truth; ledger every reason for the rest.

Each rule (`stages.lib.rules`) is a small named object in `RULES` with a reason string and its
settings (a threshold, and `enabled`), whose defaults it declares and `filter.rules.<name>` overrides
(`filter.rules.claim_iou.threshold=0.6`, `filter.rules.verified.enabled=true`). Every rule
runs on every record, so a rejected record gets one ledger row per rule it failed: the ledger tells
which rules are too strict for a model, not just which rule happened to be checked first. Rules read `scores` (written
by `align`, and `verify` where it ran) and are vectorised over the partition with pyarrow/numpy:
thresholds change often, so re-filtering a large build must stay cheap.

A second output, for the annotation cascade (stages/annotate.py `cascade_dag`): a filter node whose
block says `output: rejected` (the cascade's `escalate_t<k>` nodes; the setting exists only there)
keeps exactly the records that fail a rule, for the next tier to annotate again, and ledgers
nothing, since its tier's own filter node, on the same input with the same rules, ledgers them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.settings import Settings, setting
from pipeline.stage import Rejection, Stage, StageConfig, StageResult, UnitContext
from stages.lib.rules import Batch, configured_rules, rule_defaults, rule_problems
from stages.lib.schema import conform


@dataclass(kw_only=True)
class OutputSetting(Settings):
    """Which records a filter node keeps, where its block names it (a cascade's escalate nodes)."""

    output: Literal["kept", "rejected"] = setting(help="kept: the records that pass every rule (a filter); "
                                                       "rejected: those that fail one, without ledger rows (a "
                                                       "cascade's escalate node, set by the cascade)")


@register_stage
class FilterStage(Stage):
    """Run every enabled rule on every record; keep the records that pass them all."""

    name = "filter"
    version = "1"

    @dataclass(kw_only=True)
    class Config(StageConfig):
        rules: dict[str, Any] = setting(
            factory=rule_defaults,
            help="per rule (stages/lib/rules.py), its settings: enabled, threshold; the defaults are the rules' own")

        def __post_init__(self) -> None:
            # each rule's entry completed from its defaults, so a partial entry means the same as the
            # whole one (and fingerprints alike); what is not a rule's entry is left for check()
            merged = {}
            for name, default in rule_defaults().items():
                entry = self.rules.get(name, {})
                merged[name] = {**default, **entry} if isinstance(entry, Mapping) else entry
            self.rules = {**merged, **{n: e for n, e in self.rules.items() if n not in merged}}

        def check(self) -> list[str]:
            return rule_problems(self.rules)

    cfg: Config

    @classmethod
    def config_parts(cls, config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
        output = [("the annotation cascade", OutputSetting)] if "output" in config else []
        return super().config_parts(config) + output

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        table = conform(table)
        batch = Batch(table)
        keep = np.ones(table.num_rows, dtype=bool)
        rejections: list[Rejection] = []
        for rule in configured_rules(self.cfg.rules):
            outcome = rule.check(batch)
            keep &= ~outcome.failed
            for i in np.flatnonzero(outcome.failed):
                rejections.append(Rejection(
                    id=batch.ids[i], rule=rule.name, reason=outcome.reasons[i], value=outcome.values.get(i),
                    threshold=rule.threshold_for(batch.tasks[i]), record=batch.source_ids[i] or batch.ids[i],
                ))
        if self.config.get("output") == "rejected":
            return StageResult(table.filter(pa.array(~keep)))
        rejections.sort(key=lambda r: (r.id or "", r.rule))
        return StageResult(table.filter(pa.array(keep)), rejections)
