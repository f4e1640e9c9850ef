"""V-STaR: the model's five answers per item, parsed and scored as the benchmark does.

Per item the model answers five questions (V-STaR's `inference_demo.py`, in the think-mode wording
of Open-o3 Video's evaluation):

- `vqa`: the open "what" question, shared by both chains;
- chain 1 (what -> when -> where): `temporal_1` (when?) and `spatial_1` (where, at each whole second
  of the *ground-truth* span, which the prompt gives);
- chain 2 (what -> where -> when): `spatial_2` (where, told how many boxes to give) and `temporal_2`
  (when, given the *ground-truth* boxes).

The frames are those of training (`stages.lib.render.render_example`): labelled `Frame k at t s:`, boxes on the
model's own grid, so a model is tested on the layout it was trained on. Boxes the model writes are
read in its frame and compared in the canonical normalised frame with the ground truth (V-STaR's
code compares the model's raw numbers with source pixels; see docs/evaluation.md).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from stages.lib import evidence, geometry, metrics
from stages.lib.evidence import parse_boxes_by_time
from stages.lib.media import video_jpegs
from stages.lib.render import request_from_messages
from stages.lib.schema import frame_image
from stages.lib.targets import frame_from_dict, frame_to_dict
from train.eval.crops import crop_calls, crop_kind
from train.eval.judge import CORRECT_FROM, INVALID, JudgeCalls
from train.eval.runner import Call, Runner
from train.eval.scaling import tts_candidates, tts_outcome
from train.eval.vstar_data import VStarItem

KINDS = ("vqa", "temporal_1", "spatial_1", "spatial_2", "temporal_2")

Box = tuple[float, float, float, float]


# --- frames and prompts -------------------------------------------------------------------------------


def frame_times(item: VStarItem, fps: float, max_frames: int) -> list[tuple[float, int]]:
    """(seconds, frame index) of the frames shown: `fps` per second over the whole video, spread
    uniformly over all frames when that would exceed `max_frames` (as Open-o3 Video's V-STaR code)."""
    count = item.frame_count
    step = max(1, int(round(item.fps / fps)))
    indices = list(range(0, count, step))
    if len(indices) > max_frames:
        indices = [int(i) for i in np.linspace(0, count - 1, max_frames).round()]
    return [(round(i / item.fps, 6), i) for i in indices]


def whole_seconds(item: VStarItem) -> list[int]:
    """The whole seconds inside the ground-truth span, ends included (V-STaR's `time_range`)."""
    start, end = item.timestamps
    return list(range(math.ceil(start), math.floor(end) + 1))


def gt_boxes_in_frame(item: VStarItem, frame: geometry.BoxFrame) -> list[list[float]]:
    """The ground-truth boxes (source pixels) rewritten in the model's frame, rounded as it writes."""
    pixels = np.asarray([b.xyxy for b in item.bboxes], dtype=np.float64)
    canonical = geometry.pixel_frame(item.width, item.height).to_canonical(pixels)
    return frame.quantise(frame.from_canonical(canonical)).tolist()


def prompt_variables(item: VStarItem, frame: geometry.BoxFrame) -> dict[str, Any]:
    seconds = whole_seconds(item)
    boxes = gt_boxes_in_frame(item, frame)
    return {
        "question": item.question,
        "temporal_question": item.temporal_question,
        "spatial_question": item.spatial_question,
        "spatial_question_2": item.spatial_question_2,
        "duration": f"{item.duration_s:g}",
        "width": f"{frame.width:g}",
        "height": f"{frame.height:g}",
        "time_range": "[" + ", ".join(str(s) for s in seconds) + "]",
        "first_second": str(seconds[0]) if seconds else "0",
        "num_boxes": str(len(boxes)),
        "boxes": "[" + ", ".join(frame.format_box(b) for b in boxes) + "]",
    }


def render_prompt(template: str, variables: Mapping[str, Any]) -> str:
    """`{name}` placeholders filled from `variables`; literal braces are written `{{` and `}}`."""
    return template.format(**variables).strip()


# --- scoring ---------------------------------------------------------------------------------------------

_CLOCK_IN_TEXT = re.compile(r"\d+(?::\d+){1,2}(?:\.\d+)?")
_NUMBER_WITH_UNIT = re.compile(r"\b(\d+(?:\.\d+)?)(?:s|secs?|seconds?)?\b")
_BARE_NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)\b")


