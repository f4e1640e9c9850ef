"""The paper's RL rewards, as plain functions in TRL's reward signature (and a verl adapter).

Every function takes `completions` (strings, or chat messages as TRL passes them) and
`reward_target` (one JSON object per completion, made by `stages.lib.targets.reward_target`: task, answer,
options, answer span, key frames with canonical boxes, and the box frame the model writes in) and
returns one float per completion. None of them raises: malformed text, malformed targets and
absurd inputs (10,000 claims, boxes with three numbers, times as words) score 0 for what is wrong.
Parsing goes through `stages.lib.evidence`, boxes through `stages.lib.geometry`, answers through
`stages.lib.answers`; nothing here re-implements them. Behaviour follows the released Open-o3 Video
rewards (`reward_func.py`); where it does not, docs/training.md lists the departure and its reason.

- `accuracy`: the `<answer>` content scored by `stages.lib.answers.score_answer`, the one scorer the
  filter and evaluation use too (option letter, letter + span, tIoU, IoU or ROUGE, by what the
  record's answer is); 0 without an `<answer>` section or without a ground truth.
- `format`: 0 / 0.5 / 1 (`evidence.format_score`): not well formed / well formed / well formed with
  the evidence the task needs.
- `temporal` (0 without a `<think>` section): for a record with key frames, the mean over the cited
  times of exp(-dt^2 / 2 sigma^2), dt to the nearest key time (the released point reward); for a
  record with an answer span and no key frames, the fraction of cited times inside the span (the
  released segment reward). sigma = sigma_start (1 - p) while training progress p < anneal_until,
  then sigma_end (the paper: 4 -> 1 by 75 % of training); p = (global_step + 1) / max_steps.
- `spatial` (0 without `<think>` and `<answer>` sections): mean over the timed claims with boxes of
  the claim's IoU at the nearest key frame, counted only when |dt| <= tau. A claim's IoU there is the
  best over the frame's objects of the mean, over that object's ground-truth boxes, of the best IoU
  with the claim's boxes. Of two key frames at one time, the first in the list counts. The gate is
  symmetric; the reference tests `gt_time - pred_time < tau`, which lets any prediction *after* the
  key frame through (and gates on the wrong side); we do not copy that.

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

from stages.lib import answers, evidence, geometry
from stages.lib.targets import frame_from_dict

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
    """Training progress from a transformers TrainerState, as the released trainer computes it:
    (global_step + 1) / max_steps, the step being generated for counting as done (0 when unknown).
    TRL scores a step's completions before it increments `global_step`, so the last step reads 1."""
    step = getattr(trainer_state, "global_step", 0) or 0
    total = getattr(trainer_state, "max_steps", 0) or 0
    return (step + 1) / total if total > 0 else 0.0


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
    key_objects: tuple[np.ndarray, ...]  # per key frame, (n_k,) which object each box is (0..m_k-1)
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
        objects = [[o for o in kf.get("objects") or [] if o.get("box")] for kf in key_frames]
        span = data.get("answer_span")
        return Target(
            task=str(data["task"]),
            answer=str(data.get("answer") or ""),
            options=tuple(str(o) for o in data.get("options") or []),
            answer_span=(float(span[0]), float(span[1])) if span else None,
            key_times=np.asarray([float(kf["t_s"]) for kf in key_frames], dtype=np.float64),
            key_boxes=tuple(np.asarray([o["box"] for o in objs], dtype=np.float64).reshape(-1, 4) for objs in objects),
            key_objects=tuple(_object_ids(objs) for objs in objects),
            frame=frame_from_dict(data["frame"]),
        )
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        log.warning("unusable reward target (%s): %.200r", exc, raw)
        return None


