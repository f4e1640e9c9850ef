"""A record's ground truth as a plain JSON-able dict: what a model's completion is scored against.

One definition serves every scorer: the RL rewards (`train.rewards` reads it from the `reward_target`
column TRL passes), evaluation, and verl (`stgr export --format verl` writes it as
`reward_model.ground_truth`, so `train.rewards.compute_score` runs unchanged there). It lives in
`stages/` because the export command is part of the domain layer, which must not import `train/`.

The target holds the answer, options, answer span and key-frame boxes in canonical units, plus the
box frame the model is asked to write in: the scorer needs that frame to read the completion's
boxes back, and a JSON target cannot carry a `BoxFrame` object, hence `frame_to_dict`/`frame_from_dict`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stages.lib.geometry import BoxFrame

_FRAME_FIELDS = ("name", "width", "height", "layout", "decimals", "time_decimals")


def frame_to_dict(frame: BoxFrame) -> dict[str, Any]:
    """A box frame as JSON-able fields (the inverse of `frame_from_dict`)."""
    return {name: getattr(frame, name) for name in _FRAME_FIELDS}


def frame_from_dict(data: Mapping[str, Any]) -> BoxFrame:
    """The box frame written by `frame_to_dict`; a missing field raises KeyError, a bad value ValueError."""
    return BoxFrame(**{name: data[name] for name in _FRAME_FIELDS})


def reward_target(record: Mapping[str, Any], frame: BoxFrame) -> dict[str, Any]:
    """Everything the rewards need about `record`, in canonical units, plus the `frame` the model
    writes boxes in (so a scorer maps the completion's boxes back to canonical before comparing).

    Key frames without a time and objects without a box carry no evidence to score against and are
    left out.
    """
    return {
        "id": record["id"],
        "task": record["task"],
        "answer": record["answer"],
        "options": list(record.get("options") or []),
        "answer_span": list(record["answer_span"]) if record.get("answer_span") else None,
        "key_frames": [
            {"t_s": float(kf["t_s"]),
             "objects": [{"name": o.get("name"), "box": list(o["box"])} for o in kf.get("objects") or [] if o.get("box")]}
            for kf in record.get("key_frames") or [] if kf.get("t_s") is not None
        ],
        "frame": frame_to_dict(frame),
    }
