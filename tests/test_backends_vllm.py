"""The `vllm` backend (vllm.LLM in the actor) and the `openai` backend against vLLM's own server.

Run in the environment of ../shared/tools/vllm-cpu/setup:
    source /tmp/stgr-vllm-venv/bin/activate-vllm && pip install -e . --no-deps
    python -m pytest tests/test_backends_vllm.py -m vllm -x -q
Skipped where vllm cannot be imported. The model is the project's tiny random Qwen2.5-VL with two
attention heads of 32 (vLLM's CPU attention supports head sizes 32, 64, 80, ...; the shared tiny
model's 16 is not among them).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from pipeline.testing import unit_context  # noqa: E402
from stages.annotate import AnnotateStage  # noqa: E402
from stages.lib.media import FrameReader  # noqa: E402
from stages.lib.schema import frame_image, to_table  # noqa: E402
from tests.test_annotate import annotator_config, jpeg, seed_record  # noqa: E402


@pytest.fixture(scope="module")
def vllm_tiny_model(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with head_dim 32 (2 heads over hidden 64, mRoPE [4, 6, 6])."""
    from stages.testing.tiny_model import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny-vllm"), seed=0, head_dim=32)


def engine_config(model: Path, **overrides) -> dict:
    settings = dict(model=str(model), dtype="float32", max_model_len=4096, max_new_tokens=16, image_max_side=112,
                    engine_kwargs={"enforce_eager": True}, num_gpus=0)
    return annotator_config("vllm", **{**settings, **overrides})


def records(n: int) -> list[dict]:
    tasks = ["spatio_temporal", "temporal", "spatial"]
    out = []
    for i in range(n):
        record = seed_record(f"v{i}", tasks[i % 3])
        record["frames"] = [dict(f, image=frame_image(jpeg(100 * i + k, size=(112, 84))))
                            for k, f in enumerate(record["frames"][:4])]
        out.append(record)
    return out


def test_vllm_engine_annotates_with_video_metadata_and_images(tmp_path, vllm_tiny_model):
    stage = AnnotateStage(engine_config(vllm_tiny_model))
    assert AnnotateStage.validate_config(stage.config) == []
    ctx = unit_context(tmp_path, stage="annotate")
    stage.setup(ctx)
    backend = stage.backend
    calls = []
    real_generate = backend.llm.generate
    backend.llm.generate = lambda *a, **k: calls.append(len(a[0])) or real_generate(*a, **k)

    batch = records(6)
    result = stage.process(to_table(batch), ctx)
    assert result.rejections == []
    rows = result.table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in batch)
    assert all(isinstance(r["response"], str) for r in rows)
    assert {r["provenance"]["annotator"] for r in rows} == {"vllm"}
    assert calls == [6]  # one engine call for the whole batch
    # the cost ledger counts the engine's own prompt and generated token ids, and the images sent
    assert result.cost["calls"] == 6 and result.cost["input_tokens"] > 0 and result.cost["output_tokens"] > 0
    assert result.cost["images"] == 6 * 4

    # what vLLM got: one video whose metadata places the frames at their source indices
    request = stage.request_for(batch[0], FrameReader(112))
    engine_input = backend.engine_input(request)
    frames, meta = engine_input["multi_modal_data"]["video"]
    assert frames.shape == (4, 84, 112, 3)
    assert meta["frames_indices"] == [f["index"] for f in batch[0]["frames"]]
    assert meta["fps"] == 10.0 and meta["do_sample_frames"] is False
    assert "Frame 1 at 0.5 s; Frame 2 at 1 s; Frame 3 at 1.5 s; Frame 4 at 2 s" in engine_input["prompt"]
    assert engine_input["prompt"].count("<|video_pad|>") == 1

    # the same batch again: every response from the cache, no engine call
    again = stage.process(to_table(batch), ctx)
    assert calls == [6]
    assert sorted(again.table.column("response").to_pylist()) == sorted(r["response"] for r in rows)

    # frames as labelled images instead of a video
    backend.input = "images"
    image_input = backend.engine_input(request)
    assert len(image_input["multi_modal_data"]["image"]) == 4
    assert image_input["prompt"].count("<|image_pad|>") == 4 and "Frame 3 at 1.5 s: " in image_input["prompt"]
    (text,) = backend.generate([request])
    assert isinstance(text, str)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _successes(url: str) -> float:
    """vLLM's own count of finished requests, from its Prometheus metrics."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r'^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def test_openai_backend_against_vllm_server(tmp_path, vllm_tiny_model):
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_tiny_model),
         "--served-model-name", "tiny-qwen", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "4096", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 8}'],
        stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT, env=dict(os.environ),
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM server did not come up in 300 s"
            time.sleep(2)
        config = annotator_config("openai", base_url=url, model="tiny-qwen", api_key_env=None, max_new_tokens=16,
                                  image_max_side=112, concurrency=4)
        batch = records(4)
        ctx = unit_context(tmp_path / "run", stage="annotate")
        before = _successes(url)
        result = AnnotateStage(config).process(to_table(batch), ctx)
        assert result.rejections == [] and result.table.num_rows == 4
        assert _successes(url) - before == 4
        again = AnnotateStage(config).process(to_table(batch), ctx)
        assert again.table.num_rows == 4 and _successes(url) - before == 4  # nothing asked twice
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
