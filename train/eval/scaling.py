"""Test-time scaling of one question: N sampled answers, their crop ratings, both votes.

Shared by the V-STaR and STGR evaluations; the voting rules are in train/tts.py, the crops in
train/eval/crops.py. Everything here is read back from stored completions, so it is cheap to
recompute and identical on every rerun.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from stages.lib import evidence, geometry
from train import tts
from train.eval.crops import sample_ratings

Sample = tuple[str | None, geometry.BoxFrame | None]  # (completion, the model's box frame)


def _votes(samples: Sequence[Sample], duration_s: float, config: Mapping[str, Any], answer_kind: str,
           num_options: int | None, crop_completion: Callable[[int, int], str | None]) -> list[dict[str, Any]]:
    out = []
    for n, (completion, frame) in enumerate(samples):
        answer = evidence.answer_text(completion or "") or None
        ratings = sample_ratings(completion, frame or geometry.CANONICAL, duration_s, int(config["max_crops"]),
                                 lambda j, n=n: crop_completion(n, j)) if completion else []
        out.append({"answer": answer, "key": tts.voting_key(answer_kind, answer, num_options),
                    "ratings": ratings, "confidence": tts.sample_confidence(ratings)})
    return out


def _representative(votes: Sequence[Mapping[str, Any]], key: str | None) -> str | None:
    """The answer text of the first sample that voted for `key`."""
    return next((v["answer"] for v in votes if key is not None and v["key"] == key), None)


def _decisions(votes: Sequence[Mapping[str, Any]]) -> dict[str, tts.Decision]:
    ballots = [tts.Vote(v["key"], v["confidence"]) for v in votes]
    return {"majority": tts.majority_vote(ballots), "confidence": tts.confidence_vote(ballots)}


def tts_candidates(samples: Sequence[Sample], duration_s: float, config: Mapping[str, Any], answer_kind: str,
                   num_options: int | None, crop_completion: Callable[[int, int], str | None]) -> list[str]:
    """The answers the two votes pick (to be judged where answers are free-form)."""
    if not samples:
        return []
    votes = _votes(samples, duration_s, config, answer_kind, num_options, crop_completion)
    picks = [_representative(votes, d.answer) for d in _decisions(votes).values()]
    return [p for p in picks if p]


def tts_outcome(samples: Sequence[Sample], duration_s: float, config: Mapping[str, Any], answer_kind: str,
                num_options: int | None, crop_completion: Callable[[int, int], str | None],
                is_correct: Callable[[str], bool]) -> dict[str, Any]:
    """Per sample: answer, voting key, crop ratings, confidence; per vote: the pick and whether it is right."""
    votes = _votes(samples, duration_s, config, answer_kind, num_options, crop_completion)
    out: dict[str, Any] = {"samples": votes}
    for name, decision in _decisions(votes).items():
        answer = _representative(votes, decision.answer)
        out[name] = {"answer": answer, "key": decision.answer, "weight": decision.weight,
                     "tally": decision.tally, "correct": bool(answer) and is_correct(answer)}
    return out