def _clock_to_seconds(m: re.Match[str]) -> str:
    seconds = evidence.parse_seconds(m.group(0))
    return m.group(0) if seconds is None else f" {seconds} "


def parse_span(text: str | None) -> tuple[float, float] | None:
    """The span a temporal answer gives, in seconds, or None.

    First the grammar's spellings (`evidence.parse_time_span`: `<t>3</t>s to <t>7</t>s`, `[3, 7]`,
    `3 - 7 s`, clock times), then V-STaR's own rule (the official `extract_timestamps`): in the
    `<answer>` content, clock times become seconds, and an answer holding exactly two numbers is the
    span ("between 41.2 and 46 seconds", "Start: 41.2s, End: 46.5s"). Numbers are counted first with
    a unit glued on, then as the official counts them (a number between word boundaries, which reads
    "41.2s" as 41 and does not see "12s"): whenever the official finds a span this finds one, with
    the same numbers except that the decimals of "41.2s" are kept.
    """
    if not text:
        return None
    span = evidence.parse_time_span(text)
    if span is not None:
        return span
    body = _CLOCK_IN_TEXT.sub(_clock_to_seconds, evidence.answer_text(text))
    for pattern in (_NUMBER_WITH_UNIT, _BARE_NUMBER):
        numbers = pattern.findall(body)
        if len(numbers) == 2:
            return float(numbers[0]), float(numbers[1])
    return None


@dataclass(frozen=True)
class SpatialScore:
    ious: list[float]  # one per ground-truth box, in file order
    miou: float


def score_spatial(item: VStarItem, pred: Mapping[float, Sequence[Box]] | None) -> SpatialScore:
    """V-STaR's per-item spatial score: for each ground-truth box, the best IoU of the boxes
    predicted at its timestamp (0 where none); m_vIoU is their mean and AP@θ the share >= θ.

    Each box goes through `metrics.vstar_spatial_miou` on its own, so the per-box IoUs (needed for
    AP@θ) come from the same definition as the mean, also where a timestamp has several boxes."""
    gt = geometry.pixel_frame(item.width, item.height).to_canonical(
        np.asarray([b.xyxy for b in item.bboxes], dtype=np.float64))
    ious = [metrics.vstar_spatial_miou({box.timestamp: row}, pred) for box, row in zip(item.bboxes, gt)]
    return SpatialScore(ious, float(np.mean(ious)) if ious else 0.0)


def score_temporal(item: VStarItem, pred: tuple[float, float] | None) -> float:
    return float(metrics.temporal_iou(item.timestamps, pred))


# --- the evaluation flow ------------------------------------------------------------------------------


