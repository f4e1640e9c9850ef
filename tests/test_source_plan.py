"""Sources plan without holding their file (stages/sources/layout.py): the partitions, each read from
where the driver's one streaming pass says it starts, together give exactly the entries of a
whole-file read (`json.load`, Python's text lines: none lost, none twice, same order, same values),
for JSON Lines and for each released JSON layout, on the real fixtures of ../shared/fixtures where
they exist (VidSTG, HC-STVG) and on files written in the published layout where they do not
(V-STaR, ActivityNet Captions, the released STGR json). JSON files are also read one byte at a time
(`layout.CHUNK` = 1), so every entry, key, number and error crosses a chunk boundary somewhere, and
any JSON array or object, and any text, that hypothesis draws partitions as `json.load` and Python's
text lines read it.
A bad line costs its own ledger row only, and the driver's plan of a 10^5-line file keeps a small
fraction of the file in memory (a memory bound, measured with tracemalloc: no timing)."""
from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import InputError
from pipeline.testing import unit_context
from stages.source import SourceStage
from stages.sources import base, get_adapter, layout
from tests.test_stgr_json_released import RELEASED

#: Partition sizes: one entry each, a few, and more than any file here holds.
SIZES = (1, 2, 3, 5, 10**6)


@pytest.fixture(autouse=True)
def fresh_plans() -> Iterator[None]:
    """Each test scans its files itself: no partition starts kept from another test (or chunk size)."""
    base._cached_starts.cache_clear()
    yield
    base._cached_starts.cache_clear()


def read_partitions(adapter: base.Adapter, per_partition: int) -> list[list[tuple[int, Any]]]:
    return [list(adapter.partition(p, per_partition)) for p in range(adapter.num_partitions(per_partition))]


def assert_partitions_are_the_whole_file(adapter: base.Adapter, whole: list[Any]) -> None:
    """For every size: full partitions but the last, positions 0..n-1 once each, the entries of `whole`."""
    for k in SIZES:
        parts = read_partitions(adapter, k)
        assert len(parts) == math.ceil(len(whole) / k)
        assert all(len(part) == k for part in parts[:-1]) and 1 <= len(parts[-1]) <= k
        flat = [item for part in parts for item in part]
        assert [position for position, _ in flat] == list(range(len(whole))), k
        assert [entry for _, entry in flat] == whole, k


def adapter_for(name: str, path: Path, **extra: Any) -> base.Adapter:
    return get_adapter(name)({"annotations": str(path), "video_dir": str(path.parent), **extra})


# -- JSON: the real fixtures, and the published layouts ----------------------------------------------
@pytest.fixture(params=[layout.CHUNK, 1], ids=["chunk-1MiB", "chunk-1B"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(layout, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize(("adapter", "path"), [("vidstg", "vidstg/test_annotations_subset.json"),
                                               ("hcstvg", "hcstvg/test_subset.json")])
def test_real_fixtures_partition_into_exactly_their_entries(fixtures_dir: Path, chunk: int, adapter: str,
                                                             path: str) -> None:
    annotations = fixtures_dir / path
    data = json.loads(annotations.read_text(encoding="utf-8"))
    whole = data if isinstance(data, list) else list(data.items())
    assert len(whole) == {"vidstg": 13, "hcstvg": 2}[adapter]
    assert_partitions_are_the_whole_file(adapter_for(adapter, annotations), whole)


def vstar_entries(fixtures_dir: Path) -> list[dict[str, Any]]:
    """V-STaR entries (`V_STaR_test.json` layout) made from the real VidSTG entries of the same clips,
    alternating its two box layouts (flat and keyed by `<timestamp>_<frame_index>`)."""
    out = []
    for k, e in enumerate(json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())):
        gt, target = e["temporal_gt"], e["subject/objects"][0]["category"]
        corners = {"xmin": 10 + k, "ymin": 20, "xmax": 300, "ymax": 200}
        box = {"timestamp": gt["begin_fid"] / e["fps"], "frame_index": gt["begin_fid"], **corners}
        out.append({"vid": e["vid"], "domain": "Life Record — vlog", "fps": e["fps"], "width": e["width"],
                    "height": e["height"], "frame_count": e["frame_count"], "object": target,
                    "question": (e["questions"] or e["captions"])[0]["description"],
                    "answer": (e["captions"] or e["questions"])[0]["description"],
                    "temporal_question": f"When is the {target} seen?", "spatial_question": f"Where is the {target}?",
                    "timestamps": [gt["begin_fid"] / e["fps"], gt["end_fid"] / e["fps"]],
                    "bboxes": [box] if k % 2 else [{f"{box['timestamp']}_{gt['begin_fid']}": corners}]})
    return out


def activitynet_entries(fixtures_dir: Path) -> dict[str, Any]:
    return {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                              "sentences": ["A young woman is seen standing in a room.", " She then begins dancing."]},
            "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 10.1e0]], "sentences": ["Ein Mann läuft."]},
            "v_nwznKOuZM7w": {"duration": 7e1, "timestamps": [[1, 2]], "sentences": ["人が走る"]}}


PUBLISHED = {"vstar": vstar_entries, "activitynet": activitynet_entries, "stgr_json": lambda _: RELEASED}


@pytest.mark.parametrize("indent", [None, 1], ids=["compact", "indented"])
@pytest.mark.parametrize("adapter", sorted(PUBLISHED))
def test_published_layouts_partition_into_exactly_their_entries(fixtures_dir: Path, tmp_path: Path, chunk: int,
                                                                 adapter: str, indent: int | None) -> None:
    data = PUBLISHED[adapter](fixtures_dir)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False), encoding="utf-8")
    whole = data if isinstance(data, list) else list(data.items())
    assert_partitions_are_the_whole_file(adapter_for(adapter, path), whole)
    stage = SourceStage({"adapter": adapter, "annotations": str(path), "video_dir": str(tmp_path),
                         "records_per_partition": 2})
    results = [stage.process(None, unit_context(tmp_path / "run", stage="source", partition=p))
               for p in range(stage.plan())]
    assert all(r.rejections == [] and r.table.num_rows for r in results)  # well-formed entries of the layout


