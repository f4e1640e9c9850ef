"""The free-form answer judge, as V-STaR's `eval.py` scores its open "what" questions.

A judge model compares the candidate answer with the ground truth and replies with one integer from
0 (entirely wrong) to 3 (entirely right); 2 and 3 count as correct. V-STaR's README says 0-4 with
"above 2" correct, but its code prompts for 0-3 and counts `score >= 2`: we follow the code (the
numbers in its leaderboard come from the code). A reply that is not a bare integer in 0-3 scores
-1: it counts as 0 in the mean score and as wrong, as V-STaR's code does for non-integers.

The judge runs through any backend (`make_backend`), so a large local model, a vLLM server or an
OpenAI-compatible API can judge. The prompt wording lives in conf/eval/default.yaml (`judge.system`,
`judge.template`) so it can be set to the exact text of any published evaluation.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

from stages.lib.chat import ChatRequest
from train.eval.runner import Call, Runner

INVALID = -1
CORRECT_FROM = 2


def parse_judge_score(text: str | None) -> int:
    """A bare integer 0-3 (surrounding whitespace allowed, as Python's `int()` in V-STaR's code);
    anything else -> INVALID."""
    try:
        score = int((text or "").strip())
    except ValueError:
        return INVALID
    return score if 0 <= score <= 3 else INVALID


def is_correct(score: int) -> bool:
    return score >= CORRECT_FROM


def judge_request(question: str, answer: str, candidate: str, config: Mapping[str, Any],
                  context: Mapping[str, Any]) -> ChatRequest:
    """The judge's chat for one candidate answer; `context` identifies it (for replay and logs)."""
    prompt = str(config["template"]).format(question=question, answer=answer, candidate=candidate)
    return ChatRequest(
        prompt=prompt,
        system=str(config["system"]).strip() or None,
        max_new_tokens=int(config.get("max_new_tokens", 512)),
        temperature=0.0,
        context={**dict(context), "kind": "judge", "candidate": candidate},
    )


def judge_kind(candidate: str) -> str:
    """Where one candidate's judge score is stored (per sample key): a hash of the candidate text."""
    return "judge." + hashlib.sha1(candidate.encode()).hexdigest()[:12]


class JudgeCalls:
    """Judge calls and scores through one runner (its own store: the judge is its own model)."""

    def __init__(self, runner: Runner, config: Mapping[str, Any]) -> None:
        self.runner, self.config = runner, config

    def call(self, key: str, question: str, answer: str, candidate: str, context: Mapping[str, Any]) -> Call:
        return Call(key, judge_kind(candidate),
                    lambda: judge_request(question, answer, candidate, self.config, {**dict(context), "key": key}))

    def score(self, key: str, question: str, answer: str, candidate: str | None) -> int:
        """The stored score of `candidate`; INVALID for no candidate or a judge reply that is no score."""
        if not candidate:
            return INVALID
        return parse_judge_score(self.runner.completion(key, judge_kind(candidate)))
