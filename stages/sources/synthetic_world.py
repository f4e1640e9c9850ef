"""The synthetic world: coloured shapes that move, stop, touch, change colour, enter and leave.

A scene is simulated frame by frame on the video's own timeline (frame i is at i / fps seconds),
so every box and every event time is exact on that timeline: an event "happens" at the first frame
where its condition holds. The same (seed, index) always gives the same scene, the same pixels and
the same H.264 bytes (one encoder thread), which keeps a re-run unit's output identical.

Boxes are integer pixel rectangles `[x, y, x + size, y + size]` of the shape's extent, clipped to
the frame; shapes are drawn inside exactly those pixels, so the ground truth is the drawn extent.
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.geometry import clip_boxes, has_positive_area, pixels_to_normalised

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (38, 84, 214),
    "yellow": (235, 200, 25),
    "purple": (140, 56, 180),
    "orange": (240, 128, 16),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
EDGES = ("left", "right", "top", "bottom")


@dataclass
class Event:
    """One thing that happens, at an exact frame time (`end_s` > `start_s` only for states)."""

    kind: str  # enters | leaves | stops | touches | changes_colour
    objects: tuple[str, ...]
    start_s: float
    end_s: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SceneObject:
    name: str  # colour at the start + shape, e.g. "red circle"; stays the object's name after a colour change
    shape: str
    size: int
    colours: np.ndarray  # (F,) index into COLOURS per frame
    xy: np.ndarray  # (F, 2) integer top-left corner per frame (may lie outside the frame)
    visible: np.ndarray  # (F,) bool: some pixel of the shape is inside the frame
    boxes: np.ndarray  # (F, 4) clipped pixel xyxy (meaningful where visible)
    entry_edge: str | None = None
    exit_edge: str | None = None


@dataclass
class Scene:
    name: str
    width: int
    height: int
    fps: float
    num_frames: int
    background: tuple[int, int, int]
    objects: list[SceneObject]
    events: list[Event]

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    def time(self, frame: int) -> float:
        return round(float(frame) / self.fps, 6)

    def frame_at(self, t: float) -> int:
        return int(min(self.num_frames - 1, max(0, round(t * self.fps))))

    def object(self, name: str) -> SceneObject:
        return next(o for o in self.objects if o.name == name)

    def normalised_box(self, obj: SceneObject, frame: int) -> list[float]:
        return [round(v, 6) for v in pixels_to_normalised(obj.boxes[frame], self.width, self.height)[0].tolist()]

    def track(self, obj: SceneObject) -> list[dict[str, Any]]:
        frames = np.flatnonzero(obj.visible)
        boxes = pixels_to_normalised(obj.boxes[frames], self.width, self.height).round(6)
        return [{"t_s": self.time(int(f)), "box": b} for f, b in zip(frames.tolist(), boxes.tolist())]


def simulate(seed: int, index: int, *, width: int, height: int, fps: float, duration_s: tuple[float, float],
             num_objects: tuple[int, int], object_size: tuple[int, int]) -> Scene:
    """Simulate scene `index` of the synthetic set drawn with `seed`: positions, colours and events."""
    rng = np.random.default_rng([seed, index])
    duration = float(rng.uniform(*duration_s))
    num_frames = max(2, int(round(duration * fps)))
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    colour_names = list(COLOURS)
    colours = rng.choice(len(colour_names), size=count, replace=False)
    shade = int(rng.integers(200, 236))
    background = (shade, shade, min(255, shade + int(rng.integers(0, 16))))
    objects = [
        _simulate_object(rng, f"{colour_names[c]} {SHAPES[s]}", SHAPES[s], int(c), width, height, fps, num_frames,
                         object_size, colours)
        for s, c in zip(shapes.tolist(), colours.tolist())
    ]
    objects = [o for o in objects if o.visible.any()]  # a shape that never made it into view is not in the scene
    scene = Scene(name=f"{index:06d}", width=width, height=height, fps=fps, num_frames=num_frames,
                  background=background, objects=objects, events=[])
    scene.events = _events(scene)
    return scene


def _simulate_object(rng: np.random.Generator, name: str, shape: str, colour: int, width: int, height: int, fps: float,
                     num_frames: int, object_size: tuple[int, int], taken_colours: np.ndarray) -> SceneObject:
    size = int(rng.integers(object_size[0], object_size[1] + 1))
    speed = float(rng.uniform(35.0, 75.0)) / fps  # pixels per frame
    duration = num_frames / fps
    enters = bool(rng.random() < 0.5)
    entry_edge = None
    if enters:
        entry_edge = EDGES[int(rng.integers(4))]
        delay = float(rng.uniform(0.3, 0.3 * duration)) * fps * speed
        pos, vel = _outside_start(rng, entry_edge, size, width, height, speed, delay)
        mode = "entering"
    else:
        pos = np.array([rng.uniform(0, width - size), rng.uniform(0, height - size)])
        angle = rng.uniform(0, 2 * math.pi)
        vel = speed * np.array([math.cos(angle), math.sin(angle)])
        mode = "inside"
    stop_at = int(rng.uniform(0.2, 0.55) * num_frames) if rng.random() < 0.7 else None
    stop_len = int(rng.uniform(1.5, 3.0) * fps)
    leave_at = int(rng.uniform(0.65, 0.8) * num_frames) if rng.random() < 0.4 else None
    change_at = int(rng.uniform(0.3, 0.8) * num_frames) if rng.random() < 0.35 else None
    free = [c for c in range(len(COLOURS)) if c not in set(taken_colours.tolist())]
    new_colour = int(rng.choice(free)) if free else (colour + 1) % len(COLOURS)

    xy = np.zeros((num_frames, 2), dtype=np.int64)
    colours = np.full(num_frames, colour, dtype=np.int64)
    stopped_until = -1
    exit_edge = None
    for i in range(num_frames):
        inside = 0 <= pos[0] and pos[0] + size <= width and 0 <= pos[1] and pos[1] + size <= height
        if mode == "entering" and inside:
            mode = "inside"
        if mode == "inside" and stop_at is not None and i >= stop_at and stopped_until < 0:
            stopped_until = i + stop_len
            mode = "stopped"
        if mode == "stopped" and i >= stopped_until:
            angle = rng.uniform(0, 2 * math.pi)
            vel = speed * np.array([math.cos(angle), math.sin(angle)])
            mode = "inside"
        if mode == "inside" and leave_at is not None and i >= leave_at and stopped_until < i:
            exit_edge = _nearest_edge(pos, size, width, height)
            vel = speed * 1.3 * _edge_direction(exit_edge)
            mode = "leaving"
        if change_at is not None and i >= change_at and mode in ("inside", "stopped"):
            colours[i:] = new_colour
            change_at = None
        xy[i] = np.round(pos).astype(np.int64)
        if mode == "stopped":
            continue
        pos = pos + vel
        if mode == "inside":
            for axis, limit in ((0, width), (1, height)):
                if pos[axis] < 0 or pos[axis] + size > limit:
                    vel[axis] = -vel[axis]
                    pos[axis] = min(max(pos[axis], 0.0), limit - size)
    boxes = np.concatenate([xy, xy + size], axis=1).astype(np.float64)
    clipped = clip_boxes(boxes, width, height)
    visible = has_positive_area(clipped)
    return SceneObject(name=name, shape=shape, size=size, colours=colours, xy=xy, visible=visible, boxes=clipped,
                       entry_edge=entry_edge, exit_edge=exit_edge if exit_edge and not visible[-1] else None)


def _outside_start(rng: np.random.Generator, edge: str, size: int, width: int, height: int, speed: float,
                   delay: float) -> tuple[np.ndarray, np.ndarray]:
    """A start outside `edge`, `delay` pixels of travel before the shape first shows."""
    inward = -_edge_direction(edge)
    drift = float(rng.uniform(-0.4, 0.4))
    if edge in ("left", "right"):
        start = np.array([-size - delay if edge == "left" else width + delay, rng.uniform(0, height - size)])
        direction = np.array([inward[0], drift])
    else:
        start = np.array([rng.uniform(0, width - size), -size - delay if edge == "top" else height + delay])
        direction = np.array([drift, inward[1]])
    return start, speed * direction / np.linalg.norm(direction)


def _edge_direction(edge: str) -> np.ndarray:
    return {"left": np.array([-1.0, 0.0]), "right": np.array([1.0, 0.0]),
            "top": np.array([0.0, -1.0]), "bottom": np.array([0.0, 1.0])}[edge]


def _nearest_edge(pos: np.ndarray, size: int, width: int, height: int) -> str:
    gaps = {"left": pos[0], "right": width - pos[0] - size, "top": pos[1], "bottom": height - pos[1] - size}
    return min(gaps, key=gaps.get)


def _outline(shape: str, x: float, y: float, size: int) -> list[tuple[float, float]]:
    """The shape's polygon in pixel coordinates, inside the rectangle [x, x + size) x [y, y + size)."""
    s = size - 1
    if shape == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if shape == "triangle":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    if shape == "diamond":
        return [(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)]
    if shape == "hexagon":
        return [(x + s / 4, y), (x + 3 * s / 4, y), (x + s, y + s / 2), (x + 3 * s / 4, y + s), (x + s / 4, y + s),
                (x, y + s / 2)]
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    return list(zip((x + s / 2 + s / 2 * np.cos(angles)).tolist(), (y + s / 2 + s / 2 * np.sin(angles)).tolist()))


