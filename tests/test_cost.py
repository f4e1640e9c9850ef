"""The cost ledger (stages/lib/cost.py): every model call counted, priced and summed.

- the `openai` backend against a real OpenAI-compatible server on 127.0.0.1 that reports `usage`
  (`TinyModelServer`): the unit's token counts are the sums of what the server reported; a later
  attempt of the same unit counts its earlier payment (recovered), another unit's hit is saved;
- the tokenizer path with the tiny Qwen2.5-VL: a request's counts are the processor's, the same in a
  padded batch as alone;
- real `stgr build`s in one run directory: the template annotator (free), then `annotator=openai`
  against a server answering the template's correct traces (tokens as the server billed them, a
  cost per kept row in `stgr status`, manifest.json and the card), then the same build moved to a
  second server (the response cache answers: every call cached and saved, the server called 0 times).
"""
from __future__ import annotations

import json
import time

import pytest

from pipeline.config import compose_plan
from pipeline.cost import usd_text
from pipeline.errors import ConfigError
from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.backends import Backend, make_backend
from stages.backends.transformers_backend import generated_lengths
from stages.lib.chat import ChatRequest, LabelledImage
from stages.lib.cost import CostMeter, Price
from stages.lib.schema import to_table
from tests.engine_util import kill_when_cached, node_rows, run_stgr, stgr
from tests.test_annotate import jpeg
from tests.test_backends_openai import (TinyModelServer, distinct_records, openai_config, request_from_body,
                                         words_usage)

PRICE = {"input_per_mtok": 2.5, "output_per_mtok": 10.0, "per_gpu_hour": 0.0}


def billed(usage: list[dict[str, int]]) -> tuple[int, int]:
    return sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)


def test_price_and_its_checks():
    assert Price.of(PRICE).usd(1_000_000, 100_000, 0) == pytest.approx(2.5 + 1.0)
    assert Price(per_gpu_hour=3.6).usd(0, 0, 1000) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"annotator\.price\.input_per_mtok: must be >= 0, got -1"):
        compose_plan(["annotator.price.input_per_mtok=-1"])


class OnTwoGpus(Backend):
    """A backend computing on two GPUs (none is here: `gpus` says so) that counts no token."""

    name = "two-gpus"
    gpus = 2.0

    def generate(self, requests):
        time.sleep(0.01)
        return ["ok"] * len(requests)


def test_accelerator_seconds_are_wall_seconds_times_the_backend_gpus():
    backend = OnTwoGpus({"price": {"per_gpu_hour": 3600.0}})
    meter = CostMeter.for_backend(backend)
    results, usages = meter.call(backend, [ChatRequest(prompt="a"), ChatRequest(prompt="b")])
    assert results == ["ok", "ok"] and usages[0].wall_s == usages[1].wall_s > 0
    totals = meter.totals
    assert totals["accelerator_s"] == pytest.approx(2 * totals["wall_s"])
    assert totals["usd"] == pytest.approx(totals["accelerator_s"])  # $3600 per GPU-hour: $1 per GPU-second
    assert (totals["calls"], totals["unmetered"], totals["input_tokens"]) == (2, 2, 0)  # it reported no tokens
    meter.cached(usages[0].as_dict())
    assert totals["cached"] == 1 and totals["saved_usd"] == pytest.approx(usages[0].accelerator_s, rel=1e-3)  # stored to the microsecond


def test_a_price_change_keeps_every_fingerprint():
    """A price says what a call costs, not what it computes: committed units stay valid."""
    base = ["annotator=openai", "annotator.model=m"]
    plain = compose_plan(base)
    priced = compose_plan([*base, "annotator.price.input_per_mtok=3", "annotator.price.per_gpu_hour=2"])
    assert priced.nodes["annotate"].config["price"]["input_per_mtok"] == 3
    assert fingerprints(plain) == fingerprints(priced)
    assert fingerprints(compose_plan([*base, "annotator.max_new_tokens=9"]))["annotate"] != fingerprints(plain)["annotate"]


def fingerprints(plan) -> dict[str, str]:
    """Each node's fingerprint, as the engine computes it (upstream fingerprints included)."""
    from pipeline.fingerprint import stage_fingerprint

    out: dict[str, str] = {}
    for name in plan.order:
        spec = plan.nodes[name]
        out[name] = stage_fingerprint(spec.stage_cls.name, spec.stage_cls.version, spec.config,
                                      [out[u] for u in spec.after], spec.stage_cls.excluded_keys(spec.config))
    return out


