"""The `annotate` stage: a vision-language model writes question, grounded reasoning and answer.

Each record becomes one `ChatRequest`: its sampled frames (JPEG, labelled `Frame k at t s:`), the
task's prompt template from the versioned prompt set (`conf/prompts/`), rendered with the record's
ground truth. The backend (`annotator.backend`: template, transformers, vllm, openai, ...) is built
once per actor in `setup()`. Responses are looked up in, and written to, the run's response cache
(`stages/lib/response_cache.py`) one batch at a time, so a unit killed halfway has paid once for what it
got, and its retry or a resumed build pays only for the rest.

What the stage writes:
- `response`: the backend's raw text, always (align/filter judge it; garbage passes through as text).
- `reasoning`: the `<think>` part of the response (boxes normalised to [0, 1], as the prompt asks:
  the canonical frame); None when there is none.
- `question`, `answer`, `answer_span`: the *ground truth*, never model text. The seed's own values
  are kept; where the seed has none they are written from its ground truth (the question by the
  template phrasebook, the answer as the target span or box), before any model is asked, so every
  backend reasons about the same question and align can compare the model's answer (which stays in
  `response`) with the truth. Multiple-choice and open questions need the source's question,
  options and answer.
- `provenance`: annotator (backend name), model (name@revision), prompt_sha, build_id, and this
  stage's fingerprint added to `stage_fingerprints`.

A record whose frames cannot be read, or whose request the backend can never complete (HTTP 400,
a template task without the ground truth it needs), goes to the ledger; transient backend trouble
that outlasts the backend's retries fails the unit after every other response of the unit has been
sent and cached, and the engine retries the unit (cached calls are free).
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from functools import cached_property
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline.registry import register_stage
from pipeline.stage import Rejection, Stage, StageResult, UnitContext, record_error
from stages.lib import evidence
from stages.backends import Backend, ChatRequest, LabelledImage, RequestFailed, load_backends, make_backend
from stages.backends.template import write_question
from stages.lib.geometry import CANONICAL
from stages.lib.response_cache import ResponseCache
from stages.lib.answers import KINDS, record_answer_kind
from stages.lib.schema import TASKS, to_table

PROMPT_PARTS = ("system", "format", "common", "tasks", "answer_hints")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class PromptSet:
    """A versioned set of Jinja prompt templates (one per task), as found under `annotator.prompts`.

    The templates come from the resolved config (not read from disk on the worker), so the prompt
    text is part of the stage's fingerprint and travels to every node of a cluster with the config.
    """

    def __init__(self, spec: Mapping[str, Any], where: str = "annotator.prompts") -> None:
        from jinja2 import Environment, StrictUndefined, TemplateSyntaxError

        missing = [part for part in PROMPT_PARTS if part not in spec]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (see conf/prompts/v1.yaml)")
        tasks = spec["tasks"]
        absent = [t for t in TASKS if t not in tasks]
        if absent:
            raise ValueError(f"{where}.tasks: no template for task(s) {', '.join(absent)}")
        hints = dict(spec["answer_hints"])
        if "option" in hints and "span" in hints:
            # prompt sets written before the letter-plus-span kind existed compose it from its parts
            hints.setdefault("option_span", f"{hints['option']}, then on the next line {hints['span']}")
        absent_hints = sorted(set(KINDS) - set(hints))
        if absent_hints:
            raise ValueError(f"{where}.answer_hints: no hint for answer kind(s) {', '.join(absent_hints)}")
        self.version = str(spec.get("version", "unversioned"))
        self.spec = dict(spec)
        self.answer_hints = hints
        env = Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
        env.filters["box"] = lambda box: CANONICAL.format_box(box).replace(",", ", ")
        env.filters["sec"] = lambda seconds: f"{float(seconds):.2f}"
        self.templates: dict[str, Any] = {}
        try:
            for key in ("system", "format", "common"):
                self.templates[key] = env.from_string(str(spec[key]))
            for task in TASKS:
                self.templates[f"tasks.{task}"] = env.from_string(str(tasks[task]))
        except TemplateSyntaxError as exc:
            raise ValueError(f"{where}: template syntax error at line {exc.lineno}: {exc.message}") from exc

    def check(self, where: str = "annotator.prompts") -> None:
        """Render every task once on an example record, so a misspelt variable fails at validation
        (StrictUndefined) instead of sending every record of the build to the ledger."""
        from jinja2 import UndefinedError

        frames = [{"t_s": 1.0, "index": 10}, {"t_s": 2.0, "index": 20}]
        gt = {"objects": [{"name": "red circle", "track": [{"t_s": 1.0, "box": [0.1, 0.1, 0.3, 0.3]}]}],
              "spans": [{"label": "the circle moves", "start_s": 1.0, "end_s": 2.0}]}
        for task in TASKS:
            record = {"id": "example", "task": task, "frames": frames, "gt": gt, "question": "Which?",
                      "options": ["A. one", "B. two"], "answer": "A",
                      "media": {"duration_s": 3.0}, "clip": {"start_s": 0.0, "end_s": 3.0}}
            try:
                self.render(task, record_context(record))
            except UndefinedError as exc:
                raise ValueError(f"{where}: task {task}: {exc.message}") from exc

    def sha(self, task: str) -> str:
        """Hash of everything a task's prompt is rendered from: the value stored in provenance."""
        parts = [self.version, str(self.spec["system"]), str(self.spec["format"]), str(self.spec["common"]),
                 str(self.spec["tasks"][task]), json.dumps(self.spec["answer_hints"], sort_keys=True)]
        return _sha("\x1e".join(parts))

    def render(self, task: str, context: Mapping[str, Any]) -> tuple[str, str]:
        """(system text, user prompt) for one record's context."""
        variables = dict(context)
        variables["answer_hint"] = self.answer_hints[context["answer_kind"]]
        variables["response_format"] = self.templates["format"].render(**variables)
        system = self.templates["system"].render(**variables).strip()
        body = self.templates["common"].render(**variables).strip()
        task_text = self.templates[f"tasks.{task}"].render(**variables).strip()
        prompt = f"{body}\n\n{task_text}\n\n{variables['response_format'].strip()}"
        return system, prompt