def _events(scene: Scene) -> list[Event]:
    """Events at exact frame times, from the simulated states (not from the plan that drove them)."""
    from shapely.geometry import Polygon

    events: list[Event] = []
    last = scene.num_frames - 1
    for obj in scene.objects:
        shown = np.flatnonzero(obj.visible)
        if shown.size == 0:
            continue
        if shown[0] > 0:
            events.append(Event("enters", (obj.name,), scene.time(shown[0]), scene.time(shown[0]),
                                {"edge": obj.entry_edge}))
        if shown[-1] < last:
            events.append(Event("leaves", (obj.name,), scene.time(shown[-1] + 1), scene.time(shown[-1] + 1),
                                {"edge": obj.exit_edge}))
        still = np.all(obj.xy[1:] == obj.xy[:-1], axis=1) & obj.visible[1:]
        for start, end in _runs(still):
            if end - start >= 3:  # at least 3 frame steps without moving: a stop, not a bounce
                events.append(Event("stops", (obj.name,), scene.time(start), scene.time(end), {}))
        changed = np.flatnonzero(obj.colours[1:] != obj.colours[:-1])
        for f in changed.tolist():
            colour_names = list(COLOURS)
            events.append(Event("changes_colour", (obj.name,), scene.time(f + 1), scene.time(f + 1),
                                {"from": colour_names[obj.colours[f]], "to": colour_names[obj.colours[f + 1]]}))
    for a_i, a in enumerate(scene.objects):
        for b in scene.objects[a_i + 1:]:
            apart_before = False
            for f in np.flatnonzero(a.visible & b.visible).tolist():
                pa = Polygon(_outline(a.shape, *a.xy[f], a.size))
                pb = Polygon(_outline(b.shape, *b.xy[f], b.size))
                touching = pa.distance(pb) <= 1.0
                if touching and apart_before:  # the first contact after being seen apart
                    events.append(Event("touches", (a.name, b.name), scene.time(f), scene.time(f), {}))
                    break
                apart_before = apart_before or not touching
    events.sort(key=lambda e: (e.start_s, e.kind, e.objects))
    return events


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) frame pairs of the True runs of a per-step mask (step k spans frames k..k+1)."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e)) for s, e in zip(edges[0::2], edges[1::2])]


