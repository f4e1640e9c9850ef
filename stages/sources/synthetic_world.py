"""The synthetic world: coloured shapes that move, stop, touch, change colour, enter and leave.

A scene is simulated frame by frame on the video's own timeline (frame i is at i / fps seconds),
so every box and every event time is exact on that timeline: an event "happens" at the first frame
where its condition holds. The same (seed, index) always gives the same scene, the same pixels and
the same H.264 bytes (one encoder thread), which keeps a re-run unit's output identical.

Every shape is one pixel mask, rasterised once per object; `render` paints exactly that mask, and
the ground truth is read from it: a box is the tight pixel rectangle of the mask's pixels inside the
frame (a shape half out of the frame gets the box of its visible half, not of its full extent; other
shapes drawn over it are ignored), and the visible fraction is the share of the mask's pixels inside
the frame. A shape is *in view* in a frame when that fraction is at least `min_visible_fraction`:
tracks, key frames, events (enters, leaves, ...) and "first/last seen" all use that one definition,
so a sliver at the edge is never claimed, and "enters at t" means "is first in view at t".

A shape's `name` is its identity: its colour when first in view and its shape (shapes are unique in
a scene, colours at the start too). `Scene.appearance` names it as it looks in one frame: the same
name until it changes colour, then e.g. "blue circle that was yellow" (the new colour is one no
shape of the scene starts with, and the shape word alone is unique), which names the object as
seen there and still names it.
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.lib.geometry import pixels_to_normalised

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

#: A shape is in view where at least this share of its pixels is inside the frame (the default of
#: the synthetic source's `min_visible_fraction`).
MIN_VISIBLE_FRACTION = 0.5
#: H.264 quality of the rendered videos (the default of the synthetic source's `crf`).
CRF = 18


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
    name: str  # identity: colour when first in view + shape, e.g. "red circle" (see Scene.appearance)
    shape: str
    size: int
    colours: np.ndarray  # (F,) index into COLOURS per frame
    xy: np.ndarray  # (F, 2) integer top-left corner per frame (may lie outside the frame)
    mask: np.ndarray  # (size, size) bool: the pixels of the shape, relative to its top-left corner
    fraction: np.ndarray  # (F,) share of the mask's pixels inside the frame
    visible: np.ndarray  # (F,) bool: in view, fraction >= the scene's min_visible_fraction
    boxes: np.ndarray  # (F, 4) pixel xyxy of the mask's pixels inside the frame (meaningful where visible)
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

    def appearance(self, obj: SceneObject, frame: int) -> str:
        """The object named as it looks in `frame`: its colour there and its shape, plus the colour
        it was first seen in once that differs ("blue circle that was yellow")."""
        names = list(COLOURS)
        now, first = names[obj.colours[frame]], names[obj.colours[np.flatnonzero(obj.visible)[0]]]
        return f"{now} {obj.shape}" if now == first else f"{now} {obj.shape} that was {first}"

    def normalised_box(self, obj: SceneObject, frame: int) -> list[float]:
        return [round(v, 6) for v in pixels_to_normalised(obj.boxes[frame], self.width, self.height)[0].tolist()]

    def track(self, obj: SceneObject) -> list[dict[str, Any]]:
        frames = np.flatnonzero(obj.visible)
        boxes = pixels_to_normalised(obj.boxes[frames], self.width, self.height).round(6)
        return [{"t_s": self.time(int(f)), "box": b} for f, b in zip(frames.tolist(), boxes.tolist())]


def simulate(seed: int, index: int, *, width: int, height: int, fps: float, duration_s: tuple[float, float],
             num_objects: tuple[int, int], object_size: tuple[int, int],
             min_visible_fraction: float = MIN_VISIBLE_FRACTION) -> Scene:
    """Simulate scene `index` of the synthetic set drawn with `seed`: positions, colours and events.

    A shape counts as in view where at least `min_visible_fraction` of its pixels are inside the frame."""
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
                         object_size, colours, min_visible_fraction)
        for s, c in zip(shapes.tolist(), colours.tolist())
    ]
    objects = [o for o in objects if o.visible.any()]  # a shape that never made it into view is not in the scene
    scene = Scene(name=f"{index:06d}", width=width, height=height, fps=fps, num_frames=num_frames,
                  background=background, objects=objects, events=[])
    scene.events = _events(scene)
    return scene


def _simulate_object(rng: np.random.Generator, name: str, shape: str, colour: int, width: int, height: int, fps: float,
                     num_frames: int, object_size: tuple[int, int], taken_colours: np.ndarray,
                     min_visible_fraction: float) -> SceneObject:
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
    mask = shape_mask(shape, size)
    fraction, boxes = _visible_part(mask, xy, width, height)
    visible = (fraction > 0) & (fraction >= min_visible_fraction)
    return SceneObject(name=name, shape=shape, size=size, colours=colours, xy=xy, mask=mask, fraction=fraction,
                       visible=visible, boxes=boxes, entry_edge=entry_edge,
                       exit_edge=exit_edge if exit_edge and not visible[-1] else None)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The (size, size) bool pixel mask of a shape with its top-left corner at (0, 0): what `render`
    paints, and what every box and visible fraction is measured on."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((0, 0, size - 1, size - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, size - 1, size - 1), fill=255)
    else:
        draw.polygon(_outline(shape, 0, 0, size), fill=255)
    return np.asarray(image) > 0


def _visible_part(mask: np.ndarray, xy: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the share of `mask`'s pixels inside the frame when its corner is at `xy`, and the
    tight pixel box `[x1, y1, x2, y2]` (exclusive ends) of those pixels (zeros where none are inside).

    Counted from prefix sums of the mask's rows and columns, so the cost is (frames x size), not
    (frames x size^2): a long, high-rate scene stays cheap to simulate."""
    size = mask.shape[0]
    x, y = xy[:, 0], xy[:, 1]
    # the mask's columns / rows that fall inside the frame, per frame: [lo, hi)
    col_lo, col_hi = np.clip(-x, 0, size), np.clip(width - x, 0, size)
    row_lo, row_hi = np.clip(-y, 0, size), np.clip(height - y, 0, size)
    index = np.arange(size)
    by_row = np.concatenate([np.zeros((size, 1), np.int64), np.cumsum(mask, axis=1)], axis=1)  # (size, size + 1)
    by_col = np.concatenate([np.zeros((size, 1), np.int64), np.cumsum(mask.T, axis=1)], axis=1)
    row_counts = (by_row[:, col_hi] - by_row[:, col_lo]).T  # (F, size): mask pixels per row within the columns
    row_counts = np.where((index >= row_lo[:, None]) & (index < row_hi[:, None]), row_counts, 0)
    col_counts = (by_col[:, row_hi] - by_col[:, row_lo]).T
    col_counts = np.where((index >= col_lo[:, None]) & (index < col_hi[:, None]), col_counts, 0)
    count = row_counts.sum(axis=1)
    rows, cols = row_counts > 0, col_counts > 0
    boxes = np.stack([x + cols.argmax(axis=1), y + rows.argmax(axis=1),
                      x + size - cols[:, ::-1].argmax(axis=1), y + size - rows[:, ::-1].argmax(axis=1)],
                     axis=1).astype(np.float64)
    boxes[count == 0] = 0.0
    return count / mask.sum(), boxes


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
    """All frames as a (F, H, W, 3) uint8 array: each shape's mask painted in its colour of the frame,
    in scene order (later shapes over earlier ones), wherever any pixel of it is inside the frame."""
    colour_values = np.array(list(COLOURS.values()), dtype=np.uint8)
    frames = np.empty((scene.num_frames, scene.height, scene.width, 3), dtype=np.uint8)
    frames[:] = np.array(scene.background, dtype=np.uint8)
    for obj in scene.objects:
        size = obj.size
        for i in np.flatnonzero(obj.fraction > 0).tolist():
            x, y = (int(v) for v in obj.xy[i])
            x0, y0 = max(x, 0), max(y, 0)
            x1, y1 = min(x + size, scene.width), min(y + size, scene.height)
            part = obj.mask[y0 - y:y1 - y, x0 - x:x1 - x]
            frames[i, y0:y1, x0:x1][part] = colour_values[obj.colours[i]]
    return frames


def encode_mp4(frames: np.ndarray, fps: float, path: str, filesystem: Any = None, crf: int = CRF) -> None:
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
