"""The paper's RL rewards, as plain functions in TRL's reward signature (and a verl adapter).

Every function takes `completions` (strings, or chat messages as TRL passes them) and
`reward_target` (one JSON object per completion, made by `stages.targets.reward_target`: task, answer,
options, answer span, key frames with canonical boxes, and the box frame the model writes in) and
returns one float per completion. None of them raises: malformed text, malformed targets and
absurd inputs (10,000 claims, boxes with three numbers, times as words) score 0 for what is wrong.
Parsing goes through `stages.evidence`, boxes through `stages.geometry`, spans through
`stages.metrics`; nothing here re-implements them.

- `accuracy`: per answer kind - option letter (MCQ), tIoU (temporal span), IoU (box answer),
  ROUGE-L F1 (free form). The kind is "option" whenever the record has options, else by task.
- `format`: 0 / 0.5 / 1 (`evidence.format_score`): not well formed / well formed / well formed with
  the evidence the task needs.
- `temporal`: mean over the cited times of exp(-dt^2 / 2 sigma^2), dt to the nearest ground-truth
  key time (to the answer span when a record has no key frames); sigma = sigma_start (1 - p) while
  training progress p < anneal_until, then sigma_end (the paper: 4 -> 1 by 75 % of training).
- `spatial`: mean over the timed claims with boxes of the best IoU against the ground-truth boxes of
  the nearest key frame, counted only when |dt| <= tau. The gate is symmetric; the reference tests
  `gt_time - pred_time < tau`, which lets any prediction *after* the key frame through (and gates on
  the wrong side); we do not copy that.

The numeric part is vectorised over the whole batch with numpy (nearest key time by one
`searchsorted`, IoU of all claim/ground-truth pairs at once); `tests/bench/bench_rewards.py`
compares it with a per-completion loop.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stages import evidence, geometry, metrics
from stages.schema import ANSWER_KINDS
from stages.targets import frame_from_dict

log = logging.getLogger("stgr.train.rewards")

COMPONENTS = ("accuracy", "format", "temporal", "spatial")
_MAX_TIME = 1e7  # seconds; larger cited times are clipped (their reward is 0 anyway)


@dataclass(frozen=True)
class RewardConfig:
    """Weights and schedule of the rewards (conf/train/rl.yaml `rewards`)."""

    weights: Mapping[str, float] = field(default_factory=lambda: {name: 1.0 for name in COMPONENTS})
    sigma_start: float = 4.0
    sigma_end: float = 1.0
    anneal_until: float = 0.75
    tau: float = 1.0

    @classmethod
    def from_config(cls, rewards: Mapping[str, Any]) -> "RewardConfig":
        weights = dict(rewards.get("weights") or {})
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"rewards.weights: unknown component(s) {unknown}; known: {list(COMPONENTS)}")
        temporal, spatial = rewards.get("temporal") or {}, rewards.get("spatial") or {}
        return cls(
            weights={name: float(weights.get(name, 1.0)) for name in COMPONENTS},
            sigma_start=float(temporal.get("sigma_start", cls.sigma_start)),
            sigma_end=float(temporal.get("sigma_end", cls.sigma_end)),
            anneal_until=float(temporal.get("anneal_until", cls.anneal_until)),
            tau=float(spatial.get("tau", cls.tau)),
        )


def sigma_at(progress: float, cfg: RewardConfig = RewardConfig()) -> float:
    """The temporal reward's width at training progress `progress` in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0) if math.isfinite(progress) else 0.0
    return cfg.sigma_start * (1.0 - p) if p < cfg.anneal_until else cfg.sigma_end


def progress_of(trainer_state: Any) -> float:
    """Training progress from a transformers TrainerState (0 when unknown)."""
    step = getattr(trainer_state, "global_step", 0) or 0
    total = getattr(trainer_state, "max_steps", 0) or 0
    return step / total if total > 0 else 0.0


