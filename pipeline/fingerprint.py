"""Fingerprints: what a stage's output depends on, and nothing else.

fingerprint = hash(stage name, stage version, resolved stage config, upstream fingerprints).
Keys that only say *how* to run (resources, pool sizes, retries) are excluded, so moving a build to
a bigger cluster reuses everything already committed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_fingerprint(stage_name: str, version: str, config: Mapping[str, Any],
                      upstream: Iterable[str], exclude: Iterable[str] = ()) -> str:
    excluded = set(exclude)
    kept = {k: v for k, v in config.items() if k not in excluded}
    payload = canonical_json({"stage": stage_name, "version": version, "config": kept, "upstream": list(upstream)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_digest(nodes: Mapping[str, tuple[str, int]]) -> str:
    """One digest of a whole plan (node -> (fingerprint, partitions)): two builds with the same digest
    compute the same units into the same files, so they may share a run directory (pipeline.lease)."""
    payload = canonical_json({node: list(value) for node, value in sorted(nodes.items())})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
