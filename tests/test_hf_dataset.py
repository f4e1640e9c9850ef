"""The published dataset is native to Hugging Face `datasets` and to pandas.

Two real `stgr build` runs of the default DAG on the synthetic source (2 and 3 videos, different
seeds; the second also rejects its general_mcq records), both publishing to a folder named `dataset`:

- `load_dataset(DIR, "stgr-cot", split="train")` decodes frames to PIL images; `"stgr-rl"` gives only
  RL rows; the two sets are never merged;
- loaded one after the other with one Hugging Face cache, each build gives its own rows (a card
  whose configs are file globs gave the first build's rows for the second: `datasets` keys its cache
  on the card), also when one build's dataset replaces the other's in the same folder;
- pandas reads the shards (frames as JPEG bytes PIL opens) and a stage's output folder;
- the card: licence, the column table (the same as docs/schema.md's), an example record, counts and
  the yield per source and rule, all agreeing with the run's own files;
- a shard of schema 1.x (`gt`, `clip`, `frames[].jpeg`, splits `sft`/`rl`) still reads, as this schema.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from stages.commands._records import locate
from stages.lib.card import SOURCE_LICENSES
from stages.lib.columns import COLUMNS, column_table, field_type
from stages.lib.schema import IMAGE, RECORD_SCHEMA, SETS, conform, to_table
from tests.engine_util import run_stgr
from tests.record_factory import make_record
from tests.shard_util import publish_records
from tests.storage_util import plan_fingerprint
from train.data import load_records

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
REJECT_MCQ = "filter.rules.answer_agrees.threshold.general_mcq=1.01"  # no answer scores above 1


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two different builds, each in its own run directory whose dataset folder is `dataset`."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    base = tmp_path_factory.mktemp("builds")
    common = ["cluster.num_cpus=2", f"cluster.temp_dir={ray_tmp}"]
    configs = {"a": ["source.num_videos=2", "source.records_per_partition=2"],
               "b": ["source.num_videos=3", "source.records_per_partition=3", "source.seed=1", REJECT_MCQ]}
    runs = {}
    for name, overrides in configs.items():
        runs[name] = base / name / "run"
        code, out = run_stgr("build", "--run", str(runs[name]), *common, *overrides)
        assert code == 0, out[-3000:]
    yield runs
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One Hugging Face datasets cache for the test (as a user's HF_DATASETS_CACHE)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # read by load_dataset at each call
    return cache


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "dataset" / "manifest.json").read_text())


def shard_ids(run: Path, name: str) -> list[str]:
    return sorted(pd.read_parquet(run / "dataset" / name, columns=["id"])["id"])


def test_frames_are_images_and_each_set_is_a_config_of_its_own(builds: dict[str, Path], hf_cache: Path) -> None:
    dataset = builds["a"] / "dataset"
    cot = datasets.load_dataset(str(dataset), "stgr-cot", split="train")
    assert isinstance(cot[0]["frames"][0]["image"], Image.Image)
    assert cot[0]["frames"][0]["image"].size == (320, 240)  # the synthetic source's frame size
    assert cot.features["frames"].feature["image"] == datasets.Image()

    rl = datasets.load_dataset(str(dataset), "stgr-rl")
    assert list(rl) == ["train"]
    assert set(rl["train"]["split"]) == {"stgr-rl"} and len(rl["train"]) == manifest(builds["a"])["splits"]["stgr-rl"]["rows"]
    assert set(cot["split"]) == {"stgr-cot"}
    with pytest.raises(ValueError, match=r"Config name is missing[\s\S]*'stgr-cot', 'stgr-rl'"):
        datasets.load_dataset(str(dataset))  # never one split of both sets

    # the shards carry the features too: a plain Parquet load decodes the frames as well
    plain = datasets.load_dataset("parquet", data_dir=str(dataset / "stgr-rl"), split="train")
    assert isinstance(plain[0]["frames"][0]["image"], Image.Image)


def test_two_builds_loaded_with_one_cache_each_give_their_own_rows(builds: dict[str, Path], hf_cache: Path,
                                                                    tmp_path: Path) -> None:
    a, b = builds["a"], builds["b"]
    assert manifest(a)["rows"] != manifest(b)["rows"], "the builds must differ for this test to mean anything"
    for run in (a, b, a):
        for name in SETS:
            loaded = datasets.load_dataset(str(run / "dataset"), name, split="train")
            assert len(loaded) == manifest(run)["splits"][name]["rows"], (run, name)
            assert sorted(loaded["id"]) == shard_ids(run, name)

    # a rebuild in place: the other build's dataset now sits in the same folder
    same_place = tmp_path / "rebuilt" / "dataset"
    shutil.copytree(a / "dataset", same_place)
    assert len(datasets.load_dataset(str(same_place), "stgr-cot", split="train")) == manifest(a)["splits"]["stgr-cot"]["rows"]
    shutil.rmtree(same_place)
    shutil.copytree(b / "dataset", same_place)
    reloaded = datasets.load_dataset(str(same_place), "stgr-cot", split="train")
    assert sorted(reloaded["id"]) == shard_ids(b, "stgr-cot")


def test_pandas_reads_the_shards_and_a_stage_output_folder(builds: dict[str, Path]) -> None:
    run = builds["a"]
    cot = pd.read_parquet(run / "dataset" / "stgr-cot")
    assert len(cot) == manifest(run)["splits"]["stgr-cot"]["rows"]
    image = cot.frames.iloc[0][0]["image"]
    assert image["path"] is None and Image.open(io.BytesIO(image["bytes"])).size == (320, 240)
    shadowing = [c for c in cot.columns if hasattr(pd.DataFrame, c) or hasattr(pd.Series, c)]
    assert shadowing == [], "a column named like a pandas method is unreachable as row.<name>"
    assert isinstance(cot.iloc[0].ground_truth, dict) and cot.iloc[0].clip_window["end_s"] > 0

    for node in ("source", "align", "filter"):
        frame = pd.read_parquet(run / "stages" / node)  # commit records (`_part-*.json`) are skipped
        units = sorted((run / "stages" / node / plan_fingerprint(run, node)).glob("part-*.parquet"))
        assert len(frame) == sum(pq.read_metadata(u).num_rows for u in units) > 0, node
        visible = [p.name for p in (run / "stages" / node).rglob("*")
                   if p.is_file() and not p.name.endswith(".parquet") and not p.name.startswith(("_", "."))]
        assert visible == [], "a file a Parquet reader would try to read"


def test_the_card_says_licence_columns_example_counts_and_yield(builds: dict[str, Path]) -> None:
    run = builds["b"]
    card = (run / "dataset" / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["license"] == SOURCE_LICENSES["synthetic"][0] == "apache-2.0"
    assert [c["config_name"] for c in meta["configs"]] == list(SETS)
    info = {i["config_name"]: i for i in meta["dataset_info"]}
    for name in SETS:
        assert info[name]["splits"] == [{"name": "train", "num_bytes": manifest(run)["splits"][name]["arrow_bytes"],
                                         "num_examples": manifest(run)["splits"][name]["rows"]}]
        frames = next(f for f in info[name]["features"] if f["name"] == "frames")
        assert {"name": "image", "dtype": "image"} in frames["list"]

    assert column_table() in body
    assert column_table() in (ROOT / "docs" / "schema.md").read_text(), "docs/schema.md must show the card's column table"

    example = json.loads(body.split("## Example record", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0])
    first = min(shard_ids(run, "stgr-cot"))
    assert example["id"] == first and example["split"] == "stgr-cot"
    assert example["frames"][0]["image"]["bytes"].endswith("bytes of JPEG>")

    seeds = len(pd.read_parquet(run / "stages" / "source", columns=["id"]))
    kept = sum(manifest(run)["splits"][name]["rows"] for name in SETS)
    mcq = int((pd.read_parquet(run / "stages" / "align", columns=["task"]).task == "general_mcq").sum())
    assert mcq > 0 and seeds == kept + mcq  # the REJECT_MCQ rule rejects every general_mcq record, nothing else
    assert f"| synthetic | {seeds} | {kept} | {kept / seeds:.1%} | filter/answer_agrees {mcq} |" in body
    assert f"| filter | answer_agrees | {mcq} |" in body
    assert f"| stgr-rl | {manifest(run)['splits']['stgr-rl']['rows']} | " in body


def test_the_licence_comes_from_the_config(tmp_path: Path) -> None:
    records = to_table([make_record(i, source="jsonl") for i in range(4)])
    publish_records(tmp_path / "own", records)
    own = yaml.safe_load((tmp_path / "own" / "dataset" / "README.md").read_text().split("---\n")[1])
    assert own["license"] == "unknown"  # a user's own file: STGR cannot know its licence
    publish_records(tmp_path / "set", records, {"license": "cc-by-nc-4.0"})
    card = (tmp_path / "set" / "dataset" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "cc-by-nc-4.0"
    assert "Set by `shard.license`: `cc-by-nc-4.0`" in card


def test_every_field_of_the_schema_is_in_the_column_table() -> None:
    documented = [c.name for c in COLUMNS]
    assert len(set(documented)) == len(documented)
    for name in documented:
        field_type(name)  # names a real field

    def leaves(data_type: pa.DataType, prefix: str) -> Iterator[str]:
        if data_type == IMAGE or not (pa.types.is_struct(data_type) or pa.types.is_list(data_type)):
            yield prefix
        elif pa.types.is_list(data_type):
            yield from leaves(data_type.value_type, prefix + "[]")
        else:
            for field in data_type:
                yield from leaves(field.type, f"{prefix}.{field.name}" if prefix else field.name)

    def covered(leaf: str) -> bool:
        return any(leaf == name or leaf.startswith((name + ".", name + "[]")) for name in documented)

    assert [leaf for leaf in leaves(pa.struct(list(RECORD_SCHEMA)), "") if not covered(leaf)] == []


def _as_schema_1(table: pa.Table) -> pa.Table:
    """`table` as schema 1.x wrote it: `gt`, `clip`, frames `{t_s, index, jpeg}`, splits `sft`/`rl`."""
    old_frame = pa.struct([("t_s", pa.float64()), ("index", pa.int64()), ("jpeg", pa.binary())])
    frames = [[{"t_s": f["t_s"], "index": f["index"], "jpeg": (f["image"] or {}).get("bytes")} for f in row] if row is not None else None
              for row in table.column("frames").to_pylist()]
    split = pc.replace_substring(pc.replace_substring(table.column("split"), "stgr-cot", "sft"), "stgr-rl", "rl")
    table = table.set_column(table.schema.get_field_index("frames"), "frames", pa.array(frames, pa.list_(old_frame)))
    table = table.set_column(table.schema.get_field_index("split"), "split", split)
    return table.rename_columns([{"ground_truth": "gt", "clip_window": "clip"}.get(n, n) for n in table.column_names])


def test_a_schema_1_dataset_still_reads_as_this_schema(builds: dict[str, Path], tmp_path: Path) -> None:
    shard = sorted((builds["a"] / "dataset" / "stgr-cot").glob("*.parquet"))[0]
    current = pq.read_table(shard).replace_schema_metadata(None)
    old = tmp_path / "old" / "dataset" / "stgr-cot"
    old.mkdir(parents=True)
    pq.write_table(_as_schema_1(current), old / "train-00000-of-00001.parquet")

    assert conform(pq.read_table(old / "train-00000-of-00001.parquet")).to_pylist() == conform(current).to_pylist()
    records = load_records(tmp_path / "old", "stgr-cot")
    assert [r["id"] for r in records] == sorted(current.column("id").to_pylist())
    assert records[0]["frames"][0]["image"]["bytes"][:2] == b"\xff\xd8"  # a JPEG
    assert records[0]["ground_truth"] and records[0]["split"] == "stgr-cot" and "gt" not in records[0]
    rows = locate(str(old / "train-00000-of-00001.parquet")).read().to_pylist()
    assert {r["split"] for r in rows} == {"stgr-cot"} and rows[0]["clip_window"] is not None