class VStarEval:
    """Calls and scores of a V-STaR file; see the module docstring. `cfg` is the eval config."""

    answer_kind = "text"

    def __init__(self, items: Sequence[VStarItem], cfg: Mapping[str, Any], policy: Any) -> None:
        self.items = list(items)
        self.cfg = cfg
        self.policy = policy
        video_dir = cfg["data"].get("video_dir")
        self.video_dir = Path(video_dir) if video_dir else None
        self._index: dict[str, Path] | None = None
        self._inputs: tuple[str, _ItemInputs] | None = None

    # inputs -------------------------------------------------------------------------------------

    def video(self, item: VStarItem) -> Path | None:
        """`<video_dir>/<vid>.mp4`, else the first `<vid>.mp4` below video_dir (as V-STaR's find_video)."""
        if self.video_dir is None:
            return None
        direct = self.video_dir / f"{item.vid}.mp4"
        if direct.is_file():
            return direct
        if self._index is None:
            self._index = {p.stem: p for p in sorted(self.video_dir.rglob("*.mp4"))}
        return self._index.get(item.vid)

    def inputs(self, item: VStarItem) -> "_ItemInputs":
        """The item's decoded frames; kept for the current item only (calls come item by item)."""
        if self._inputs is None or self._inputs[0] != item.key:
            video = self.video(item)
            assert video is not None
            self._inputs = (item.key, _ItemInputs(item, video, self.cfg, self.policy))
        return self._inputs[1]

    def context(self, item: VStarItem, kind: str, **more: Any) -> dict[str, Any]:
        return {"key": item.key, "vid": item.vid, "kind": kind, **more}

    # calls --------------------------------------------------------------------------------------

    def answer_calls(self) -> Iterator[Call]:
        gen = self.cfg["generation"]
        tts_cfg = self.cfg["tts"]
        for item in self.items:
            if self.video(item) is None:
                continue
            for kind in KINDS:
                yield Call(item.key, kind,
                           lambda item=item, kind=kind: self.inputs(item).request(
                               kind, max_new_tokens=int(gen["max_new_tokens"]),
                               context=self.context(item, kind)),
                           lambda item=item: {"frame": frame_to_dict(self.inputs(item).frame)})
            for n in range(int(tts_cfg["num_samples"]) if int(tts_cfg["num_samples"]) > 1 else 0):
                yield Call(item.key, f"vqa@{n}",
                           lambda item=item, n=n: self.inputs(item).request(
                               "vqa", max_new_tokens=int(gen["max_new_tokens"]),
                               temperature=float(tts_cfg["temperature"]), top_p=float(tts_cfg["top_p"]), seed=n,
                               context=self.context(item, "vqa", sample=n)),
                           lambda item=item: {"frame": frame_to_dict(self.inputs(item).frame)})

    def samples(self, runner: Runner, item: VStarItem) -> list[tuple[int, str | None, geometry.BoxFrame | None]]:
        out = []
        for n in range(int(self.cfg["tts"]["num_samples"]) if int(self.cfg["tts"]["num_samples"]) > 1 else 0):
            entry = runner.entry(item.key, f"vqa@{n}")
            frame = frame_from_dict(entry["frame"]) if entry and entry.get("frame") else None
            out.append((n, entry.get("completion") if entry else None, frame))
        return out

    def crop_calls(self, runner: Runner) -> Iterator[Call]:
        for item in self.items:
            stored = [(n, c, f) for n, c, f in self.samples(runner, item) if f is not None]
            if not stored:
                continue
            yield from crop_calls(item.key, [(n, c) for n, c, _ in stored], stored[0][2], item.duration_s,
                                  lambda t, item=item: self.inputs(item).image_at(t), self.cfg["tts"],
                                  self.context(item, "crop"))

    # scores -------------------------------------------------------------------------------------

    def score(self, runner: Runner, judge: JudgeCalls) -> list[dict[str, Any]]:
        """Per-item scores (JSON-able), V-STaR's fields plus what was parsed from each answer."""
        results = []
        for item in self.items:
            results.append(self._score_item(item, runner, judge))
        return results

    def _score_item(self, item: VStarItem, runner: Runner, judge: JudgeCalls) -> dict[str, Any]:
        problems: list[str] = []
        if self.video(item) is None:
            problems.append(f"video not found: {item.vid}.mp4 under data.video_dir={self.video_dir}")
        completions: dict[str, str | None] = {}
        frame: geometry.BoxFrame | None = None
        for kind in KINDS:
            entry = runner.entry(item.key, kind)
            completions[kind] = entry.get("completion") if entry else None
            if entry and entry.get("failed"):
                problems.append(f"{kind}: request failed: {entry['failed']}")
            if entry and entry.get("frame"):
                frame = frame_from_dict(entry["frame"])
        frame = frame or geometry.CANONICAL
        answer = evidence.answer_text(completions["vqa"] or "") or None
        score = judge.score(item.key, item.question, item.answer, answer)
        if completions["vqa"] is not None and answer is None:
            problems.append("vqa: empty answer")
        elif answer is not None and score == INVALID:
            problems.append("vqa: the judge's reply is not a score 0-3")
        chains = {}
        for chain, t_kind, s_kind in ((1, "temporal_1", "spatial_1"), (2, "temporal_2", "spatial_2")):
            span = parse_span(completions[t_kind])
            boxes = parse_boxes_by_time(completions[s_kind], frame)
            if completions[t_kind] is not None and span is None:
                problems.append(f"{t_kind}: no time span in the answer")
            elif span is not None and span[1] < span[0]:
                problems.append(f"{t_kind}: reversed time span (scores 0)")
            if completions[s_kind] is not None and boxes is None:
                problems.append(f"{s_kind}: no boxes by second in the answer")
            spatial = score_spatial(item, boxes)
            chains[f"chain{chain}"] = {
                "span": list(span) if span else None,
                "tiou": score_temporal(item, span),
                "boxes": {f"{t:g}": [list(b) for b in bs] for t, bs in (boxes or {}).items()},
                "ious": spatial.ious,
                "viou": spatial.miou,
            }
        out: dict[str, Any] = {
            "key": item.key, "index": item.index, "vid": item.vid, "domain": item.domain,
            "duration_s": item.duration_s, "duration": item.duration_bucket,
            "answer": answer, "judge": score, "correct": score >= CORRECT_FROM,
            **chains, "completions": completions, "problems": problems,
        }
        samples = self.samples(runner, item)
        if samples:
            out["tts"] = tts_outcome(
                [(c, f) for _, c, f in samples], item.duration_s, self.cfg["tts"], self.answer_kind, None,
                lambda n, j, item=item: runner.completion(item.key, crop_kind(n, j)),
                lambda candidate, item=item: judge.score(item.key, item.question, item.answer, candidate) >= CORRECT_FROM)
        return out

    def judge_calls(self, runner: Runner, judge: JudgeCalls) -> Iterator[Call]:
        for item in self.items:
            answer = evidence.answer_text(runner.completion(item.key, "vqa") or "") or None
            candidates = [answer] + [
                c for c in tts_candidates([(c, f) for _, c, f in self.samples(runner, item)], item.duration_s,
                                          self.cfg["tts"], self.answer_kind, None,
                                          lambda n, j, item=item: runner.completion(item.key, crop_kind(n, j)))]
            for candidate in dict.fromkeys(c for c in candidates if c):
                yield judge.call(item.key, item.question, item.answer, candidate, {"vid": item.vid})


