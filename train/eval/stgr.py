"""STGR splits: answers and evidence of a model on records built by `stgr build`.

Each record is rendered exactly as for training (`stages.lib.render.render_example`: frames labelled
`Frame k at t s:`, boxes on the model's grid, the same instruction), answered once greedily (and N
times for test-time scaling), and scored with the training rewards' definitions (`train.rewards`),
so evaluation and RL agree on what "right" means:

- answer (`stages.lib.answers`, by what the record's answer is): option letter (multiple choice), letter
  and span ((letter + tIoU) / 2 >= 0.75 counts as correct: the right letter and tIoU >= 0.5), tIoU
  with the answer span (>= 0.5 correct), IoU with the answer box (>= 0.5), and for free-form
  answers the judge's 0-3 score (>= 2 correct), with the ROUGE accuracy reward beside it;
- evidence: format score (0 / 0.5 / 1), temporal proximity of the cited times to the key frames
  (exp(-dt^2 / 2 sigma^2)), spatial precision (IoU of each cited box with the key frame's boxes
  when |dt| <= tau), and the number of grounded claims.
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.errors import InputError
from stages.lib import answers, evidence, metrics
from stages.lib.media import video_jpegs
from stages.lib.render import render_example, request_from_messages
from stages.lib.schema import frame_jpeg
from train import rewards
from train.data import load_records
from train.eval.crops import crop_calls, crop_kind
from train.eval.judge import CORRECT_FROM, INVALID, JudgeCalls
from train.eval.report import TIOU_THRESHOLDS, _mean, _pct, _problems, _tts_lines, _tts_summary
from train.eval.runner import Call, Runner
from train.eval.scaling import tts_candidates, tts_outcome

#: Answers below these scores are not "correct" (spans and boxes are scored continuously).
CORRECT_IOU = 0.5
CORRECT_OPTION_SPAN = 0.75
VOTING_KINDS = {"option": "option", "option_span": "option", "text": "text"}
"""Answer kinds that test-time scaling votes on, and the kind their votes are keyed by (a letter
followed by a span votes by its letter)."""


def _split_location(path: Path, split: str) -> tuple[Path, str]:
    """`data.path` may be a split folder itself (it holds the shards), else a dataset or run dir."""
    if path.is_dir() and any(path.glob("*.parquet")):
        return path.parent, path.name
    return path, split


class StgrEval:
    """Calls and scores of an STGR split (see the module docstring)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any], policy: Any) -> None:
        self.records = list(records)
        self.cfg = cfg
        self.policy = policy
        self._rendered: tuple[str, Any] | None = None
        for record in self.records:
            if record["task"] in ("temporal",) and not record.get("answer_span"):
                raise InputError(f"{record.get('_file')}: record {record['id']!r}: field 'answer_span' is empty "
                                 f"(a temporal record needs it)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], policy: Any) -> "StgrEval":
        root, split = _split_location(Path(cfg["data"]["path"]), cfg["data"]["split"])
        max_records = cfg["data"].get("max_records")
        records = load_records(root, split, int(max_records) if max_records is not None else None)
        return cls(records, cfg, policy)

    def _render(self, record: Mapping[str, Any]) -> Any:
        """The record as the model sees it; the last one is kept, since a record's calls come together
        (its answer, its samples, and what is stored with them) and decoding its frames is the cost."""
        if self._rendered is None or self._rendered[0] != record["id"]:
            data = self.cfg["data"]
            base = Path(record["_file"]).parent if record.get("_file") else None
            example = render_example(record, self.policy, data.get("instruction") or "", data.get("system_prompt"), base)
            self._rendered = (record["id"], example)
        return self._rendered[1]

    def _request(self, record: Mapping[str, Any], *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, sample: int | None = None) -> Any:
        example = self._render(record)
        context = {"key": record["id"], "id": record["id"], "task": record["task"], "kind": "answer"}
        if sample is not None:
            context["sample"] = sample
        return request_from_messages(example.prompt(), example.images,
                                     max_new_tokens=int(self.cfg["generation"]["max_new_tokens"]),
                                     temperature=temperature, top_p=top_p, seed=seed, context=context)

    def _meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"target": self._render(record).reward_target}

    def _num_samples(self, record: Mapping[str, Any]) -> int:
        n = int(self.cfg["tts"]["num_samples"])
        return n if n > 1 and answers.record_answer_kind(record) in VOTING_KINDS else 0

    # calls --------------------------------------------------------------------------------------

    def answer_calls(self) -> Iterator[Call]:
        tts_cfg = self.cfg["tts"]
        for record in self.records:
            yield Call(record["id"], "answer", lambda r=record: self._request(r), lambda r=record: self._meta(r))
            for n in range(self._num_samples(record)):
                yield Call(record["id"], f"answer@{n}",
                           lambda r=record, n=n: self._request(r, temperature=float(tts_cfg["temperature"]),
                                                               top_p=float(tts_cfg["top_p"]), seed=n, sample=n),
                           lambda r=record: self._meta(r))

    def _target(self, runner: Runner, record: Mapping[str, Any], kind: str = "answer") -> rewards.Target | None:
        entry = runner.entry(record["id"], kind)
        return rewards.parse_target(entry["target"]) if entry and entry.get("target") else None

    def _samples(self, runner: Runner, record: Mapping[str, Any]) -> list[tuple[str | None, Any]]:
        out = []
        for n in range(self._num_samples(record)):
            target = self._target(runner, record, f"answer@{n}")
            out.append((runner.completion(record["id"], f"answer@{n}"), target.frame if target else None))
        return out

    def _duration(self, record: Mapping[str, Any]) -> float:
        media = record.get("media") or {}
        return float(media.get("duration_s") or max(f["t_s"] for f in record["frames"]))

    def _image_at(self, record: Mapping[str, Any], t: float) -> Any:
        """The frame at `t`: decoded from the video when it is readable, else the nearest embedded frame."""
        from PIL import Image

        media = record.get("media") or {}
        uri = str(media.get("uri") or "").removeprefix("file://")
        path = Path(uri)
        if uri and not path.is_absolute() and record.get("_file"):
            path = Path(record["_file"]).parent / path
        if uri and path.is_file() and media.get("fps"):
            return Image.open(io.BytesIO(video_jpegs(path, [int(round(t * float(media["fps"])))])[0]))
        frames = [f for f in record["frames"] if frame_jpeg(f)]
        if not frames:
            raise InputError(f"{record.get('_file')}: record {record['id']!r}: cannot crop at {t} s: "
                             f"'media.uri' is not readable and no frame carries a JPEG")
        nearest = min(frames, key=lambda f: abs(f["t_s"] - t))
        return Image.open(io.BytesIO(frame_jpeg(nearest)))

    def crop_calls(self, runner: Runner) -> Iterator[Call]:
        for record in self.records:
            samples = self._samples(runner, record)
            frames = [f for _, f in samples if f is not None]
            if not frames:
                continue
            yield from crop_calls(record["id"], [(n, c) for n, (c, f) in enumerate(samples) if f is not None],
                                  frames[0], self._duration(record), lambda t, r=record: self._image_at(r, t),
                                  self.cfg["tts"], {"key": record["id"], "id": record["id"], "task": record["task"]})

    def judge_calls(self, runner: Runner, judge: JudgeCalls) -> Iterator[Call]:
        for record in self.records:
            target = self._target(runner, record)
            if target is None or rewards.answer_kind(target) != "text":
                continue
            answer = evidence.answer_text(runner.completion(record["id"], "answer") or "") or None
            candidates = [answer] + tts_candidates(
                self._samples(runner, record), self._duration(record), self.cfg["tts"], "text", None,
                lambda n, j, r=record: runner.completion(r["id"], crop_kind(n, j)))
            for candidate in dict.fromkeys(c for c in candidates if c):
                yield judge.call(record["id"], record["question"], evidence.answer_text(record["answer"]), candidate,
                                 {"id": record["id"], "task": record["task"]})

    # scores -------------------------------------------------------------------------------------

    def score(self, runner: Runner, judge: JudgeCalls) -> list[dict[str, Any]]:
        texts, targets = [], []
        for record in self.records:
            texts.append(runner.completion(record["id"], "answer") or "")
            targets.append(self._target(runner, record))
        ev = self.cfg["evidence"]
        accuracy = rewards.accuracy_scores(texts, targets)
        fmt = rewards.format_scores(texts, targets)
        temporal = rewards.temporal_scores(texts, targets, float(ev["sigma_s"]))
        spatial = rewards.spatial_scores(texts, targets, float(ev["tau_s"]))
        rows = []
        for i, (record, text, target) in enumerate(zip(self.records, texts, targets)):
            rows.append(self._row(runner, judge, record, text, target,
                                  {"accuracy": accuracy[i], "format": fmt[i], "temporal": temporal[i],
                                   "spatial": spatial[i]}))
        return rows

    def _row(self, runner: Runner, judge: JudgeCalls, record: Mapping[str, Any], text: str,
             target: rewards.Target | None, reward: Mapping[str, float]) -> dict[str, Any]:
        problems: list[str] = []
        entry = runner.entry(record["id"], "answer")
        if entry is None:
            problems.append("answer: no completion")
        elif entry.get("failed"):
            problems.append(f"answer: request failed: {entry['failed']}")
        kind = rewards.answer_kind(target) if target else "text"
        answer = evidence.answer_text(text) or None
        row: dict[str, Any] = {"id": record["id"], "task": record["task"], "answer_kind": kind, "answer": answer,
                               "completion": text, "reward": dict(reward), "problems": problems}
        if target is not None and evidence.split_sections(text).answer is None and text:
            problems.append("answer: no <answer> section")
        frame = target.frame if target else None
        if kind == "option":
            row["correct"] = reward["accuracy"] == 1.0
        elif kind == "option_span":
            row["correct"] = reward["accuracy"] >= CORRECT_OPTION_SPAN
        elif kind == "span":
            row["tiou"] = reward["accuracy"]
            row["correct"] = reward["accuracy"] >= CORRECT_IOU
        elif kind == "box":
            row["iou"] = reward["accuracy"]
            row["correct"] = reward["accuracy"] >= CORRECT_IOU
        else:
            score = judge.score(record["id"], record["question"], evidence.answer_text(record["answer"]), answer)
            row.update(judge=score, rouge_l=reward["accuracy"], correct=score >= CORRECT_FROM)
            if answer and score == INVALID:
                problems.append("answer: the judge's reply is not a score 0-3")
            if record.get("answer_span"):
                row["tiou"] = float(metrics.temporal_iou(record["answer_span"], evidence.parse_time_span(text)))
        claims = evidence.parse_trace(text, frame).claims if frame else ()
        row["claims"] = sum(1 for c in claims if c.boxes and c.t is not None)
        samples = self._samples(runner, record)
        if samples:
            truth = evidence.answer_text(record["answer"])
            num_options = len(record.get("options") or []) or None
            vote_kind = VOTING_KINDS.get(kind, "text")
            if vote_kind == "option":
                letter = evidence.parse_option_letter(truth.split("\n", 1)[0], num_options)
                is_correct = lambda c: evidence.parse_option_letter(c, num_options) == letter  # noqa: E731
            else:
                is_correct = lambda c, r=record: judge.score(  # noqa: E731
                    r["id"], r["question"], truth, c) >= CORRECT_FROM
            row["tts"] = tts_outcome(samples, self._duration(record), self.cfg["tts"], vote_kind, num_options,
                                     lambda n, j, r=record: runner.completion(r["id"], crop_kind(n, j)), is_correct)
        return row


