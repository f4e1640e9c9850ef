"""A small STGR dataset written the way `stgr build` lays it out, for the training tests.

Records are made with `stages.lib.schema.to_table` from drawn frames (a coloured disc moving across a
grey field, JPEG-embedded) with exact boxes and times, and traces written with the grammar's own
renderer, so the training code sees real shards without running a whole build.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from stages.lib.evidence import Claim, render_claim
from stages.lib.geometry import CANONICAL
from stages.lib.schema import SETS, frame_image, record_id, to_table

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
WIDTH, HEIGHT = 160, 120


def _frame(colour: str, box: list[float]) -> bytes:
    image = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([box[0] * WIDTH, box[1] * HEIGHT, box[2] * WIDTH, box[3] * HEIGHT],
                                  fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def toy_record(i: int, task: str, rng: random.Random) -> dict:
    colour = rng.choice(sorted(COLOURS))
    name = f"{colour} circle"
    times = [0.5, 1.0, 1.5, 2.0]
    x0 = rng.uniform(0.05, 0.35)
    boxes = [[round(x0 + 0.12 * k, 3), 0.3, round(x0 + 0.12 * k + 0.25, 3), 0.63] for k in range(len(times))]
    key = rng.randrange(len(times))
    claim = render_claim(Claim(name, (tuple(boxes[key]),), times[key]), CANONICAL)
    options: list[str] = []
    span = None
    if task == "spatial":
        question, answer = f"Where is the {name} at {times[key]} s?", CANONICAL.format_box(boxes[key]).replace(",", ", ")
        reasoning = f"I look at the frame at {times[key]} s. {claim} is there. So the {name} is at {answer}."
    elif task == "temporal":
        question, answer, span = f"When is the {name} visible?", "[0.5, 2.0]", [0.5, 2.0]
        reasoning = f"The {name} is seen from <t>0.5</t>s to <t>2</t>s; {claim} for example."
    else:
        letters = "ABCD"
        colours = sorted(COLOURS)
        options = [f"{letters[k]}. {c}" for k, c in enumerate(colours)]
        question, answer = "What colour is the moving circle?", letters[colours.index(colour)]
        reasoning = f"{claim} is {colour}."
    return {
        "id": record_id("toy", f"video{i}", task), "source": "toy", "source_id": f"video{i}", "task": task,
        "media": {"uri": "", "kind": "video", "fps": 2.0, "num_frames": 5, "duration_s": 2.5,
                  "width": WIDTH, "height": HEIGHT},
        "clip_window": {"start_s": 0.0, "end_s": 2.5},
        "frames": [{"t_s": t, "index": k + 1, "image": frame_image(_frame(colour, b))} for k, (t, b) in enumerate(zip(times, boxes))],
        "question": question, "options": options, "answer": answer, "answer_span": span, "reasoning": reasoning,
        "key_frames": [{"t_s": times[key], "objects": [{"name": name, "box": boxes[key]}]}],
    }


def write_toy_dataset(root: Path, n: int = 8, tasks: tuple[str, ...] = ("general_mcq", "spatio_temporal", "temporal", "spatial"),
                      seed: int = 0) -> Path:
    """Write `root/dataset/{stgr-cot,stgr-rl}/train-00000-of-00001.parquet` (the same n records in both)."""
    rng = random.Random(seed)
    rows = [toy_record(i, tasks[i % len(tasks)], rng) for i in range(n)]
    for name in SETS:
        out = root / "dataset" / name
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(to_table([{**r, "split": name} for r in rows]), out / "train-00000-of-00001.parquet")
    return root