def test_the_ledger_counts_what_the_endpoint_billed_and_what_the_cache_saved(tmp_path, tiny_model_dir):
    records = distinct_records(5)
    config = openai_config("", price=PRICE)
    with TinyModelServer(str(tiny_model_dir)) as server:
        config["base_url"] = server.url
        ctx = unit_context(tmp_path, stage="annotate")
        cost = AnnotateStage(config).process(to_table(records), ctx).cost
        assert len(server.usage) == 5
        paid_in, paid_out = billed(server.usage)
        assert paid_in > 0 and paid_out > 0
        assert (cost["calls"], cost["cached"], cost["unmetered"], cost["recovered"]) == (5, 0, 0, 0)
        assert (cost["input_tokens"], cost["output_tokens"]) == (paid_in, paid_out)
        assert cost["images"] == sum(len(r["frames"]) for r in records)
        assert cost["usd"] == pytest.approx((paid_in * 2.5 + paid_out * 10.0) / 1e6)
        assert cost["accelerator_s"] == 0 and cost["wall_s"] > 0  # an API: no GPU of ours
        assert (cost["backend"], cost["model"], cost["tier"]) == ("openai", "tiny-qwen@main", "1")

        # the same unit again (it died before committing): what its first attempt paid is its cost
        again = AnnotateStage(config).process(to_table(records), ctx).cost
        assert len(server.usage) == 5
        assert (again["calls"], again["recovered"], again["cached"]) == (5, 5, 0)
        assert (again["input_tokens"], again["usd"]) == (paid_in, cost["usd"])

        # another unit (another fingerprint) asking the same: free, and saved
        other = unit_context(tmp_path, stage="annotate", fingerprint="e" * 16)
        saved = AnnotateStage(config).process(to_table(records), other).cost
        assert len(server.usage) == 5
        assert (saved["calls"], saved["cached"], saved["usd"]) == (0, 5, 0)
        assert (saved["saved_input_tokens"], saved["saved_output_tokens"]) == (paid_in, paid_out)
        assert saved["saved_usd"] == pytest.approx(cost["usd"])


def test_verify_and_the_judge_count_what_the_endpoint_billed(tmp_path, tiny_model_dir):
    """verify's crops and evaluation's judge go through the same ledger: tokens as billed, priced,
    and what an earlier run stored counts as saved."""
    from stages.verify import VerifyStage
    from tests.test_verify import PROMPT, _aligned
    from train.eval.judge import JudgeCalls
    from train.eval.runner import Runner
    from train.eval.store import CompletionStore

    with TinyModelServer(str(tiny_model_dir)) as server:
        verify = {"backend": "openai", "base_url": server.url, "model": "tiny-qwen", "api_key_env": None,
                  "max_retries": 1, "prompt": PROMPT, "price": PRICE, "image_max_side": 64}
        cost = VerifyStage(verify).process(_aligned(tmp_path), unit_context(tmp_path, stage="verify")).cost
        paid_in, paid_out = billed(server.usage)
        assert cost["calls"] == len(server.usage) == cost["images"] > 0  # one crop per claimed box
        assert (cost["input_tokens"], cost["output_tokens"]) == (paid_in, paid_out)
        assert cost["usd"] == pytest.approx((paid_in * 2.5 + paid_out * 10.0) / 1e6)

        judged = len(server.usage)
        judge_cfg = {"system": "Score 0-3.", "template": "Q: {question} A: {answer} C: {candidate}", "max_new_tokens": 4}
        backend = make_backend({"backend": "openai", "base_url": server.url, "model": "judge", "api_key_env": None,
                                "price": PRICE})
        calls = [JudgeCalls(None, judge_cfg).call(f"s{i}", "What?", "a ball", f"candidate {i}", {}) for i in range(3)]
        first = Runner(backend, CompletionStore(tmp_path / "eval", "judge"), batch_size=2)
        first.run(calls)
        paid_in, paid_out = billed(server.usage[judged:])
        judge = first.meter.totals
        assert (judge["calls"], judge["input_tokens"], judge["output_tokens"]) == (3, paid_in, paid_out)
        again = Runner(backend, CompletionStore(tmp_path / "eval", "judge"), batch_size=2)
        again.run(calls)
        assert len(server.usage) == judged + 3
        reused = again.meter.totals
        assert (reused["calls"], reused["cached"], reused["saved_input_tokens"]) == (0, 3, paid_in)
        assert reused["saved_usd"] == pytest.approx(judge["usd"]) and judge["usd"] > 0


