"""The annotation cascade (`annotator=cascade`, stages/annotate.py `cascade_dag`, stages/filter.py).

- the plan: one annotate -> align -> filter chain per tier, an `escalate` node per tier but the last,
  the filter's readers reading every tier's filter; each tier's block is the cascade's shared settings
  plus its entry, checked against its backend's settings; a resume (the stored config) expands it
  to the same fingerprints; a DAG without a chain to a filter, or a bad tier, is one ConfigError line;
- a cascade's escalate node (a filter node with `output: rejected`) keeps exactly the rows its tier's
  filter rejects;
- real builds (`stgr build` on an embedded Ray, real servers on 127.0.0.1):
  the tiny random Qwen2.5-VL (garbage) then the template: every record is written by tier 2, tier 1's
  rejections are in its filter's ledger, the cost ledger counts tier 1's calls and tokens, and
  `stgr status` / `stgr inspect` name the tiers' nodes; an OpenAI-compatible server answering correct
  traces as tier 1 leaves the second server uncalled; killed (SIGKILL) while tier 2 waits on its
  server, then resumed, neither server answers any request twice.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import compose, compose_plan, from_yaml, to_yaml, validate
from pipeline.cost import usd_text
from pipeline.errors import ConfigError
from pipeline.executor import resolve_nodes
from pipeline.rundir import Unit
from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.filter import FilterStage
from stages.lib.chat import ChatRequest
from stages.lib.card import cost_section
from stages.lib.cost import cost_summary
from stages.lib.schema import to_table
from tests.engine_util import commit_records, kill_session, ledger_rows, node_rows, run_stgr, stgr
from tests.record_factory import make_record
from tests.test_backends_openai import TinyModelServer

TWO_TIERS = ["annotator=cascade", "annotator.tiers=[{backend: template}, {backend: template, max_cites: 1}]"]
TIER_NODES = ["annotate_t1", "align_t1", "filter_t1", "escalate_t1", "annotate_t2", "align_t2", "filter_t2"]


# --- the plan -------------------------------------------------------------------------------------------


def test_the_plan_repeats_annotate_align_filter_per_tier_and_shard_reads_every_tier():
    plan = compose_plan([*TWO_TIERS, "annotator.temperature=0.5"])
    assert plan.order[:len(TIER_NODES) + 3] == ["source", "sample", *TIER_NODES, "shard"]
    after = {n: plan.nodes[n].after for n in plan.order}
    assert after["annotate_t1"] == ["sample"] and after["escalate_t1"] == ["align_t1"]
    assert after["annotate_t2"] == ["escalate_t1"] and after["filter_t2"] == ["align_t2"]
    assert after["shard"] == ["filter_t1", "filter_t2"]
    escalate = plan.nodes["escalate_t1"]
    assert (escalate.stage_cls.name, escalate.config_key) == ("filter", "filter@escalate")
    assert escalate.config == {**plan.nodes["filter_t1"].config, "output": "rejected"}
    assert plan.nodes["filter_t1"].config == plan.nodes["filter_t2"].config == compose_plan().nodes["filter"].config
    first, second = plan.nodes["annotate_t1"].config, plan.nodes["annotate_t2"].config
    assert (first["tier"], second["tier"]) == (1, 2)
    assert (first["max_cites"], second["max_cites"]) == (3, 1)  # the entry's own, else its backend's default
    assert first["temperature"] == second["temperature"] == 0.5  # the cascade's settings are every tier's
    assert plan.nodes["annotate_t2"].config_key == "annotator.tiers.1"
    assert "tiers" in plan.config["annotator"], "the plan keeps the config as written"

    states = resolve_nodes(plan)
    assert len({states[n].fingerprint for n in ("annotate_t1", "annotate_t2")}) == 2
    shard = states["shard"]  # a map node reads the tiers' partitions one after another
    assert shard.barrier or shard.partitions == states["filter_t1"].partitions + states["filter_t2"].partitions
    resumed = resolve_nodes(validate(from_yaml(to_yaml(plan.config))))  # what `stgr resume` plans
    assert {n: s.fingerprint for n, s in resumed.items()} == {n: s.fingerprint for n, s in states.items()}


def test_a_tier_takes_what_its_backends_file_sets_unless_the_cascade_or_the_entry_says_otherwise():
    """conf/annotator/vllm.yaml sets num_gpus 1 and batch_size 64: a vllm tier gets them, as
    `annotator=vllm` would; the tier's entry overrides them, and so does a setting given the cascade."""
    tiers = "annotator.tiers=[{backend: vllm, model: m}, {backend: vllm, model: m, num_gpus: 2, batch_size: 4}]"
    plan = compose_plan(["annotator=cascade", tiers])
    vllm = compose_plan(["annotator=vllm", "annotator.model=m"]).nodes["annotate"].config
    first, second = plan.nodes["annotate_t1"].config, plan.nodes["annotate_t2"].config
    assert (first["num_gpus"], first["batch_size"]) == (vllm["num_gpus"], vllm["batch_size"]) == (1, 64)
    assert (second["num_gpus"], second["batch_size"]) == (2, 4)
    shared = compose_plan(["annotator=cascade", "annotator.batch_size=16", tiers]).nodes["annotate_t1"].config
    assert (shared["num_gpus"], shared["batch_size"]) == (1, 16)