def test_every_json_value_at_the_top_level_reads_back_as_json_load_reads_it(tmp_path: Path, chunk: int) -> None:
    """Numbers and literals end at no closing mark: one cut by a chunk boundary is read again, whole."""
    values = [12345678901234567890, -1.5e-300, 0, True, False, None, "a \"quoted\" \\ string", [], {},
              {"nested": [1, [2, [3]]], "é": "\u2028"}, 3.141592653589793, -0.0, 1e400]
    path = tmp_path / "values.json"
    path.write_text("[ " + " ,\n\t".join(json.dumps(v, ensure_ascii=False) for v in values) + " ]\n", encoding="utf-8")
    assert_partitions_are_the_whole_file(adapter_for("vstar", path), json.loads(path.read_text(encoding="utf-8")))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(data=st.lists(JSON_VALUES, min_size=1, max_size=8) | st.dictionaries(st.text(max_size=6), JSON_VALUES,
                                                                           min_size=1, max_size=8),
       indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans(), step=st.integers(1, 9),
       per_partition=st.integers(1, 4))
def test_any_json_array_or_object_partitions_as_json_load_reads_it(tmp_path_factory: pytest.TempPathFactory,
                                                                    data: Any, indent: int | None, ascii_only: bool,
                                                                    step: int, per_partition: int) -> None:
    path = tmp_path_factory.mktemp("any") / "data.json"
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    kind = layout.JsonEntries(type(data), "a JSON value")
    original, layout.CHUNK = layout.CHUNK, step
    try:
        scan = kind.scan(str(path), per_partition)
        read = [item for start in scan.starts for item in kind.read(str(path), start, per_partition)]
    finally:
        layout.CHUNK = original
    whole = data if isinstance(data, list) else list(json.loads(path.read_text(encoding="utf-8")).items())
    assert scan.count == len(whole) and read == list(enumerate(whole))


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                              max_size=6) | st.sampled_from(["", " ", "\t", "\u3000", "\x1c", "\x0c"]),
                      min_size=1, max_size=12),
       crlf=st.booleans(), per_partition=st.integers(1, 4))
def test_any_text_partitions_as_its_text_lines(tmp_path_factory: pytest.TempPathFactory, lines: list[str], crlf: bool,
                                               per_partition: int) -> None:
    """Line numbers and texts as Python's text reading gives them, for lines split at `\n` (`\r\n`)."""
    path = tmp_path_factory.mktemp("lines") / "data.txt"
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode("utf-8"))
    kind = layout.Lines()
    scan = kind.scan(str(path), per_partition)
    read = [item for start in scan.starts for item in kind.read(str(path), start, per_partition)]
    whole = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    assert scan.count == len(whole) and [entry for _, entry in read] == whole
    assert [position for position, _ in read] == list(range(len(whole)))


