"""`stgr view DIR`: look through a build in a browser, records and rejections side by side.

Writes one self-contained page, DIR/view/index.html, with the pictures it needs beside it in
DIR/view/img/ (or under `--out`), and with `--serve` serves that folder on 127.0.0.1. The page holds:

* summary counts: rows per split, task and source, the alignment numbers and the ledger per rule;
* every record (up to `--max-records`), filterable by split, task and source: the frames the trace
  cites, drawn as `stgr show` draws them (ground truth thin white, each claimed box coloured by its
  IoU: red 0, yellow 0.5, green 1, grey where there was no ground truth), a legend, question,
  options, answer, the times (clip, answer span, each claim's written time and the frame it snapped
  to) and the trace with every claimed box coloured by its IoU;
* a reject gallery per ledger rule: the rejected records, found in the output of the stage they were
  rejected from, drawn the same way with the ledger's value, threshold and reason. Examples closest
  to the threshold come first: if those look right, the rule is too strict.

Why static files: they open from disk on any machine, can be copied next to the run, and need no
server; `--serve` is only for machines whose browser cannot read the run directory. Every text is
escaped by Jinja's autoescape, and the page's Content-Security-Policy allows only its own inline
script (by hash) and its own images, so a model's trace can neither run code nor load anything from
the network.
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import http.server
import io
import json
import math
import os
import posixpath
import re
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pyarrow.compute as pc
import pyarrow.fs as pafs
from jinja2 import Environment, PackageLoader, StrictUndefined
from PIL import Image, ImageDraw

from pipeline.errors import UserError
from stages.commands._records import Located, locate
from stages.commands.inspect import summarise
from stages.commands.show import GT_COLOUR, chosen_frames, draw_frame, iou_colour
from stages.lib.dataset import read_ledger
from stages.lib.media import FrameReader
from stages.lib.truth import TruthSettings

#: File whose presence marks a folder as written by `stgr view`, so that a rewrite may clear it.
MARKER = ".stgr-view"
#: Seconds within which a ground-truth track point counts at a frame's time (align's default, as `stgr show`).
GT_TOLERANCE_S = TruthSettings().gt_tolerance_s
#: A box in the trace is the claim row whose canonical box is this close (the trace rounds to 3 digits).
BOX_MATCH_ATOL = 1e-3
_TAG = re.compile(r"<(/?)(think|answer|obj|box|t)>")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("view", help="a self-contained web page of a build: records with frames, boxes and "
                                           "traces, a reject gallery per ledger rule, summary counts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory (or its dataset/, a split folder, a stage output folder)")
    p.add_argument("--out", help="folder to write the page into (default: <run>/view)")
    p.add_argument("--serve", action="store_true", help="after writing, serve the page on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=8765, help="port for --serve (0 picks a free one)")
    p.add_argument("--max-records", type=int, default=2000, help="most records to put on the page")
    p.add_argument("--max-frames", type=int, default=4, help="most frames to draw per record (cited frames first)")
    p.add_argument("--examples", type=int, default=12, help="rejected records to draw per ledger rule")
    p.set_defaults(func=handler)


def css_colour(rgb: Sequence[int]) -> str:
    return "rgb({}, {}, {})".format(*(int(c) for c in rgb))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _box_values(content: str) -> list[float] | None:
    values = [float(v) for v in _NUMBER.findall(content)]
    return values if len(values) == 4 and all(math.isfinite(v) for v in values) else None


def _claim_colour(claim: Mapping[str, Any]) -> str:
    return css_colour(iou_colour(claim.get("iou")))


def _claim_score(claim: Mapping[str, Any]) -> str:
    if claim.get("iou") is None:
        return "no ground truth"
    against = f" with {claim['gt_name']}" if claim.get("gt_name") else " (unmatched)"
    return f"IoU {claim['iou']:.2f}{against}"


def _piece(kind: str, text: str, colour: str | None = None, title: str | None = None,
           score: str | None = None) -> dict[str, Any]:
    return {"kind": kind, "text": text, "colour": colour, "title": title, "score": score}


def trace_segments(text: str | None, claims: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The trace as display pieces: plain text, section labels, object names, boxes and times.

    A `<box>` is the next claim row (in trace order) whose box it equals; it takes that claim's IoU
    colour and score, and the object name before it the same colour. A box that is no claim (one
    the parser rejected) stays uncoloured, and a tag without its partner is shown as written, so a
    malformed trace looks malformed. The pieces are data: the template escapes every text.
    """
    if not text:
        return []
    rows = [c for c in claims if c.get("box") is not None]
    cursor = 0
    pieces: list[dict[str, Any]] = []
    open_tag: str | None = None
    position = 0
    for match in _TAG.finditer(text):
        inner = text[position:match.start()]
        closing, tag = match.group(1) == "/", match.group(2)
        position = match.end()
        if closing and tag == open_tag:  # the placeholder of its opening tag is the last piece
            piece = _piece(tag, " ".join(inner.split()))
            values = _box_values(inner) if tag == "box" else None
            for k in range(cursor, len(rows) if values is not None else 0):
                if all(abs(a - b) <= BOX_MATCH_ATOL for a, b in zip(values, rows[k]["box"])):
                    iou = rows[k].get("iou")
                    piece.update(colour=_claim_colour(rows[k]), title=_claim_score(rows[k]),
                                 score="no GT" if iou is None else f"{iou:.2f}")
                    cursor = k + 1
                    break
            pieces[-1] = piece
            open_tag = None
            continue
        if inner:
            pieces.append(_piece("text", inner))
        open_tag = None
        if tag in ("think", "answer"):
            if not closing:  # a section's end needs no mark: the next label or the end of the trace shows it
                pieces.append(_piece("section", tag))
        elif closing:
            pieces.append(_piece("tag", match.group(0)))
        else:
            pieces.append(_piece("tag", match.group(0)))
            open_tag = tag
    if text[position:]:
        pieces.append(_piece("text", text[position:]))
    for k, piece in enumerate(pieces):
        if piece["kind"] == "obj":
            following = next((p for p in pieces[k + 1:] if p["kind"] in ("obj", "box")), None)
            if following is not None and following["kind"] == "box":
                piece["colour"] = following["colour"]
    return pieces


