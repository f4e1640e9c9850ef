"""What a model is asked about a record: the facts of the record, the versioned prompt templates,
and the question written from the ground truth when the seed has none.

`record_context` is everything a prompt (and the template backend, which writes from it alone) may
use, in canonical units; `PromptSet` renders the task templates of `conf/prompts/` with it;
`write_question` phrases a question that follows from the ground truth. The annotate stage asks
every backend the same question this way, so a model and the template reason about one question.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Mapping, Sequence

import numpy as np

from stages.lib.answers import KINDS, record_answer_kind
from stages.lib.geometry import CANONICAL
from stages.lib.schema import TASKS

PROMPT_PARTS = ("system", "format", "common", "tasks", "answer_hints")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class PromptSet:
    """A versioned set of Jinja prompt templates (one per task), as found under `annotator.prompts`.

    The templates come from the resolved config (not read from disk on the worker), so the prompt
    text is part of the stage's fingerprint and travels to every node of a cluster with the config.
    """

    def __init__(self, spec: Mapping[str, Any], where: str = "annotator.prompts") -> None:
        from jinja2 import Environment, StrictUndefined, TemplateSyntaxError

        missing = [part for part in PROMPT_PARTS if part not in spec]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (see conf/prompts/v1.yaml)")
        tasks = spec["tasks"]
        absent = [t for t in TASKS if t not in tasks]
        if absent:
            raise ValueError(f"{where}.tasks: no template for task(s) {', '.join(absent)}")
        hints = dict(spec["answer_hints"])
        if "option" in hints and "span" in hints:
            # prompt sets written before the letter-plus-span kind existed compose it from its parts
            hints.setdefault("option_span", f"{hints['option']}, then on the next line {hints['span']}")
        absent_hints = sorted(set(KINDS) - set(hints))
        if absent_hints:
            raise ValueError(f"{where}.answer_hints: no hint for answer kind(s) {', '.join(absent_hints)}")
        self.version = str(spec.get("version", "unversioned"))
        self.spec = dict(spec)
        self.answer_hints = hints
        env = Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
        env.filters["box"] = lambda box: CANONICAL.format_box(box).replace(",", ", ")
        env.filters["sec"] = lambda seconds: f"{float(seconds):.2f}"
        self.templates: dict[str, Any] = {}
        try:
            for key in ("system", "format", "common"):
                self.templates[key] = env.from_string(str(spec[key]))
            for task in TASKS:
                self.templates[f"tasks.{task}"] = env.from_string(str(tasks[task]))
        except TemplateSyntaxError as exc:
            raise ValueError(f"{where}: template syntax error at line {exc.lineno}: {exc.message}") from exc

    def check(self, where: str = "annotator.prompts") -> None:
        """Render every task once on an example record, so a misspelt variable fails at validation
        (StrictUndefined) instead of sending every record of the build to the ledger."""
        from jinja2 import UndefinedError

        frames = [{"t_s": 1.0, "index": 10}, {"t_s": 2.0, "index": 20}]
        gt = {"objects": [{"name": "red circle", "track": [{"t_s": 1.0, "box": [0.1, 0.1, 0.3, 0.3]}]}],
              "spans": [{"label": "the circle moves", "start_s": 1.0, "end_s": 2.0}]}
        for task in TASKS:
            record = {"id": "example", "task": task, "frames": frames, "ground_truth": gt, "question": "Which?",
                      "options": ["A. one", "B. two"], "answer": "A",
                      "media": {"duration_s": 3.0}, "clip_window": {"start_s": 0.0, "end_s": 3.0}}
            try:
                self.render(task, record_context(record))
            except UndefinedError as exc:
                raise ValueError(f"{where}: task {task}: {exc.message}") from exc

    def sha(self, task: str) -> str:
        """Hash of everything a task's prompt is rendered from: the value stored in provenance."""
        parts = [self.version, str(self.spec["system"]), str(self.spec["format"]), str(self.spec["common"]),
                 str(self.spec["tasks"][task]), json.dumps(self.spec["answer_hints"], sort_keys=True)]
        return _sha("\x1e".join(parts))

    def render(self, task: str, context: Mapping[str, Any]) -> tuple[str, str]:
        """(system text, user prompt) for one record's context."""
        variables = dict(context)
        variables["answer_hint"] = self.answer_hints[context["answer_kind"]]
        variables["response_format"] = self.templates["format"].render(**variables)
        system = self.templates["system"].render(**variables).strip()
        body = self.templates["common"].render(**variables).strip()
        task_text = self.templates[f"tasks.{task}"].render(**variables).strip()
        prompt = f"{body}\n\n{task_text}\n\n{variables['response_format'].strip()}"
        return system, prompt