# --- inputs ------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or TRL's list of messages (last assistant content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        content = completion[-1].get("content") if isinstance(completion[-1], Mapping) else None
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(p.get("text") or "" for p in content if isinstance(p, Mapping))
    return ""


@dataclass(frozen=True)
class Target:
    """A parsed reward target; `frame` is the model's box frame for that record."""

    task: str
    answer: str
    options: tuple[str, ...]
    answer_span: tuple[float, float] | None
    key_times: np.ndarray  # (K,)
    key_boxes: tuple[np.ndarray, ...]  # per key frame, (n_k, 4) canonical
    frame: geometry.BoxFrame


def parse_target(raw: Any) -> Target | None:
    """A reward target from JSON text or a dict; None when it is unusable (every reward is then 0).
    JSON text is cached: TRL passes the same targets to each of the four rewards."""
    return _parse_target_text(raw) if isinstance(raw, (str, bytes)) else _parse_target(raw)


@lru_cache(maxsize=32768)
def _parse_target_text(raw: str | bytes) -> Target | None:
    return _parse_target(raw)


def _parse_target(raw: Any) -> Target | None:
    try:
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
        key_frames = [kf for kf in data.get("key_frames") or [] if kf.get("t_s") is not None]
        span = data.get("answer_span")
        return Target(
            task=str(data["task"]),
            answer=str(data.get("answer") or ""),
            options=tuple(str(o) for o in data.get("options") or []),
            answer_span=(float(span[0]), float(span[1])) if span else None,
            key_times=np.asarray([float(kf["t_s"]) for kf in key_frames], dtype=np.float64),
            key_boxes=tuple(
                np.asarray([o["box"] for o in kf.get("objects") or [] if o.get("box")], dtype=np.float64).reshape(-1, 4)
                for kf in key_frames
            ),
            frame=frame_from_dict(data["frame"]),
        )
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        log.warning("unusable reward target (%s): %.200r", exc, raw)
        return None


@lru_cache(maxsize=32768)
def _parse(text: str, frame: geometry.BoxFrame) -> evidence.Trace:
    """The trace of one completion; cached because TRL calls each reward on the same completions."""
    return evidence.parse_trace(text, frame)


@lru_cache(maxsize=32768)
def _format_check(text: str, frame: geometry.BoxFrame) -> evidence.FormatCheck:
    return evidence.check_format(text, frame)


def _inputs(completions: Sequence[Any], reward_target: Sequence[Any]) -> tuple[list[str], list[Target | None]]:
    texts = [completion_text(c) for c in completions]
    targets = [parse_target(t) for t in reward_target] if reward_target is not None else [None] * len(texts)
    if len(targets) != len(texts):
        log.warning("got %d completions but %d reward targets; scoring the mismatch as 0", len(texts), len(targets))
        targets = (targets + [None] * len(texts))[: len(texts)]
    return texts, targets


def _guarded(name: str, per_item: Callable[[str, Target], float]) -> Callable[[list[str], list[Target | None]], list[float]]:
    """Apply `per_item` to each (text, target); a target of None or any error scores 0, and the error is logged."""

    def run(texts: list[str], targets: list[Target | None]) -> list[float]:
        out = []
        for text, target in zip(texts, targets):
            try:
                value = 0.0 if target is None else float(per_item(text, target))
            except Exception:  # a reward must never stop training; log what broke, score 0
                log.exception("%s reward failed on %.200r", name, text)
                value = 0.0
            out.append(value if math.isfinite(value) else 0.0)
        return out

    return run


# --- accuracy ------------------------------------------------------------------------------------------


def _rouge_l(reference: str, prediction: str) -> float:
    from rouge_score import rouge_scorer

    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    if not reference.strip() or not prediction.strip():
        return 0.0
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


_SCORER = None


