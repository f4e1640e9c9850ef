"""Model backends shared by `annotate`, `verify` and evaluation: one interface, chosen by name.

A backend turns chat requests (`stages.lib.chat.ChatRequest`: text plus frames labelled with their
times) into completions. The annotator, the verifier and `stgr eval` all go through it, so a model
that works for one works for all. Backends register with `register_backend`; heavy libraries are
imported in `__init__`/`load`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

from stages.lib.chat import ChatRequest


class RequestFailed(Exception):
    """A request the backend could not complete, returned in place of its completion by `generate_each`.

    `retryable=False`: the request itself is bad (HTTP 400, no ground truth for the template), and
    retrying will not help: the caller puts that record in the ledger and goes on with the rest.
    `retryable=True`: transient trouble (429, 5xx, timeouts) outlasted the backend's own retries:
    the caller keeps the other results (they are paid for) and then fails the unit, so the engine
    retries it later.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class AuthenticationFailed(RuntimeError):
    """The endpoint refused the credentials (HTTP 401/403). Every other request would be refused the
    same way, so it is raised, not returned: the unit fails with this one message (and is retried,
    then reported), instead of one ledger row per record and an empty dataset."""


class Backend(ABC):
    """Generates completions for batches of requests. One instance per worker (it holds the model)."""

    name: ClassVar[str] = ""
    #: False where a response costs nothing to recompute (the template backend): not worth a cache file.
    cacheable: ClassVar[bool] = True
    #: Config keys that say how requests are sent, never what is asked (connections, timeouts,
    #: retries): a stage that uses this backend leaves them out of its fingerprint.
    run_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    @property
    def model_id(self) -> str:
        """Model name plus revision: part of every cache key."""
        return f"{self.config.get('model', self.name)}@{self.config.get('revision') or 'main'}"

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One completion per request, in order."""

    def generate_each(self, requests: Sequence[ChatRequest]) -> list[str | RequestFailed]:
        """Like `generate`, but a request that can never succeed comes back as its `RequestFailed`
        in place of a completion, so one bad request does not cost the others' (paid) results."""
        return list(self.generate(requests))


    def prompt_sha(self, template_sha: str) -> str:
        """What goes into provenance as `prompt_sha`: the prompt template's hash for backends that
        read the prompt; a backend that writes from `context` alone returns its own version hash."""
        return template_sha

    def close(self) -> None:
        """Release what the backend holds (connections, GPU memory); the default holds nothing."""


class PerRequestBackend(Backend):
    """A backend whose requests succeed or fail one by one: it implements `generate_each`, and
    `generate` raises the first failure."""

    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        out = []
        for result in self.generate_each(requests):
            if isinstance(result, RequestFailed):
                raise result
            out.append(result)
        return out

    @abstractmethod
    def generate_each(self, requests: Sequence[ChatRequest]) -> list[str | RequestFailed]:
        """One completion, or the request's `RequestFailed`, per request, in order."""


BACKENDS: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    BACKENDS[cls.name] = cls
    return cls


def load_backends() -> dict[str, type[Backend]]:
    """Import every module of this package (each registers its backend); heavy imports stay lazy."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)
    return BACKENDS


def run_keys(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The how-to-run keys of the backend `config['backend']` names (none for an unknown name: the
    stage's validation reports that)."""
    backend = load_backends().get(config.get("backend"))
    return backend.run_keys if backend is not None else ()


def make_backend(config: Mapping[str, Any]) -> Backend:
    """Build the backend named by `config['backend']`; the modules of this package self-register."""
    load_backends()
    name = config.get("backend")
    if name not in BACKENDS:
        raise KeyError(f"annotator.backend: unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name](config)