# --- frames --------------------------------------------------------------------------------------


class FrameReader:
    """JPEG bytes for a record's frames: the embedded `frames[].jpeg`, or decoded with decord.

    The `sample` stage may embed JPEGs (self-contained shards) or only record indices; either way
    the model sees the same pixels. Decoders are kept for the last few videos because a partition
    holds several records (tasks) of the same video in a row.
    """

    def __init__(self, max_side: int | None = None, quality: int = 90, keep_open: int = 2) -> None:
        self.max_side = max_side
        self.quality = quality
        self.keep_open = keep_open
        self._readers: OrderedDict[str, Any] = OrderedDict()

    def _reader(self, uri: str) -> Any:
        import decord

        if uri in self._readers:
            self._readers.move_to_end(uri)
            return self._readers[uri]
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if "://" in path:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path)
            with fs.open_input_file(inner) as handle:
                source: Any = io.BytesIO(handle.read())
        else:
            source = path
        reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        self._readers[uri] = reader
        while len(self._readers) > self.keep_open:
            self._readers.popitem(last=False)
        return reader

    def _encode(self, array: np.ndarray) -> bytes:
        from PIL import Image

        image = Image.fromarray(array)
        if self.max_side and max(image.size) > self.max_side:
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=self.quality)
        return out.getvalue()

    def _fit(self, jpeg: bytes) -> bytes:
        if not self.max_side:
            return jpeg
        from PIL import Image

        with Image.open(io.BytesIO(jpeg)) as image:
            if max(image.size) <= self.max_side:
                return jpeg
            return self._encode(np.asarray(image.convert("RGB")))

    def images(self, record: Mapping[str, Any]) -> list[LabelledImage]:
        """The record's frames in time order, each labelled `Frame k at t s:` (k from 1)."""
        frames = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
        if not frames:
            raise ValueError(f"record {record.get('id')}: field 'frames' is empty; the sample stage "
                             "must choose frames before annotate")
        jpegs: list[bytes | None] = [self._fit(f["jpeg"]) if f.get("jpeg") else None for f in frames]
        todo = [i for i, j in enumerate(jpegs) if j is None]
        if todo:
            uri = (record.get("media") or {}).get("uri")
            if not uri:
                raise ValueError(f"record {record.get('id')}: frames carry no 'jpeg' and field 'media.uri' is empty")
            indices = [frames[i].get("index") for i in todo]
            if any(index is None for index in indices):
                raise ValueError(f"record {record.get('id')}: a frame has neither 'jpeg' nor 'index'")
            reader = self._reader(uri)
            if max(indices) >= len(reader):
                raise ValueError(f"record {record.get('id')}: frame index {max(indices)} is beyond the "
                                 f"{len(reader)} frames of {uri}")
            batch = reader.get_batch(indices).asnumpy()
            for i, array in zip(todo, batch):
                jpegs[i] = self._encode(array)
        return [LabelledImage(jpeg=j, label=f"Frame {k} at {CANONICAL.format_time(f['t_s'])} s:")
                for k, (f, j) in enumerate(zip(frames, jpegs), 1)]


