"""The `openai` backend against a real HTTP endpoint on 127.0.0.1 that serves the tiny Qwen2.5-VL.

`TinyModelServer` is a real OpenAI-compatible chat-completions server (stdlib HTTP, JSON, base64
images) whose completions come from the tiny model through transformers `generate`. It counts every
call, and can fail a share of them with 500s, 429s and timeouts (hanging past the client's timeout),
chosen per request body and attempt, so the tests can check at the server that every record is
annotated exactly once: nothing lost, nothing paid for twice. Each answer reports its `usage` as an
endpoint does (the tiny model's token counts; `answer`'s own texts by `words_usage`), kept in `usage`
so the cost ledger can be held to what the endpoint billed.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from pipeline.testing import unit_context
from stages.annotate import AnnotateStage
from stages.backends import AuthenticationFailed, RequestFailed, make_backend
from stages.lib.chat import IMAGE_END, LABEL_END, ChatRequest, LabelledImage, content_text, frames_content
from stages.lib.media import FrameReader
from stages.lib.response_cache import ResponseCache
from stages.lib.schema import frame_image, to_table
from tests.test_annotate import annotator_config, jpeg, seed_record

MAX_NEW_TOKENS = 12


def words_usage(request: ChatRequest, text: str) -> dict[str, int]:
    """The usage the server bills for an answer it did not generate: words, and 64 tokens per image."""
    prompt = f"{request.system or ''} {request.prompt}"
    return {"prompt_tokens": len(prompt.split()) + 64 * len(request.images), "completion_tokens": len(text.split())}


def request_from_body(body: dict[str, Any]) -> ChatRequest:
    """The server side of `chat_body`: OpenAI messages back into a ChatRequest (labels, JPEGs, prompt).

    The text before each image, less `LABEL_END`, is its label; the text part right after an image must
    be `IMAGE_END`; the rest is the prompt. Raises ValueError (the server answers 400) unless the user
    turn is exactly `stages.lib.chat`'s layout of what was read back, so a backend that drifts
    from the layout training renders fails every request here."""
    system = None
    labels, jpegs, text, content = [], [], "", []
    for message in body["messages"]:
        if message["role"] == "system":
            system = message["content"]
            continue
        content = message["content"]
    after_image = False
    for part in content:
        if part["type"] == "image_url":
            labels.append(text.removesuffix(LABEL_END))
            jpegs.append(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
            text, after_image = "", True
        elif after_image and part["text"] == IMAGE_END:
            after_image = False
        else:
            text += part["text"]
    received = [{"type": "image"} if part["type"] == "image_url" else part for part in content]
    if received != frames_content(labels, text):
        raise ValueError(f"user turn is not in stages.lib.chat's layout: {received!r}")
    return ChatRequest(prompt=text, images=tuple(LabelledImage(j, label) for j, label in zip(jpegs, labels)),
                       system=system, max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                       top_p=body["top_p"], seed=body["seed"])


class TinyModelServer:
    """POST /v1/chat/completions answered by the tiny model. `fail(body_sha, attempt, body)` may return
    an HTTP status to answer with ("500", "429", ...), "timeout" (hang past the client's timeout) or
    None (answer normally). Counts calls per body, and successful answers per body; keeps the bodies
    it answers (`bodies`) and the usage it reports (`usage`), and answers 400 to a body not in
    `stages.lib.chat`'s layout. `answer(request)` (e.g. a correct trace) replaces the model's text."""

    def __init__(self, model_dir: str, fail: Callable[[str, int, dict[str, Any]], str | None] | None = None,
                 api_key: str | None = None, client_timeout_s: float = 8.0, hang_s: float = 9.0,
                 delay_s: float = 0.0, answer: Callable[[ChatRequest], str] | None = None) -> None:
        self.backend = make_backend({"backend": "transformers", "model": str(model_dir)})
        self.fail = fail
        self.api_key = api_key
        self.client_timeout_s = client_timeout_s
        self.hang_s = hang_s
        self.delay_s = delay_s
        self.answer = answer
        self.usage: list[dict[str, int]] = []
        self.lock = threading.Lock()
        self.generate_lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.delivered: collections.Counter[str] = collections.Counter()
        self.modes: collections.Counter[str] = collections.Counter()
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return
                key = hashlib.sha256(raw).hexdigest()
                with server.lock:
                    server.calls[key] += 1
                    attempt = server.calls[key]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    body = json.loads(raw)
                    mode = server.fail(key, attempt, body) if server.fail else None
                    with server.lock:
                        server.modes[mode or "ok"] += 1
                    if mode == "timeout":
                        # Hang past the client's timeout. Just before it gives up, stop counting the
                        # request as in flight: the client's concurrency limit covers what it waits on.
                        time.sleep(server.client_timeout_s - 0.5)
                        with server.lock:
                            server.in_flight -= 1
                            counted = False
                        time.sleep(server.hang_s - server.client_timeout_s + 0.5)
                        self._send(504, {"error": {"message": "too late"}})
                    elif mode is not None:
                        headers = {"Retry-After": "0"} if mode == "429" else {}
                        self._send(int(mode), {"error": {"message": f"injected HTTP {mode}"}}, headers)
                    else:
                        try:
                            request = request_from_body(body)
                        except ValueError as exc:
                            self._send(400, {"error": {"message": str(exc)}})
                            return
                        with server.lock:
                            server.bodies.append(body)
                        time.sleep(server.delay_s)
                        if server.answer is not None:
                            text = server.answer(request)
                            usage = words_usage(request, text)
                        else:
                            with server.generate_lock:
                                text = server.backend.generate([request])[0]
                                (used,) = server.backend.last_usage
                            usage = {"prompt_tokens": used.input_tokens, "completion_tokens": used.output_tokens}
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        with server.lock:
                            server.delivered[key] += 1
                            server.usage.append(usage)
                        self._send(200, {"id": f"chatcmpl-{key[:12]}", "object": "chat.completion",
                                         "model": body["model"], "usage": usage,
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}]})
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "TinyModelServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_config(url: str, **overrides: Any) -> dict[str, Any]:
    settings = dict(base_url=url, model="tiny-qwen", api_key_env=None, concurrency=4, timeout_s=30, max_retries=4,
                    backoff_s=0.05, max_backoff_s=0.2, max_new_tokens=MAX_NEW_TOKENS, batch_size=16, image_max_side=64)
    return annotator_config("openai", **{**settings, **overrides})


def distinct_records(n: int) -> list[dict[str, Any]]:
    """Records whose frames differ, so every one is a distinct request (no shared cache key)."""
    tasks = ["spatio_temporal", "temporal", "spatial"]
    out = []
    for i in range(n):
        record = seed_record(f"r{i:02d}", tasks[i % 3])
        record["frames"] = [dict(f, image=frame_image(jpeg(1000 * i + k))) for k, f in enumerate(record["frames"][:3])]
        out.append(record)
    return out


def test_annotate_through_a_real_local_endpoint_and_never_pays_twice(tmp_path, tiny_model_dir):
    records = distinct_records(6)
    with TinyModelServer(str(tiny_model_dir)) as server:
        stage = AnnotateStage(openai_config(server.url))
        ctx = unit_context(tmp_path, stage="annotate")
        result = stage.process(to_table(records), ctx)
        assert result.rejections == []
        rows = result.table.to_pylist()
        assert sorted(r["id"] for r in rows) == [r["id"] for r in records]
        assert sum(server.calls.values()) == 6 and set(server.delivered.values()) == {1}
        # what came back over HTTP is what the tiny model writes for exactly this request locally
        local = make_backend({"backend": "transformers", "model": str(tiny_model_dir)})
        request = stage.request_for(records[0], FrameReader(64))
        row0 = next(r for r in rows if r["id"] == records[0]["id"])
        assert row0["response"] == local.generate([request])[0]
        # ... sent in stages.lib.chat's layout: `label image` pairs, one a line, then the prompt
        (body,) = [b for b in server.bodies if request_from_body(b).images == request.images]
        shown = "".join(part["text"] if part["type"] == "text" else "<image>"
                        for part in body["messages"][-1]["content"])
        labels = [image.label for image in request.images]
        assert labels[0] == "Frame 1 at 0.5 s:"
        assert shown.startswith(f"{labels[0]} <image>\n{labels[1]} <image>\n{labels[2]} <image>\n")
        assert shown == content_text(frames_content(labels, request.prompt), "<image>")
        assert row0["provenance"]["annotator"] == "openai"
        assert row0["provenance"]["model"] == "tiny-qwen@main"
        # a resumed unit (new stage instance, same run directory) answers from the cache
        again = AnnotateStage(openai_config(server.url)).process(to_table(records), ctx)
        assert sum(server.calls.values()) == 6
        assert sorted(again.table.column("response").to_pylist()) == sorted(r["response"] for r in rows)
    assert len(ResponseCache.for_run(ctx.filesystem, ctx.run_path)) == 6


def test_flaky_endpoint_every_record_exactly_once(tmp_path, tiny_model_dir):
    modes = ["500", "429", "timeout", None]

    def fail(key: str, attempt: int, body: dict) -> str | None:
        # first tries: a quarter each of 500, 429, timeout, success; second tries: a third fail again
        if attempt == 1:
            return modes[int(key[:8], 16) % 4]
        if attempt == 2 and int(key[8:16], 16) % 3 == 0:
            return "503" if int(key[:8], 16) % 2 else "500"
        return None

    records = distinct_records(12)
    # the client waits 8 s; a hung request holds its slot 9 s (normal answers take well under 1 s each)
    with TinyModelServer(str(tiny_model_dir), fail=fail, client_timeout_s=8.0, hang_s=9.0) as server:
        result = AnnotateStage(openai_config(server.url, timeout_s=8)).process(to_table(records), unit_context(tmp_path))
    assert result.rejections == []
    ids = result.table.column("id").to_pylist()
    assert sorted(ids) == [r["id"] for r in records] and len(set(ids)) == len(ids)
    assert len(server.calls) == 12                    # one distinct request per record
    assert set(server.delivered.values()) == {1}      # each answered successfully exactly once
    assert sum(server.calls.values()) > 12            # ... after retries
    assert server.modes["500"] and server.modes["429"] and server.modes["timeout"]
    assert server.max_in_flight <= 4                  # the concurrency limit held


def test_persistent_failures_fail_the_unit_after_caching_the_rest(tmp_path, tiny_model_dir):
    records = distinct_records(6)
    doomed = set()

    def fail(key: str, attempt: int, body: dict) -> str | None:
        if int(key[:8], 16) % 3 == 0 or key in doomed:
            doomed.add(key)
            return "500"
        return None

    ctx = unit_context(tmp_path)
    with TinyModelServer(str(tiny_model_dir), fail=fail) as server:
        with pytest.raises(RuntimeError, match=r"still failing after retries .* completed ones are cached"):
            AnnotateStage(openai_config(server.url, max_retries=2)).process(to_table(records), ctx)
        assert doomed and all(server.calls[k] == 3 for k in doomed)
        paid = sum(server.delivered.values())
        assert paid == 6 - len(doomed)
    with TinyModelServer(str(tiny_model_dir)) as healthy:
        result = AnnotateStage(openai_config(healthy.url)).process(to_table(records), ctx)
    assert result.table.num_rows == 6
    assert sum(healthy.calls.values()) == len(doomed)  # only the calls never paid for


def test_api_key_comes_from_the_named_env_var_a_wrong_key_fails_and_bad_requests_go_to_the_ledger(tmp_path, tiny_model_dir, monkeypatch):
    records = distinct_records(3)  # spatio_temporal, temporal, spatial

    def fail(key: str, attempt: int, body: dict) -> str | None:
        return "400" if "Task: temporal grounding" in body["messages"][-1]["content"][-1]["text"] else None

    with TinyModelServer(str(tiny_model_dir), api_key="sk-test-123", fail=fail) as server:
        config = openai_config(server.url, api_key_env="STGR_TEST_KEY")
        monkeypatch.delenv("STGR_TEST_KEY", raising=False)
        with pytest.raises(ValueError, match="STGR_TEST_KEY is not set"):
            make_backend(config)
        monkeypatch.setenv("STGR_TEST_KEY", "sk-wrong")
        # a refused key fails the whole unit with one message (never one ledger row per record)
        with pytest.raises(AuthenticationFailed, match=r"HTTP 401 to the key in api_key_env \(STGR_TEST_KEY\)"):
            AnnotateStage(config).process(to_table(records), unit_context(tmp_path / "a"))
        assert sum(server.calls.values()) == 0  # refused before counting, and never retried

        monkeypatch.setenv("STGR_TEST_KEY", "sk-test-123")
        result = AnnotateStage(config).process(to_table(records), unit_context(tmp_path / "b"))
        assert sorted(result.table.column("id").to_pylist()) == [records[0]["id"], records[2]["id"]]
        (rejection,) = result.rejections
        assert rejection.id == records[1]["id"] and "HTTP 400" in rejection.reason
        assert sum(server.calls.values()) == 3
        assert "sk-test-123" not in json.dumps(config)


def test_backend_reports_unrecoverable_and_transient_failures_per_request(tiny_model_dir):
    request = ChatRequest(prompt="hello", images=(LabelledImage(jpeg(1), "Frame 1 at 0 s:"),), max_new_tokens=4)
    with TinyModelServer(str(tiny_model_dir), fail=lambda key, attempt, body: "429") as server:
        backend = make_backend(openai_config(server.url, max_retries=1))
        (result,) = backend.generate_each([request])
        assert isinstance(result, RequestFailed) and result.retryable
        assert "gave up after 2 attempts" in str(result) and "HTTP 429" in str(result)
        assert sum(server.calls.values()) == 2


def test_how_requests_are_sent_stays_out_of_every_model_stage_fingerprint():
    """The openai backend's own how-to-run settings (marked `run`) leave annotate's and verify's fingerprints
    alone, so moving a build to a faster endpoint reuses its committed units; what is asked does not."""
    from pipeline.fingerprint import stage_fingerprint
    from stages.verify import VerifyStage

    def fingerprint(stage, config):
        return stage_fingerprint(stage.name, stage.version, config, [], stage.excluded_keys(config))

    for stage, config in ((AnnotateStage, openai_config("http://127.0.0.1:1/v1")),
                          (VerifyStage, {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m",
                                         "prompt": "Is this a {object}?"})):
        faster = {**config, "concurrency": 64, "timeout_s": 5.0, "max_retries": 1, "backoff_s": 0.1,
                  "max_backoff_s": 1.0, "batch_size": 32, "api_key_env": "MY_KEY"}
        assert fingerprint(stage, faster) == fingerprint(stage, config)
        assert fingerprint(stage, {**config, "model": "another"}) != fingerprint(stage, config)
