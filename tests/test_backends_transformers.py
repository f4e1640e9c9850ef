"""The `transformers` backend on the tiny Qwen2.5-VL: real processor, real chat template, real generate."""
from __future__ import annotations

import pytest

from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.backends import make_backend
from stages.backends.transformers_backend import chat_messages
from stages.lib.chat import ChatRequest, LabelledImage
from stages.lib.media import FrameReader
from stages.lib.schema import to_table
from tests.test_annotate import annotator_config, jpeg, seed_record


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return make_backend({"backend": "transformers", "model": str(tiny_model_dir), "device": "auto"})


def requests(n: int, frames: int = 3, **kw) -> list[ChatRequest]:
    # prompts of different lengths, so a batch needs padding
    return [ChatRequest(prompt="Where is the red circle? " * (1 + i), system="You annotate videos.",
                        images=tuple(LabelledImage(jpeg(10 * i + k), f"Frame {k} at {0.5 * k:g} s:")
                                     for k in range(1, frames + 1)), max_new_tokens=10, **kw)
            for i in range(n)]


def test_each_frame_follows_its_label_in_the_chat(backend):
    (request,) = requests(1)
    text = backend.processor.apply_chat_template(chat_messages(request), tokenize=False, add_generation_prompt=True)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert f"Frame 1 at 0.5 s: {image}\nFrame 2 at 1 s: {image}\nFrame 3 at 1.5 s: {image}\n" in text
    assert text.index("You annotate videos.") < text.index("Frame 1") < text.index("Where is the red circle?")


def test_batched_generation_equals_one_by_one(backend):
    batch = requests(4)
    together = backend.generate(batch)
    alone = [backend.generate([r])[0] for r in batch]
    assert together == alone
    assert all(isinstance(t, str) for t in together)


def test_requests_with_different_sampling_are_generated_apart_and_returned_in_order(backend):
    greedy = requests(2)
    sampled = requests(2, temperature=0.9, seed=3)
    mixed = [greedy[0], sampled[0], greedy[1], sampled[1]]
    out = backend.generate(mixed)
    assert [out[0], out[2]] == backend.generate(greedy)
    assert [out[1], out[3]] == backend.generate(sampled)  # same seed, same samples


def test_annotate_with_transformers_caches_and_keeps_raw_text(tmp_path, tiny_model_dir):
    config = annotator_config("transformers", model=str(tiny_model_dir), max_new_tokens=10, batch_size=3,
                              image_max_side=96)
    stage = AnnotateStage(config)
    ctx = unit_context(tmp_path, stage="annotate")
    stage.setup(ctx)
    calls = []
    real = stage.backend.generate_each
    stage.backend.generate_each = lambda reqs: calls.append(len(reqs)) or real(reqs)
    records = [seed_record(f"t{i}", ["spatio_temporal", "temporal", "spatial"][i % 3]) for i in range(5)]
    for i, record in enumerate(records):
        record["frames"] = [dict(f, jpeg=jpeg(50 * i + k)) for k, f in enumerate(record["frames"][:3])]
    result = stage.process(to_table(records), ctx)
    assert calls == [3, 2]  # batch_size requests per call, each batch cached before the next
    rows = {r["id"]: r for r in result.table.to_pylist()}
    assert set(rows) == {r["id"] for r in records}
    expected = stage.backend.generate([stage.request_for(records[0], FrameReader(96))])[0]
    assert rows["t0"]["response"] == expected
    assert rows["t0"]["answer_span"] == pytest.approx([1.0, 4.0])  # the truth, whatever the model wrote
    assert rows["t0"]["provenance"]["prompt_sha"] == stage.prompts.sha("spatio_temporal")
    stage.process(to_table(records), ctx)
    assert calls == [3, 2]