@pytest.mark.parametrize("text", ['[{"vid": "1",', "[1 2]", "[1}", "[1,]", '[{"a": 1}] x', "[\n {\"a\": tru}]",
                                  '{"a": {"b": 1}, "c" 2}', "", "\ufeff[1]"])
def test_a_json_syntax_error_names_the_line_and_column_json_load_names(tmp_path: Path, chunk: int, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(path.read_text(encoding="utf-8"))
    shape = "hcstvg" if text.startswith("{") else "vidstg"
    with pytest.raises(InputError) as error:
        SourceStage({"adapter": shape, "annotations": str(path), "video_dir": str(tmp_path)}).plan()
    assert str(error.value) == (f"{path}: not valid JSON at line {expected.value.lineno}, column "
                                f"{expected.value.colno}: {expected.value.msg}")


def test_a_json_file_that_is_not_utf8_names_the_byte(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "latin1.json"
    head = b'[{"vid": "1"}, {"vid": "caf'
    path.write_bytes(head + b'\xe9"}]')  # é in Latin-1
    with pytest.raises(InputError, match=rf"latin1.json: not UTF-8 text at byte {len(head)}$"):
        SourceStage({"adapter": "vidstg", "annotations": str(path), "video_dir": str(tmp_path)}).plan()


# -- JSON Lines ------------------------------------------------------------------------------------------
def whole_file_lines(path: Path) -> list[tuple[int, str]]:
    """Entries as a whole-file text read gives them: (line number, line) of every non-blank line."""
    with open(path, encoding="utf-8") as handle:
        return [(n, line.removesuffix("\n")) for n, line in enumerate(handle, start=1) if line.strip()]


def jsonl_line(i: int, **extra: Any) -> str:
    return json.dumps({"video": f"clips/{i}.mp4", "task": "temporal", "id": f"r{i}", "answer_span": [i, i + 1.5],
                       **extra}, ensure_ascii=False)


def test_jsonl_partitions_are_the_whole_file_read(tmp_path: Path) -> None:
    """Blank and whitespace-only lines (Unicode spaces too) are no entries, `\\r\\n` ends a line as
    `\\n` does, and byte offsets stay right past multi-byte text."""
    lines = [jsonl_line(0), "", "   \t", jsonl_line(1, question="¿Cuándo? 🎬") + "\r", "\u3000\u00a0",
             jsonl_line(2), "\x0c", jsonl_line(3, question="x" * 5000), jsonl_line(4), "", jsonl_line(5)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # the last line without its newline
    whole = whole_file_lines(path)
    assert [n for n, _ in whole] == [1, 4, 6, 8, 9, 11]
    assert_partitions_are_the_whole_file(adapter_for("jsonl", path), whole)


def test_a_line_longer_than_any_buffer_at_a_partition_boundary(tmp_path: Path) -> None:
    """A 3 MB line ends partition 0 and another starts partition 1: each partition starts at the
    first byte of its first line (just after a newline) and reads each of its lines whole, once."""
    long = "y" * (3 << 20)
    lines = [jsonl_line(0), jsonl_line(1, question=long), jsonl_line(2, question=long + "z"), jsonl_line(3)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    adapter = adapter_for("jsonl", path)
    data = path.read_bytes()
    starts = adapter.starts(2)
    assert [s.position for s in starts] == [0, 2] and [s.line for s in starts] == [1, 3]
    assert starts[1].offset == len("\n".join(lines[:2]).encode()) + 1 and data[starts[1].offset - 1:starts[1].offset] == b"\n"
    assert [entry[1] for _, entry in adapter.partition(0, 2)] == lines[:2]
    assert [entry[1] for _, entry in adapter.partition(1, 2)] == lines[2:]


def test_a_bad_line_costs_its_own_ledger_row_and_no_other_partition(tmp_path: Path) -> None:
    """Lines 5 (not JSON) and 7 (not UTF-8) of 9, three per partition: partitions 1 and 2 each ledger
    their bad line, naming file and line, and every other line of every partition is built."""
    lines = [jsonl_line(i).encode() for i in range(1, 10)]
    lines[4] = b'{"video": "clips/5.mp4", "task": '
    lines[6] = jsonl_line(7, question="café").encode().replace("é".encode(), b"\xe9")  # Latin-1, not UTF-8
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stage = SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(tmp_path),
                         "records_per_partition": 3})
    assert stage.plan() == 3
    results = [stage.process(None, unit_context(tmp_path / "run", stage="source", partition=p, num_partitions=3))
               for p in range(3)]
    built = [[row["source_id"] for row in result.table.to_pylist()] for result in results]
    assert built == [["r1", "r2", "r3"], ["r4", "r6"], ["r8", "r9"]]
    assert [[(r.rule, r.file, r.record) for r in result.rejections] for result in results] == [
        [], [("malformed_record", str(path), "line 5")], [("malformed_record", str(path), "line 7")]]
    assert "not valid JSON at column" in results[1].rejections[0].reason
    byte = lines[6].index(b"\xe9") + 1
    assert results[2].rejections[0].reason == f"{path}: line 7: not UTF-8 text at byte {byte} of the line"


def test_a_jsonl_file_is_checked_by_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('\n[{"video": "a.mp4"}]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"data.jsonl: line 2, column 1: expected one JSON object per line"):
        SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(tmp_path)}).plan()
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match=r"data.jsonl: the annotation file holds no entries"):
        SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(tmp_path)}).plan()


