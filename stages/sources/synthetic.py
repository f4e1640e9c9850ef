"""`synthetic`: the embedded default source, short videos of moving shapes with exact ground truth.

Format: none; `num_videos` scenes are generated from `seed` (stages/sources/synthetic_world.py).
Units: the scene is simulated on its own frame timeline (frame i at i / fps s), boxes are the drawn
pixel extents normalised by the frame size, so key frames, tracks and spans are exact, not estimates.

Each scene becomes up to one record per task in `tasks`, all about the same video:
- `spatio_temporal`: when and where a state lasts ("When does the red circle stand still, and where is
  it while it does?"), answer `[start, end]` seconds, `answer_span` and boxes at start, middle and end;
- `temporal`: a time span as `[start, end]` seconds (how long an object stands still or is visible);
- `temporal_mcq`: the same kind of span among four options, answer a letter;
- `spatial`: the box of an object at a given time, answer `[x1, y1, x2, y2]` normalised;
- `general_mcq`: what happened (which shape changes colour, what touches what, how many shapes
  appear, which one enters last), answer a letter;
- `general_free`: a description of one object's behaviour with its event times.
Options are written `"A. text"`, `"B. text"`, ...; the answer of a multiple-choice task is the letter.

Names: questions, answers, options and `gt.objects[].name` use an object's identity (its colour when
first in view and its shape, "yellow circle"); key-frame objects are named as they look in their
frame ("blue circle that was yellow" after a colour change), so a trace citing a key frame names
what that frame shows. Every box is the tight box of the shape's pixels inside the frame, and only a
shape with at least `min_visible_fraction` of its pixels inside the frame is in the ground truth
(tracks, key frames, spans, events) of that frame: no sliver at the edge is ever a box to claim.
Videos are rendered on the worker that builds the partition, into `<run>/media/synthetic/<params>/`
(or `media_dir`), under a name that encodes every parameter that changes pixels.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from pipeline.registry import Registry
from pipeline.settings import setting
from pipeline.stage import UnitContext
from stages.lib.schema import TASKS, meta_dump
from stages.sources.base import Adapter, AdapterConfig, make_record, media, register_adapter
from stages.sources.synthetic_world import (COLOURS, CRF, MIN_VISIBLE_FRACTION, Event, Scene, encode_mp4, render,
                                            simulate)

LETTERS = "ABCDEFGH"
#: Bumped when the same parameters would render different pixels (part of the media folder's name,
#: so videos rendered by an older world are never reused).
WORLD_VERSION = 2


def _num(t: float) -> str:
    """A time or coordinate as written in questions and answers: at most 2 decimals, no trailing zeros."""
    return f"{round(float(t), 2):.2f}".rstrip("0").rstrip(".")


def _box_text(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def _options(rng: np.random.Generator, correct: str, distractors: Sequence[str], count: int = 4) -> tuple[list[str], str]:
    """Shuffled lettered options and the correct letter."""
    pool = [d for d in dict.fromkeys(distractors) if d != correct]
    picked = [pool[i] for i in sorted(rng.choice(len(pool), size=min(count - 1, len(pool)), replace=False))] if pool else []
    texts = [correct, *picked]
    order = rng.permutation(len(texts))
    shuffled = [texts[i] for i in order]
    letter = LETTERS[shuffled.index(correct)]
    return [f"{LETTERS[i]}. {t}" for i, t in enumerate(shuffled)], letter


class _Context:
    """What the task writers share about one scene."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.scene = scene
        self.rng = rng

    def key_frame(self, t: float, names: Sequence[str]) -> dict[str, Any]:
        frame = self.scene.frame_at(t)
        objects = [{"name": n, "box": self.scene.normalised_box(self.scene.object(n), frame)}
                   for n in names if self.scene.object(n).visible[frame]]
        return {"t_s": self.scene.time(frame), "objects": objects}

    def events(self, *kinds: str) -> list[Event]:
        return [e for e in self.scene.events if e.kind in kinds]

    def pick(self, items: Sequence[Any]) -> Any:
        return items[int(self.rng.integers(len(items)))]

    def phrase(self, event: Event) -> str:
        """The event as a verb phrase about its object(s), for questions and descriptions."""
        a = event.objects[0]
        if event.kind == "enters":
            side = f" from the {event.detail['edge']}" if event.detail.get("edge") else ""
            return f"the {a} enters the scene{side}"
        if event.kind == "leaves":
            side = f" through the {event.detail['edge']}" if event.detail.get("edge") else ""
            return f"the {a} leaves the scene{side}"
        if event.kind == "stops":
            return f"the {a} stands still"
        if event.kind == "changes_colour":
            return f"the {a} turns {event.detail['to']}"
        return f"the {a} touches the {event.objects[1]}"

    def visible_span(self, name: str) -> tuple[float, float]:
        shown = np.flatnonzero(self.scene.object(name).visible)
        end = min(self.scene.num_frames - 1, int(shown[-1]) + 1)
        return self.scene.time(int(shown[0])), self.scene.time(end)


