"""Media paths stay inside `source.video_dir`: `..`, absolute paths and symlinks are resolved, and one
that leads outside is a `media_outside_video_dir` ledger row unless `allow_outside_video_dir=true`.

The source stage on real files and real symlinks (a JSON Lines file, and VidSTG, whose adapter finds
videos by indexing the folder); remote folders by URI. A whole build that ledgers an outside path is
in tests/test_bad_records.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.testing import unit_context
from stages.source import SourceStage
from stages.sources.base import resolve_media


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """videos/{a.mp4, sub/b.mp4, in.mp4 -> sub/b.mp4, out.mp4 -> ../elsewhere/c.mp4}, elsewhere/c.mp4,
    and `linked` -> videos (a video_dir that is itself a symlink)."""
    (tmp_path / "videos" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in ("videos/a.mp4", "videos/sub/b.mp4", "elsewhere/c.mp4"):
        (tmp_path / path).write_bytes(b"not decoded by the source stage")
    (tmp_path / "videos" / "in.mp4").symlink_to("sub/b.mp4")
    (tmp_path / "videos" / "out.mp4").symlink_to("../elsewhere/c.mp4")
    (tmp_path / "linked").symlink_to("videos")
    return tmp_path


def seed(tmp_path: Path, video_dir: Path, videos: list[str], **config) -> tuple[dict[str, str], dict[str, str]]:
    """{line's id: media uri} of the records and {record label: ledger rule} of the rejections."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"video": v, "task": "temporal", "id": f"v{i}", "answer_span": [0.0, 1.0]}) + "\n"
                            for i, v in enumerate(videos)))
    stage = SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(video_dir), **config})
    result = stage.process(None, unit_context(tmp_path / "run", stage="source"))
    return ({r["source_id"]: r["media"]["uri"] for r in result.table.to_pylist()},
            {r.record: r.rule for r in result.rejections})


def test_paths_leading_outside_video_dir_are_ledgered(tree: Path) -> None:
    videos = tree / "videos"
    inside = ["a.mp4", "sub/../a.mp4", str(videos / "sub" / "b.mp4"), "in.mp4", f"file://{videos / 'a.mp4'}"]
    outside = ["../elsewhere/c.mp4", "../../x.mp4", str(tree / "elsewhere" / "c.mp4"), "out.mp4", "s3://bucket/c.mp4"]
    kept, rejected = seed(tree, videos, inside + outside)
    assert kept == {"v0": str(videos / "a.mp4"), "v1": str(videos / "a.mp4"), "v2": str(videos / "sub" / "b.mp4"),
                    "v3": str(videos / "in.mp4"), "v4": str(videos / "a.mp4")}
    assert rejected == {f"line {i}": "media_outside_video_dir" for i in range(6, 11)}

    path = tree / "data.jsonl"
    stage = SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(videos)})
    reasons = [r.reason for r in stage.process(None, unit_context(tree / "run", stage="source")).rejections]
    assert reasons[3] == (f"{path}: line 9: field 'media.uri': {videos / 'out.mp4'} resolves to "
                          f"{tree / 'elsewhere' / 'c.mp4'}, outside source.video_dir {videos} "
                          "(source.allow_outside_video_dir=true admits it)")

    # a video_dir that is itself a symlink contains what lies in its target
    kept, rejected = seed(tree, tree / "linked", ["a.mp4", "in.mp4", "out.mp4"])
    assert sorted(kept) == ["v0", "v1"] and rejected == {"line 3": "media_outside_video_dir"}


def test_allow_outside_video_dir_admits_them(tree: Path) -> None:
    videos = tree / "videos"
    kept, rejected = seed(tree, videos, ["../elsewhere/c.mp4", str(tree / "elsewhere" / "c.mp4"), "out.mp4"],
                          allow_outside_video_dir=True)
    assert rejected == {} and kept == {"v0": str(tree / "elsewhere" / "c.mp4"), "v1": str(tree / "elsewhere" / "c.mp4"),
                                       "v2": str(videos / "out.mp4")}


def test_an_indexed_video_that_is_a_symlink_outside_is_ledgered(fixtures_dir: Path, tmp_path: Path) -> None:
    """VidSTG finds `<vid>.mp4` anywhere below video_dir: a symlink there to a clip elsewhere is outside."""
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())
    vids = sorted({e["vid"] for e in entries})
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / f"{vids[0]}.mp4").write_bytes((fixtures_dir / "vidstg" / f"{vids[0]}.mp4").read_bytes())
    (videos / f"{vids[1]}.mp4").symlink_to(fixtures_dir / "vidstg" / f"{vids[1]}.mp4")
    path = tmp_path / "vidstg.json"
    path.write_text(json.dumps(entries))
    stage = SourceStage({"adapter": "vidstg", "annotations": str(path), "video_dir": str(videos),
                         "records_per_partition": len(entries)})
    result = stage.process(None, unit_context(tmp_path / "run", stage="source"))
    assert {r["media"]["uri"] for r in result.table.to_pylist()} == {str(videos / f"{vids[0]}.mp4")}
    outside = [e for e in entries if e["vid"] == vids[1]]
    assert len(result.rejections) == len(outside) and {r.rule for r in result.rejections} == {"media_outside_video_dir"}


@pytest.mark.parametrize(("uri", "kept", "outside"), [
    ("s3://bucket/videos/a.mp4", "s3://bucket/videos/a.mp4", False),
    ("sub/a.mp4", "s3://bucket/videos/sub/a.mp4", False),
    ("s3://bucket/videos/sub/../a.mp4", "s3://bucket/videos/a.mp4", False),
    ("s3://bucket/videos/../secret.mp4", "s3://bucket/secret.mp4", True),
    ("../secret.mp4", "s3://bucket/secret.mp4", True),
    ("s3://bucket/videos2/a.mp4", "s3://bucket/videos2/a.mp4", True),
    ("gs://bucket/videos/a.mp4", "gs://bucket/videos/a.mp4", True),
])
def test_a_remote_video_dir_contains_the_uris_below_it(uri: str, kept: str, outside: bool) -> None:
    assert resolve_media(uri, "s3://bucket/videos/") == (kept, kept if outside else None)