# -- the driver keeps no entries -----------------------------------------------------------------------
def traced_peak(call: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        value = call()
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_plan_of_a_large_jsonl_keeps_a_small_fraction_of_the_file(tmp_path: Path) -> None:
    """10^5 lines (~16 MB): the plan keeps one Slice per partition (6,250) and reads a line at a
    time (a peak of about 1.2 MB), where holding the entries took more than the file's size."""
    path = tmp_path / "large.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(10**5):
            handle.write(jsonl_line(i, question=f"When does event {i} happen in the video?") + "\n")
    size = path.stat().st_size
    stage = SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(tmp_path),
                         "records_per_partition": 16})
    partitions, peak = traced_peak(stage.plan)
    assert partitions == 6250
    assert peak < size / 10, f"plan() peak {peak} bytes for a {size}-byte file"


def test_plan_of_a_large_json_array_holds_neither_the_text_nor_the_entries(fixtures_dir: Path, tmp_path: Path) -> None:
    """A VidSTG-format array of 26,000 entries (the fixture's 13, repeated; ~23 MB): the plan's peak
    is a few chunks of bytes and text (`layout.CHUNK`, 1 MiB) and one entry, whatever the file's size
    (`json.load` would hold the text and, several times larger, every entry)."""
    entries = json.loads((fixtures_dir / "vidstg" / "test_annotations_subset.json").read_text())
    path = tmp_path / "vidstg_large.json"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for copy in range(2000):
            handle.write(",\n".join(json.dumps({**e, "vid": f"{copy:06d}{e['vid']}"}, indent=1) for e in entries))
            handle.write(",\n" if copy < 1999 else "\n]\n")
    size = path.stat().st_size
    stage = SourceStage({"adapter": "vidstg", "annotations": str(path), "video_dir": str(tmp_path),
                         "records_per_partition": 16})
    partitions, peak = traced_peak(stage.plan)
    assert partitions == math.ceil(26000 / 16)
    assert size > 20 * layout.CHUNK and peak < 6 * layout.CHUNK, f"plan() peak {peak} bytes for a {size}-byte file"


def test_a_task_given_its_start_by_the_plan_reads_its_slice_without_scanning(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's one scan hands each partition's start to its unit (`partition_specs` ->
    `UnitContext.spec`): a worker that never scanned the file builds its partition from there."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(jsonl_line(i) + "\n" for i in range(1, 8)))
    stage = SourceStage({"adapter": "jsonl", "annotations": str(path), "video_dir": str(tmp_path),
                         "records_per_partition": 3})
    specs = stage.partition_specs()
    assert specs is not None and len(specs) == stage.plan() == 3
    base._cached_starts.cache_clear()  # a worker process: nothing planned there

    def no_scan(*args: Any) -> None:
        raise AssertionError("a task scanned the annotation file")

    monkeypatch.setattr(layout.Lines, "scan", no_scan)
    built = [[row["source_id"] for row in stage.process(None, unit_context(
        tmp_path / "run", stage="source", partition=p, num_partitions=3, spec=specs[p])).table.to_pylist()]
        for p in range(3)]
    assert built == [["r1", "r2", "r3"], ["r4", "r5", "r6"], ["r7"]]