Writer = Callable[[_Context], dict[str, Any] | None]
#: The task writers by task name (`tasks`): each writes one record of its task about a scene, or None.
WRITERS: Registry[Writer] = Registry("synthetic task writer")


@WRITERS.register(name="spatio_temporal")
def _spatio_temporal(c: _Context) -> dict[str, Any] | None:
    candidates: list[tuple[str, str, tuple[float, float]]] = []
    for e in c.events("stops"):
        name = e.objects[0]
        candidates.append((f"When does the {name} stand still, and where is it while it does?", name, (e.start_s, e.end_s)))
    for obj in c.scene.objects:
        start, end = c.visible_span(obj.name)
        if start > 0 or end < c.scene.time(c.scene.num_frames - 1):
            candidates.append((f"When is the {obj.name} in view, and where does it move meanwhile?", obj.name, (start, end)))
    if not candidates:
        return None
    question, name, (start, end) = c.pick(candidates)
    frames = _span_key_frames(c, name, (start, end))
    middle = c.key_frame((start + end) / 2, [name])
    return {"question": question, "answer": f"[{_num(start)}, {_num(end)}]", "answer_span": [start, end],
            "key_frames": [frames[0], middle, frames[-1]] if middle["objects"] else frames}


def _span_question(c: _Context) -> tuple[str, str, tuple[float, float]] | None:
    """A (question, object, span) about a state with a duration: standing still, or being visible."""
    candidates: list[tuple[str, str, tuple[float, float]]] = []
    for e in c.events("stops"):
        candidates.append((f"During which time span does the {e.objects[0]} stand still?", e.objects[0],
                           (e.start_s, e.end_s)))
    for obj in c.scene.objects:
        start, end = c.visible_span(obj.name)
        if obj.visible.any() and (start > 0 or end < c.scene.time(c.scene.num_frames - 1)):
            candidates.append((f"During which time span is the {obj.name} visible?", obj.name, (start, end)))
    return c.pick(candidates) if candidates else None


def _span_key_frames(c: _Context, name: str, span: tuple[float, float]) -> list[dict[str, Any]]:
    last_visible = c.scene.time(max(0, c.scene.frame_at(span[1]) - 1)) if span[1] > span[0] else span[1]
    end = span[1] if c.scene.object(name).visible[c.scene.frame_at(span[1])] else last_visible
    return [c.key_frame(span[0], [name]), c.key_frame(end, [name])]


@WRITERS.register(name="temporal")
def _temporal(c: _Context) -> dict[str, Any] | None:
    picked = _span_question(c)
    if picked is None:
        return None
    question, name, (start, end) = picked
    return {"question": question, "answer": f"[{_num(start)}, {_num(end)}]", "answer_span": [start, end],
            "key_frames": _span_key_frames(c, name, (start, end))}


@WRITERS.register(name="temporal_mcq")
def _temporal_mcq(c: _Context) -> dict[str, Any] | None:
    picked = _span_question(c)
    if picked is None:
        return None
    question, name, (start, end) = picked
    duration = c.scene.duration_s
    length = end - start
    shifts = [k * max(length, 1.0) for k in (-3, -2, -1, 1, 2, 3)]
    spans = [(start + s, end + s) for s in shifts if start + s >= 0 and end + s <= duration]
    if len(spans) < 2:
        spans += [(0.0, duration / 4), (duration / 4, duration / 2), (duration / 2, 3 * duration / 4),
                  (3 * duration / 4, duration)]
    text = lambda s, e: f"from {_num(s)} s to {_num(e)} s"  # noqa: E731 - one format for all options
    options, letter = _options(c.rng, text(start, end), [text(s, e) for s, e in spans if (s, e) != (start, end)])
    return {"question": question, "options": options, "answer": letter, "answer_span": [start, end],
            "key_frames": _span_key_frames(c, name, (start, end))}


