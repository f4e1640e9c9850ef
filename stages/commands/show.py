"""`stgr show PATH --id ID --out FILE`: a picture of one record, to check a trace by eye.

The frames the trace cites (its claims and its other `<t>` times, and the key frames) are drawn with
their times written as the trace writes times (`3.64 s`, with the trace's own `<t>` beside it when
the frame is the sampled one nearest to it); on each, the ground truth in thin white with its name,
and every claimed box in a colour from red (IoU 0) through yellow to green (IoU 1), grey where there
was no ground truth to compare with, as the legend says. Beside them: question, options, answer, the
trace, and the claims listed in the same colours with their IoU. FILE's suffix picks the format:
`.png` (Pillow) or `.html` (one self-contained file).

An id that is not there is explained: a record the build rejected is named with the stage and rules
that rejected it (and the folder that holds it as that stage received it, which `stgr show` draws);
otherwise a few ids that are there.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import textwrap
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import InputError, UserError
from stages.commands._records import Located, locate
from stages.lib.evidence import parse_trace
from stages.lib.geometry import CANONICAL
from stages.lib.media import FrameReader
from stages.lib.truth import GroundTruth, TruthSettings, snap

THUMB_WIDTH = 360
TEXT_WIDTH = 620
GT_COLOUR = (255, 255, 255)
NO_GT_COLOUR = (150, 150, 150)
LEGEND = [("thin white box: ground truth, with its name", GT_COLOUR),
          ("thick box: a claim of the trace, coloured by its IoU with the ground truth:", (230, 230, 230)),
          ("  red = 0", (230, 40, 40)), ("  yellow = 0.5", (230, 220, 40)), ("  green = 1", (30, 220, 40)),
          ("  grey = no ground truth at that time", NO_GT_COLOUR)]
"""What the drawn boxes mean, in the order the picture and the page list it."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("show", help="picture of one record: frames with boxes and times, the trace beside them",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, dataset/, split folder, stage output folder or Parquet file")
    p.add_argument("--id", required=True, help="the record's id (stgr inspect or pandas shows them)")
    p.add_argument("--out", required=True, help="output file: .png or .html")
    p.add_argument("--max-frames", type=int, default=8, help="most frames to draw (cited frames first)")
    p.set_defaults(func=handler)


def iou_colour(iou: float | None) -> tuple[int, int, int]:
    """Red (0) -> yellow (0.5) -> green (1); grey for a claim with nothing to compare with."""
    if iou is None:
        return NO_GT_COLOUR
    x = float(np.clip(iou, 0.0, 1.0))
    if x < 0.5:
        return (230, int(40 + 380 * x), 40)
    return (int(230 - 400 * (x - 0.5)), 220, 40)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def format_seconds(t: float) -> str:
    """A time as the trace writes times (`CANONICAL.format_time`): `3.47`, never `3.470133`."""
    return CANONICAL.format_time(t)


def _trace_times(record: Mapping[str, Any]) -> list[float]:
    """Every `<t>` of the trace, bound to a claim or not (a temporal answer cites times only)."""
    text = record.get("reasoning") or record.get("response") or ""
    return list(parse_trace(text).times) if text else []


def cited_times(record: Mapping[str, Any]) -> dict[float, list[float]]:
    """Sampled frame time -> the trace's times that snap to it (its claims' and its other `<t>`s)."""
    times = np.sort(np.array([f["t_s"] for f in record.get("frames") or []], dtype=np.float64))
    cited = _trace_times(record)
    if times.size == 0 or not cited:
        return {}
    out: dict[float, list[float]] = {}
    for t, frame in zip(cited, snap(cited, times)):
        out.setdefault(float(frame), []).append(float(t))
    return out


