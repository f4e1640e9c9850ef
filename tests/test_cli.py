"""A CLI that says what happened: real `stgr` processes on real local Ray, small synthetic builds.

Two builds: one complete build that keeps some records and rejects others (its summary, a resume
that starts no Ray, `status --json` into a closed pipe, `show` and `export` on it), and one that is
interrupted with SIGINT as a terminal's Ctrl-C would (to the whole process group), then planned with
`--dry-run` and resumed; it rejects every record, so it also gives the empty dataset that training
refuses. Expectations are read from the run directories themselves (commit records, Parquet files,
the ledger), never from the code under test. Each input error is one line and exit 2.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.cli import make_parser
from pipeline.rundir import RunDir, Unit, is_committed
from tests.engine_util import ledger_rows, run_stgr, stgr

# every general_mcq answer scores at most 1, so each general_mcq record fails answer_agrees
REJECT_GENERAL_MCQ = "filter.rules.answer_agrees.threshold.general_mcq=1.01"
# six partitions (31 units), every record failing format_valid (more than -1 problems): an empty dataset
INTERRUPTED_BUILD = ["source.num_videos=6", "source.records_per_partition=1", "cluster.num_cpus=2",
                     "filter.rules.format_valid.threshold=-1", "shard.allow_empty=true"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> tuple[Path, str]:
    """A complete build of 2 partitions (13 units: shard runs per partition, publish once) and its output."""
    run = tmp_path_factory.mktemp("cli") / "run"
    code, out = run_stgr("build", "--run", str(run), "source.num_videos=2", "source.records_per_partition=1",
                         "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}", REJECT_GENERAL_MCQ)
    assert code == 0, out[-3000:]
    return run, out


def committed(run: Path) -> dict[str, tuple[int, int]]:
    """node -> (units committed, partitions), from plan.json and the commit records."""
    plan = json.loads((run / "plan.json").read_text())
    rundir = RunDir.open(str(run))
    return {node: (sum(is_committed(rundir, Unit(node, info["fingerprint"], p)) for p in range(info["partitions"])),
                   info["partitions"]) for node, info in plan["nodes"].items()}


def dataset_rows(run: Path) -> list[dict]:
    return [row for path in sorted((run / "dataset").rglob("*.parquet"))
            for row in pq.read_table(path, columns=["id", "task", "split"]).to_pylist()]


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def assert_one_line_exit_2(code: int, out: str, *expected: str) -> None:
    lines = error_lines(out)
    assert code == 2, out[-3000:]
    assert len(lines) == 1 and lines[0].startswith("stgr: error: "), out[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]


# -- the end of a build ------------------------------------------------------------------------------


def test_a_build_ends_with_a_summary_and_where_to_look_next(built: tuple[Path, str]) -> None:
    run, out = built
    lines = out.splitlines()
    assert re.search(rf"^{re.escape(str(run))}: 13 unit\(s\) committed, 0 reused, 0 failed, 0 blocked in [\d.]+ s$",
                     out, re.M), out[-3000:]
    rows = dataset_rows(run)
    start = lines.index(f"dataset {run}/dataset: {len(rows)} rows")
    for folder in sorted(p for p in (run / "dataset").iterdir() if p.is_dir()):
        frame = [r for path in folder.glob("*.parquet") for r in pq.read_table(path, columns=["task"]).to_pylist()]
        [line] = [line for line in lines[start:] if line.startswith(f"  {folder.name}")]
        assert f": {len(frame)} rows" in line
        for task, n in Counter(r["task"] for r in frame).items():
            assert f"{task} {n}" in line
    plan = json.loads((run / "plan.json").read_text())
    rules = Counter(f"{node}/{r['rule']}" for node in plan["nodes"] for r in ledger_rows(run, node))
    [(top, count)] = rules.most_common(1)
    assert top == "filter/answer_agrees" and count > 0
    assert f"top rules: {top} {count}" in lines[start + 3]
    assert lines[-1] == (f"next: `stgr view {run}` to look through it, `stgr inspect {run}` for counts and "
                         f"rejections, `stgr status {run}` per stage")
    assert "Traceback" not in out


def test_resume_of_a_complete_run_starts_no_ray(built: tuple[Path, str], ray_tmp: str) -> None:
    run, _ = built
    sessions = set(os.listdir(ray_tmp))
    code, out = run_stgr("resume", str(run))
    assert code == 0, out[-3000:]
    assert set(os.listdir(ray_tmp)) == sessions  # the stored config points Ray's session files here
    assert "Started a local Ray instance" not in out and "(Ray not started)" in out
    assert re.search(r": 0 unit\(s\) committed, 13 reused, 0 failed, 0 blocked in ", out)
    assert f"dataset {run}/dataset: {len(dataset_rows(run))} rows" in out.splitlines()


def test_status_json_into_a_closed_pipe_ends_quietly(built: tuple[Path, str]) -> None:
    """As `stgr status --json DIR | head -1` when head has gone: no BrokenPipeError, SIGPIPE's exit code."""
    run, _ = built
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", "--json", str(run)], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr
    code, out = run_stgr("status", "--json", str(run))
    assert code == 0 and json.loads(out)["complete"] is True