def render(scene: Scene) -> np.ndarray:
    """All frames as a (F, H, W, 3) uint8 array."""
    from PIL import Image, ImageDraw

    colour_values = list(COLOURS.values())
    frames = np.empty((scene.num_frames, scene.height, scene.width, 3), dtype=np.uint8)
    for i in range(scene.num_frames):
        image = Image.new("RGB", (scene.width, scene.height), scene.background)
        draw = ImageDraw.Draw(image)
        for obj in scene.objects:
            if not obj.visible[i]:
                continue
            x, y = (int(v) for v in obj.xy[i])
            fill = colour_values[obj.colours[i]]
            if obj.shape == "circle":
                draw.ellipse((x, y, x + obj.size - 1, y + obj.size - 1), fill=fill)
            elif obj.shape == "square":
                draw.rectangle((x, y, x + obj.size - 1, y + obj.size - 1), fill=fill)
            else:
                draw.polygon(_outline(obj.shape, x, y, obj.size), fill=fill)
        frames[i] = np.asarray(image)
    return frames


def encode_mp4(frames: np.ndarray, fps: float, path: str, filesystem: Any = None, crf: int = 18) -> None:
    """Write frames as H.264 mp4 at `path`: to a temporary name first, then renamed into place.

    A unit killed mid-write leaves at most a `.tmp-*` file, never a truncated video under the final
    name; a second writer of the same scene renames identical bytes over the first.
    """
    import io
    from fractions import Fraction

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                      options={"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"})
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = buffer.getvalue()
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    if filesystem is None:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return
    filesystem.create_dir(directory, recursive=True)
    with filesystem.open_output_stream(tmp) as handle:
        handle.write(data)
    filesystem.move(tmp, path)