# --- the ground truth the prompt shows --------------------------------------------------------------


def _evidence_from_tracks(objects: Sequence[Mapping[str, Any]], times: np.ndarray, limit: int) -> list[dict[str, Any]]:
    """Ground-truth boxes at the sampled frame times: for each frame, each object whose track has a
    point within half a track step of it. Spread over at most `limit` frames that show something."""
    by_time: dict[float, list[dict[str, Any]]] = {}
    for obj in objects:
        track = sorted(obj.get("track") or [], key=lambda p: p["t_s"])
        if not track:
            continue
        ts = np.array([p["t_s"] for p in track], dtype=float)
        step = float(np.median(np.diff(ts))) if len(ts) > 1 else 0.5
        nearest = np.clip(np.searchsorted(ts, times), 0, len(ts) - 1)
        left = np.clip(nearest - 1, 0, len(ts) - 1)
        pick = np.where(np.abs(ts[left] - times) < np.abs(ts[nearest] - times), left, nearest)
        close = np.abs(ts[pick] - times) <= step / 2 + 1e-9
        for t, idx in zip(times[close], pick[close]):
            by_time.setdefault(float(t), []).append({"name": obj["name"], "box": list(track[idx]["box"])})
    keys = sorted(by_time)
    if len(keys) > limit:
        keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, limit).round().astype(int))]
    return [{"t_s": t, "objects": by_time[t]} for t in keys]