def _group(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n": len(rows),
        "acc": _mean(float(r["correct"]) for r in rows),
        "format": _mean(r["reward"]["format"] for r in rows),
        "temporal": _mean(r["reward"]["temporal"] for r in rows),
        "spatial": _mean(r["reward"]["spatial"] for r in rows),
        "claims": _mean(r["claims"] for r in rows),
        "grounded": _mean(float(r["claims"] > 0) for r in rows),
    }
    tious = [r["tiou"] for r in rows if "tiou" in r]
    if tious:
        out["m_tiou"] = _mean(tious)
        out["R"] = {f"{t:g}": v for t, v in metrics.recall_at(tious, TIOU_THRESHOLDS).items()}
    ious = [r["iou"] for r in rows if "iou" in r]
    if ious:
        out["m_iou"] = _mean(ious)
    judged = [r["judge"] for r in rows if "judge" in r]
    if judged:
        out["judge_mean"] = _mean(max(s, 0) for s in judged)
        out["rouge_l"] = _mean(r["rouge_l"] for r in rows if "rouge_l" in r)
    tts = _tts_summary(rows)
    if tts:
        out["tts"] = tts
    return out


def stgr_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    tasks = sorted(Counter(r["task"] for r in rows))
    return {"overall": _group(rows), "by_task": {t: _group([r for r in rows if r["task"] == t]) for t in tasks}}


