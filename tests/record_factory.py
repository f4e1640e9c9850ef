"""Records built by hand for the align/filter/shard/command tests, in exactly RECORD_SCHEMA.

One moving "red circle" and one still "blue square" on a 320x240, 10 fps, 6 s video; frames sampled
at 2 fps; exact ground-truth tracks at every native frame. Tests choose the trace, so every score the
stages compute can be checked by hand.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from stages.lib.schema import frame_image, record_id

WIDTH, HEIGHT, FPS, DURATION = 320, 240, 10.0, 6.0
FRAME_TIMES = [round(0.5 * k, 3) for k in range(12)]  # 2 fps over 0..5.5 s


def circle_box(t: float) -> list[float]:
    """The red circle moves right by 0.1 of the frame per second, from x1 = 0.1."""
    x1 = 0.1 + 0.1 * t
    return [round(x1, 6), 0.2, round(x1 + 0.2, 6), 0.5]


SQUARE_BOX = [0.6, 0.6, 0.8, 0.9]


def jpeg(t: float) -> bytes:
    """A frame that shows the ground truth (so a picture of it can be checked by eye)."""
    img = np.full((HEIGHT, WIDTH, 3), 30, dtype=np.uint8)
    x1, y1, x2, y2 = circle_box(t)
    img[int(y1 * HEIGHT):int(y2 * HEIGHT), int(x1 * WIDTH):int(x2 * WIDTH)] = (220, 40, 40)
    sx1, sy1, sx2, sy2 = SQUARE_BOX
    img[int(sy1 * HEIGHT):int(sy2 * HEIGHT), int(sx1 * WIDTH):int(sx2 * WIDTH)] = (40, 40, 220)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_record(n: int = 0, *, task: str = "spatio_temporal", source: str = "synthetic",
                with_jpeg: bool = False, **overrides: Any) -> dict[str, Any]:
    """A complete record after `annotate`; `overrides` replace any column."""
    track_times = [round(k / FPS, 3) for k in range(int(DURATION * FPS))]
    record = {
        "id": record_id(source, f"video{n:04d}", task),
        "source": source,
        "source_id": f"video{n:04d}",
        "task": task,
        "media": {"uri": f"/data/video{n:04d}.mp4", "kind": "video", "fps": FPS,
                  "num_frames": int(DURATION * FPS), "duration_s": DURATION, "width": WIDTH, "height": HEIGHT},
        "clip_window": {"start_s": 0.0, "end_s": 5.5},
        "frames": [{"t_s": t, "index": int(round(t * FPS)), "image": frame_image(jpeg(t) if with_jpeg else None)}
                   for t in FRAME_TIMES],
        "question": "Where is the red circle when it passes the middle?",
        "options": None,
        "answer": "It is in the middle of the frame.",
        "answer_span": None,
        "reasoning": None,
        "key_frames": [{"t_s": 2.0, "objects": [{"name": "red circle", "box": circle_box(2.0)},
                                                {"name": "blue square", "box": SQUARE_BOX}]}],
        "ground_truth": {"objects": [
            {"name": "red circle", "track": [{"t_s": t, "box": circle_box(t)} for t in track_times]},
            {"name": "blue square", "track": [{"t_s": t, "box": SQUARE_BOX} for t in track_times]},
        ], "spans": [{"label": "red circle moves", "start_s": 0.0, "end_s": 5.9}]},
        "response": None,
        "split": None,
        "scores": None,
        "provenance": {"annotator": "template", "model": "template", "prompt_sha": "0" * 8,
                       "build_id": None, "stage_fingerprints": None},
        "meta": None,
    }
    unknown = sorted(set(overrides) - set(record))
    assert not unknown, f"make_record: no column {unknown} in the record schema"  # to_table would drop it
    record.update(overrides)
    return record


def box_text(box: list[float]) -> str:
    return "[" + ",".join(f"{v:.3f}" for v in box) + "]"


def grounded_response(t: float, answer: str = "[0.0, 5.0]", shift: float = 0.0) -> str:
    """A response citing the red circle at `t` (its box moved right by `shift`) and the blue square."""
    circle = circle_box(t)
    circle = [circle[0] + shift, circle[1], circle[2] + shift, circle[3]]
    return (f"<think>The <obj>red circle</obj><box>{box_text(circle)}</box>at<t>{t:g}</t>s moves right past "
            f"the <obj>blue square</obj><box>{box_text(SQUARE_BOX)}</box>at<t>{t:g}</t>s.</think>"
            f"<answer>{answer}</answer>")


FINGERPRINTS = {"align": "a1" * 8, "filter": "f1" * 8, "shard": "5h" * 8, "publish": "9b" * 8}


def build_run(run, n: int = 12) -> dict[str, Any]:
    """A run directory as the engine leaves it after align -> filter -> shard -> publish, built by calling the
    real stages: plan.json, committed stage outputs, the filter ledger and the dataset. A third of the
    records cite a box far from the ground truth and are rejected. Returns ids by fate."""
    import dataclasses
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stage import LEDGER_SCHEMA
    from pipeline.testing import unit_context
    from stages.align import AlignStage
    from stages.filter import FilterStage
    from stages.lib.schema import to_table
    from stages.publish import PublishStage
    from stages.shard import ShardStage

    from stages.lib.evidence import split_sections

    responses = [grounded_response(1.0 + (i % 4), shift=0.4 if i % 3 == 0 else 0.0) for i in range(n)]
    # as annotate leaves them: the raw response, and its <think> part as the reasoning
    records = [make_record(i, with_jpeg=True, task="spatio_temporal", answer="[0.0, 5.0]", answer_span=[0.0, 5.0],
                           response=response, reasoning=split_sections(response).think)
               for i, response in enumerate(responses)]
    nodes = {"align": [], "filter": ["align"], "shard": ["filter"], "publish": ["shard"]}
    (run).mkdir(parents=True, exist_ok=True)
    plan = {"build_id": run.name, "nodes": {name: {"node": name, "stage": name, "fingerprint": FINGERPRINTS[name],
                                                    "partitions": 1, "after": after, "actor": False,
                                                    "barrier": name == "publish"} for name, after in nodes.items()}}
    (run / "plan.json").write_text(json.dumps(plan))

    def ctx(stage):
        return dataclasses.replace(unit_context(run, stage=stage, fingerprint=FINGERPRINTS[stage]), fingerprints=FINGERPRINTS)

    table = to_table(records)
    for stage_cls in (AlignStage, FilterStage, ShardStage, PublishStage):
        name = stage_cls.name
        result = stage_cls({}).process(table, ctx(name))
        out = run / "stages" / name / FINGERPRINTS[name]
        out.mkdir(parents=True)
        pq.write_table(result.table, out / "part-00000.parquet")
        ledger = run / "ledger" / name / FINGERPRINTS[name]
        ledger.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([r.as_row(name, 1) for r in result.rejections], schema=LEDGER_SCHEMA),
                       ledger / "part-00000.parquet")
        table = result.table
    kept = table.column("id").to_pylist()
    return {"kept": kept, "rejected": [r["id"] for r in records if r["id"] not in kept], "records": records}
