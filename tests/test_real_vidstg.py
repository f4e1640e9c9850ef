"""The README's real-data example on the real VidSTG fixture (../shared/fixtures/vidstg), as a user
runs it: a real `stgr` process, real Ray, decord on the real clips, the default template annotator.

Without trajectory files VidSTG carries temporal ground truth only, so its records are temporal
grounding records that pass the default filter; with a VidOR trajectory file (written here in the
published VidOR layout) the same sentences become spatio-temporal records whose claimed boxes are the
file's boxes at the cited times.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from stages.lib import evidence
from tests.engine_util import run_stgr

ANNOTATIONS = "../shared/fixtures/vidstg/test_annotations_subset.json"
VIDEOS = "../shared/fixtures/vidstg"
FPS = 30000 / 1001
# rules that a template trace (which restates the ground truth) must never fail on real data
SELF_INFLICTED = {"format_valid", "time_in_clip", "answer_agrees"}


def _dataset(run: Path) -> pd.DataFrame:
    files = sorted((run / "dataset").rglob("*.parquet"))
    assert files, f"no dataset shards under {run}"
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _ledger(run: Path) -> pd.DataFrame:
    files = sorted((run / "ledger").rglob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=["rule"])


def _build(run: Path, *overrides: str) -> tuple[int, str]:
    return run_stgr("build", "--run", str(run), "source=vidstg", f"source.annotations={ANNOTATIONS}",
                    f"source.video_dir={VIDEOS}", *overrides, timeout=600)


def test_readme_vidstg_example_gives_temporal_rows(fixtures_dir: Path, tmp_path: Path) -> None:
    code, out = _build(tmp_path / "run")
    assert code == 0, out[-3000:]
    rows = _dataset(tmp_path / "run")
    assert set(rows.task) == {"temporal"}
    # every entry is there: 13 entries, each with its captions and questions (26 records, all kept)
    ledger = _ledger(tmp_path / "run")
    assert not (set(ledger.rule) & SELF_INFLICTED), ledger[["rule", "reason"]].to_string()
    assert len(rows) + len(ledger) == 26 and len(rows) == 26
    spans = {sid: list(span) for sid, span in zip(rows.source_id, rows.answer_span)}
    # temporal_gt frames [104, 389) of 5804131706 at 29.97 fps
    assert spans["5804131706#0"] == pytest.approx([3.470, 12.980], abs=1 / FPS)
    # 5587257558: entry 7 is frames [0, 235), entry 11 [0, 303), entry 8 [456, 540) (to the clip's end)
    assert spans["5587257558#7"] == pytest.approx([0.0, 7.841], abs=1 / FPS)
    assert spans["5587257558#11"] == pytest.approx([0.0, 10.110], abs=1 / FPS)
    assert spans["5587257558#8"] == pytest.approx([15.215, 18.018], abs=1 / FPS)
    for answer, span in zip(rows.answer, rows.answer_span):
        assert evidence.parse_time_span(answer) == pytest.approx(list(span), abs=0.01)
    assert "dataset" in out and "temporal" in out  # the closing summary names the dataset and its tasks
    _assert_frames_stored_once(tmp_path / "run", rows)


def _assert_frames_stored_once(run: Path, rows: pd.DataFrame) -> None:
    """The real clips' JPEGs are in `sample`'s files and in the dataset, byte for byte, and in no other
    stage's file (frames stored once, docs/stages.md)."""
    def jpegs(frame: pd.DataFrame) -> dict[str, list[bytes | None]]:
        return {rid: [(f["image"] or {}).get("bytes") for f in frames] for rid, frames in zip(frame.id, frame.frames)}

    sampled = jpegs(pd.concat([pd.read_parquet(f) for f in sorted((run / "stages" / "sample").rglob("part-*.parquet"))]))
    published = jpegs(rows)
    assert published == {rid: sampled[rid] for rid in published}
    assert all(j and all(j) for j in published.values())
    # the 640 x 360 and 640 x 480 clips at the annotators' 448 px
    assert {Image.open(io.BytesIO(j[0])).size for j in published.values()} == {(448, 252), (448, 336)}
    for node in ("annotate", "align", "filter"):
        for path in sorted((run / "stages" / node).rglob("part-*.parquet")):
            frames = [f for row in pd.read_parquet(path, columns=["frames"]).frames for f in row]
            assert frames and all(f["image"] is None for f in frames), path


def _box(tid: int, fid: int) -> dict[str, float]:
    """A target's pixel box at a frame: it moves right half a pixel per frame, so a box cited at the
    wrong frame is visibly off."""
    x, y = 10 + 0.5 * fid + 20 * tid, 50 + 10 * tid
    return {"xmin": x, "ymin": y, "xmax": x + 120, "ymax": y + 200}


def _write_vidor(folder: Path, vid: str, frame_count: int, tids: list[int], width: int, height: int) -> None:
    """One VidOR annotation file (the layout of VidOR's `annotation/<group>/<vid>.json`)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"video_id": vid, "frame_count": frame_count, "fps": 29.97, "width": width, "height": height,
           "subject/objects": [{"tid": t, "category": "adult"} for t in tids],
           "trajectories": [[{"tid": t, "bbox": _box(t, f), "generated": 0, "tracker": "none"} for t in tids]
                            for f in range(frame_count)],
           "relation_instances": []}
    (folder / f"{vid}.json").write_text(json.dumps(doc))


def test_vidor_trajectories_give_true_spatio_temporal_rows(fixtures_dir: Path, tmp_path: Path) -> None:
    _write_vidor(tmp_path / "vidor" / "0000", "5804131706", 553, list(range(6)), 640, 480)
    code, out = _build(tmp_path / "run", f"source.trajectories_dir={tmp_path / 'vidor'}")
    assert code == 0, out[-3000:]
    rows = _dataset(tmp_path / "run")
    ledger = _ledger(tmp_path / "run")
    assert not (set(ledger.rule) & SELF_INFLICTED), ledger[["rule", "reason"]].to_string()
    tracked = rows[rows.source_id.str.startswith("5804131706")]
    assert len(tracked) and set(tracked.task) == {"spatio_temporal"}
    assert set(rows[rows.source_id.str.startswith("5587257558")].task) == {"temporal"}  # no file for it
    for _, row in tracked.iterrows():
        meta = json.loads(row.meta)
        tid, (begin, end) = meta["target_id"], meta["temporal_gt_fid"]
        claims = [c for c in evidence.parse_trace(row.response).claims if c.boxes and c.t is not None]
        assert len(claims) >= 2, row.response
        for claim in claims:
            fid = round(claim.t * FPS)
            assert begin <= fid < end, f"{row.id}: cited {claim.t} s is outside temporal_gt [{begin}, {end})"
            b = _box(tid, fid)
            expected = [b["xmin"] / 640, b["ymin"] / 480, b["xmax"] / 640, b["ymax"] / 480]
            # one frame of motion is 0.5 px = 0.0008 of the width; boxes are written to 3 decimals
            assert list(claim.boxes[0]) == pytest.approx(expected, abs=2e-3), (row.id, claim.t)
        cited = sorted(c.t for c in claims)
        span = (end - begin) / FPS
        assert cited[-1] - cited[0] >= 0.5 * span - 2 / FPS, f"{row.id}: cited times {cited} bunch in a {span:.2f} s span"
