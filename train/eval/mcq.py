"""Multiple-choice video benchmarks (Video-MME, WorldSense, VideoMMMU, generic): one grounded answer
per question, N sampled ones for test-time scaling, and the report with the benchmarks' breakdowns.

Each question is shown as for training (`stages.lib.render.render_example`: frames `data.fps` per second
over the whole video, spread uniformly when more than `data.max_frames`, labelled `Frame k at t s:`,
boxes on the model's grid), followed by its options and `mcq.instruction`: think inside `<think>`
citing evidence as `<obj>…</obj><box>…</box>at<t>…</t>s`, then only the option letter inside
`<answer>`, as the paper's evaluation asks. The greedy answer is scored; an answer that is no
option letter, or a letter past the last option, scores 0 and is counted as unparsed.

With `tts.num_samples=N` (> 1) the question is also answered N times with sampling; the cited
boxes of each sample are cropped and rated by the model (train/eval/crops.py) and both votes of
train/tts.py are taken, majority and confidence-weighted, and reported side by side with the
questions on which they differ and which of them was right there.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.errors import ConfigError, InputError
from stages.lib import evidence, geometry
from stages.lib.answers import option_letter
from stages.lib.chat import ChatRequest, LabelledImage
from stages.lib.media import jpeg_bytes, open_video, video_jpegs
from stages.lib.render import FramePolicy, render_example, request_from_messages
from stages.lib.schema import frame_image
from stages.lib.targets import frame_from_dict, frame_to_dict
from train.eval.crops import crop_calls, crop_kind
from train.eval.judge import JudgeCalls
from train.eval.mcq_data import TITLES, McqItem, McqSet, load_mcq, ordered_values
from train.eval.report import _mean, _pct, _problems, _tts_lines, _tts_summary
from train.eval.runner import Call, Runner
from train.eval.scaling import tts_outcome

VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")
#: How a greedy answer was read: an option letter, no letter, a letter past the last option, no answer.
PARSED, UNPARSED, OUT_OF_OPTIONS, MISSING = "ok", "unparsed", "out_of_options", "missing"
QUESTION_IMAGE_LABEL = "The image of the question:"


def parse_choice(completion: str | None, num_options: int) -> tuple[str | None, str]:
    """(the option letter, how it was read): the letter the `<answer>` gives, read by the one answer
    scorer's reader (`stages.lib.answers.option_letter`: `B`, `(B)`, `B. …`, `Answer: B`; the whole text
    when there is no `<answer>`), OUT_OF_OPTIONS for a letter past the
    last option (it is no option: it scores 0), UNPARSED for none, MISSING for no completion."""
    if completion is None:
        return None, MISSING
    letter = option_letter(completion, num_options)
    if letter is not None:
        return letter, PARSED
    if option_letter(completion) is not None:
        return None, OUT_OF_OPTIONS
    return None, UNPARSED


def letters_phrase(letters: Sequence[str]) -> str:
    """"A, B, C, or D" (the released prompts' spelling), "A or B" for two."""
    if len(letters) <= 2:
        return " or ".join(letters)
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def frame_indices(frame_count: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """`fps` frames per second over the whole video, spread uniformly over all frames when that
    would exceed `max_frames` (the V-STaR evaluation's sampling)."""
    import numpy as np

    step = max(1, int(round(video_fps / fps)))
    indices = list(range(0, frame_count, step))
    if len(indices) <= max_frames:
        return indices
    return [int(i) for i in np.linspace(0, frame_count - 1, max_frames).round()]


class McqEval:
    """Calls and scores of a multiple-choice benchmark (see the module docstring)."""

    answer_kind = "option"

    def __init__(self, data: McqSet, cfg: Mapping[str, Any], policy: FramePolicy) -> None:
        self.data, self.items, self.cfg, self.policy = data, data.items, cfg, policy
        video_dir = cfg["data"].get("video_dir") or data.video_dir
        if not video_dir:
            raise ConfigError(f"data.video_dir: required for {TITLES[data.benchmark]} "
                              "(videos are read as <video_dir>/<video>.mp4, or found below it)")
        self.video_dir = Path(video_dir)
        if not self.video_dir.is_dir():
            raise InputError(f"data.video_dir: {self.video_dir} is not a directory")
        self._index: dict[str, Path] | None = None
        self._inputs: tuple[str, _Inputs] | None = None

    @classmethod
    def from_config(cls, fmt: str, cfg: Mapping[str, Any], policy: FramePolicy) -> "McqEval":
        max_records = cfg["data"].get("max_records")
        data = load_mcq(fmt, cfg["data"]["path"], cfg["mcq"], int(max_records) if max_records is not None else None)
        return cls(data, cfg, policy)

    # inputs -------------------------------------------------------------------------------------

    def video(self, item: McqItem) -> Path | None:
        """`<video_dir>/<video>.mp4` (or .mkv, … as the released scripts also look), a path relative
        to video_dir as written, else the first file of that name below video_dir."""
        for suffix in ("", *VIDEO_SUFFIXES):
            direct = self.video_dir / f"{item.video}{suffix}"
            if direct.is_file():
                return direct
        if self._index is None:
            found = (p for s in VIDEO_SUFFIXES for p in self.video_dir.rglob(f"*{s}"))
            self._index = {}
            for path in sorted(found):
                self._index.setdefault(path.stem, path)
        return self._index.get(Path(item.video).stem)

    def inputs(self, item: McqItem) -> "_Inputs":
        """The item's decoded frames; kept for the current item only (its calls come together)."""
        if self._inputs is None or self._inputs[0] != item.key:
            video = self.video(item)
            assert video is not None
            self._inputs = (item.key, _Inputs(item, video, self.cfg, self.policy))
        return self._inputs[1]

    def _num_samples(self) -> int:
        n = int(self.cfg["tts"]["num_samples"])
        return n if n > 1 else 0

    def _context(self, item: McqItem, **more: Any) -> dict[str, Any]:
        return {"key": item.key, "qid": item.qid, "video": item.video, "benchmark": self.data.benchmark, **more}

    # calls --------------------------------------------------------------------------------------

    def answer_calls(self) -> Iterator[Call]:
        tts_cfg = self.cfg["tts"]
        for item in self.items:
            if self.video(item) is None:
                continue
            meta = lambda item=item: self.inputs(item).meta()  # noqa: E731
            yield Call(item.key, "answer", lambda item=item: self.inputs(item).request(
                context=self._context(item, kind="answer")), meta)
            for n in range(self._num_samples()):
                yield Call(item.key, f"answer@{n}", lambda item=item, n=n: self.inputs(item).request(
                    temperature=float(tts_cfg["temperature"]), top_p=float(tts_cfg["top_p"]), seed=n,
                    context=self._context(item, kind="answer", sample=n)), meta)

    def samples(self, runner: Runner, item: McqItem) -> list[tuple[str | None, geometry.BoxFrame | None]]:
        out = []
        for n in range(self._num_samples()):
            entry = runner.entry(item.key, f"answer@{n}") or {}
            out.append((entry.get("completion"), frame_from_dict(entry["frame"]) if entry.get("frame") else None))
        return out

    def _duration(self, runner: Runner, item: McqItem) -> float:
        """The video's length, as stored with its answers (no video is opened to score)."""
        for kind in ("answer", *(f"answer@{n}" for n in range(self._num_samples()))):
            entry = runner.entry(item.key, kind)
            if entry and entry.get("duration_s") is not None:
                return float(entry["duration_s"])
        return 0.0

    def crop_calls(self, runner: Runner) -> Iterator[Call]:
        for item in self.items:
            stored = [(n, c, f) for n, (c, f) in enumerate(self.samples(runner, item)) if f is not None]
            if stored:
                yield from crop_calls(item.key, [(n, c) for n, c, _ in stored], stored[0][2],
                                      self._duration(runner, item), lambda t, item=item: self.inputs(item).image_at(t),
                                      self.cfg["tts"], self._context(item, kind="crop"))

    def judge_calls(self, runner: Runner, judge: JudgeCalls) -> Iterator[Call]:
        """None: option letters are scored exactly, no judge is asked."""
        return iter(())

    # scores -------------------------------------------------------------------------------------

    def score(self, runner: Runner, judge: JudgeCalls) -> list[dict[str, Any]]:
        return [self._row(runner, item) for item in self.items]

    def _row(self, runner: Runner, item: McqItem) -> dict[str, Any]:
        problems: list[str] = []
        if self.video(item) is None:
            problems.append(f"video not found: {item.video} under data.video_dir={self.video_dir}")
        entry = runner.entry(item.key, "answer") or {}
        if entry.get("failed"):
            problems.append(f"answer: request failed: {entry['failed']}")
        text = entry.get("completion")
        num_options = len(item.options)
        pred, how = parse_choice(text, num_options)
        answer = evidence.answer_text(text) if text is not None else None
        if how == OUT_OF_OPTIONS:
            problems.append(f"answer: {answer!r:.40} is not one of the options A-{item.letters[-1]}")
        elif how == UNPARSED:
            problems.append("answer: no option letter")
        frame = frame_from_dict(entry["frame"]) if entry.get("frame") else geometry.CANONICAL
        sections = evidence.split_sections(text or "")
        claims = evidence.parse_trace(text, frame).claims if text else ()
        row: dict[str, Any] = {
            "key": item.key, "qid": item.qid, "video": item.video, "question": item.question,
            "options": list(item.options), "truth": item.answer, "groups": {k: list(v) for k, v in item.groups.items()},
            "completion": text, "answer": answer, "pred": pred, "parsed": how, "correct": pred == item.answer,
            "grounded_format": sections.think is not None and sections.answer is not None,
            "claims": sum(1 for c in claims if c.boxes and c.t is not None), "problems": problems,
        }
        samples = self.samples(runner, item)
        if samples:
            row["tts"] = tts_outcome(samples, self._duration(runner, item), self.cfg["tts"], self.answer_kind, num_options,
                                     lambda n, j, item=item: runner.completion(item.key, crop_kind(n, j)),
                                     lambda c, item=item: option_letter(c, num_options) == item.answer)
        return row

    # report -------------------------------------------------------------------------------------

    def summary(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Overall and per value of each breakdown (an item with several values counts in each)."""
        by: dict[str, Any] = {}
        for name in self.data.breakdowns:
            values = ordered_values([v for r in rows for v in r["groups"][name]])
            by[name] = {v: group_summary([r for r in rows if v in r["groups"][name]]) for v in values}
        return {"overall": group_summary(rows), "by": by}


def group_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy and how answers were read for a group of questions (every question counts: one
    without a readable letter scores 0); with TTS both votes and where they differ."""
    parsed = [r["parsed"] for r in rows]
    out: dict[str, Any] = {
        "n": len(rows), "correct": sum(bool(r["correct"]) for r in rows),
        "acc": _mean(float(r["correct"]) for r in rows),
        "unparsed": sum(p in (UNPARSED, OUT_OF_OPTIONS) for p in parsed),
        "out_of_options": parsed.count(OUT_OF_OPTIONS), "missing": parsed.count(MISSING),
        "grounded_format": _mean(float(r["grounded_format"]) for r in rows),
        "claims": _mean(r["claims"] for r in rows),
    }
    tts = _tts_summary(rows)
    if tts:
        differ = [r["tts"] for r in rows if r.get("tts") and r["tts"]["majority"]["key"] != r["tts"]["confidence"]["key"]]
        tts["differ"] = {"majority_right": sum(bool(t["majority"]["correct"]) for t in differ),
                         "confidence_right": sum(bool(t["confidence"]["correct"]) for t in differ),
                         "neither_right": sum(not t["majority"]["correct"] and not t["confidence"]["correct"]
                                              for t in differ)}
        out["tts"] = tts
    return out


def mcq_markdown(result: Mapping[str, Any]) -> str:
    """The report: overall, one table per breakdown, the votes, skipped records and problems."""
    s = result["summary"]
    o = s["overall"]
    title = TITLES[result["format"]]
    tts = "tts" in o
    lines = [f"# {title} evaluation", "",
             f"- model: `{result['model']}` (backend `{result['backend']}`)",
             f"- data: `{result['data']}` ({o['n']} questions; {len(result['skipped'])} records skipped)",
             "- prompt: grounded (`<think>` citing evidence, `<answer>` with the option letter); the greedy "
             "answer is scored, an answer that is no option letter scores 0", "",
             "## Overall", "",
             "| n | Acc | correct | unparsed | of which out of options | no answer | grounded format | claims |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {o['n']} | {_pct(o['acc'])} | {o['correct']} | {o['unparsed']} | {o['out_of_options']} | "
             f"{o['missing']} | {_pct(o['grounded_format'])} | {o['claims']:.1f} |", ""]
    for name, groups in s["by"].items():
        head = ["n", "Acc", "unparsed"] + (["majority", "confidence"] if tts else [])
        lines += [f"## By {name.replace('_', ' ')}", "", f"| {name} | " + " | ".join(head) + " |",
                  "| --- |" + " ---: |" * len(head)]
        for value, g in groups.items():
            cells = [str(g["n"]), _pct(g["acc"]), str(g["unparsed"])]
            if tts:
                cells += [_pct(g["tts"]["majority_acc"]), _pct(g["tts"]["confidence_acc"])] if "tts" in g else ["-", "-"]
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
        lines.append("")
    if tts:
        d = o["tts"]["differ"]
        lines += _tts_lines(o)
        lines += [f"Where they differ: majority right on {d['majority_right']}, confidence-weighted right on "
                  f"{d['confidence_right']}, neither on {d['neither_right']}.", ""]
    if result["skipped"]:
        lines += ["## Skipped records", "", f"{len(result['skipped'])} record(s) could not be evaluated and are not "
                  "counted in any number:", ""]
        lines += [f"- {row['message']}" for row in result["skipped"][:20]]
        lines += [f"- … and {len(result['skipped']) - 20} more (all in results.json)"] if len(result["skipped"]) > 20 else []
        lines.append("")
    lines += _problems(result["samples"], "qid")
    return "\n".join(lines)


class _Inputs:
    """One question's frames (decoded once) and the requests rendered from them."""

    def __init__(self, item: McqItem, video: Path, cfg: Mapping[str, Any], policy: FramePolicy) -> None:
        self.item, self.video, self.cfg, self.policy = item, video, cfg, policy
        try:
            reader = open_video(str(video))
            self.fps, count = float(reader.get_avg_fps()), len(reader)
        except Exception as exc:  # decord raises its own DECORDError and RuntimeError types
            raise InputError(f"{video}: cannot decode the video of question {item.qid!r}: {exc}") from exc
        data = cfg["data"]
        indices = frame_indices(count, self.fps, float(data["fps"]), int(data["max_frames"]))
        jpegs = video_jpegs(video, indices)
        self.duration_s = round(count / self.fps, 2)
        self.frames = [{"t_s": round(i / self.fps, 6), "index": i, "image": frame_image(j)} for i, j in zip(indices, jpegs)]
        from PIL import Image

        with Image.open(io.BytesIO(jpegs[0])) as first:
            self.frame = policy.frame_for(*first.size)

    def meta(self) -> dict[str, Any]:
        """Stored with each answer: read back to score and crop without opening the video."""
        return {"frame": frame_to_dict(self.frame), "duration_s": self.duration_s}

    def request(self, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                context: Mapping[str, Any]) -> ChatRequest:
        item, data = self.item, self.cfg["data"]
        instruction = str(self.cfg["mcq"]["instruction"]).format(letters=letters_phrase(item.letters)).strip()
        record = {"id": item.key, "task": "general_mcq", "frames": self.frames, "question": item.question,
                  "options": list(item.options), "answer": item.answer, "key_frames": [],
                  "media": {"uri": str(self.video), "duration_s": self.duration_s}}
        policy = dataclasses.replace(self.policy, max_frames=len(self.frames))
        example = render_example(record, policy, "\n".join(p for p in (item.hint, instruction) if p),
                                 data.get("system_prompt"))
        request = request_from_messages(example.prompt(), example.images,
                                        max_new_tokens=int(self.cfg["generation"]["max_new_tokens"]),
                                        temperature=temperature, top_p=top_p, seed=seed, context=context)
        if item.image is None:
            return request
        from PIL import Image

        with Image.open(io.BytesIO(item.image)) as image:
            shown = LabelledImage(jpeg=jpeg_bytes(image), label=QUESTION_IMAGE_LABEL)
        return dataclasses.replace(request, images=(*request.images, shown))

    def image_at(self, t: float) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(video_jpegs(self.video, [int(round(t * self.fps))])[0]))