@WRITERS.register(name="spatial")
def _spatial(c: _Context) -> dict[str, Any] | None:
    scene = c.scene
    step = max(1, int(round(scene.fps / 2)))  # a time on the half-second grid that `sample` keeps at 2 fps
    candidates = [(o.name, f) for o in scene.objects for f in range(0, scene.num_frames, step) if o.visible[f]
                  and o.boxes[f][2] - o.boxes[f][0] >= o.size * 0.75 and o.boxes[f][3] - o.boxes[f][1] >= o.size * 0.75]
    if not candidates:
        return None
    name, frame = c.pick(candidates)
    t = scene.time(frame)
    key = c.key_frame(t, [name])
    seen_as = scene.appearance(scene.object(name), frame)  # the question names what the frame shows
    return {"question": f"Where is the {seen_as} at {_num(t)} s? Answer with its box [x1, y1, x2, y2] in coordinates "
                        f"normalised to the frame.",
            "answer": _box_text(key["objects"][0]["box"]), "answer_span": None, "key_frames": [key]}


@WRITERS.register(name="general_mcq")
def _general_mcq(c: _Context) -> dict[str, Any] | None:
    names = [o.name for o in c.scene.objects if o.visible.any()]
    kinds: list[Callable[[], dict[str, Any] | None]] = []
    changes = c.events("changes_colour")
    touches = c.events("touches")
    enters = c.events("enters")

    def which_changes() -> dict[str, Any]:
        e = changes[0]
        options, letter = _options(c.rng, f"the {e.objects[0]}", [f"the {n}" for n in names] + ["none of them"])
        return {"question": "Which shape changes colour during the video?", "options": options, "answer": letter,
                "key_frames": [c.key_frame(max(0.0, e.start_s - 1 / c.scene.fps), [e.objects[0]]),
                               c.key_frame(e.start_s, [e.objects[0]])], "answer_span": [e.start_s, e.end_s]}

    def turns_into() -> dict[str, Any]:
        e = changes[0]
        options, letter = _options(c.rng, e.detail["to"], [k for k in COLOURS if k != e.detail["from"]])
        return {"question": f"What colour does the {e.objects[0]} turn into?", "options": options, "answer": letter,
                "key_frames": [c.key_frame(e.start_s, [e.objects[0]])], "answer_span": [e.start_s, e.end_s]}

    def touches_what() -> dict[str, Any]:
        e = touches[0]
        a, b = e.objects
        options, letter = _options(c.rng, f"the {b}", [f"the {n}" for n in names if n != a] + ["nothing"])
        return {"question": f"Which object does the {a} touch first?", "options": options, "answer": letter,
                "key_frames": [c.key_frame(e.start_s, [a, b])], "answer_span": [e.start_s, e.end_s]}

    def how_many() -> dict[str, Any]:
        n = len(names)
        options, letter = _options(c.rng, str(n), [str(k) for k in range(max(1, n - 2), n + 3)])
        firsts = sorted((c.visible_span(m)[0], m) for m in names)
        return {"question": "How many different shapes appear in the video?", "options": options, "answer": letter,
                "key_frames": [c.key_frame(t, [m]) for t, m in firsts], "answer_span": None}

    def enters_last() -> dict[str, Any]:
        e = enters[-1]
        options, letter = _options(c.rng, f"the {e.objects[0]}", [f"the {n}" for n in names])
        return {"question": "Which shape is the last to enter the scene?", "options": options, "answer": letter,
                "key_frames": [c.key_frame(min(c.scene.duration_s, e.start_s + 0.5), [e.objects[0]])],
                "answer_span": [e.start_s, e.end_s]}

    if changes:
        kinds += [which_changes, turns_into]
    if touches:
        kinds.append(touches_what)
    if enters:
        kinds.append(enters_last)
    kinds.append(how_many)
    return c.pick(kinds)()