def _evidence_from_tracks(objects: Sequence[Mapping[str, Any]], times: np.ndarray, limit: int) -> list[dict[str, Any]]:
    """Ground-truth boxes at the sampled frame times: for each frame, each object whose track has a
    point within half a track step of it. Spread over at most `limit` frames that show something."""
    by_time: dict[float, list[dict[str, Any]]] = {}
    for obj in objects:
        track = sorted(obj.get("track") or [], key=lambda p: p["t_s"])
        if not track:
            continue
        ts = np.array([p["t_s"] for p in track], dtype=float)
        step = float(np.median(np.diff(ts))) if len(ts) > 1 else 0.5
        nearest = np.clip(np.searchsorted(ts, times), 0, len(ts) - 1)
        left = np.clip(nearest - 1, 0, len(ts) - 1)
        pick = np.where(np.abs(ts[left] - times) < np.abs(ts[nearest] - times), left, nearest)
        close = np.abs(ts[pick] - times) <= step / 2 + 1e-9
        for t, idx in zip(times[close], pick[close]):
            by_time.setdefault(float(t), []).append({"name": obj["name"], "box": list(track[idx]["box"])})
    keys = sorted(by_time)
    if len(keys) > limit:
        keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, limit).round().astype(int))]
    return [{"t_s": t, "objects": by_time[t]} for t in keys]


