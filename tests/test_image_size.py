"""One image size: `sample` embeds frames at the size the annotators send, so a backend that reads
pixels gets the embedded JPEGs as they are, and the template backend, which never looks at pixels,
gets requests without images and decodes nothing.

Real Hydra composition of conf/, the real `sample` stage (decord) on a real VidSTG clip, and the
real annotate stage with the template backend.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.config import compose
from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.backends import BACKENDS
from stages.backends.template import TemplateBackend
from stages.lib.media import FrameReader
from stages.lib.schema import frame_image, frame_jpeg, record_id, to_table
from stages.sample import SampleStage
from tests.test_annotate import all_tasks, annotator_config

REPO = Path(__file__).resolve().parents[1]


def _sampled(clip: Path, tmp_path: Path, **overrides: object) -> dict:
    """The one record `sample` makes of `clip` with the default config (and `overrides`)."""
    config = {**OmegaConf.to_container(compose()["sample"], resolve=True), **overrides}
    seed = {"id": record_id("test", clip.name, "general_free"), "source": "test", "source_id": clip.name,
            "task": "general_free", "media": {"uri": str(clip)}}
    result = SampleStage(config).process(to_table([seed]), unit_context(tmp_path / "run", stage="sample"))
    assert result.rejections == []
    (record,) = result.table.to_pylist()
    return record


def test_sample_embeds_frames_at_the_size_every_pixel_reading_annotator_sends() -> None:
    side = compose()["sample"]["jpeg_max_side"]
    backends = BACKENDS
    for path in sorted((REPO / "conf" / "annotator").glob("*.yaml")):
        config = annotator_config(path.stem)
        if config["backend"] == "cascade":  # not a backend: its tiers are annotator configs of their own
            continue
        if backends[config["backend"]].needs_pixels:
            assert config["image_max_side"] == side, path.name
        else:
            assert "image_max_side" not in config, f"{path.name}: a backend that reads no pixels has no image size"
    assert not TemplateBackend.needs_pixels


def test_default_frames_reach_a_pixel_reading_backend_as_they_are(fixtures_dir: Path, tmp_path: Path) -> None:
    clip = fixtures_dir / "vidstg" / "5587257558.mp4"  # 640 x 360
    send = annotator_config("openai")["image_max_side"]
    record = _sampled(clip, tmp_path)
    embedded = [frame_jpeg(f) for f in sorted(record["frames"], key=lambda f: (f["t_s"], f["index"]))]
    assert {Image.open(io.BytesIO(j)).size for j in embedded} == {(448, 252)}
    sent = [image.jpeg for image in FrameReader(send).images(record)]
    assert sent == embedded  # byte for byte: nothing re-encoded
    # frames embedded larger than the annotator sends are re-encoded, each one
    larger = _sampled(clip, tmp_path / "larger", jpeg_max_side=640)
    resized = FrameReader(send).images(larger)
    assert all(image.jpeg != frame_jpeg(f) for image, f in zip(resized, larger["frames"]))
    assert {Image.open(io.BytesIO(image.jpeg)).size for image in resized} == {(448, 252)}


def test_the_template_backend_decodes_no_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames whose bytes are no image at all, or that would have to be decoded from a video that is
    not there, cost the template nothing: it never reads them. A backend that reads pixels cannot."""
    records = all_tasks()
    for record in records[:3]:
        record["frames"] = [dict(f, image=frame_image(b"not a jpeg")) for f in record["frames"]]
    for record in records[3:]:
        record["frames"] = [dict(f, image=None) for f in record["frames"]]
        record["media"] = dict(record["media"], uri=str(tmp_path / "absent.mp4"))
    stage = AnnotateStage(annotator_config("template"))
    result = stage.process(to_table(records), unit_context(tmp_path / "a"))
    assert result.rejections == [] and result.table.num_rows == len(records)

    monkeypatch.setattr(TemplateBackend, "needs_pixels", True)
    result = AnnotateStage(annotator_config("template", image_max_side=448)).process(to_table(records),
                                                                                      unit_context(tmp_path / "b"))
    assert result.table.num_rows == 0 and len(result.rejections) == len(records)
    assert any("absent.mp4" in r.reason for r in result.rejections)