# -- show and export on the build --------------------------------------------------------------------


def test_show_draws_a_legend_and_explains_an_id_that_is_not_there(built: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = built
    rows = dataset_rows(run)
    record_id = next(r["id"] for r in rows if r["task"] == "spatio_temporal")
    code, out = run_stgr("show", str(run), "--id", record_id, "--out", str(tmp_path / "r.html"))
    assert code == 0, out[-3000:]
    page = (tmp_path / "r.html").read_text()
    assert "<h3>Legend</h3>" in page and "thin white box: ground truth" in page
    code, out = run_stgr("show", str(run), "--id", record_id, "--out", str(tmp_path / "r.png"))
    assert code == 0 and Image.open(tmp_path / "r.png").size[0] > 0

    plan = json.loads((run / "plan.json").read_text())
    rejected_ids = sorted({r["id"] for r in ledger_rows(run, "filter")} - {r["id"] for r in rows})
    assert rejected_ids
    rejected = rejected_ids[0]
    code, out = run_stgr("show", str(run), "--id", rejected, "--out", str(tmp_path / "x.png"))
    align = run / "stages" / "align" / plan["nodes"]["align"]["fingerprint"]
    assert_one_line_exit_2(code, out, f"record '{rejected}' was rejected by filter/answer_agrees",
                           f"`stgr show {align} --id {rejected} --out FILE`")
    code, out = run_stgr("show", str(align), "--id", rejected, "--out", str(tmp_path / "x.png"))
    assert code == 0, out[-3000:]  # the command the message gives draws it

    code, out = run_stgr("show", str(run), "--id", "no-such-id", "--out", str(tmp_path / "y.png"))
    assert_one_line_exit_2(code, out, f"no record with id 'no-such-id' among its {len(rows)} records",
                           sorted(r["id"] for r in rows)[0], f"`stgr view {run}`")
    assert not (tmp_path / "y.png").exists()


def test_show_writes_times_as_the_trace_does_and_keeps_labels_inside() -> None:
    from PIL import ImageDraw

    from stages.commands.show import _font, _label, chosen_frames, frame_title

    # a temporal trace cites times only; the frames drawn are the sampled ones nearest to them
    record = {"frames": [{"t_s": t, "index": i} for i, t in enumerate([2.66933, 3.637, 4.137, 12.512, 13.013])],
              "reasoning": "It starts around <t>3.47</t>s and is over by <t>12.98</t>s.", "key_frames": []}
    assert chosen_frames(record, 8) == [3.637, 13.013]
    assert frame_title(3.637, [3.47]) == "3.64 s (trace: 3.47 s)"
    assert frame_title(2.5, [2.5]) == "2.5 s"

    # a claim's label at a box near the right edge is moved left, whole, not cut off
    image = Image.new("RGB", (300, 60))
    draw = ImageDraw.Draw(image)
    text = "blue circle that was yellow 0.99"
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font(12))  # the letters, without their outline
    assert right - left < image.width - 20
    _label(draw, (290.0, 30.0), text, (255, 0, 0), image.size)
    columns = [x for x in range(image.width) if any(image.getpixel((x, y))[0] > 128 for y in range(image.height))]
    assert columns[-1] < image.width - 1 and columns[-1] - columns[0] + 1 >= right - left - 2