def _target_span(record: Mapping[str, Any], spans: Sequence[Mapping[str, Any]],
                 objects: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """The span a span-answer record is about: the seed's `answer_span`, else the first ground-truth
    event, else the time the first ground-truth object is visible."""
    if record.get("answer_span") is not None:
        return [float(v) for v in record["answer_span"]]
    if spans:
        return [float(spans[0]["start_s"]), float(spans[0]["end_s"])]
    if objects:
        return [float(objects[0]["first_s"]), float(objects[0]["last_s"])]
    return None


def record_context(record: Mapping[str, Any], max_evidence: int = 8) -> dict[str, Any]:
    """The facts of one record a prompt (and the template backend) may use, in canonical units."""
    task = record.get("task")
    if task not in TASKS:
        raise ValueError(f"record {record.get('id')}: field 'task' is {task!r}; expected one of {list(TASKS)}")
    media = record.get("media") or {}
    clip = record.get("clip_window") or {}
    frames = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
    times = np.array([f["t_s"] for f in frames], dtype=float)
    gt = record.get("ground_truth") or {}
    gt_objects = gt.get("objects") or []
    objects = []
    for obj in gt_objects:
        track_times = [p["t_s"] for p in obj.get("track") or []]
        if track_times:
            objects.append({"name": obj["name"], "first_s": min(track_times), "last_s": max(track_times)})
    key_frames = [kf for kf in record.get("key_frames") or [] if kf.get("objects")]
    if key_frames:
        evidence = [{"t_s": kf["t_s"], "objects": [{"name": o["name"], "box": list(o["box"])} for o in kf["objects"]]}
                    for kf in sorted(key_frames, key=lambda kf: kf["t_s"])][:max_evidence]
    else:
        evidence = _evidence_from_tracks(gt_objects, times, max_evidence)
    spans = [{"label": s.get("label") or "", "start_s": s["start_s"], "end_s": s["end_s"]} for s in gt.get("spans") or []]
    duration = media.get("duration_s")
    start = clip.get("start_s") if clip.get("start_s") is not None else (float(times[0]) if len(times) else 0.0)
    end = clip.get("end_s") if clip.get("end_s") is not None else (float(times[-1]) if len(times) else 0.0)
    kind = record_answer_kind(record)
    return {
        "id": record.get("id"),
        "task": task,
        "answer_kind": kind,
        "multiple_choice": kind in ("option", "option_span"),
        "duration_s": float(duration) if duration is not None else float(end),
        "clip_start_s": float(start),
        "clip_end_s": float(end),
        "frames": [{"k": k, "t_s": float(f["t_s"])} for k, f in enumerate(frames, 1)],
        "frame_times": [float(f["t_s"]) for f in frames],
        "frame_indices": [f.get("index") for f in frames],
        "fps": media.get("fps"),
        "num_frames": media.get("num_frames"),
        "question": record.get("question"),
        "options": list(record.get("options") or []),
        "answer": record.get("answer"),
        # the seed's span is ground truth whatever the answer kind (a temporal MCQ keeps it); a span
        # answer without one takes it from the ground truth
        "answer_span": (_target_span(record, spans, objects)
                        if kind in ("span", "option_span") or record.get("answer_span") is not None else None),
        "objects": objects,
        "spans": spans,
        "evidence": evidence,
    }


def target_answer(context: Mapping[str, Any]) -> str | None:
    """The ground-truth answer of a record: the seed's, else what its ground truth determines (the
    target span of a span task, the first evidence box of a spatial task), else None."""
    if context.get("answer") is not None:
        return str(context["answer"])
    kind = context["answer_kind"]
    if kind == "span" and context.get("answer_span") is not None:
        s, e = context["answer_span"]
        return f"[{CANONICAL.format_time(s)}, {CANONICAL.format_time(e)}]"
    if kind == "box" and context.get("evidence"):
        return CANONICAL.format_box(context["evidence"][0]["objects"][0]["box"]).replace(",", ", ")
    return None


# --- questions written from the ground truth ------------------------------------------------------

QUESTIONS: dict[str, list[str]] = {
    "spatio_temporal": [
        "When is the {obj} visible in the video, and where is it?",
        "During which seconds does the {obj} appear, and where is it in the frame?",
        "Find the {obj}: in what time span is it on screen, and where?",
    ],
    "temporal": [
        "During which seconds does {label} happen?",
        "When does {label} take place? Give the start and end time.",
        "In what time span of the video does {label} occur?",
    ],
    "temporal_object": [
        "During which seconds is the {obj} visible?",
        "When is the {obj} on screen? Give the start and end time.",
        "In what time span of the video can the {obj} be seen?",
    ],
    "spatial": [
        "Where is the {obj} at {t} s?",
        "At {t} s, where in the frame is the {obj}?",
        "Give the box of the {obj} in the frame at {t} s.",
    ],
}
"""Question phrasings per task (placeholders {obj} object name, {label} an event, {t} a time as
written in `<t>`); which one a record gets is a pure function of its id."""


def record_rng(record_id: str, salt: str) -> random.Random:
    """A generator seeded by the record id and a salt: the same record gets the same phrasing on every
    rebuild, and records of one video do not all read alike."""
    digest = hashlib.sha256(f"{record_id}\x1f{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def subject_of(context: Mapping[str, Any]) -> str | None:
    """The object the question is about: the first ground-truth object with a track."""
    objects = context.get("objects") or []
    return objects[0]["name"] if objects else None


def event_label(context: Mapping[str, Any]) -> str | None:
    """The first ground-truth event's label, when the source names one."""
    spans = context.get("spans") or []
    return str(spans[0]["label"]) if spans and spans[0].get("label") else None


def write_question(context: Mapping[str, Any]) -> str:
    """A question that follows from the ground truth, for a seed without one.

    The annotate stage calls it before prompting any backend. Raises ValueError naming the record and
    what is missing where the ground truth cannot support a question (multiple-choice and open
    questions need the source's question and options).
    """
    task, rid = context["task"], str(context.get("id"))
    questions = QUESTIONS
    if task not in questions:
        raise ValueError(f"record {rid}: field 'question' is empty and a {task} question cannot be written from "
                         "ground truth (it needs the source's question)")
    rng = record_rng(rid, "question")
    evidence = context.get("evidence") or []
    subject = subject_of(context) or (evidence[0]["objects"][0]["name"] if evidence else None)
    label = event_label(context)
    if task == "temporal" and label is not None:
        return rng.choice(questions["temporal"]).format(label=label)
    if subject is None:
        raise ValueError(f"record {rid}: field 'question' is empty and 'ground_truth' has no object or event to ask about")
    if task == "temporal":
        return rng.choice(questions["temporal_object"]).format(obj=subject)
    if task == "spatial":
        if not evidence:
            raise ValueError(f"record {rid}: a spatial question needs a ground-truth box at a sampled frame time")
        return rng.choice(questions["spatial"]).format(obj=evidence[0]["objects"][0]["name"],
                                                        t=CANONICAL.format_time(evidence[0]["t_s"]))
    return rng.choice(questions[task]).format(obj=subject)