@WRITERS.register(name="general_free")
def _general_free(c: _Context) -> dict[str, Any] | None:
    by_object = {o.name: [e for e in c.scene.events if o.name in e.objects] for o in c.scene.objects if o.visible.any()}
    eventful = [n for n, evs in by_object.items() if evs]
    if not eventful:
        return None
    name = c.pick(eventful)
    parts = []
    key_frames = []
    for e in by_object[name]:
        if e.kind == "stops":
            parts.append(f"stands still from {_num(e.start_s)} s to {_num(e.end_s)} s")
        elif e.kind == "touches":
            other = e.objects[1] if e.objects[0] == name else e.objects[0]
            parts.append(f"touches the {other} at {_num(e.start_s)} s")
        else:
            parts.append(c.phrase(e).replace(f"the {name} ", "", 1) + f" at {_num(e.start_s)} s")
        t = e.start_s if e.kind != "leaves" else max(0.0, e.start_s - 1 / c.scene.fps)
        if e.kind == "enters":
            t = min(c.visible_span(name)[1], e.start_s + 0.5)
        frame = c.key_frame(t, [name])
        if frame["objects"]:
            key_frames.append(frame)
    sentence = ", then ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + ", and finally " + parts[-1]
    return {"question": f"Describe what the {name} does in the video, with the times of what happens.",
            "answer": f"The {name} {sentence}.", "answer_span": None, "key_frames": key_frames}