def test_open_o3_export_writes_relative_video_paths(built: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = built
    for media in ("relative", "copy", "link"):
        out = tmp_path / media
        code, printed = run_stgr("export", str(run), "--format", "open-o3", "--out", str(out), "--media", media)
        assert code == 0, printed[-3000:]
        entries = [e for name in ("STGR-SFT.json", "STGR-RL.json") if (out / name).exists()
                   for e in json.loads((out / name).read_text())]
        assert len(entries) == len(dataset_rows(run))
        for entry in entries:
            path = entry["video_path"]
            assert not os.path.isabs(path) and (out / path).is_file(), path
            if media == "relative":
                assert (out / path).resolve().is_relative_to(run.resolve())
            else:
                assert path.startswith("videos/") and (out / path).is_symlink() == (media == "link")


# -- Ctrl-C, the plan of a half-built run, resume; the empty dataset it leaves ------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, ray_tmp: str) -> tuple[Path, str, int, dict]:
    """A build stopped by SIGINT to its process group (as Ctrl-C in a terminal) once a unit committed;
    its output, exit code and what was committed when it had ended."""
    run = tmp_path_factory.mktemp("ctrl-c") / "run"
    proc = stgr("build", "--run", str(run), *INTERRUPTED_BUILD, f"cluster.temp_dir={ray_tmp}")
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "plan.json").exists() and any(d for d, _ in committed(run).values()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return run, out, proc.returncode, committed(run)


@pytest.fixture(scope="module")
def resumed(interrupted: tuple[Path, str, int, dict]) -> dict:
    """`resume --dry-run` and a `build --dry-run` with a changed rule on the half-built run, then `resume`."""
    run = interrupted[0]
    found = {"before": committed(run), "files": sorted(p.name for p in run.rglob("*") if p.is_file())}
    found["dry_run"] = run_stgr("resume", str(run), "--dry-run")
    found["files_after_dry_run"] = sorted(p.name for p in run.rglob("*") if p.is_file())
    found["changed"] = run_stgr("build", "--run", str(run), "--dry-run", *INTERRUPTED_BUILD,
                                "filter.rules.claim_iou.threshold=0.9")
    found["resume"] = run_stgr("resume", str(run))
    return found


def test_ctrl_c_says_what_committed_and_how_to_resume(interrupted: tuple[Path, str, int, dict]) -> None:
    run, out, code, done = interrupted
    assert code == 130, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    [line] = [line for line in out.splitlines() if "interrupted" in line]
    stages = ", ".join(f"{node} {d}/{t}" for node, (d, t) in done.items())
    total = sum(t for _, t in done.values())
    assert line == (f"stgr: interrupted: {sum(d for d, _ in done.values())} of {total} units committed ({stages}); "
                    f"`stgr resume {run}` continues from there")
    assert 0 < sum(d for d, _ in done.values()) < total


def test_dry_run_of_a_half_built_run_says_what_would_rerun_and_resume_completes(resumed: dict,
                                                                                interrupted: tuple) -> None:
    run, before = interrupted[0], resumed["before"]
    code, out = resumed["dry_run"]
    assert code == 0, out[-3000:]
    assert resumed["files_after_dry_run"] == resumed["files"]  # nothing written
    assert "Started a local Ray instance" not in out
    table = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split()[0] in before}
    for node, (done, partitions) in before.items():
        _, _, units, reused, to_run, *why = table[node]
        assert (int(units), int(reused), int(to_run)) == (partitions, done, partitions - done), table[node]
        assert ("all committed" if done == partitions else "not committed: part-") in " ".join(why)
    rerun = sum(t - d for d, t in before.values())
    assert out.splitlines()[-1] == (f"{sum(d for d, _ in before.values())} of {sum(t for _, t in before.values())} "
                                    f"units would be reused, {rerun} would run")

    code, out = resumed["changed"]
    assert code == 0, out[-3000:]
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "rerun: new fingerprint" in rows["filter"] and "rerun: new fingerprint" in rows["shard"]
    assert "rerun" not in rows["align"]  # a changed rule leaves the stages before filter alone

    code, out = resumed["resume"]
    assert code == 0, out[-3000:]
    assert all(d == t for d, t in committed(run).values())
    assert re.search(rf"{re.escape(str(run))}: {rerun} unit\(s\) committed, ", out)
    assert dataset_rows(run) == []


# -- one line and exit 2 ----------------------------------------------------------------------------