def _acc_option(answer: str, target: Target) -> float:
    truth = evidence.parse_option_letter(target.answer, len(target.options) or None)
    pred = evidence.parse_option_letter(answer, len(target.options) or None)
    return float(truth is not None and pred == truth)


def _acc_span(answer: str, target: Target) -> float:
    truth = target.answer_span or evidence.parse_time_span(target.answer)
    pred = evidence.parse_time_span(answer)
    if truth is None or pred is None:
        return 0.0
    return float(metrics.temporal_iou(truth, pred))


def _acc_box(answer: str, target: Target) -> float:
    truth = evidence.parse_box_answer(target.answer)
    pred = evidence.parse_box_answer(answer, target.frame)
    if truth is None or pred is None:
        return 0.0
    return float(geometry.paired_iou([truth], [pred])[0])


def _acc_text(answer: str, target: Target) -> float:
    return _rouge_l(evidence.answer_text(target.answer), answer)


ACCURACY: dict[str, Callable[[str, Target], float]] = {
    "option": _acc_option,
    "span": _acc_span,
    "box": _acc_box,
    "text": _acc_text,
}
"""Accuracy scorers by answer kind: (the completion's <answer> text, target) -> [0, 1]."""

def answer_kind(target: Target) -> str:
    return "option" if target.options else ANSWER_KINDS.get(target.task, "text")


def _accuracy_item(text: str, target: Target) -> float:
    answer = evidence.split_sections(text).answer
    return 0.0 if answer is None else ACCURACY[answer_kind(target)](answer, target)


def _format_item(text: str, target: Target) -> float:
    if target.task not in evidence.EVIDENCE_REQUIREMENTS:
        return 0.0
    return evidence.format_score(_format_check(text, target.frame), target.task)


def accuracy_scores(texts: list[str], targets: list[Target | None]) -> list[float]:
    return _guarded("accuracy", _accuracy_item)(texts, targets)


def format_scores(texts: list[str], targets: list[Target | None]) -> list[float]:
    return _guarded("format", _format_item)(texts, targets)


# --- temporal and spatial, vectorised ------------------------------------------------------------------