class Painter:
    """Draws records' frames into `img_dir`, one JPEG per drawn frame.

    One FrameReader for the whole page: records of the same video come in a row, and it keeps their
    decoders open when the frames are not embedded.
    """

    def __init__(self, img_dir: str, max_frames: int) -> None:
        self.img_dir = img_dir
        self.max_frames = max_frames
        self.reader = FrameReader()
        self.count = 0

    def paint(self, record: Mapping[str, Any], limit: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """(images, None), or ([], why) when the record's frames cannot be read: a bad record is a note
        on the page, never the end of the page."""
        wanted = self.max_frames if limit is None else min(limit, self.max_frames)
        if wanted == 0:
            return [], None
        times = chosen_frames(record, wanted)
        if not times:
            return [], "no frames sampled"
        try:
            ordered = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
            jpegs = {float(f["t_s"]): image.jpeg for f, image in zip(ordered, self.reader.images(record))}
            panels = [draw_frame(jpegs[t], t, record, GT_TOLERANCE_S) for t in times]
        except Exception as exc:  # noqa: BLE001 - any unreadable video or JPEG is the record's problem, shown as such
            return [], f"frames unavailable: {type(exc).__name__}: {exc}"
        images = []
        for t, panel in zip(times, panels):
            self.count += 1
            name = f"f{self.count:06d}.jpg"
            panel.save(os.path.join(self.img_dir, name), format="JPEG", quality=85)
            images.append({"src": f"img/{name}", "t": _seconds(t), "width": panel.width, "height": panel.height})
        return images, None


def record_view(record: Mapping[str, Any], images: list[dict[str, Any]], note: str | None) -> dict[str, Any]:
    """What the page shows of one record, as plain values for the template."""
    scores = record.get("scores") or {}
    claims = list(scores.get("claims") or [])
    clip = record.get("clip_window") or {}
    span = record.get("answer_span")
    sampled = sorted(float(f["t_s"]) for f in record.get("frames") or [] if f.get("t_s") is not None)
    split = record.get("split")
    return {
        "id": str(record.get("id")), "split": split or "", "split_label": split or "-",
        "task": record.get("task") or "", "source": record.get("source") or "",
        "source_id": record.get("source_id") or "", "question": record.get("question") or "",
        "options": list(record.get("options") or []), "answer": record.get("answer") or "",
        "clip": f"{_seconds(clip.get('start_s'))} - {_seconds(clip.get('end_s'))} s" if clip else "-",
        "answer_span": f"{_seconds(span[0])} - {_seconds(span[1])} s" if span is not None and len(span) == 2 else None,
        "sampled": ", ".join(_seconds(t) for t in sampled), "num_sampled": len(sampled),
        "media": (record.get("media") or {}).get("uri") or "",
        "images": images, "note": note,
        "trace": trace_segments(record.get("response") or record.get("reasoning"), claims),
        "claims": [{"name": c.get("name") or "", "t": _seconds(c.get("t_s")), "frame": _seconds(c.get("t_snapped")),
                    "score": _claim_score(c), "colour": _claim_colour(c)} for c in claims],
        "scored": bool(scores),
        "format_ok": scores.get("format_ok"), "num_claims": scores.get("num_claims"),
        "num_matched": scores.get("num_matched"),
        "mean_iou": None if scores.get("mean_iou") is None else f"{scores['mean_iou']:.3f}",
        "answer_score": None if scores.get("answer_score") is None else f"{scores['answer_score']:.3f}",
        "answer_pred": scores.get("answer_pred"),
        "problems": list(scores.get("problems") or []),
    }


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _closest_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numeric values nearest their threshold first (the borderline cases judge a rule), then the rest."""
    def key(row: dict[str, Any]) -> tuple[int, float, str]:
        value, threshold = _number(row.get("value")), _number(row.get("threshold"))
        if value is None or threshold is None:
            return (1, 0.0, str(row.get("id")))
        return (0, abs(value - threshold), str(row.get("id")))
    return sorted(rows, key=key)


def _value_range(rows: Iterable[Mapping[str, Any]]) -> str | None:
    values = [v for v in (_number(r.get("value")) for r in rows) if v is not None]
    if not values:
        return None
    return f"min {min(values):.3g}, median {statistics.median(values):.3g}, max {max(values):.3g}"


@dataclass
class Upstream:
    """Where a node's rejected records can be found again: the committed output of its inputs."""

    located: list[Located] = field(default_factory=list)

    def records(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for located in self.located:
            for record in located.iter_records(where=pc.field("id").isin(ids)):
                found.setdefault(record["id"], record)
        return found


def _upstream(located: Located, plan: Mapping[str, Any], node: str) -> Upstream:
    """The committed outputs of `node`'s inputs in this plan (a source node has none: no pictures)."""
    nodes = plan.get("nodes", {})
    out = Upstream()
    for parent in nodes.get(node, {}).get("after", []):
        directory = posixpath.join(located.run_path or "", "stages", parent, nodes[parent]["fingerprint"])
        if located.fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        files = sorted(info.path for info in located.fs.get_file_info(pafs.FileSelector(directory))
                       if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
        out.located.append(Located("stage", directory, located.fs, directory, files))
    return out


def _read_plan(located: Located) -> dict[str, Any]:
    with located.fs.open_input_stream(posixpath.join(located.run_path or "", "plan.json")) as stream:
        return json.loads(stream.read())


def rule_galleries(located: Located, painter: Painter, examples: int) -> list[dict[str, Any]]:
    """One entry per (node, rule) of the ledger, most rows first, each with drawn examples."""
    if located.run_path is None or not located.ledger_units:
        return []
    plan = _read_plan(located)
    galleries = []
    for node, fingerprint in sorted(located.ledger_units.items()):
        ledger = read_ledger(located.fs, located.run_path, {node: fingerprint}).to_pylist()
        if not ledger:
            continue
        by_rule: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in ledger:
            by_rule[row["rule"] or "-"].append(row)
        picked = {rule: _closest_first(rows)[:examples] for rule, rows in by_rule.items()}
        wanted = sorted({r["id"] for rows in picked.values() for r in rows if r.get("id")})
        records = _upstream(located, plan, node).records(wanted) if wanted else {}
        for rule, rows in by_rule.items():
            cards = []
            for row in picked[rule]:
                record = records.get(row.get("id") or "")
                images, note = painter.paint(record, limit=2) if record is not None else ([], None)
                cards.append({"row": {k: ("" if v is None else str(v)) for k, v in row.items()},
                              "record": record_view(record, images, note) if record is not None else None})
            thresholds = sorted({str(r["threshold"]) for r in rows if r.get("threshold") is not None})
            galleries.append({"node": node, "stage": rows[0].get("stage") or node, "rule": rule, "rows": len(rows),
                              "thresholds": ", ".join(thresholds) or "-", "range": _value_range(rows),
                              "example": rows[0].get("reason") or "", "cards": cards,
                              "anchor": f"rule-{len(galleries)}"})
    return sorted(galleries, key=lambda g: (-g["rows"], g["node"], g["rule"]))


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(loader=PackageLoader("stages", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def legend() -> list[dict[str, str]]:
    """The box colours the frames use, for the page's legend."""
    return [{"label": "ground truth", "colour": css_colour(GT_COLOUR), "style": "thin"},
            {"label": "claim, IoU 0", "colour": css_colour(iou_colour(0.0)), "style": "thick"},
            {"label": "claim, IoU 0.5", "colour": css_colour(iou_colour(0.5)), "style": "thick"},
            {"label": "claim, IoU 1", "colour": css_colour(iou_colour(1.0)), "style": "thick"},
            {"label": "claim, no ground truth", "colour": css_colour(iou_colour(None)), "style": "thick"}]


def render_page(context: Mapping[str, Any]) -> str:
    """The page from its context: `title`, `what`, `summary`, `records`, `total`, `galleries`.

    The inline script is allowed by its hash in the Content-Security-Policy, so no other script runs.
    """
    env = _environment()
    script = env.get_template("view.js.jinja").render()
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    records = context["records"]
    filters = {key: sorted({r[key] for r in records if r[key]}) for key in ("split", "task", "source")}
    return env.get_template("view.html.jinja").render(
        **context, script=script, script_hash=f"sha256-{digest}", filters=filters, legend=legend())


def _favicon() -> bytes:
    image = Image.new("RGB", (32, 32), (12, 12, 16))
    draw = ImageDraw.Draw(image)
    draw.rectangle([3, 3, 28, 28], outline=GT_COLOUR, width=2)
    draw.rectangle([9, 9, 22, 22], outline=iou_colour(1.0), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare(out: str) -> str:
    """Empty `out` for a fresh page (only a folder `stgr view` wrote, or an empty one); returns img/."""
    if os.path.isfile(out):
        raise UserError(f"--out {out}: is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise UserError(f"--out {out}: the folder holds files stgr view did not write; give a new or empty folder")
        shutil.rmtree(out)
    img = os.path.join(out, "img")
    os.makedirs(img, exist_ok=True)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as handle:
        handle.write("written by stgr view; the whole folder is replaced when it runs again\n")
    return img


def _default_out(located: Located, out: str | None) -> str:
    if out is not None:
        return os.path.abspath(out)
    if located.run_path is None:
        raise UserError(f"{located.uri}: not inside a run directory; say where to write the page with --out")
    if not isinstance(located.fs, pafs.LocalFileSystem):
        raise UserError(f"{located.uri}: the run is not on the local disk; say where to write the page with --out")
    return os.path.join(located.run_path, "view")


def write_site(located: Located, out: str, max_records: int, max_frames: int, examples: int) -> dict[str, Any]:
    """Write index.html, favicon.png and img/ into `out`; returns counts of what the page shows."""
    painter = Painter(_prepare(out), max_frames)
    summary = summarise(located)
    records = []
    for record in located.iter_records():
        if len(records) >= max_records:
            break
        records.append(record_view(record, *painter.paint(record)))
    galleries = rule_galleries(located, painter, examples)
    page = render_page({"title": f"STGR view: {located.label}", "what": located.label, "path": located.uri,
                        "summary": summary, "records": records, "total": summary["rows"], "galleries": galleries})
    with open(os.path.join(out, "favicon.png"), "wb") as handle:
        handle.write(_favicon())
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as handle:
        handle.write(page)
    return {"records": len(records), "total": summary["rows"], "rules": len(galleries), "images": painter.count}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the page's folder without an access log line per image."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return


def serve(directory: str, port: int) -> int:
    """Serve `directory` on 127.0.0.1:`port` until Ctrl-C (exit 0)."""
    handler = functools.partial(_QuietHandler, directory=directory)
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise UserError(f"--port {port}: cannot listen on 127.0.0.1 ({exc.strerror}); "
                        "pick another port (--port 0 picks a free one)") from None
    print(f"serving {directory} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def handler(args: argparse.Namespace) -> int:
    for name in ("max_records", "max_frames", "examples"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be 0 or more")
    located = locate(args.path)
    out = _default_out(located, args.out)
    counts = write_site(located, out, args.max_records, args.max_frames, args.examples)
    shown = f"{counts['records']} of {counts['total']} records" if counts["records"] < counts["total"] \
        else f"{counts['records']} records"
    print(f"{os.path.join(out, 'index.html')}: {shown}, {counts['rules']} ledger rule(s) in the reject gallery",
          flush=True)
    return serve(out, args.port) if args.serve else 0
