"""Crops of cited evidence for confidence-aware test-time scaling (see train/tts.py).

A sample's evidence is the claims of its trace that have both a box and a time. Each of the first
`max_crops` of them is cut out of the video frame at its cited time and shown to the model with the
question "does this show <name>?". What counts as a crop is decided from the completion alone (the
box clipped to the image must have an area, the time must lie in the video), so scoring after a
rerun gives the same crops without decoding anything; a claim that fails this is rated 0.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from stages.lib import evidence, geometry
from stages.lib.chat import ChatRequest, LabelledImage
from train import tts
from train.eval.runner import Call

#: Crops are widened to at least this many pixels per side (centred, inside the image) so that the
#: processor's resize keeps a sane aspect ratio and the model sees a little context.
MIN_CROP_SIDE = 28


@dataclass(frozen=True)
class Citation:
    index: int
    name: str
    box: tuple[float, float, float, float]  # canonical, clipped to the image
    t: float
    valid: bool


def citations(completion: str | None, frame: geometry.BoxFrame, duration_s: float, max_crops: int) -> list[Citation]:
    """The first `max_crops` claims with a box and a time, each with its first box."""
    if not completion:
        return []
    out = []
    for claim in evidence.parse_trace(completion, frame).claims:
        if not claim.boxes or claim.t is None:
            continue
        box = geometry.clip_boxes([claim.boxes[0]])
        valid = bool(geometry.has_positive_area(box)[0]) and 0.0 <= claim.t <= duration_s
        out.append(Citation(len(out), claim.name, tuple(box[0].tolist()), claim.t, valid))  # type: ignore[arg-type]
        if len(out) >= max_crops:
            break
    return out


def crop_jpeg(image: Any, box: tuple[float, float, float, float]) -> bytes:
    """The canonical `box` cut out of a PIL image (widened to MIN_CROP_SIDE pixels), as JPEG."""
    width, height = image.size
    x1, y1, x2, y2 = geometry.normalised_to_pixels([box], width, height)[0]
    x1, y1, x2, y2 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
    for lo, hi, size in ((0, 2, width), (1, 3, height)):
        side = min(size, MIN_CROP_SIDE)
        coords = [x1, y1, x2, y2]
        if coords[hi] - coords[lo] < side:
            centre = (coords[lo] + coords[hi]) // 2
            start = min(max(0, centre - side // 2), size - side)
            coords[lo], coords[hi] = start, start + side
        x1, y1, x2, y2 = coords
    buf = io.BytesIO()
    image.crop((x1, y1, x2, y2)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def crop_kind(sample: int, index: int) -> str:
    return f"crop@{sample}.{index}"


def crop_calls(key: str, samples: list[tuple[int, str | None]], frame: geometry.BoxFrame, duration_s: float,
               image_at: Callable[[float], Any], config: Mapping[str, Any],
               context: Mapping[str, Any]) -> Iterator[Call]:
    """One call per valid citation of each sample; `image_at(t)` gives the PIL frame at t seconds."""
    for sample, completion in samples:
        for cite in citations(completion, frame, duration_s, int(config["max_crops"])):
            if not cite.valid:
                continue

            def make(cite: Citation = cite, sample: int = sample) -> ChatRequest:
                jpeg = crop_jpeg(image_at(cite.t), cite.box)
                return ChatRequest(
                    prompt=str(config["crop_prompt"]).format(name=cite.name).strip(),
                    images=(LabelledImage(jpeg=jpeg, label=""),),
                    max_new_tokens=int(config["crop_max_new_tokens"]),
                    context={**dict(context), "kind": "crop", "sample": sample, "claim": cite.index,
                             "name": cite.name, "t": cite.t},
                )

            yield Call(key, crop_kind(sample, cite.index), make)


def sample_ratings(completion: str | None, frame: geometry.BoxFrame, duration_s: float, max_crops: int,
                   crop_completion: Callable[[int], str | None]) -> list[int | None]:
    """The 0/1/2 rating of each citation of one sample (an invalid citation is rated 0 unasked)."""
    ratings: list[int | None] = []
    for cite in citations(completion, frame, duration_s, max_crops):
        ratings.append(tts.parse_rating(crop_completion(cite.index) or "") if cite.valid else 0)
    return ratings