def _nearest(q_owner: np.ndarray, q_t: np.ndarray, k_owner: np.ndarray, k_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query (owner, time): the index of the nearest key of the same owner and |dt|
    (-1 and inf where the owner has no key). One sort and one searchsorted for the whole batch:
    owners are laid end to end on one time axis, `stride` apart, so a neighbour from another owner
    is always farther than any key of the query's own."""
    idx = np.full(len(q_t), -1, dtype=np.int64)
    dist = np.full(len(q_t), np.inf)
    if len(q_t) == 0 or len(k_t) == 0:
        return idx, dist
    q_t = np.clip(q_t, -_MAX_TIME, _MAX_TIME)
    k_t = np.clip(k_t, -_MAX_TIME, _MAX_TIME)
    stride = 8 * _MAX_TIME
    keys = k_owner * stride + k_t
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.searchsorted(sorted_keys, q_owner * stride + q_t)
    cand = np.stack([np.clip(pos - 1, 0, len(keys) - 1), np.clip(pos, 0, len(keys) - 1)])
    cand_idx = order[cand]
    d = np.abs(k_t[cand_idx] - q_t)
    d[k_owner[cand_idx] != q_owner] = np.inf
    best = np.argmin(d, axis=0)
    cols = np.arange(len(q_t))
    dist = d[best, cols]
    idx = np.where(np.isfinite(dist), cand_idx[best, cols], -1)
    return idx, dist


def _span_distance(t: np.ndarray, span: tuple[float, float]) -> np.ndarray:
    lo, hi = min(span), max(span)
    return np.maximum(0.0, np.maximum(lo - t, t - hi))


def temporal_scores(texts: list[str], targets: list[Target | None], sigma: float) -> list[float]:
    """Mean Gaussian proximity of every cited time to the nearest key time (or the answer span)."""
    n = len(texts)
    q_owner, q_t, k_owner, k_t = [], [], [], []
    span_owner, span_t, span_d = [], [], []
    for i, (text, target) in enumerate(zip(texts, targets)):
        if target is None:
            continue
        times = _parse(text, target.frame).times
        if not times:
            continue
        if len(target.key_times):
            q_owner.append(np.full(len(times), i))
            q_t.append(np.asarray(times, dtype=np.float64))
            k_owner.append(np.full(len(target.key_times), i))
            k_t.append(target.key_times)
        elif target.answer_span is not None:
            t = np.clip(np.asarray(times, dtype=np.float64), -_MAX_TIME, _MAX_TIME)
            span_owner.append(np.full(len(t), i))
            span_t.append(t)
            span_d.append(_span_distance(t, target.answer_span))
    owners = np.concatenate(q_owner + span_owner) if q_owner or span_owner else np.zeros(0, dtype=np.int64)
    dt = np.concatenate(
        ([_nearest(np.concatenate(q_owner), np.concatenate(q_t), np.concatenate(k_owner), np.concatenate(k_t))[1]]
         if q_owner else []) + span_d
    ) if owners.size else np.zeros(0)
    score = np.exp(-(dt**2) / (2.0 * sigma**2)) if sigma > 0 else (dt == 0).astype(float)
    total = np.bincount(owners.astype(np.int64), weights=score, minlength=n)
    count = np.bincount(owners.astype(np.int64), minlength=n)
    return np.divide(total, count, out=np.zeros(n), where=count > 0).tolist()


def spatial_scores(texts: list[str], targets: list[Target | None], tau: float) -> list[float]:
    """Mean over timed claims with boxes of max IoU with the nearest key frame's boxes, if |dt| <= tau."""
    n = len(texts)
    c_owner, c_t, c_nbox, boxes = [], [], [], []
    k_owner, k_t, k_nbox, gt = [], [], [], []
    for i, (text, target) in enumerate(zip(texts, targets)):
        if target is None or not len(target.key_times):
            continue
        claims = [c for c in _parse(text, target.frame).claims if c.boxes and c.t is not None]
        if not claims:
            continue
        c_owner.extend([i] * len(claims))
        c_t.extend(c.t for c in claims)
        c_nbox.extend(len(c.boxes) for c in claims)
        boxes.extend(b for c in claims for b in c.boxes)
        k_owner.extend([i] * len(target.key_times))
        k_t.extend(target.key_times.tolist())
        k_nbox.extend(len(b) for b in target.key_boxes)
        gt.extend(target.key_boxes)
    if not c_owner:
        return [0.0] * n
    c_owner_a = np.asarray(c_owner, dtype=np.int64)
    key, dt = _nearest(c_owner_a, np.asarray(c_t, dtype=np.float64),
                       np.asarray(k_owner, dtype=np.int64), np.asarray(k_t, dtype=np.float64))
    gated = (key >= 0) & (dt <= tau)
    claim_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box_claim = np.repeat(np.arange(len(c_owner)), c_nbox)
    k_nbox_a = np.asarray(k_nbox, dtype=np.int64)
    gt_start = np.concatenate([[0], np.cumsum(k_nbox_a)[:-1]])
    gt_all = np.concatenate(gt) if gt else np.zeros((0, 4))
    box_key = np.where(gated[box_claim], key[box_claim], -1)
    pairs_per_box = np.where(box_key >= 0, k_nbox_a[np.maximum(box_key, 0)], 0)
    pair_box = np.repeat(np.arange(len(claim_boxes)), pairs_per_box)
    first = np.repeat(np.cumsum(pairs_per_box) - pairs_per_box, pairs_per_box)
    pair_gt = gt_start[box_key[pair_box]] + (np.arange(len(pair_box)) - first)
    iou = geometry.paired_iou(claim_boxes[pair_box], gt_all[pair_gt]) if len(pair_box) else np.zeros(0)
    claim_iou = np.zeros(len(c_owner))
    np.maximum.at(claim_iou, box_claim[pair_box], iou)
    total = np.bincount(c_owner_a, weights=claim_iou, minlength=n)
    count = np.bincount(c_owner_a, minlength=n)
    return np.divide(total, count, out=np.zeros(n), where=count > 0).tolist()


def _safe_batch(name: str, fn: Callable[[], list[float]], n: int) -> list[float]:
    """Run a vectorised reward; if it fails on some input, log it and score the batch 0 (never raise)."""
    try:
        values = fn()
    except Exception:
        log.exception("%s reward failed on a batch of %d completions; scoring them 0", name, n)
        return [0.0] * n
    return [v if math.isfinite(v) else 0.0 for v in values]


# --- TRL reward functions ---------------------------------------------------------------------------


def make_reward_funcs(cfg: RewardConfig = RewardConfig()) -> list[Callable[..., list[float]]]:
    """The four components as TRL reward functions, named so TRL logs each as rewards/<name>/mean.
    Pass `[cfg.weights[f.__name__] for f in funcs]` as GRPOConfig.reward_weights."""

    def accuracy(completions: Sequence[Any], reward_target: Sequence[Any] = None, **kwargs: Any) -> list[float]:
        return accuracy_scores(*_inputs(completions, reward_target))

    def format(completions: Sequence[Any], reward_target: Sequence[Any] = None, **kwargs: Any) -> list[float]:  # noqa: A001
        return format_scores(*_inputs(completions, reward_target))

    def temporal(completions: Sequence[Any], reward_target: Sequence[Any] = None, **kwargs: Any) -> list[float]:
        texts, targets = _inputs(completions, reward_target)
        progress = kwargs["progress"] if "progress" in kwargs else progress_of(kwargs.get("trainer_state"))
        sigma = sigma_at(progress, cfg)
        return _safe_batch("temporal", lambda: temporal_scores(texts, targets, sigma), len(texts))

    def spatial(completions: Sequence[Any], reward_target: Sequence[Any] = None, **kwargs: Any) -> list[float]:
        texts, targets = _inputs(completions, reward_target)
        return _safe_batch("spatial", lambda: spatial_scores(texts, targets, cfg.tau), len(texts))

    return [accuracy, format, temporal, spatial]


def score_all(completions: Sequence[Any], reward_target: Sequence[Any], cfg: RewardConfig = RewardConfig(),
              progress: float = 0.0) -> dict[str, list[float]]:
    """Every component plus the weighted `total`, for evaluation and the verl adapter."""
    out = {f.__name__: f(completions, reward_target, progress=progress) for f in make_reward_funcs(cfg)}
    out["total"] = np.sum([np.asarray(out[k]) * cfg.weights[k] for k in COMPONENTS], axis=0).tolist()
    return out


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  **reward_kwargs: Any) -> dict[str, float]:
    """verl's custom reward signature (`custom_reward_function.path=train/rewards.py`, `name=compute_score`).

    `ground_truth` is the reward target (`stages.targets.reward_target`, JSON text or dict; `stgr export
    --format verl` writes it). `extra_info["progress"]` (0-1), if given, drives the sigma schedule;
    `reward_kwargs` may hold a `rewards` mapping shaped like conf/train/rl.yaml's. Returns verl's dict
    form: `score` (the weighted total) plus each component.
    """
    try:
        cfg = RewardConfig.from_config(reward_kwargs.get("rewards") or {})
        progress = float((extra_info or {}).get("progress", 0.0))
    except (TypeError, ValueError) as exc:
        log.warning("compute_score: bad reward settings (%s); using defaults", exc)
        cfg, progress = RewardConfig(), 0.0
    scores = score_all([solution_str], [ground_truth], cfg, progress)
    return {"score": scores["total"][0], **{k: scores[k][0] for k in COMPONENTS}}
