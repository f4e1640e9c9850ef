"""`stgr view`: the page of a real build opened in a real headless Chromium, and its escaping.

The browser test builds the default DAG on the synthetic source with real `stgr build` (real local
Ray), with filter thresholds that reject some records, serves the page with `stgr view --serve` and
drives Debian's Chromium (/usr/bin/chromium, which .ci/run installs) with Playwright: no console
error, no request leaves the page's own server, one article per dataset row, one gallery section per
ledger rule with its pictures, working filters, a non-blank screenshot. Expectations come from the
run's own Parquet files, not from the code under test.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from pipeline.cli import main
from stages.commands._records import locate
from stages.commands.show import iou_colour
from stages.commands.view import css_colour, trace_segments, write_site
from stages.lib.schema import to_table
from tests.engine_util import ledger_rows, run_stgr, stgr
from tests.record_factory import FINGERPRINTS, build_run, make_record

CHROMIUM = Path("/usr/bin/chromium")
# --headless comes from Playwright's headless=True; the rest keep Chromium off the network and quiet
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
# general_mcq answers score at most 1, so every general_mcq record fails answer_agrees; the synthetic
# traces' claim IoUs lie around 0.99, so claim_iou at 0.99 rejects some of the others
# Loads the lazy images now and resolves once each has loaded or failed (page.evaluate is not subject
# to the page's Content-Security-Policy; Playwright's wait_for_function is, and the page forbids eval)
LOAD_ALL_IMAGES = """() => Promise.all(Array.from(document.images).map(function (image) {
  image.loading = "eager";
  return image.complete ? null : new Promise(function (done) {
    image.addEventListener("load", done); image.addEventListener("error", done);
  });
}))"""
REJECT_SOME = ["filter.rules.answer_agrees.threshold.general_mcq=1.01", "filter.rules.claim_iou.threshold=0.99"]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("view") / "run"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        code, out = run_stgr("build", "--run", str(run), "source.num_videos=4", "source.records_per_partition=4",
                             "cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}", *REJECT_SOME)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, out[-3000:]
    return run


def dataset_rows(run: Path) -> list[dict]:
    """Every row of every Parquet file under dataset/, whatever its layout of folders."""
    return [row for path in sorted((run / "dataset").rglob("*.parquet"))
            for row in pq.read_table(path, columns=["id", "task", "split", "source"]).to_pylist()]


def ledger_rules(run: Path) -> Counter:
    plan = json.loads((run / "plan.json").read_text())
    return Counter((node, r["rule"]) for node in plan["nodes"] for r in ledger_rows(run, node))


def _serve(run: Path) -> tuple[subprocess.Popen, str, str]:
    """Start `stgr view RUN --serve --port 0`; its written-page line and the URL it serves at."""
    proc = stgr("view", str(run), "--serve", "--port", "0")
    written = proc.stdout.readline()
    serving = proc.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+/) ", serving)
    if match is None:
        proc.kill()
        raise AssertionError(f"stgr view --serve printed {written!r} {serving!r} {proc.communicate()[0]!r}")
    return proc, written, match.group(1)


def test_page_in_headless_chromium(build: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package; .ci/run installs it with apt-get)")
    from playwright.sync_api import sync_playwright

    rows = dataset_rows(build)
    rules = ledger_rules(build)
    assert rows and rules, "the build must keep some records and reject others"
    proc, written, base = _serve(build)
    try:
        assert written.strip() == f"{build / 'view' / 'index.html'}: {len(rows)} records, {len(rules)} ledger rule(s) in the reject gallery"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000})
            try:
                page = browser.new_page()
                problems: list[str] = []
                requested: list[str] = []
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
                page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
                page.on("request", lambda r: requested.append(r.url))

                page.goto(base + "index.html")
                page.evaluate(LOAD_ALL_IMAGES)
                assert page.locator("article.record").count() == len(rows)
                assert page.locator("#shown").inner_text() == str(len(rows))
                assert page.evaluate("Array.from(document.images).filter(function (i) { return i.naturalWidth === 0; }).length") == 0
                assert page.locator("article.record img").count() >= len(rows)

                sections = page.locator("#rejected section.rule")
                assert sections.count() == len(rules)
                headings = sorted(sections.locator("h3").all_inner_texts())
                assert headings == sorted(f"filter / {rule}: {n} rejected" for (_, rule), n in rules.items())
                for k in range(sections.count()):
                    assert sections.nth(k).locator(".card img").count() >= 1  # the rejected records, drawn

                task, count = Counter(r["task"] for r in rows).most_common(1)[0]
                page.select_option("select[data-filter=task]", task)
                assert page.locator("#shown").inner_text() == str(count)
                assert page.locator("article.record:visible").count() == count
                page.select_option("select[data-filter=task]", "")

                shot = tmp_path / "view.png"
                page.screenshot(path=str(shot), full_page=True)
                image = Image.open(shot).convert("RGB")
                assert image.height > 1000 and max(ImageStat.Stat(image).var) > 100  # not blank
                assert len(image.getcolors(maxcolors=1 << 24)) > 100

                # the same page straight from disk
                page.goto((build / "view" / "index.html").as_uri())
                assert page.locator("article.record").count() == len(rows)
            finally:
                browser.close()
        assert problems == []
        assert requested and all(url.startswith((base, "file://")) for url in requested), requested
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out  # Ctrl-C ends the server cleanly


def test_rewrites_its_own_folder_and_refuses_others(build: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "page"
    assert main(["view", str(build), "--out", str(out), "--max-records", "2", "--max-frames", "1"]) == 0
    assert f"{out / 'index.html'}: 2 of {len(dataset_rows(build))} records" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert page.count('<article class="record"') == 2 and "raise --max-records to see all" in page
    assert main(["view", str(build), "--out", str(out), "--examples", "0"]) == 0  # replaces the previous page
    assert (out / "index.html").read_text().count('<article class="record"') == len(dataset_rows(build))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["view", str(build), "--out", str(foreign)]) == 2
    assert "holds files stgr view did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def test_record_text_is_escaped_and_a_bad_record_is_a_note(tmp_path: Path) -> None:
    hostile = "<script>alert('q')</script>"
    record = make_record(0, with_jpeg=True, source='syn"the<b>tic', question=hostile,
                         options=["<img src=x onerror=alert(1)>", "B"], answer="</dd><script>alert(2)</script>",
                         response="<think>see <b onmouseover=alert(3)>this</b> <script>alert(4)</script></think>"
                                  "<answer><iframe src=//example.com></iframe></answer>")
    unreadable = make_record(1, with_jpeg=False)  # no embedded JPEG, and its video /data/video0001.mp4 does not exist
    path = tmp_path / "records.parquet"
    pq.write_table(to_table([record, unreadable]), path)
    out = tmp_path / "page"
    write_site(locate(str(path)), str(out), max_records=10, max_frames=2, examples=3)
    page = (out / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#39;q&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;iframe" in page
    parser = _Tags()
    parser.feed(page)
    assert [tag for tag, _ in parser.tags].count("script") == 1  # the page's own, allowed by its hash only
    assert not [(tag, name) for tag, attrs in parser.tags for name, _ in attrs if name.startswith("on")]
    assert "iframe" not in [tag for tag, _ in parser.tags]
    assert ("data-source", 'syn"the<b>tic') in [a for tag, attrs in parser.tags if tag == "article" for a in attrs]
    assert "frames unavailable:" in page and page.count('<article class="record"') == 2


def test_trace_boxes_and_gallery_take_the_claims_scores(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fates = build_run(run, n=6)
    # record 0 cites the red circle 0.4 to the right of the truth (IoU 0) and the blue square exactly (IoU 1)
    aligned = locate(str(run / "stages" / "align" / FINGERPRINTS["align"])).record(fates["records"][0]["id"])
    pieces = trace_segments(aligned["response"], aligned["scores"]["claims"])
    boxes = [p for p in pieces if p["kind"] == "box"]
    names = [p for p in pieces if p["kind"] == "obj"]
    assert [b["colour"] for b in boxes] == [css_colour(iou_colour(0.0)), css_colour(iou_colour(1.0))]
    assert [n["colour"] for n in names] == [b["colour"] for b in boxes]
    assert [b["score"] for b in boxes] == ["0.00", "1.00"]

    ledger = locate(str(run)).ledger().to_pylist()
    rules = Counter(row["rule"] for row in ledger)
    assert {row["id"] for row in ledger} == set(fates["rejected"])
    out = tmp_path / "page"
    counts = write_site(locate(str(run)), str(out), max_records=100, max_frames=2, examples=10)
    assert (counts["records"], counts["total"], counts["rules"]) == (len(fates["kept"]), len(fates["kept"]), len(rules))
    page = (out / "index.html").read_text()
    for rule, n in rules.items():
        assert f"filter / {rule}: {n} rejected" in page
    gallery = page.split('<section id="rejected">')[1]
    assert gallery.count('<div class="card">') == len(ledger)
    assert gallery.count("<img ") >= len(ledger)  # each found in align's output and drawn