def test_a_build_without_a_cascade_keeps_its_dag():
    plan = compose_plan()
    assert list(plan.nodes) == list(compose()["dag"]) and plan.nodes["shard"].after == ["filter"]
    assert "tier" not in plan.nodes["annotate"].config and "output" not in plan.nodes["filter"].config


@pytest.mark.parametrize(("overrides", "message"), [
    (["annotator=cascade", "annotator.tiers=[]"], "annotator.tiers: expected a non-empty list"),
    (["annotator=cascade", "annotator.tiers=null"], "annotator.tiers: required by the cascade but missing"),
    (["annotator=cascade", "annotator.tiers=[{backend: template}, 3]"],
     "annotator.tiers.1: expected an annotator config"),
    (["annotator=cascade", "annotator.tiers=[{backend: template}, {backend: transformers}]"],
     "annotator.tiers.1.model: required by backend 'transformers' but missing"),
    (["annotator=cascade", "annotator.tiers=[{backend: templat}]"],
     "annotator.tiers.0.backend: unknown backend 'templat'"),
    (["annotator=cascade", "annotator.tiers=[{backend: template, max_cite: 2}]"],
     "annotator.tiers.0.max_cite: unknown key for stage 'annotate' (did you mean max_cites?)"),
    (["annotator=cascade", "~dag.filter", "dag.shard.after=[align]"], "dag.annotate: a cascade repeats the chain"),
])
def test_a_bad_cascade_is_one_line_naming_its_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        compose_plan(overrides)
    assert str(caught.value).startswith(message), caught.value


# --- the escalate node ----------------------------------------------------------------------------------


def _scores(format_ok: bool) -> dict:
    return {"format_ok": format_ok, "num_claims": 0, "mean_iou": None, "min_iou": None, "answer_ok": None, "claims": [],
            "verify": None, "problems": [] if format_ok else ["missing_section: no <think>"], "num_matched": 0,
            "answer_pred": "B", "answer_score": 1.0, "times": []}