def test_tokens_from_the_processor_of_a_local_model(tiny_model_dir):
    """transformers: input tokens are the request's own row of the attention mask (text and image
    tokens, no padding), output tokens those generated up to the first stop token."""
    backend = make_backend({"backend": "transformers", "model": str(tiny_model_dir)})
    short = ChatRequest(prompt="Where is the cat?", images=(LabelledImage(jpeg(1), "Frame 1 at 0 s:"),), max_new_tokens=6)
    long = ChatRequest(prompt="Describe in detail what happens to the red ball in these two frames, please.",
                       images=(LabelledImage(jpeg(2), "Frame 1 at 0 s:"), LabelledImage(jpeg(3), "Frame 2 at 1 s:")),
                       max_new_tokens=6)
    backend.generate([short, long])
    together = backend.last_usage
    alone = []
    for request in (short, long):
        backend.generate([request])
        alone.extend(backend.last_usage)
    assert [(u.input_tokens, u.output_tokens) for u in together] == [(u.input_tokens, u.output_tokens) for u in alone]
    from stages.backends.transformers_backend import chat_messages

    for request, usage in zip((short, long), alone):
        text = backend.processor.apply_chat_template(chat_messages(request), tokenize=False, add_generation_prompt=True)
        inputs = backend.processor(text=[text], images=[backend._images(request)], return_tensors="pt")
        assert usage.input_tokens == inputs["input_ids"].shape[1]
        assert 1 <= usage.output_tokens <= 6 and usage.images == len(request.images)
    assert together[1].input_tokens > together[0].input_tokens
    assert backend.gpus == 0.0  # the CPU: no accelerator-seconds


def test_generated_lengths_stop_at_the_first_stop_token():
    import torch

    new = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert generated_lengths(new, {2, 0}) == [3, 5, 1]


# --- real builds ------------------------------------------------------------------------------------------

BUILD = ["source.num_videos=2", "cluster.num_cpus=2"]
OPENAI = ["annotator=openai", "annotator.model=tiny-qwen", "annotator.api_key_env=null", "annotator.batch_size=4",
          "annotator.concurrency=2", "annotator.price.input_per_mtok=2.5", "annotator.price.output_per_mtok=10"]


def correct_traces(run, overrides: list[str]) -> dict[str, str]:
    """Prompt -> the template annotator's trace, for every record the build at `run` sampled: what a
    strong model would answer (it passes align and filter), served by the test endpoint."""
    from stages.backends.template import write_response

    stage = AnnotateStage(compose_plan(overrides).nodes["annotate"].config)
    traces = {}
    for record in node_rows(run, "sample"):
        request = stage.request_for(record, None)
        traces[request.prompt] = write_response(request.context, 3)
    return traces


def template_build(run, base: list[str]) -> dict:
    """The default build with the template annotator: its manifest's cost."""
    code, out = run_stgr("build", "--run", str(run), *base, timeout=600)
    assert code == 0, out[-3000:]
    return json.loads((run / "dataset" / "manifest.json").read_text())["cost"]


