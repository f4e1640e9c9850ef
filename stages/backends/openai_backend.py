"""`openai`: any OpenAI-compatible chat-completions endpoint (`vllm serve`, `transformers serve`,
Gemini's OpenAI-compatible API, hosted providers).

Frames go as base64 `data:image/jpeg` URLs, each after its `Frame k at t s:` label, in
`stages.lib.chat`'s layout (the one training renders). Requests run concurrently up to
`concurrency` per actor (an asyncio semaphore over one pooled httpx client).
429, 5xx, timeouts and dropped connections are retried with exponential backoff and jitter,
honouring `Retry-After`; 401 and 403 refuse the key itself, so `AuthenticationFailed` is raised and
the unit fails with one message; other 4xx mean the request itself is bad and come back as a
non-retryable `RequestFailed` (that record goes to the ledger). Transient trouble that outlasts `max_retries`
comes back as a retryable `RequestFailed`: the annotate stage caches every other response first,
then fails the unit so the engine retries it (paying only for the missing calls).

Token counts for the cost ledger are the endpoint's own: `usage.prompt_tokens` and
`usage.completion_tokens` of each answer (`response_usage`); an answer without them is unmetered.

The API key is read from the environment variable named by `api_key_env` when the backend is built
(on the worker, which the build hands the value to: pipeline.redact); the key is never part of the
config, which is stored in the run directory, and is cut out of every error text the backend makes
(an endpoint may echo the key in its error bodies).
"""
from __future__ import annotations

import asyncio
import base64
import os
import random
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.redact import Secrets, scrub
from pipeline.settings import setting
from stages.backends import AuthenticationFailed, ModelConfig, PerRequestBackend, RequestFailed, register_backend
from stages.lib.chat import ChatRequest, frames_content
from stages.lib.cost import Usage

#: HTTP statuses worth another try: rate limits, overload, gateway trouble, request timeouts.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: HTTP statuses that refuse the credentials, whatever the request.
AUTH_STATUS = frozenset({401, 403})


def chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The chat-completions request body: system text, then the frames in `stages.lib.chat`'s layout
    (each label and its `LABEL_END`, the image, `IMAGE_END`), then the prompt. A served model thus
    sees the text around its images that training rendered and the other backends send."""
    images = iter(request.images)
    content = [part if part["type"] == "text" else
               {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                   + base64.b64encode(next(images).jpeg).decode("ascii")}}
               for part in frames_content([image.label for image in request.images], request.prompt)]
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": request.max_new_tokens,
                            "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
    body.update(dict(request.extra))
    return body


def completion_text(data: Any) -> str:
    """The text of the first choice; content given as a list of parts is joined. Raises ValueError."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"response has no choices[0].message.content ({exc!r})") from None
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, expected text")
    return content


def response_usage(data: Any, images: int) -> Usage:
    """The tokens an endpoint says one answer used (`usage.prompt_tokens`, `usage.completion_tokens`);
    unmetered (0 tokens) when it says nothing readable: the ledger never guesses a bill."""
    usage = data.get("usage") if isinstance(data, dict) else None
    counts = [usage.get(k) if isinstance(usage, dict) else None for k in ("prompt_tokens", "completion_tokens")]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return Usage(images=images, metered=False)
    return Usage(input_tokens=counts[0], output_tokens=counts[1], images=images)