@register_adapter
class SyntheticAdapter(Adapter):
    """Generated scenes of named coloured shapes; see the module docstring for the tasks."""

    name = "synthetic"

    @dataclass(kw_only=True)
    class Config(AdapterConfig):
        num_videos: int = setting(64, "scenes to generate, one video each", ge=1)
        seed: int = setting(0, "seed of the generator: the same seed gives the same videos and records")
        fps: float = setting(10, "frames per second of the rendered videos", ge=1, le=60)
        width: int = setting(320, "frame width in pixels (even: H.264 4:2:0)", ge=64)
        height: int = setting(240, "frame height in pixels (even: H.264 4:2:0)", ge=64)
        duration_s: list[float] = setting([8.0, 12.0], "each video's length is drawn uniformly from this range")
        num_objects: list[int] = setting([2, 4], "shapes per video (each a distinct shape and colour)")
        object_size: list[int] = setting([28, 44], "shape side in pixels")
        min_visible_fraction: float = setting(
            MIN_VISIBLE_FRACTION, "a shape is in view (in tracks, key frames, spans, events, first/last seen) only "
            "where at least this share of its pixels is inside the frame: no sliver at the edge becomes a box",
            ge=0, le=1)
        crf: int = setting(CRF, "H.264 quality of the rendered videos", ge=0, le=51)
        tasks: list[str] = setting(list(TASKS), "the tasks written for each scene, one record each where the scene has one")
        media_dir: str | None = setting(None, "where the videos are rendered; null: <run>/media/synthetic", path=True)

        def check(self) -> list[str]:
            problems = [f"{key}: must be even (H.264 4:2:0), got {getattr(self, key)}"
                        for key in ("width", "height") if getattr(self, key) % 2]
            for key, lo, hi in (("duration_s", 2.0, 600.0), ("num_objects", 1, len(COLOURS) - 1),
                                ("object_size", 8, min(self.width, self.height) // 3)):
                value = getattr(self, key)
                if not (len(value) == 2 and lo <= value[0] <= value[1] <= hi):
                    problems.append(f"{key}: expected [min, max] with {lo} <= min <= max <= {hi}, got {value!r}")
            if not self.tasks or any(t not in TASKS for t in self.tasks):
                problems.append(f"tasks: expected a non-empty list of {list(TASKS)}, got {self.tasks!r}")
            return problems

    cfg: Config

    @property
    def annotations(self) -> str:
        return "synthetic"

    def num_partitions(self, per_partition: int) -> int:
        return math.ceil(self.cfg.num_videos / per_partition)

    def partition(self, index: int, per_partition: int, start: Sequence[int] | None = None) -> Iterator[tuple[int, Any]]:
        """Scene *i* is entry *i*: a partition is a range of scene numbers, nothing to read (so the
        plan gives no `start`)."""
        first = index * per_partition
        return ((i, i) for i in range(first, min(first + per_partition, self.cfg.num_videos)))

    def entry_label(self, entry: Any, position: int) -> str:
        return f"video {entry:06d}"

    def _params(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"width": cfg.width, "height": cfg.height, "fps": float(cfg.fps), "duration_s": tuple(cfg.duration_s),
                "num_objects": tuple(cfg.num_objects), "object_size": tuple(cfg.object_size),
                "min_visible_fraction": float(cfg.min_visible_fraction)}

    def media_dir(self, ctx: UnitContext) -> tuple[str, str]:
        """(uri prefix, filesystem path) of the folder for this parameter set's videos."""
        params = {"seed": self.cfg.seed, **self._params(), "crf": self.cfg.crf,
                  "world": WORLD_VERSION}
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        if self.cfg.media_dir:
            base = self.cfg.media_dir
            return os.path.join(base, digest), os.path.join(base, digest)
        return (f"{ctx.run_uri.rstrip('/')}/media/synthetic/{digest}",
                f"{ctx.run_path.rstrip('/')}/media/synthetic/{digest}")

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        seed = self.cfg.seed
        scene = simulate(seed, int(entry), **self._params())
        uri_dir, path_dir = self.media_dir(ctx)
        path = f"{path_dir}/{scene.name}.mp4"
        filesystem = None if self.cfg.media_dir else ctx.filesystem
        if not _exists(path, filesystem):
            encode_mp4(render(scene), scene.fps, path, filesystem, crf=self.cfg.crf)
        rng = np.random.default_rng([seed, int(entry), 1])
        c = _Context(scene, rng)
        gt = {"objects": [{"name": o.name, "track": scene.track(o)} for o in scene.objects if o.visible.any()],
              "spans": [{"label": c.phrase(e), "start_s": e.start_s, "end_s": e.end_s} for e in scene.events]
              + [{"label": f"the {o.name} is in view", "start_s": a, "end_s": b} for o in scene.objects
                 for a, b in [c.visible_span(o.name)] if a > 0 or not o.visible[-1]]}
        meta = meta_dump({"scene": scene.name, "seed": seed, "events": [
            {"kind": e.kind, "objects": list(e.objects), "start_s": e.start_s, "end_s": e.end_s, **e.detail}
            for e in scene.events]})
        declared = media(f"{uri_dir}/{scene.name}.mp4", fps=scene.fps, num_frames=scene.num_frames,
                         duration_s=scene.duration_s, width=scene.width, height=scene.height)
        records = []
        for task in self.cfg.tasks:
            written = WRITERS[task](c)
            if written is None:
                continue
            focused = _focus(gt, written)
            written["key_frames"] = _as_seen(scene, written["key_frames"])
            records.append(make_record(source="synthetic", source_id=f"{seed}/{scene.name}", task=task,
                                       media=declared, ground_truth=focused, meta=meta, **written))
        return records


def _as_seen(scene: Scene, key_frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Key frames with each object named as it looks in that frame (`Scene.appearance`)."""
    return [{"t_s": kf["t_s"], "objects": [
        {**o, "name": scene.appearance(scene.object(o["name"]), scene.frame_at(kf["t_s"]))} for o in kf["objects"]]}
        for kf in key_frames]


def _focus(gt: dict[str, Any], written: dict[str, Any]) -> dict[str, Any]:
    """The scene's ground truth with the record's subject first: its object(s), then its span.

    Consumers read `gt.objects[0]` as the object a record is about and `gt.spans[0]` as its event (the
    template annotator does), while the rest of the scene stays available as context.
    """
    subjects = list(dict.fromkeys(o["name"] for kf in written.get("key_frames") or [] for o in kf["objects"]))
    rank = {name: i for i, name in enumerate(subjects)}
    objects = sorted(gt["objects"], key=lambda o: rank.get(o["name"], len(rank)))
    span = written.get("answer_span")

    def span_key(s: dict[str, Any]) -> tuple[int, int]:
        about = next((rank[n] for n in subjects if f"the {n} " in s["label"] + " "), len(rank))
        exact = span is not None and [s["start_s"], s["end_s"]] == list(span)
        return (0 if exact and about < len(rank) else 1, about)

    return {"objects": objects, "spans": sorted(gt["spans"], key=span_key)}


def _exists(path: str, filesystem: Any) -> bool:
    if filesystem is None:
        return os.path.exists(path)
    import pyarrow.fs as pafs

    return filesystem.get_file_info(path).type == pafs.FileType.File