@pytest.mark.slow
def test_a_build_prices_its_calls_and_a_rebuild_pays_nothing(tmp_path, tiny_model_dir, ray_tmp):
    run = tmp_path / "run"
    base = [*BUILD, f"cluster.temp_dir={ray_tmp}"]
    template = template_build(run, base)
    assert template["total_usd"] == 0 and template["stages"]["annotate"]["calls"] == len(node_rows(run, "annotate")) > 0
    assert template["stages"]["annotate"]["input_tokens"] == 0  # no model ran: no token used

    def answer(request: ChatRequest) -> str:
        return traces.get(request.prompt, "no trace for this prompt")

    with TinyModelServer(str(tiny_model_dir), answer=answer) as server, \
            TinyModelServer(str(tiny_model_dir), answer=answer) as mirror:
        overrides = [*base, *OPENAI, f"annotator.base_url={server.url}"]
        traces = correct_traces(run, overrides)
        code, out = run_stgr("build", "--run", str(run), *overrides, timeout=600)
        assert code == 0, out[-3000:]
        calls = len(server.usage)
        assert calls == len(traces) > 0
        paid_in, paid_out = billed(server.usage)
        manifest = json.loads((run / "dataset" / "manifest.json").read_text())
        cost = manifest["cost"]
        annotate = cost["stages"]["annotate"]
        assert (annotate["calls"], annotate["cached"], annotate["unmetered"]) == (calls, 0, 0)
        assert (annotate["input_tokens"], annotate["output_tokens"]) == (paid_in, paid_out)
        usd = (paid_in * 2.5 + paid_out * 10.0) / 1e6
        assert cost["total_usd"] == pytest.approx(usd)
        kept = manifest["rows"]
        assert kept == cost["kept_rows"] > 0
        assert cost["per_kept_row_usd"] == pytest.approx(usd / kept)
        assert cost["tiers"]["1"]["backend"] == "openai" and cost["tiers"]["1"]["usd"] == pytest.approx(usd)
        card = (run / "dataset" / "README.md").read_text()
        assert "## Cost" in card and f"{usd_text(usd / kept)} per kept row ({kept} rows)" in card

        code, status = run_stgr("status", str(run))
        assert code == 0, status
        assert status.splitlines()[1].split()[-1] == "cost"
        assert f"{usd_text(usd / kept)} per kept row ({kept} rows)" in status

        # the same build moved to another endpoint serving the same model: a new fingerprint for
        # annotate, but every request is in the response cache: nothing is asked, all is saved
        moved = [*base, *OPENAI, f"annotator.base_url={mirror.url}"]
        code, out = run_stgr("build", "--run", str(run), *moved, timeout=600)
        assert code == 0, out[-3000:]
        assert len(mirror.usage) == 0 and len(server.usage) == calls
        again = json.loads((run / "dataset" / "manifest.json").read_text())["cost"]
        annotate = again["stages"]["annotate"]
        assert (annotate["calls"], annotate["cached"], annotate["usd"]) == (0, calls, 0)
        assert (annotate["saved_input_tokens"], annotate["saved_output_tokens"]) == (paid_in, paid_out)
        assert again["total_usd"] == 0 and again["saved_usd"] == pytest.approx(usd)
        assert again["per_kept_row_usd"] == 0


@pytest.mark.slow
def test_a_killed_build_counts_each_call_it_paid_for_once(tmp_path, tiny_model_dir, ray_tmp):
    """Killed (SIGKILL of its whole session) during annotate, then resumed: the ledger holds every
    distinct call the server answered, once, including those the killed attempt paid for
    (`recovered`); only answers lost in flight at the kill were billed twice by the server."""
    run = tmp_path / "run"
    base = [*BUILD, f"cluster.temp_dir={ray_tmp}"]
    template_build(run, base)
    cache = run / "cache" / "annotate"
    with TinyModelServer(str(tiny_model_dir), answer=lambda r: traces.get(r.prompt, "no trace"), delay_s=0.3) as server:
        overrides = [*base, *OPENAI, f"annotator.base_url={server.url}", "annotator.batch_size=2"]
        traces = correct_traces(run, overrides)
        cached_at_kill = kill_when_cached(stgr("build", "--run", str(run), *overrides), cache, 3, server)
        assert cached_at_kill < len(traces), "the build finished annotating before the kill"
        code, out = run_stgr("resume", str(run), timeout=600)
        assert code == 0, out[-3000:]

    def usage(body: dict) -> dict[str, int]:
        request = request_from_body(body)
        return words_usage(request, traces[request.prompt])

    distinct = {json.dumps(body, sort_keys=True): body for body in server.bodies}
    assert len(distinct) == len(traces)
    annotate = json.loads((run / "dataset" / "manifest.json").read_text())["cost"]["stages"]["annotate"]
    assert (annotate["calls"], annotate["recovered"], annotate["cached"]) == (len(traces), cached_at_kill, 0)
    assert (annotate["input_tokens"], annotate["output_tokens"]) == billed([usage(b) for b in distinct.values()])
    # what the server billed beyond that: the answers it delivered twice (lost in flight at the kill)
    assert billed(server.usage) == billed([usage(b) for b in server.bodies])