class _ItemInputs:
    """One item's frames (decoded once) and the requests rendered from them."""

    def __init__(self, item: VStarItem, video: Path, cfg: Mapping[str, Any], policy: Any) -> None:
        self.item, self.video, self.cfg, self.policy = item, video, cfg, policy
        data = cfg["data"]
        times = frame_times(item, float(data["fps"]), int(data["max_frames"]))
        jpegs = video_jpegs(video, [i for _, i in times])
        self.frames = [{"t_s": t, "index": i, "image": frame_image(j)} for (t, i), j in zip(times, jpegs)]
        from PIL import Image

        with Image.open(io.BytesIO(jpegs[0])) as first:
            width, height = first.size
        self.frame = policy.frame_for(width, height)

    def request(self, kind: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                seed: int = 0, context: Mapping[str, Any]) -> Any:
        from stages.lib.render import FramePolicy, render_example

        prompt = render_prompt(self.cfg["vstar"]["prompts"][kind], prompt_variables(self.item, self.frame))
        record = {"id": self.item.key, "task": "general_free", "frames": self.frames, "question": prompt,
                  "options": [], "answer": self.item.answer, "key_frames": [],
                  "media": {"uri": str(self.video), "duration_s": self.item.duration_s}}
        policy = FramePolicy(max_frames=len(self.frames), box_frame=self.policy.box_frame,
                             min_pixels=self.policy.min_pixels, max_pixels=self.policy.max_pixels)
        data = self.cfg["data"]
        example = render_example(record, policy, data.get("instruction") or "", data.get("system_prompt"))
        return request_from_messages(example.prompt(), example.images, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, context=context)

    def image_at(self, t: float) -> Any:
        from PIL import Image

        jpeg = video_jpegs(self.video, [int(round(t * self.item.fps))])[0]
        return Image.open(io.BytesIO(jpeg))
