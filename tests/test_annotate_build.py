"""Annotate inside real builds (`run_build` / `stgr build` on an embedded Ray) with model backends.

- the `transformers` backend with the tiny random Qwen2.5-VL: the build completes, and the model's
  garbage is kept as text by annotate and rejected by filter with reasons in the ledger;
- the `openai` backend against a real local endpoint: the build is killed (SIGKILL of its whole
  session) during annotate and resumed; counting calls at the server shows that no response that
  was cached before the kill is asked for again, and the API key never reaches the run directory.
"""
from __future__ import annotations

import tempfile

import pytest

from tests.engine_util import kill_when_cached, ledger_rows, node_rows, run_stgr, stgr
from tests.test_backends_openai import TinyModelServer

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp():
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short


def test_transformers_backend_build_keeps_garbage_and_filter_rejects_it(tmp_path, tiny_model_dir, ray_tmp):
    from pipeline.build import run_build

    run = tmp_path / "run"
    overrides = ["source.num_videos=2", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}",
                 "annotator=transformers", f"annotator.model={tiny_model_dir}", "annotator.max_new_tokens=24",
                 "annotator.image_max_side=112"]
    assert run_build(str(run), overrides, interactive=False) == 3  # every record rejected: the dataset is empty
    annotated = node_rows(run, "annotate")
    assert annotated, "annotate produced no rows"
    assert all(isinstance(r["response"], str) for r in annotated)
    assert {r["provenance"]["annotator"] for r in annotated} == {"transformers"}
    assert {r["provenance"]["model"] for r in annotated} == {f"{tiny_model_dir}@main"}
    rejected = ledger_rows(run, "filter")
    assert {r["id"] for r in rejected} == {r["id"] for r in annotated}  # garbage: every record rejected
    assert all(r["reason"] for r in rejected)
    assert "format" in " ".join(r["rule"] for r in rejected)
    assert 0 < len(list((run / "cache" / "annotate").rglob("*.json"))) <= len(annotated)  # one per distinct request


def test_openai_build_killed_during_annotate_resumes_without_paying_twice(tmp_path, tiny_model_dir, ray_tmp):
    run = tmp_path / "run"
    secret = "sk-stgr-test-secret-9f8e7d"
    env = {"STGR_TEST_KEY": secret, "HF_HUB_OFFLINE": "1"}
    cache = run / "cache" / "annotate"
    with TinyModelServer(str(tiny_model_dir), api_key=secret, delay_s=0.3) as server:
        overrides = ["source.num_videos=2", "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}", "annotator=openai",
                     f"annotator.base_url={server.url}", "annotator.model=tiny-qwen",
                     "annotator.api_key_env=STGR_TEST_KEY", "annotator.max_new_tokens=12",
                     "annotator.image_max_side=112", "annotator.batch_size=2", "annotator.concurrency=2",
                     "shard.allow_empty=true"]  # the tiny model's garbage is rejected: an empty dataset
        proc = stgr("build", "--run", str(run), *overrides, env=env)
        cached_at_kill = kill_when_cached(proc, cache, 3, server)
        paid_at_kill = sum(server.delivered.values())
        assert paid_at_kill >= cached_at_kill >= 3

        code, out = run_stgr("resume", str(run), env=env, timeout=600)
        assert code == 0, out[-3000:]
        cached_now = len(list(cache.rglob("*.json")))
        paid_after = sum(server.delivered.values())
    # the resumed build paid exactly for the responses that were not cached when it was killed
    assert cached_now > cached_at_kill
    assert paid_after - paid_at_kill == cached_now - cached_at_kill
    annotated = node_rows(run, "annotate")
    assert len({r["id"] for r in annotated}) == len(annotated) and len(annotated) >= cached_now
    # the key is read from the environment on the workers; the run directory only names the variable
    assert "api_key_env: STGR_TEST_KEY" in (run / "config.yaml").read_text()
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the API key leaked into {path}"