def chosen_frames(record: Mapping[str, Any], max_frames: int) -> list[float]:
    """Sampled frame times to draw: those the trace and the key frames point at, else evenly spread."""
    times = np.sort(np.array([f["t_s"] for f in record.get("frames") or []], dtype=np.float64))
    if times.size == 0:
        return []
    claims = (record.get("scores") or {}).get("claims") or []
    wanted = [c["t_snapped"] for c in claims if c.get("t_snapped") is not None] + _trace_times(record)
    wanted += [kf["t_s"] for kf in record.get("key_frames") or [] if kf.get("t_s") is not None]
    picked = sorted({float(t) for t in snap(wanted, times)}) if wanted else []
    if not picked:
        picked = sorted({float(t) for t in times[np.linspace(0, times.size - 1, min(max_frames, times.size)).round().astype(int)]})
    return picked[:max_frames]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
           size: tuple[int, int], above: bool = True) -> None:
    """`text` next to a box corner, moved inside the image when it would run off an edge."""
    font = _font(12)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=2)
    width, height = right - left, bottom - top
    x = min(max(0.0, xy[0] + 3), max(0.0, size[0] - width - 2))
    y = xy[1] - height - 3 if above else xy[1] + 2
    y = min(max(0.0, y), max(0.0, size[1] - height - 2))
    draw.text((x - left, y - top), text, fill=colour, font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def frame_title(t: float, cited: list[float]) -> str:
    """`3.64 s`, and the trace's own times when this frame is the one nearest to them: `3.64 s (trace: 3.47 s)`."""
    title = f"{format_seconds(t)} s"
    own = sorted({format_seconds(c) for c in cited} - {format_seconds(t)}, key=float)
    return title + (f" (trace: {', '.join(own)} s)" if own else "")


def draw_frame(jpeg: bytes, t: float, record: Mapping[str, Any], tolerance: float, cited: list[float] = ()) -> Image.Image:
    """One frame, scaled to THUMB_WIDTH, with its time, the ground truth and the claims at that time."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    scale = THUMB_WIDTH / image.width
    image = image.resize((THUMB_WIDTH, max(1, round(image.height * scale))))
    w, h = image.size
    draw = ImageDraw.Draw(image)
    names, boxes = GroundTruth.from_record(record, tolerance).at(t)
    for name, box in zip(names, boxes):
        draw.rectangle([box[0] * w, box[1] * h, box[2] * w, box[3] * h], outline=GT_COLOUR, width=1)
        _label(draw, (box[0] * w, box[3] * h), str(name), GT_COLOUR, (w, h), above=False)
    for claim in (record.get("scores") or {}).get("claims") or []:
        if claim.get("box") is None or claim.get("t_snapped") is None or abs(claim["t_snapped"] - t) > 1e-6:
            continue
        x1, y1, x2, y2 = (v * s for v, s in zip(claim["box"], (w, h, w, h)))
        colour = iou_colour(claim.get("iou"))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
        _label(draw, (x1, y1), claim["name"] + ("" if claim.get("iou") is None else f" {claim['iou']:.2f}"), colour, (w, h))
    canvas = Image.new("RGB", (w, h + 22), (20, 20, 20))
    canvas.paste(image, (0, 22))
    ImageDraw.Draw(canvas).text((6, 4), frame_title(t, list(cited)), fill=(255, 255, 255), font=_font(14))
    return canvas


def _claim_lines(record: Mapping[str, Any]) -> list[tuple[str, tuple[int, int, int]]]:
    lines = []
    for claim in (record.get("scores") or {}).get("claims") or []:
        when = "untimed" if claim.get("t_s") is None else \
            f"at {format_seconds(claim['t_s'])} s -> frame {format_seconds(claim['t_snapped'])} s" \
            if claim.get("t_snapped") is not None else f"at {format_seconds(claim['t_s'])} s"
        truth = "no ground truth" if claim.get("iou") is None else \
            f"IoU {claim['iou']:.2f} with {claim['gt_name']!r}" if claim.get("gt_name") else f"IoU {claim['iou']:.2f} (unmatched)"
        lines.append((f"{claim['name']} {when}: {truth}", iou_colour(claim.get("iou"))))
    return lines


def _text_sections(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    scores = record.get("scores") or {}
    options = record.get("options") or []
    summary = [f"task {record.get('task')}, source {record.get('source')} ({record.get('source_id')}), split {record.get('split')}"]
    if scores:
        answer = scores.get("answer_score")
        summary.append(f"format ok: {scores.get('format_ok')}, claims: {scores.get('num_claims')}, "
                       f"matched: {scores.get('num_matched')}, answer score: {'-' if answer is None else f'{answer:.2f}'}")
        summary += [f"problem: {p}" for p in scores.get("problems") or []]
    sections = [("Record " + str(record.get("id")), "\n".join(summary)), ("Question", record.get("question") or "-")]
    if options:
        sections.append(("Options", "\n".join(options)))
    answer = record.get("answer") or "-"
    if record.get("answer_span"):
        start, end = record["answer_span"]
        answer += f"   (span {format_seconds(start)}-{format_seconds(end)} s)"
    sections.append(("Answer", answer))
    sections.append(("Trace", record.get("reasoning") or record.get("response") or "-"))
    return sections


def _frames(record: Mapping[str, Any], max_frames: int,
            tolerance: float = TruthSettings().gt_tolerance_s) -> list[Image.Image]:
    times = chosen_frames(record, max_frames)
    if not times:
        return []
    frames = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
    images = FrameReader().images(record)
    by_time = {float(f["t_s"]): image.jpeg for f, image in zip(frames, images)}
    cited = cited_times(record)
    return [draw_frame(by_time[t], t, record, tolerance, cited.get(t, [])) for t in times]


def render_png(record: Mapping[str, Any], max_frames: int = 8) -> Image.Image:
    """Frames in two columns on the left, the text on the right."""
    panels = _frames(record, max_frames)
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    cell_h = max((p.height for p in panels), default=0)
    font, bold = _font(14), _font(16)
    text_lines: list[tuple[str, tuple[int, int, int], ImageFont.ImageFont]] = [("Legend", (255, 220, 120), bold)]
    text_lines += [(line, colour, font) for line, colour in LEGEND]
    text_lines.append(("", (0, 0, 0), font))
    for title, body in _text_sections(record):
        text_lines.append((title, (255, 220, 120), bold))
        for paragraph in body.splitlines() or [""]:
            for line in textwrap.wrap(paragraph, 78) or [""]:
                text_lines.append((line, (230, 230, 230), font))
        text_lines.append(("", (0, 0, 0), font))
    claims = _claim_lines(record)
    if claims:
        text_lines.append(("Claims (colour = IoU with ground truth)", (255, 220, 120), bold))
        for line, colour in claims:
            for part in textwrap.wrap(line, 78):
                text_lines.append((part, colour, font))
    text_h = 20 * len(text_lines) + 20
    width = cols * THUMB_WIDTH + (cols + 1) * 8 + TEXT_WIDTH
    height = max(rows * (cell_h + 8) + 8, text_h)
    canvas = Image.new("RGB", (width, height), (12, 12, 16))
    for k, panel in enumerate(panels):
        canvas.paste(panel, (8 + (k % cols) * (THUMB_WIDTH + 8), 8 + (k // cols) * (cell_h + 8)))
    draw = ImageDraw.Draw(canvas)
    x0 = cols * (THUMB_WIDTH + 8) + 16
    for i, (line, colour, f) in enumerate(text_lines):
        draw.text((x0, 10 + 20 * i), line, fill=colour, font=f)
    return canvas


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_html(record: Mapping[str, Any], max_frames: int = 8) -> str:
    """One self-contained page: frames as embedded PNGs, text beside them, claims coloured by IoU."""
    frames = "\n".join(f'<img src="{_png_data_uri(p)}" alt="frame">' for p in _frames(record, max_frames))
    sections = "\n".join(f"<h3>{html.escape(title)}</h3><pre>{html.escape(body)}</pre>"
                         for title, body in _text_sections(record))
    claims = "\n".join(f'<li style="color: rgb{colour}">{html.escape(line)}</li>' for line, colour in _claim_lines(record))
    legend = "\n".join(f'<li style="color: rgb{colour}">{html.escape(line)}</li>' for line, colour in LEGEND)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>STGR record {html.escape(str(record.get('id')))}</title>
<style>
body {{ background: #0c0c10; color: #e6e6e6; font-family: sans-serif; display: flex; gap: 16px; }}
.frames {{ display: grid; grid-template-columns: repeat(2, {THUMB_WIDTH}px); gap: 8px; align-content: start; }}
.text {{ max-width: 760px; }} pre {{ white-space: pre-wrap; font-size: 14px; }} h3 {{ color: #ffdc78; margin-bottom: 2px; }}
li {{ font-family: monospace; }} ul.legend {{ list-style: none; padding-left: 0; }}
</style></head>
<body><div class="frames">{frames}</div>
<div class="text"><h3>Legend</h3><ul class="legend">{legend}</ul>{sections}<h3>Claims (colour = IoU with ground truth)</h3><ul>{claims}</ul></div></body></html>
"""


def _write_png(record: Mapping[str, Any], max_frames: int, out: str) -> None:
    render_png(record, max_frames).save(out, format="PNG")


def _write_html(record: Mapping[str, Any], max_frames: int, out: str) -> None:
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(render_html(record, max_frames))


RENDERERS = {".png": _write_png, ".html": _write_html}


def find_record(located: Located, record_id: str) -> dict[str, Any]:
    """The record with `record_id`; InputError saying why it is not there: rejected (by which stage and
    rules, and where the stage's input lies), or not an id of this path (a few that are)."""
    import pyarrow.compute as pc

    table = located.read(where=pc.field("id") == record_id)
    if table.num_rows:
        return table.slice(0, 1).to_pylist()[0]
    ledger = located.ledger()
    rows = ledger.filter(pc.field("id") == record_id).to_pylist() if ledger.num_rows else []
    if rows:
        stage = rows[0]["stage"]
        rules = ", ".join(dict.fromkeys(f"{r['stage']}/{r['rule']}" for r in rows))
        reason = f": {rows[0]['reason']}" if rows[0].get("reason") else ""
        held = _stage_input(located, stage)
        where = f"; as {stage} received it: `stgr show {held} --id {record_id} --out FILE`" if held else ""
        raise InputError(f"{located.uri}: record {record_id!r} was rejected by {rules}{reason}{where}")
    ids = located.read(columns=["id"]).column("id").to_pylist()
    some = ", ".join(sorted(str(i) for i in ids)[:3])
    raise InputError(f"{located.uri}: no record with id {record_id!r} among its {len(ids)} records (e.g. {some or 'none'}); "
                     f"`stgr view {located.uri}` shows every record with its id")


def _stage_input(located: Located, node: str) -> str | None:
    """The folder of the output that node `node` read (its first upstream node's), when it is known."""
    import json
    import posixpath

    if located.run_path is None:
        return None
    try:
        with located.fs.open_input_stream(posixpath.join(located.run_path, "plan.json")) as stream:
            nodes = json.loads(stream.read()).get("nodes", {})
    except (OSError, ValueError):
        return None
    after = (nodes.get(node) or {}).get("after") or []
    if not after or after[0] not in nodes:
        return None
    folder = posixpath.join(located.run_path, "stages", after[0], nodes[after[0]]["fingerprint"])
    return folder if "://" not in located.uri else located.uri.split("://", 1)[0] + "://" + folder


def handler(args: argparse.Namespace) -> int:
    suffix = "." + args.out.rsplit(".", 1)[-1].lower() if "." in args.out else ""
    if suffix not in RENDERERS:
        raise UserError(f"--out {args.out}: the suffix picks the format; use one of {sorted(RENDERERS)}")
    record = find_record(locate(args.path), args.id)
    RENDERERS[suffix](record, args.max_frames, args.out)
    print(f"{args.out}: record {args.id}")
    return 0