def test_escalate_keeps_exactly_the_rows_the_filter_rejects(tmp_path):
    records = [make_record(i, task="general_free", scores=_scores(i % 3 != 0)) for i in range(9)]
    plan = compose_plan(TWO_TIERS)
    kept = FilterStage(plan.nodes["filter_t1"].config).process(to_table(records),
                                                               unit_context(tmp_path, stage="filter_t1"))
    escalated = FilterStage(plan.nodes["escalate_t1"].config).process(to_table(records),
                                                                       unit_context(tmp_path, stage="escalate_t1"))
    kept_ids, escalated_ids = kept.table.column("id").to_pylist(), escalated.table.column("id").to_pylist()
    assert set(escalated_ids) == {r.id for r in kept.rejections} == {records[i]["id"] for i in (0, 3, 6)}
    assert sorted(kept_ids + escalated_ids) == sorted(r["id"] for r in records)
    assert escalated.rejections == []  # the filter of the tier ledgers the reasons, once


# --- real builds ----------------------------------------------------------------------------------------

BUILD = ["source.num_videos=2", "source.records_per_partition=1", "cluster.num_cpus=2"]


def _tiers(*entries: str) -> list[str]:
    return ["annotator=cascade", f"annotator.tiers=[{', '.join(entries)}]"]


def _openai_tier(url: str, model: str, **extra: object) -> str:
    """A tier on the test server at `url`. Each tier names its own model: the response cache keys on the
    model and the request, not the endpoint, so two tiers serving one model name would share answers."""
    settings = {"backend": "openai", "base_url": url, "model": model, "api_key_env": "null", "concurrency": 1,
                "image_max_side": 64, "price": "{input_per_mtok: 2.5, output_per_mtok: 10}", **extra}
    return "{" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}"


def _cost(run: Path) -> dict:
    plan = json.loads((run / "plan.json").read_text())["nodes"]
    return cost_summary(pafs.LocalFileSystem(), str(run), plan, len(_dataset_rows(run)))


def _dataset_rows(run: Path) -> list[dict]:
    import pandas as pd

    frames = [pd.read_parquet(path) for path in sorted((run / "dataset").glob("*/*.parquet"))]
    return [row for frame in frames for row in frame.to_dict("records")]


def _sampled_ids(run: Path) -> set[str]:
    return {r["id"] for r in node_rows(run, "sample")}


@pytest.mark.slow
def test_the_tiny_model_then_the_template_every_record_written_by_tier_2(tmp_path, tiny_model_dir, ray_tmp):
    run = tmp_path / "run"
    tiny = f"{{backend: transformers, model: {tiny_model_dir}, max_new_tokens: 24, image_max_side: 112}}"
    code, out = run_stgr("build", "--run", str(run), *BUILD, f"cluster.temp_dir={ray_tmp}",
                         *_tiers(tiny, "{backend: template}"), timeout=900)
    assert code == 0, out[-3000:]
    ids = _sampled_ids(run)
    rows = _dataset_rows(run)
    assert len(ids) > 0 and {r["id"] for r in rows} == ids
    assert {(r["provenance"]["tier"], r["provenance"]["annotator"]) for r in rows} == {(2, "template")}
    # tier 1 wrote garbage: its filter rejected every record (ledgered), escalate passed them all on
    assert {r["id"] for r in ledger_rows(run, "filter_t1")} == ids
    assert {r["id"] for r in node_rows(run, "escalate_t1")} == ids
    assert all(r["stage"] == "filter_t1" and r["reason"] for r in ledger_rows(run, "filter_t1"))
    assert ledger_rows(run, "filter_t2") == []
    # the manifest's yield: every record kept once, none rejected, though tier 1's rule counts stay
    manifest = json.loads((run / "dataset" / "manifest.json").read_text())
    (synthetic,) = manifest["yield"]["sources"]
    assert (synthetic["kept"], synthetic["rejected"]) == (len(ids), 0)
    assert sum(r["records"] for r in manifest["yield"]["rules"] if r["stage"] == "filter_t1") >= len(ids)

    # the cost ledger: tier 1's calls and the tokens its processor counted, per tier and in total
    records = [json.loads(text) for path, text in commit_records(run).items() if "/annotate_t1/" in path]
    tier1 = [r["cost"] for r in records]
    assert sum(c["calls"] for c in tier1) == len(ids) and all(c["tier"] == "1" for c in tier1)
    cost = _cost(run)
    assert cost["tiers"]["1"]["calls"] == len(ids) and cost["tiers"]["1"]["backend"] == "transformers"
    assert cost["tiers"]["1"]["input_tokens"] == sum(c["input_tokens"] for c in tier1) > 0
    assert cost["tiers"]["1"]["output_tokens"] == sum(c["output_tokens"] for c in tier1) > 0
    assert (cost["tiers"]["1"]["records"], cost["tiers"]["1"]["kept"]) == (len(ids), 0)
    second = cost["tiers"]["2"]
    assert (second["records"], second["kept"], second["yield"]) == (len(ids), len(ids), 1.0)
    assert cost["input_tokens"] == cost["tiers"]["1"]["input_tokens"]  # the template counts none

    code, status = run_stgr("status", str(run))
    assert code == 0, status
    shown = {line.split()[0]: line.split() for line in status.splitlines()[2:] if line.split()}
    for node in TIER_NODES:
        assert shown[node][1] == "2/2", status
    assert shown["filter_t1"][5] == "0" and shown["escalate_t1"][5] == str(len(ids))
    code, inspected = run_stgr("inspect", str(run))
    assert code == 0, inspected
    assert f"rows: {len(ids)}" in inspected and "filter_t1" in inspected


