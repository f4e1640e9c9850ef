"""`replay`: a backend that plays back canned completions from a file. For tests only.

It exists so that evaluation, judging and test-time scaling can be checked against hand-computed
numbers: the test writes what "the model" says to each request, and every number downstream
(parsing, metrics, votes) comes out of the real code. It never runs a model and must not be used
to produce reported results.

File format (JSON Lines, one object per line):

    {"match": {"vid": "v1", "kind": "vqa"}, "completion": "<answer>a red ball</answer>"}
    {"match": {"kind": "judge"}, "completion": "0"}

A request is answered by the line whose `match` is a subset of the request's `context` (the
structured facts the caller rendered the prompt from; see `ChatRequest.context`); where several
lines match, the one with the most keys wins, then the earliest. A request no line matches is an
error, so a test cannot silently score a request it did not foresee.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.settings import setting
from stages.backends import Backend, RequestSettings, register_backend
from stages.lib.chat import ChatRequest


@register_backend
class ReplayBackend(Backend):
    """Answers each request from the JSONL file at `completions` (see the module docstring)."""

    name = "replay"
    cacheable = False

    @dataclass(kw_only=True)
    class Config(RequestSettings):
        completions: str = setting(help="the JSON Lines file of canned completions", path=True)

    cfg: Config

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.path = Path(self.cfg.completions)
        self.lines: list[tuple[dict[str, Any], str]] = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    match, completion = entry["match"], entry["completion"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{self.path}:{lineno}: expected an object with 'match' and "
                                     f"'completion' ({exc!r})") from exc
                if not isinstance(match, dict) or not isinstance(completion, str):
                    raise ValueError(f"{self.path}:{lineno}: 'match' must be an object and "
                                     f"'completion' a string")
                self.lines.append((match, completion))
        #: Every request answered, in order: tests inspect what the caller actually sent.
        self.requests: list[ChatRequest] = []

    def _answer(self, request: ChatRequest) -> str:
        context = dict(request.context)
        best: tuple[int, str] | None = None
        for match, completion in self.lines:
            if all(k in context and context[k] == v for k, v in match.items()):
                if best is None or len(match) > best[0]:
                    best = (len(match), completion)
        if best is None:
            raise KeyError(f"{self.path}: no line matches the request with context "
                           f"{json.dumps(context, default=str)[:300]}")
        return best[1]

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        self.requests.extend(requests)
        return [self._answer(r) for r in requests]
