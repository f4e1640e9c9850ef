"""`stgr build` end to end over the real fixtures: VidSTG runs through every stage that exists, and
HC-STVG (annotations without videos) commits its seed records, then ledgers every one as missing
media. A malformed annotation file stops the build before anything runs."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from pipeline.build import run_build
from pipeline.errors import InputError


@pytest.fixture
def cluster() -> Iterator[list[str]]:
    """Overrides for an embedded Ray whose session folder sits in a short /tmp path (its socket paths
    must stay under 108 bytes, which pytest's tmp_path can exceed)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield ["cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _stage_rows(run: Path, kind: str, stage: str) -> pd.DataFrame:
    files = sorted((run / kind / stage).glob("*/part-*.parquet"))
    assert files, f"no {kind} parquet for {stage} under {run}"
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_vidstg_and_hcstvg_builds(fixtures_dir: Path, tmp_path: Path, cluster: list[str]) -> None:
    run = tmp_path / "vidstg"
    code = run_build(str(run), ["source=vidstg", f"source.annotations={fixtures_dir / 'vidstg' / 'test_annotations_subset.json'}",
                                f"source.video_dir={fixtures_dir / 'vidstg'}", "sample.embed_jpeg=false",
                                *cluster], interactive=False)
    assert code == 0
    seeds = _stage_rows(run, "stages", "source")
    sampled = _stage_rows(run, "stages", "sample")
    assert len(seeds) == len(sampled) == 26
    record = sampled[sampled.source_id == "5804131706#0"].iloc[0]
    assert list(record.answer_span) == pytest.approx([3.470, 12.980], abs=1 / 29.97)
    assert record.media["num_frames"] == 553 and len(record.frames) == 32
    assert (run / "dataset" / "manifest.json").exists()

    run = tmp_path / "hcstvg"
    code = run_build(str(run), ["source=hcstvg", f"source.annotations={fixtures_dir / 'hcstvg' / 'test_subset.json'}",
                                f"source.video_dir={tmp_path / 'no-videos'}", *cluster], interactive=False)
    assert code == 3  # every unit committed; the records themselves are in the ledger: an empty dataset
    seeds = _stage_rows(run, "stages", "source")
    assert sorted(seeds.source_id) == ["14_wfEOx36N4jA.mp4", "65_xp67EC-Hvwk.mp4"]
    ledger = _stage_rows(run, "ledger", "sample")
    assert sorted(ledger.record) == sorted(seeds.source_id)
    assert set(ledger.rule) == {"missing_media"} and set(ledger.id) == set(seeds.id)
    assert all(str(tmp_path / "no-videos") in f for f in ledger.file)


def test_malformed_annotation_file_stops_the_build(tmp_path: Path, cluster: list[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(InputError, match=r"bad.json: expected a JSON list"):
        run_build(str(tmp_path / "run"), ["source=vidstg", f"source.annotations={bad}", f"source.video_dir={tmp_path}",
                                          *cluster], interactive=False)
    assert not list((tmp_path / "run").glob("stages/*/*/part-*.parquet"))