def _traces(run: Path, overrides: list[str]) -> dict[str, str]:
    """Prompt -> what the template annotator wrote for that record in the build at `run` (`_template_build`):
    a correct trace (it passes align and filter), replayed by the test servers as a strong model's."""
    stage = AnnotateStage(compose_plan(overrides).nodes["annotate_t1"].config)
    return {stage.request_for(row, None).prompt: row["response"] for row in node_rows(run, "annotate")}


def _template_build(run: Path, ray_tmp: str) -> None:
    """The default build first: the cascade reuses its source and sample units, whose records the
    servers' correct traces are written for."""
    code, out = run_stgr("build", "--run", str(run), *BUILD, f"cluster.temp_dir={ray_tmp}", timeout=600)
    assert code == 0, out[-3000:]


@pytest.mark.slow
def test_a_tier_1_that_answers_correctly_leaves_tier_2_uncalled(tmp_path, tiny_model_dir, ray_tmp):
    run = tmp_path / "run"
    _template_build(run, ray_tmp)

    def answer(request: ChatRequest) -> str:
        return traces.get(request.prompt, "no trace for this prompt")

    with TinyModelServer(str(tiny_model_dir), answer=answer) as first, \
            TinyModelServer(str(tiny_model_dir), answer=answer) as strong:
        overrides = [*BUILD, f"cluster.temp_dir={ray_tmp}",
                     *_tiers(_openai_tier(first.url, "small"), _openai_tier(strong.url, "strong"))]
        traces = _traces(run, overrides)
        code, out = run_stgr("build", "--run", str(run), *overrides, timeout=600)
        assert code == 0, out[-3000:]
    ids = _sampled_ids(run)
    assert sum(first.delivered.values()) == len(traces) == len(ids) > 0
    assert sum(strong.calls.values()) == 0, "tier 2 was called although tier 1's traces all passed"
    rows = _dataset_rows(run)
    assert {r["id"] for r in rows} == ids and {r["provenance"]["tier"] for r in rows} == {1}
    assert node_rows(run, "escalate_t1") == [] and ledger_rows(run, "filter_t1") == []
    cost = _cost(run)
    assert (cost["tiers"]["1"]["calls"], cost["tiers"]["2"]["calls"], cost["tiers"]["2"]["records"]) == (len(ids), 0, 0)
    assert cost["tiers"]["1"]["input_tokens"] == sum(u["prompt_tokens"] for u in first.usage)
    # tier 2 answered nothing: a strong-only build is estimated at tier 1's token counts, same price
    assert cost["strong_only"]["basis"] == "tokens"
    assert cost["strong_only"]["usd"] == pytest.approx(cost["tiers"]["1"]["usd"])
    card = "\n".join(cost_section(cost))  # the dataset card's cost section, per tier
    assert f"| 1 | openai | small@main | {len(ids)} | {len(ids)} | 100.0% | {len(ids)} |" in card
    assert "| 2 | openai | strong@main | 0 | 0 | - | 0 |" in card
    assert f"With tier 2 alone this build would have cost about {usd_text(cost['strong_only']['usd'])}" in card