def _target_span(record: Mapping[str, Any], spans: Sequence[Mapping[str, Any]],
                 objects: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """The span a span-answer record is about: the seed's `answer_span`, else the first ground-truth
    event, else the time the first ground-truth object is visible."""
    if record.get("answer_span") is not None:
        return [float(v) for v in record["answer_span"]]
    if spans:
        return [float(spans[0]["start_s"]), float(spans[0]["end_s"])]
    if objects:
        return [float(objects[0]["first_s"]), float(objects[0]["last_s"])]
    return None


def record_context(record: Mapping[str, Any], max_evidence: int = 8) -> dict[str, Any]:
    """The facts of one record a prompt (and the template backend) may use, in canonical units."""
    task = record.get("task")
    if task not in TASKS:
        raise ValueError(f"record {record.get('id')}: field 'task' is {task!r}; expected one of {list(TASKS)}")
    media = record.get("media") or {}
    clip = record.get("clip") or {}
    frames = sorted(record.get("frames") or [], key=lambda f: (f["t_s"], f.get("index") or 0))
    times = np.array([f["t_s"] for f in frames], dtype=float)
    gt = record.get("gt") or {}
    gt_objects = gt.get("objects") or []
    objects = []
    for obj in gt_objects:
        track_times = [p["t_s"] for p in obj.get("track") or []]
        if track_times:
            objects.append({"name": obj["name"], "first_s": min(track_times), "last_s": max(track_times)})
    key_frames = [kf for kf in record.get("key_frames") or [] if kf.get("objects")]
    if key_frames:
        evidence = [{"t_s": kf["t_s"], "objects": [{"name": o["name"], "box": list(o["box"])} for o in kf["objects"]]}
                    for kf in sorted(key_frames, key=lambda kf: kf["t_s"])][:max_evidence]
    else:
        evidence = _evidence_from_tracks(gt_objects, times, max_evidence)
    spans = [{"label": s.get("label") or "", "start_s": s["start_s"], "end_s": s["end_s"]} for s in gt.get("spans") or []]
    duration = media.get("duration_s")
    start = clip.get("start_s") if clip.get("start_s") is not None else (float(times[0]) if len(times) else 0.0)
    end = clip.get("end_s") if clip.get("end_s") is not None else (float(times[-1]) if len(times) else 0.0)
    kind = record_answer_kind(record)
    return {
        "id": record.get("id"),
        "task": task,
        "answer_kind": kind,
        "multiple_choice": kind in ("option", "option_span"),
        "duration_s": float(duration) if duration is not None else float(end),
        "clip_start_s": float(start),
        "clip_end_s": float(end),
        "frames": [{"k": k, "t_s": float(f["t_s"])} for k, f in enumerate(frames, 1)],
        "frame_times": [float(f["t_s"]) for f in frames],
        "frame_indices": [f.get("index") for f in frames],
        "fps": media.get("fps"),
        "num_frames": media.get("num_frames"),
        "question": record.get("question"),
        "options": list(record.get("options") or []),
        "answer": record.get("answer"),
        "answer_span": _target_span(record, spans, objects) if kind in ("span", "option_span") else None,
        "objects": objects,
        "spans": spans,
        "evidence": evidence,
    }


# --- reading a response back ------------------------------------------------------------------------


def target_answer(context: Mapping[str, Any]) -> str | None:
    """The ground-truth answer of a record: the seed's, else what its ground truth determines (the
    target span of a span task, the first evidence box of a spatial task), else None."""
    if context.get("answer") is not None:
        return str(context["answer"])
    kind = context["answer_kind"]
    if kind == "span" and context.get("answer_span") is not None:
        s, e = context["answer_span"]
        return f"[{CANONICAL.format_time(s)}, {CANONICAL.format_time(e)}]"
    if kind == "box" and context.get("evidence"):
        return CANONICAL.format_box(context["evidence"][0]["objects"][0]["box"]).replace(",", ", ")
    return None


def fields_from_response(response: str) -> dict[str, Any]:
    """The columns a response fills: the raw text, and its `<think>` part as `reasoning` (None when
    the model wrote none; align and the ledger read the raw `response`). Never raises on text."""
    return {"response": response, "reasoning": evidence.split_sections(response).think}


# --- the stage -----------------------------------------------------------------------------------------


@register_stage
class AnnotateStage(Stage):
    """Question, grounded reasoning and answer per record, from one backend per actor (see module doc)."""

    name = "annotate"
    env_keys: ClassVar[tuple[str, ...]] = ("api_key_env",)
    version = "1"
    actor = True
    required_keys = ("backend", "prompts")
    key_types: ClassVar[Mapping[str, type | tuple[type, ...]]] = {
        "backend": str, "model": str, "revision": str, "batch_size": int, "max_new_tokens": int,
        "temperature": float, "top_p": float, "seed": int, "image_max_side": int, "max_evidence": int,
        "prompts": dict, "extra": dict,
    }
    # How requests are sent, not what is asked: changing these never changes a response (the cache
    # key has the model, prompt, frames and sampling), so committed units stay valid.
    fingerprint_exclude = Stage.fingerprint_exclude + (
        "batch_size", "concurrency", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "api_key_env")

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> list[str]:
        problems = super().validate_config(config)
        if problems:
            return problems
        if "api_key" in config:
            problems.append("api_key: never put a secret in the config (it is stored in the run directory); "
                            "name the environment variable that holds it in api_key_env")
        known = load_backends()
        if config["backend"] not in known:
            problems.append(f"backend: unknown backend {config['backend']!r}; known: {sorted(known)}")
        try:
            PromptSet(config["prompts"]).check()
        except ValueError as exc:
            problems.append(f"prompts: {exc}")
        batch_size = config.get("batch_size", 8)
        if batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {batch_size}")
        return problems

    def setup(self, ctx: UnitContext) -> None:
        self.backend: Backend = make_backend(self.config)

    @cached_property
    def prompts(self) -> PromptSet:
        return PromptSet(self.config["prompts"])

    def _backend(self, ctx: UnitContext) -> Backend:
        if not hasattr(self, "backend"):
            self.setup(ctx)
        return self.backend

    def request_for(self, record: Mapping[str, Any], frames: FrameReader) -> ChatRequest:
        """The one chat request of a record: frames, prompt, sampling parameters, structured context."""
        context = record_context(record, int(self.config.get("max_evidence", 8)))
        if not context["question"]:
            context["question"] = write_question(context)
        context["answer"] = target_answer(context)
        if context["multiple_choice"] and not context["options"]:
            raise ValueError(f"record {record.get('id')}: field 'options' is empty; a {record['task']} record "
                             "needs the source's options")
        system, prompt = self.prompts.render(record["task"], context)
        return ChatRequest(
            prompt=prompt,
            images=tuple(frames.images(record)),
            system=system,
            max_new_tokens=int(self.config.get("max_new_tokens", 512)),
            temperature=float(self.config.get("temperature", 0.0)),
            top_p=float(self.config.get("top_p", 1.0)),
            seed=int(self.config.get("seed", 0)),
            extra=dict(self.config.get("extra") or {}),
            context=context,
        )

    def process(self, table: pa.Table | None, ctx: UnitContext) -> StageResult:
        backend = self._backend(ctx)
        records = table.to_pylist() if table is not None else []
        frames = FrameReader(self.config.get("image_max_side"), int(self.config.get("jpeg_quality", 90)))
        rejections: list[Rejection] = []
        requests: dict[int, tuple[ChatRequest, str]] = {}
        for i, record in enumerate(records):
            try:
                request = self.request_for(record, frames)
            except Exception as exc:  # noqa: BLE001 - a record that cannot be asked goes to the ledger
                rejections.append(record_error(record, exc))
                continue
            # Non-cacheable backends write from each record's own context: never share a response.
            key = request.cache_key(backend.model_id) if backend.cacheable else f"record-{i}"
            requests[i] = (request, key)

        responses, failed = self._responses(backend, ctx, {key: request for request, key in requests.values()})

        rows = []
        for i, (request, key) in requests.items():
            record = records[i]
            if key in failed:
                rejections.append(Rejection(
                    id=record.get("id"), rule="annotate_request_failed",
                    reason=f"backend {backend.name!r} cannot complete the request: {failed[key]}",
                    error=f"RequestFailed: {failed[key]}", record=record.get("source_id")))
                continue
            row = dict(record)
            row.update(question=request.context["question"], answer=request.context["answer"],
                       answer_span=request.context["answer_span"])
            row.update(fields_from_response(responses[key]))
            provenance = dict(record.get("provenance") or {})
            fingerprints = {p["stage"]: p["fingerprint"] for p in provenance.get("stage_fingerprints") or []}
            fingerprints.update(dict(ctx.fingerprints or {}))
            fingerprints[ctx.stage] = ctx.fingerprint
            provenance.update(
                annotator=backend.name, model=backend.model_id,
                prompt_sha=backend.prompt_sha(self.prompts.sha(record["task"])), build_id=ctx.build_id,
                stage_fingerprints=[{"stage": k, "fingerprint": v} for k, v in sorted(fingerprints.items())],
            )
            row["provenance"] = provenance
            rows.append(row)
        return StageResult(to_table(rows), rejections)

    def _responses(self, backend: Backend, ctx: UnitContext,
                   by_key: Mapping[str, ChatRequest]) -> tuple[dict[str, str], dict[str, RequestFailed]]:
        """Responses by cache key, and the requests that can never succeed: cached ones are read, the
        rest generated `batch_size` at a time, each batch cached before the next is sent.

        Records with the same key (the same question on the same frames) cost one call.
        """
        cache = ResponseCache.for_run(ctx.filesystem, ctx.run_path) if backend.cacheable else None
        responses: dict[str, str] = {}
        if cache is not None:
            responses = {k: entry.response for k, entry in cache.get_many(by_key).items()}
        failed: dict[str, RequestFailed] = {}
        todo = [k for k in by_key if k not in responses]
        batch_size = int(self.config.get("batch_size", 8))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            results = backend.generate_each([by_key[k] for k in chunk])
            if len(results) != len(chunk):
                raise RuntimeError(f"backend {backend.name!r} returned {len(results)} completions for "
                                   f"{len(chunk)} requests")
            for key, result in zip(chunk, results):
                if isinstance(result, RequestFailed):
                    failed[key] = result
                    continue
                if not isinstance(result, str):
                    raise TypeError(f"backend {backend.name!r} returned {type(result).__name__}, expected str")
                if cache is not None:
                    cache.put(key, backend.model_id, result)
                responses[key] = result
        transient = {k: f for k, f in failed.items() if f.retryable}
        if transient:
            first = next(iter(transient.values()))
            raise RuntimeError(f"backend {backend.name!r}: {len(transient)} request(s) still failing after retries "
                               f"(the {len(responses)} completed ones are cached; the unit will be retried): {first}")
        return responses, failed