@register_backend
class OpenAIBackend(PerRequestBackend):
    """Chat completions over HTTP (see the module docstring)."""

    name = "openai"

    @dataclass(kw_only=True)
    class Config(ModelConfig):
        base_url: str = setting("http://127.0.0.1:8000/v1", "the endpoint, up to /chat/completions")
        api_key_env: str | None = setting("OPENAI_API_KEY", "the environment variable that holds the API key (the "
                                          "key never enters the config); null: an endpoint without a key",
                                          run=True, env=True)
        concurrency: int = setting(8, "requests in flight at once, per actor", run=True, ge=1)
        timeout_s: float = setting(120, "seconds per request before it counts as a timeout (and is retried)",
                                   run=True, gt=0)
        max_retries: int = setting(6, "retries after the first try, on 429, 5xx, timeouts and dropped "
                                   "connections (a Retry-After header is honoured)", run=True, ge=0)
        backoff_s: float = setting(1.0, "the first retry's wait; it doubles up to max_backoff_s, with jitter",
                                   run=True, ge=0)
        max_backoff_s: float = setting(60.0, "the longest wait between two tries", run=True, ge=0)

    cfg: Config

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.base_url = self.cfg.base_url.rstrip("/")
        self.model = self.cfg.model
        self.headers = {"Content-Type": "application/json"}
        key_env = self.cfg.api_key_env
        self.key_env = str(key_env) if key_env else None
        self.secrets = Secrets()
        if key_env:
            key = os.environ.get(str(key_env))
            if not key:
                raise ValueError(f"api_key_env: the environment variable {key_env} is not set on this "
                                 "worker (set it, or api_key_env=null for an endpoint without a key)")
            self.headers["Authorization"] = f"Bearer {key}"
            self.secrets = Secrets({str(key_env): key})
        self.concurrency, self.timeout_s = self.cfg.concurrency, self.cfg.timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = self.cfg.max_retries, self.cfg.backoff_s, self.cfg.max_backoff_s

    def generate_each(self, requests: Sequence[ChatRequest]) -> list[str | RequestFailed]:
        coroutine = self._generate_all(list(requests))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            answers = asyncio.run(coroutine)
        else:
            # Called from inside an event loop (a notebook, an async actor): run ours on its own thread.
            box: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: box.update(result=asyncio.run(coroutine)))
            thread.start()
            thread.join()
            answers = box["result"]
        self.last_usage = [usage for _, usage in answers]
        return [result for result, _ in answers]

    async def _generate_all(self, requests: list[ChatRequest]) -> list[tuple[str | RequestFailed, Usage]]:
        import httpx

        semaphore = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, limits=limits,
                                     timeout=httpx.Timeout(self.timeout_s)) as client:
            tasks = [asyncio.ensure_future(self._one(client, semaphore, r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            except AuthenticationFailed:
                for task in tasks:  # nothing more is sent with a refused key
                    task.cancel()
                raise

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter (half to full step), at least what Retry-After asks."""
        step = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        delay = step * random.uniform(0.5, 1.0)
        if retry_after:
            try:
                delay = max(delay, min(self.max_backoff_s, float(retry_after)))
            except ValueError:
                pass
        return delay

    def _refused(self, status: int, body: str) -> str:
        """The one line of an authentication failure: which endpoint, which key variable, what it said."""
        key = f"the key in api_key_env ({self.key_env})" if self.key_env else "no key (api_key_env is null)"
        return (f"authentication failed: {self.base_url}/chat/completions answered HTTP {status} to {key}; "
                f"every request would be refused, so the unit fails: {scrub(body[:300], self.secrets)}")

    async def _one(self, client: Any, semaphore: asyncio.Semaphore,
                   request: ChatRequest) -> tuple[str | RequestFailed, Usage]:
        """The answer to one request, and what the endpoint said it used (0 tokens for a request it
        refused or never answered: an endpoint bills answers)."""
        import httpx

        body = chat_body(request, str(self.model))
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            async with semaphore:
                try:
                    response = await client.post("/chat/completions", json=body)
                except httpx.TimeoutException as exc:
                    last = f"timeout after {self.timeout_s:g} s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    last = f"connection error: {type(exc).__name__}: {exc}"
                else:
                    status = response.status_code
                    if status == 200:
                        try:
                            data = response.json()
                            return completion_text(data), response_usage(data, len(request.images))
                        except ValueError as exc:
                            last = f"HTTP 200 with an unreadable body: {exc}"
                    elif status in AUTH_STATUS:
                        raise AuthenticationFailed(self._refused(status, response.text))
                    elif status in RETRY_STATUS or status >= 500:
                        last = f"HTTP {status}: {scrub(response.text[:300], self.secrets)}"
                        retry_after = response.headers.get("retry-after")
                    else:
                        return RequestFailed(f"HTTP {status} from {self.base_url}/chat/completions: "
                                             f"{scrub(response.text[:500], self.secrets)}",
                                             retryable=False), Usage(images=len(request.images))
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt, retry_after))
        return RequestFailed(f"{self.base_url}/chat/completions: gave up after {self.max_retries + 1} attempts; "
                             f"last: {last}", retryable=True), Usage(images=len(request.images))