class Gate:
    """A test server's answers: garbage for tier 1; correct traces for tier 2, except that once `open_for`
    have been answered the next request waits (`held` is set) until `drop` makes it fail unanswered,
    and from then on every request is answered."""

    def __init__(self, open_for: int) -> None:
        self.open_for, self.answered = open_for, 0
        self.held, self.dropped = threading.Event(), threading.Event()
        self.traces: dict[str, str] = {}
        self.lock = threading.Lock()

    def answer(self, request: ChatRequest) -> str:
        with self.lock:
            hold = not self.dropped.is_set() and self.answered >= self.open_for
            self.answered += 0 if hold else 1
        if hold:
            self.held.set()
            self.dropped.wait()
            raise ConnectionAbortedError("the build was killed while this request waited")
        return self.traces.get(request.prompt, "no trace for this prompt")


@pytest.mark.slow
def test_killed_during_tier_2_and_resumed_no_call_is_answered_twice(tmp_path, tiny_model_dir, ray_tmp):
    run = tmp_path / "run"
    _template_build(run, ray_tmp)
    gate = Gate(open_for=3)
    with TinyModelServer(str(tiny_model_dir), answer=lambda request: "garbage, no trace") as first, \
            TinyModelServer(str(tiny_model_dir), answer=gate.answer) as strong:
        # one request per batch: each answer is cached before the next request is sent
        overrides = [*BUILD, f"cluster.temp_dir={ray_tmp}", "annotator.batch_size=1", "annotator.num_cpus=0.5",
                     *_tiers(_openai_tier(first.url, "small"), _openai_tier(strong.url, "strong", timeout_s=600))]
        gate.traces = _traces(run, overrides)
        proc = stgr("build", "--run", str(run), *overrides)
        deadline = time.monotonic() + 600
        while not gate.held.is_set() or not _all_committed(run, "annotate_t1"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "tier 2 never reached its fourth request"
            time.sleep(0.05)
        kill_session(proc)
        gate.dropped.set()
        while first.in_flight or strong.in_flight:
            time.sleep(0.05)
        assert sum(strong.delivered.values()) == 3

        code, out = run_stgr("resume", str(run), timeout=900)
        assert code == 0, out[-3000:]
    ids = _sampled_ids(run)
    for server in (first, strong):
        assert sum(server.delivered.values()) == len(ids) > 0
        assert set(server.delivered.values()) == {1}, "a request was answered twice"
    rows = _dataset_rows(run)
    assert {r["id"] for r in rows} == ids and {r["provenance"]["tier"] for r in rows} == {2}
    assert {r["id"] for r in ledger_rows(run, "filter_t1")} == ids  # tier 1's rejections stay in the ledger
    cost = _cost(run)
    # tier 2's ledger counts each call once: the 3 answered before the kill as recovered (this unit paid)
    second = cost["tiers"]["2"]
    assert (second["calls"], second["recovered"], second["cached"]) == (len(ids), 3, 0)
    assert cost["tiers"]["1"]["calls"] == len(ids)


def _all_committed(run: Path, node: str) -> bool:
    """Whether every unit of `node` in the run's plan has its commit record."""
    try:
        info = json.loads((run / "plan.json").read_text())["nodes"][node]
    except (FileNotFoundError, ValueError):
        return False
    return all((run / Unit(node, info["fingerprint"], p).record).exists() for p in range(info["partitions"]))