def test_an_unknown_override_names_the_closest_key(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = run_stgr("build", "--run", str(run), "source.num_vidoes=8")
    assert_one_line_exit_2(code, out, "unknown key 'source.num_vidoes' (did you mean source.num_videos?)")
    assert "+source" not in out and not run.exists()
    code, out = run_stgr("build", "--run", str(run), "+source.num_vidoes=8")  # Hydra's old hint, followed
    assert_one_line_exit_2(code, out, "did you mean source.num_videos?")
    code, out = run_stgr("build", "--run", str(run), "filter.rules.claim_iuo.threshold=0.3")
    assert_one_line_exit_2(code, out, "(did you mean filter.rules.claim_iou.threshold?)")
    code, out = run_stgr("build", "--run", str(run), "source=synthtic")
    assert_one_line_exit_2(code, out, "source=synthtic: no such option (did you mean source=synthetic?)")
    assert not run.exists()


def test_print_config_prints_the_resolved_config_and_builds_nothing(tmp_path: Path) -> None:
    from pipeline.config import compose_plan

    code, out = run_stgr("build", "--print-config", "source.num_videos=3", "annotator.seed=7")
    assert code == 0, out[-3000:]
    printed = yaml.safe_load(out)
    assert printed["source"]["num_videos"] == 3 and printed["annotator"]["seed"] == 7
    assert printed == compose_plan(["source.num_videos=3", "annotator.seed=7"]).config


def test_input_errors_are_one_line_and_exit_2(tmp_path: Path, interrupted: tuple, resumed: dict) -> None:
    empty_run = interrupted[0]  # resumed to completion: 0 rows in each set
    a_file = tmp_path / "a-file"
    a_file.write_text("not a run\n")
    for args in (["build", "--run", str(a_file)], ["status", str(a_file)], ["resume", str(a_file)],
                 ["build", "--run", str(a_file), "--dry-run"]):
        code, out = run_stgr(*args)
        assert_one_line_exit_2(code, out, f"{a_file}: is a file, not a run directory")
    assert a_file.read_text() == "not a run\n"

    tiny = tmp_path / "tiny"
    code, out = run_stgr("tiny-model", str(tiny))
    assert code == 0, out[-3000:]
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}  # an empty cache
    code, out = run_stgr("train", "sft", "--run", str(tmp_path / "t1"), f"data.dir={empty_run}", env=offline)
    assert_one_line_exit_2(code, out, "model.path: Qwen/Qwen2.5-VL-7B-Instruct is neither a local folder nor in "
                                      "the Hugging Face cache")
    code, out = run_stgr("train", "rl", "--run", str(tmp_path / "t2"), f"model.path={tmp_path / 'nowhere'}",
                         f"data.dir={empty_run}", env=offline)
    assert_one_line_exit_2(code, out, f"model.path: {tmp_path / 'nowhere'}: no such checkpoint folder")
    code, out = run_stgr("train", "sft", "--run", str(tmp_path / "t3"), "model=tiny", f"model.path={tiny}",
                         f"data.dir={empty_run}", env=offline)
    assert_one_line_exit_2(code, out, "has no records", f"`stgr inspect {empty_run}`")
    code, out = run_stgr("train", "sft", "--run", str(a_file), "model=tiny", f"model.path={tiny}",
                         f"data.dir={empty_run}", env=offline)
    assert_one_line_exit_2(code, out, f"--run {a_file}: is a file")
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()

    code, out = run_stgr("eval", "--model", str(tiny), "--data", "missing.json", "--out", str(tmp_path / "ev"))
    assert_one_line_exit_2(code, out, "--data missing.json: no such file or directory")
    assert not (tmp_path / "ev").exists()


# -- what the CLI offers ----------------------------------------------------------------------------


def test_every_subcommand_has_a_description() -> None:
    def walk(parser, name: str) -> Iterator[tuple[str, object]]:
        yield name, parser
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")

    found = dict(walk(make_parser(), "stgr"))
    assert {"stgr build", "stgr resume", "stgr status", "stgr list", "stgr train sft", "stgr train rl", "stgr eval",
            "stgr show", "stgr export"} <= set(found)
    assert [name for name, parser in found.items() if len((parser.description or "").strip()) < 40] == []


def test_list_names_what_a_build_can_use() -> None:
    from pipeline.config import CONF_DIR
    from pipeline.registry import STAGES, load_plugins
    from stages.lib.rules import RULES

    load_plugins()
    expected = {"sources": [p.stem for p in (CONF_DIR / "source").glob("*.yaml")],
                "annotators": [p.stem for p in (CONF_DIR / "annotator").glob("*.yaml")],
                "stages": list(STAGES), "rules": list(RULES)}
    for what, names in expected.items():
        code, out = run_stgr("list", what)
        assert code == 0, out[-3000:]
        first_words = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
        assert set(names) <= first_words, (what, out)


def test_progress_counts_only_the_units_to_run_and_gives_an_eta(caplog: pytest.LogCaptureFixture) -> None:
    """One reused unit and three to run: the overall count and the ETA leave the reused one out, on a
    terminal (rich's overall bar) and in a log (one line per committed unit)."""
    import logging

    from pipeline.progress import OVERALL, Progress

    units = [Unit("source", "f", 0), Unit("source", "f", 1), Unit("sample", "g", 0), Unit("sample", "g", 1)]
    for interactive in (True, False):
        with caplog.at_level(logging.INFO, logger="stgr"), Progress({"source": 2, "sample": 2}, interactive) as progress:
            caplog.clear()
            assert progress.eta() is None
            progress.update(units[0], {}, reused=True)
            for unit in units[1:]:
                progress.update(unit, {"rows_in": 1, "rows_out": 1, "rows_rejected": 0, "seconds": 0.1}, reused=False)
                assert progress.eta() is not None
            assert (progress.ran, progress.to_run) == (3, 3) and progress.eta() == 0
            if interactive:
                overall = next(t for t in progress._rich.tasks if t.description == OVERALL)
                assert (overall.completed, overall.total) == (3, 3)
            else:
                lines = [r.getMessage() for r in caplog.records]
                assert len(lines) == 3 and "source part-00001 committed (2/2; 1/3 units to run, ETA " in lines[0]
                assert "(2/2; 3/3 units to run)" in lines[-1]