def stgr_markdown(result: Mapping[str, Any]) -> str:
    s = result["summary"]
    o = s["overall"]
    dash = "-"
    lines = ["# STGR evaluation", "",
             f"- model: `{result['model']}` (backend `{result['backend']}`)",
             f"- data: `{result['data']}` ({o['n']} records)",
             f"- judge (free-form answers): `{result['judge']}`", "",
             "| task | n | Acc | m_tIoU | R@0.3 | R@0.5 | R@0.7 | m_IoU | judge 0-3 | ROUGE | format | temporal | spatial | claims | grounded |",
             "| --- | " + " | ".join(["---:"] * 14) + " |"]
    for name, g in [*s["by_task"].items(), ("**all**", o)]:
        r = g.get("R", {})
        cells = [str(g["n"]), _pct(g["acc"]), _pct(g["m_tiou"]) if "m_tiou" in g else dash] + \
                [_pct(r[f"{t:g}"]) if r else dash for t in TIOU_THRESHOLDS] + \
                [_pct(g["m_iou"]) if "m_iou" in g else dash,
                 f"{g['judge_mean']:.2f}" if "judge_mean" in g else dash,
                 _pct(g["rouge_l"]) if "rouge_l" in g else dash,
                 _pct(g["format"]), _pct(g["temporal"]), _pct(g["spatial"]), f"{g['claims']:.1f}", _pct(g["grounded"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Acc: option letter; letter and span >= 0.75; tIoU >= 0.5 (temporal); IoU >= 0.5 (spatial); judge >= 2 (free form). "
              "format / temporal / spatial: the RL rewards' definitions (docs/evaluation.md).", ""]
    lines += _tts_lines(o)
    lines += _problems(result["samples"], "id")
    return "\n".join(lines)