def _object_ids(objects: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Which object each box of a key frame belongs to: boxes with the same name are one object
    (the released `key_items` maps a name to its list of boxes); an unnamed box is its own object."""
    ids: dict[Any, int] = {}
    return np.asarray([ids.setdefault(o.get("name") if o.get("name") is not None else ("unnamed", i), len(ids))
                       for i, o in enumerate(objects)], dtype=np.int64)


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


def answer_kind(target: Target) -> str:
    """How the target's answer is scored (`stages.lib.answers.answer_kind`: decided by the answer itself)."""
    return answers.answer_kind(target.task, target.answer, target.options, target.answer_span)


def _accuracy_item(text: str, target: Target) -> float:
    answer = evidence.split_sections(text).answer
    if answer is None:
        return 0.0
    score = answers.score_answer(answer, task=target.task, answer=target.answer, options=target.options,
                                 answer_span=target.answer_span, frame=target.frame)
    return 0.0 if score is None else score


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
    is always farther than any key of the query's own.

    Ties go to the key earlier in the owner's list, as in the released loop (which keeps the first
    strict minimum, then takes the first key frame at that time): keys at one time all stand for the
    first of them, and of two keys equally far, the one listed first wins."""
    if len(q_t) == 0 or len(k_t) == 0:
        return np.full(len(q_t), -1, dtype=np.int64), np.full(len(q_t), np.inf)
    q_t = np.clip(q_t, -_MAX_TIME, _MAX_TIME)
    k_t = np.clip(k_t, -_MAX_TIME, _MAX_TIME)
    stride = 8 * _MAX_TIME
    order = np.lexsort((k_t, k_owner))  # stable: equal keys keep their list order
    s_owner, s_t = k_owner[order], k_t[order]
    starts = np.flatnonzero(np.r_[True, (s_owner[1:] != s_owner[:-1]) | (s_t[1:] != s_t[:-1])])
    first = order[starts]  # one key per distinct (owner, time): the first listed
    pos = np.searchsorted(s_owner[starts] * stride + s_t[starts], q_owner * stride + q_t)
    cand_idx = first[np.stack([np.clip(pos - 1, 0, len(starts) - 1), np.clip(pos, 0, len(starts) - 1)])]
    d = np.abs(k_t[cand_idx] - q_t)
    d[k_owner[cand_idx] != q_owner] = np.inf
    later = (d[1] < d[0]) | ((d[1] == d[0]) & (cand_idx[1] < cand_idx[0]))
    cols = np.arange(len(q_t))
    best = later.astype(np.int64)
    dist = d[best, cols]
    idx = np.where(np.isfinite(dist), cand_idx[best, cols], -1)
    return idx, dist


def temporal_scores(texts: list[str], targets: list[Target | None], sigma: float) -> list[float]:
    """Per completion, the mean over its cited times of: the Gaussian proximity to the nearest key
    time (a record with key frames), or 1 inside the answer span and 0 outside (a record with a span
    and no key frames). 0 without a `<think>` section, which is where the times are read."""
    n = len(texts)
    q_owner, q_t, k_owner, k_t = [], [], [], []
    span_owner, span_hit = [], []
    for i, (text, target) in enumerate(zip(texts, targets)):
        if target is None:
            continue
        trace = _parse(text, target.frame)
        if trace.think is None or not trace.times:
            continue
        t = np.clip(np.asarray(trace.times, dtype=np.float64), -_MAX_TIME, _MAX_TIME)
        if len(target.key_times):
            q_owner.append(np.full(len(t), i))
            q_t.append(t)
            k_owner.append(np.full(len(target.key_times), i))
            k_t.append(target.key_times)
        elif target.answer_span is not None:
            lo, hi = min(target.answer_span), max(target.answer_span)
            span_owner.append(np.full(len(t), i))
            span_hit.append(((lo <= t) & (t <= hi)).astype(np.float64))
    parts_owner, parts_score = list(span_owner), list(span_hit)
    if q_owner:
        owner = np.concatenate(q_owner)
        dt = _nearest(owner, np.concatenate(q_t), np.concatenate(k_owner), np.concatenate(k_t))[1]
        parts_owner.append(owner)
        parts_score.append(np.exp(-(dt**2) / (2.0 * sigma**2)) if sigma > 0 else (dt == 0).astype(np.float64))
    if not parts_owner:
        return [0.0] * n
    owners = np.concatenate(parts_owner).astype(np.int64)
    total = np.bincount(owners, weights=np.concatenate(parts_score), minlength=n)
    count = np.bincount(owners, minlength=n)
    return np.divide(total, count, out=np.zeros(n), where=count > 0).tolist()


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def spatial_scores(texts: list[str], targets: list[Target | None], tau: float) -> list[float]:
    """Mean over timed claims with boxes of the claim's IoU at the nearest key frame if |dt| <= tau
    (else 0): the best over the frame's objects of the mean over the object's ground-truth boxes of
    the best IoU with the claim's boxes. 0 without `<think>` and `<answer>` sections."""
    n = len(texts)
    c_owner, c_t, c_nbox, boxes = [], [], [], []
    k_owner, k_t, k_nbox, gt, gt_obj = [], [], [], [], []
    n_objects = 0
    for i, (text, target) in enumerate(zip(texts, targets)):
        if target is None or not len(target.key_times):
            continue
        trace = _parse(text, target.frame)
        if trace.think is None or trace.answer is None:
            continue
        claims = [c for c in trace.claims if c.boxes and c.t is not None]
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
        for ids in target.key_objects:  # object ids made unique across the batch
            gt_obj.append(ids + n_objects)
            n_objects += int(ids.max()) + 1 if len(ids) else 0
    if not c_owner:
        return [0.0] * n
    c_owner_a = np.asarray(c_owner, dtype=np.int64)
    key, dt = _nearest(c_owner_a, np.asarray(c_t, dtype=np.float64),
                       np.asarray(k_owner, dtype=np.int64), np.asarray(k_t, dtype=np.float64))
    key = np.where(dt <= tau, key, -1)
    k_nbox_a = np.asarray(k_nbox, dtype=np.int64)
    gt_start = _exclusive_cumsum(k_nbox_a)
    gt_all = np.concatenate(gt) if gt else np.zeros((0, 4))
    gt_obj_all = np.concatenate(gt_obj) if gt_obj else np.zeros(0, dtype=np.int64)
    # One slot per (claim, ground-truth box of the claim's key frame); each claim box meets every slot of its claim.
    n_slots = np.where(key >= 0, k_nbox_a[np.maximum(key, 0)], 0)
    slot_start = _exclusive_cumsum(n_slots)
    slot_claim = np.repeat(np.arange(len(c_owner)), n_slots)
    slot_gt = gt_start[key[slot_claim]] + (np.arange(len(slot_claim)) - slot_start[slot_claim])
    claim_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box_claim = np.repeat(np.arange(len(c_owner)), c_nbox)
    pairs_per_box = n_slots[box_claim]
    pair_box = np.repeat(np.arange(len(claim_boxes)), pairs_per_box)
    pair_rank = np.arange(len(pair_box)) - np.repeat(_exclusive_cumsum(pairs_per_box), pairs_per_box)
    pair_slot = slot_start[box_claim[pair_box]] + pair_rank
    iou = geometry.paired_iou(claim_boxes[pair_box], gt_all[slot_gt[pair_slot]]) if len(pair_box) else np.zeros(0)
    slot_iou = np.zeros(len(slot_claim))
    np.maximum.at(slot_iou, pair_slot, iou)  # each ground-truth box: the best of the claim's boxes
    group, inverse = np.unique(slot_claim * max(n_objects, 1) + gt_obj_all[slot_gt], return_inverse=True)
    object_iou = np.bincount(inverse, weights=slot_iou) / np.bincount(inverse)  # mean over the object's boxes
    claim_iou = np.zeros(len(c_owner))
    np.maximum.at(claim_iou, group // max(n_objects, 1), object_iou)  # the best object of the frame
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


class RewardFunc:
    """One component as a TRL reward function: `__name__` is the component, so TRL logs it as
    rewards/<name>/mean. An instance rather than a closure so that it pickles: Ray Train ships the
    trainer's reward functions to every worker."""

    def __init__(self, name: str, cfg: RewardConfig = RewardConfig()) -> None:
        if name not in COMPONENTS:
            raise ValueError(f"unknown reward {name!r}; known: {list(COMPONENTS)}")
        self.__name__ = name
        self.cfg = cfg

    def __call__(self, completions: Sequence[Any], reward_target: Sequence[Any] = None, **kwargs: Any) -> list[float]:
        texts, targets = _inputs(completions, reward_target)
        if self.__name__ == "temporal":
            progress = kwargs["progress"] if "progress" in kwargs else progress_of(kwargs.get("trainer_state"))
            sigma = sigma_at(progress, self.cfg)
            return _safe_batch("temporal", lambda: temporal_scores(texts, targets, sigma), len(texts))
        if self.__name__ == "spatial":
            return _safe_batch("spatial", lambda: spatial_scores(texts, targets, self.cfg.tau), len(texts))
        return (accuracy_scores if self.__name__ == "accuracy" else format_scores)(texts, targets)


def make_reward_funcs(cfg: RewardConfig = RewardConfig()) -> list[RewardFunc]:
    """The four components as TRL reward functions, in COMPONENTS order.
    Pass `[cfg.weights[f.__name__] for f in funcs]` as GRPOConfig.reward_weights."""
    return [RewardFunc(name, cfg) for name in COMPONENTS]


def score_all(completions: Sequence[Any], reward_target: Sequence[Any], cfg: RewardConfig = RewardConfig(),
              progress: float = 0.0) -> dict[str, list[float]]:
    """Every component plus the weighted `total`, for evaluation and the verl adapter."""
    out = {f.__name__: f(completions, reward_target, progress=progress) for f in make_reward_funcs(cfg)}
    out["total"] = np.sum([np.asarray(out[k]) * cfg.weights[k] for k in COMPONENTS], axis=0).tolist()
    return out


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  **reward_kwargs: Any) -> dict[str, float]:
    """verl's custom reward signature (`custom_reward_function.path=train/rewards.py`, `name=compute_score`).

    `ground_truth` is the reward target (`stages.lib.targets.reward_target`, JSON text or dict; `stgr export
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
