"""Frames stored once: `sample` writes the JPEGs, later stages commit frames without them and a
reference to the sample unit, and the engine puts them back, verified, for a stage that reads pixels.

Real `stgr build` / `stgr resume` processes on real local Ray over the synthetic source (the default
DAG), a real OpenAI-compatible server on 127.0.0.1 for the pixel-reading annotator, and the engine's
own functions (pipeline/stored.py) on real Arrow tables.
"""
from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rundir import Unit
from pipeline.stored import Input, StoredError, commit_form, own_refs, restore
from stages.lib.schema import FRAME, frame_image, frame_jpeg
from stages.sample import SampleStage
from tests.engine_util import run_stgr
from tests.storage_util import dataset_rows, plan_fingerprint

VIDEOS = 3
AFTER_SAMPLE = ("annotate", "align", "filter")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    code, out = run_stgr("build", "--run", str(run), f"source.num_videos={VIDEOS}", "source.records_per_partition=1",
                         "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}")
    assert code == 0, out[-3000:]
    return run


def _unit_table(run: Path, node: str, partition: int) -> pa.Table:
    return pq.read_table(run / "stages" / node / plan_fingerprint(run, node) / f"part-{partition:05d}.parquet")


def _record(run: Path, node: str, partition: int) -> dict[str, Any]:
    fp = plan_fingerprint(run, node)
    return json.loads((run / Unit(node, fp, partition).record).read_text())


def _jpegs_by_id(rows: list[dict[str, Any]]) -> dict[str, list[bytes | None]]:
    return {r["id"]: [frame_jpeg(f) for f in r["frames"] or []] for r in rows}


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_only_sample_holds_the_jpegs_and_the_dataset_has_them_all(reference: Path) -> None:
    sample_fp = plan_fingerprint(reference, "sample")
    sampled: dict[str, list[bytes | None]] = {}
    for partition in range(VIDEOS):
        sample = _unit_table(reference, "sample", partition)
        sampled.update(_jpegs_by_id(sample.to_pylist()))
        assert _record(reference, "sample", partition)["stored"]["frames"]["node"] == "sample"
        for node in AFTER_SAMPLE:
            table = _unit_table(reference, node, partition)
            frames = [f for row in table.column("frames").to_pylist() for f in row or []]
            assert frames and all(f["image"] is None for f in frames), f"{node} part {partition} rewrote JPEGs"
            assert all(f["t_s"] is not None for f in frames)  # times and indices stay: align reads them
            ref = _record(reference, node, partition)["stored"]["frames"]
            assert ref == {"stage": "sample", "node": "sample", "fingerprint": sample_fp, "partition": partition}
    assert all(j and all(j) for j in sampled.values())
    published = [r for rows in dataset_rows(reference).values() for r in rows]
    assert published and _jpegs_by_id(published) == {r["id"]: sampled[r["id"]] for r in published}
    after = sum(_bytes_under(reference / "stages" / n) for n in (*AFTER_SAMPLE, "shard"))
    assert after / _bytes_under(reference / "dataset") <= 1.5


def test_a_damaged_sample_unit_read_only_by_a_late_stage_is_recomputed(tmp_path: Path, reference: Path) -> None:
    """The JPEGs of a partition are read again only when the dataset is written: a bit flip there is
    caught by the sample unit's sha256, the sample unit is recomputed, and the dataset is the same."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = run / "stages" / "sample" / plan_fingerprint(run, "sample") / "part-00001.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    shutil.rmtree(run / "stages" / "shard")
    shutil.rmtree(run / "dataset")
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-5000:]
    assert str(damaged.relative_to(run)) in out
    assert dataset_rows(run) == dataset_rows(reference)


class _ImageCounter:
    """POST /v1/chat/completions on 127.0.0.1 that keeps the JPEGs of every request and answers a
    trace the filter rejects (what it says does not matter here: only what it was shown)."""

    def __init__(self) -> None:
        self.images: list[bytes] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                for message in body["messages"]:
                    for part in message["content"] if isinstance(message["content"], list) else []:
                        if part.get("type") == "image_url":
                            owner.images.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
                payload = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "<think>no</think><answer>A</answer>"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_pixel_reading_annotator_is_sent_the_jpegs_sample_stored(tmp_path: Path, ray_tmp: str) -> None:
    server = _ImageCounter()
    run = tmp_path / "run"
    try:
        code, out = run_stgr("build", "--run", str(run), "source.num_videos=1", "annotator=openai",
                             f"annotator.base_url={server.url}", "annotator.model=m", "annotator.api_key_env=null",
                             "annotator.max_retries=0",
                             "shard.allow_empty=true", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}")
    finally:
        server.close()
    assert code == 0, out[-3000:]
    stored = {j for row in _unit_table(run, "sample", 0).to_pylist() for j in _jpegs_by_id([row])[row["id"]]}
    assert server.images and set(server.images) <= stored  # the embedded JPEGs, byte for byte
    annotated = [f for row in _unit_table(run, "annotate", 0).column("frames").to_pylist() for f in row]
    assert all(f["image"] is None for f in annotated)


def _frames_table(ids: list[str], jpeg: bytes | None) -> pa.Table:
    frames = [[{"t_s": 1.0, "index": 0, "image": frame_image(jpeg)}] for _ in ids]
    return pa.table({"id": pa.array(ids), "frames": pa.array(frames, pa.list_(FRAME))})


def test_restore_matches_by_id_and_names_a_row_it_cannot_match() -> None:
    bulk = _frames_table(["a", "b", "c"], b"jpeg")
    light = _frames_table(["c", "a"], None)
    holder, unit = Unit("sample", "f0", 0), Unit("align", "f1", 0)
    restored = restore(light, bulk, ["frames"], unit, holder)
    assert [frame_jpeg(r["frames"][0]) for r in restored.to_pylist()] == [b"jpeg", b"jpeg"]
    with pytest.raises(StoredError, match=r"align/part-00000: 1 row\(s\) have no row in sample/part-00000.*'z'"):
        restore(_frames_table(["a", "z"], None), bulk, ["frames"], unit, holder)


def test_rows_with_new_ids_keep_their_frames_inline_only_when_the_stage_read_them_whole() -> None:
    holder, unit = Unit("sample", "f0", 0), Unit("plugin", "f1", 0)  # the reference names SampleStage
    source = Input(unit=Unit("annotate", "f2", 0), table=_frames_table(["a"], None), sha256="",
                   stored=own_refs(SampleStage.name, holder, ["frames"]))
    renamed = _frames_table(["a-copy"], b"jpeg")
    table, stored = commit_form(renamed, source, (), unit, "plugin", restored=("frames",))
    assert stored["frames"]["node"] == "plugin" and frame_jpeg(table.to_pylist()[0]["frames"][0]) == b"jpeg"
    with pytest.raises(StoredError, match="full_columns"):
        commit_form(renamed, source, (), unit, "plugin", restored=())
    kept, stored = commit_form(_frames_table(["a"], b"jpeg"), source, (), unit, "plugin", restored=("frames",))
    assert stored["frames"]["node"] == "sample" and kept.to_pylist()[0]["frames"][0]["image"] is None
