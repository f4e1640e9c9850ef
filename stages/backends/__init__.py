"""Model backends shared by `annotate`, `verify` and evaluation: one interface, chosen by name.

A backend turns chat requests (`stages.lib.chat.ChatRequest`: text plus frames labelled with their
times) into completions. The annotator, the verifier and `stgr eval` all go through it, so a model
that works for one works for all. Backends register with `register_backend` (in `BACKENDS`, which
imports every module of this package when first read) and declare their settings as a `Config`
dataclass (`BackendConfig`); heavy libraries are imported in `__init__`/`load`.

What a call costs (`stages.lib.cost`): a backend that can count tokens sets `last_usage`, one
`Usage` per request of its latest call, and says how many GPUs it computes on (`gpus`); every backend
has a `price` setting. The caller (`CostMeter.call`) times the call and prices it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from pipeline.registry import Registry
from pipeline.settings import Settings, setting
from stages.lib.chat import ChatRequest
from stages.lib.cost import PRICE_DEFAULT, Usage, price_problems


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


@dataclass(kw_only=True)
class BackendConfig(Settings):
    """Base of a backend's settings: read from the config block of the stage that uses the backend
    (`annotator`, `verify`) or from evaluation's backend options. A setting that says how requests are
    sent, never what is asked (connections, timeouts, retries), is marked `run`: the stage leaves it
    out of its fingerprint; so is `price`, which says what a call costs, not what it computes."""

    price: dict[str, float] = setting(PRICE_DEFAULT, "USD the cost ledger charges: input_per_mtok and output_per_mtok "
                                                     "per million tokens (API backends), per_gpu_hour per hour of one "
                                                     "GPU (local backends); 0: free", run=True)

    @classmethod
    def problems(cls, config: Mapping[str, Any], owner: str) -> list[str]:
        found = ["api_key: never put a secret in the config (it is stored in the run directory); "
                 "name the environment variable that holds it in api_key_env"] if "api_key" in config else []
        found += super().problems(config, owner)
        price = config.get("price")
        return found + (price_problems(price) if isinstance(price, Mapping) and not found else [])


@dataclass(kw_only=True)
class RequestSettings(BackendConfig):
    """How a backend that runs a model is asked: the size of the frames it is sent (it looks at them,
    `Backend.needs_pixels`) and its extra sampling fields. The stage builds each request with them, so
    they are part of the cache key; a backend that reads neither (the template) has neither to set."""

    image_max_side: int | None = setting(448, "longest side of a frame sent to the model; larger frames are "
                                         "re-encoded (null: as they are). Equal to sample.jpeg_max_side, so "
                                         "the embedded frames go as they are", ge=16)
    jpeg_quality: int = setting(90, "JPEG quality of a re-encoded frame", ge=1, le=100)
    extra: dict[str, Any] = setting({}, "extra sampling fields: an endpoint's request body, generate() or "
                                        "vllm.SamplingParams keywords (e.g. {repetition_penalty: 1.05})")


@dataclass(kw_only=True)
class ModelConfig(RequestSettings):
    """The settings of a backend that runs a model on the frames."""

    model: str = setting(help="the model: a local directory, a hub id already in the local cache, or a served name")
    revision: str | None = setting(None, "part of every cache key: pin it (a commit hash) when `model` is a hub id")


class Backend(ABC):
    """Generates completions for batches of requests. One instance per worker (it holds the model)."""

    name: ClassVar[str] = ""
    #: The backend's settings, built from its config as `self.cfg`.
    Config: ClassVar[type[BackendConfig]] = BackendConfig
    cfg: BackendConfig
    #: False where a response costs nothing to recompute (the template backend): not worth a cache file.
    cacheable: ClassVar[bool] = True
    #: False where the backend never looks at the frames (the template backend): the caller then
    #: sends requests without images and decodes no frame for them.
    needs_pixels: ClassVar[bool] = True
    #: The GPUs the backend computes on (its accelerator-seconds are its calls' wall seconds times
    #: these): 0 for an API or the CPU; a local backend on CUDA sets its own.
    gpus: float = 0.0
    #: One `Usage` per request of the latest `generate`/`generate_each` call, set by a backend that
    #: counts tokens (None: it counted none, and the cost ledger says so).
    last_usage: list[Usage] | None = None

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.cfg = self.Config.from_config(self.config, f"backend '{self.name}'")

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


#: Every backend by name; reading it imports the modules of this package (heavy imports stay lazy).
BACKENDS: Registry[type[Backend]] = Registry("backend", package=__name__, schema="backend")
register_backend = BACKENDS.register


def backend_class(config: Mapping[str, Any], key: str = "backend") -> type[Backend]:
    """The backend class `config['backend']` names; UnknownName naming `key` (the caller's config key,
    `verify.backend`, `judge.backend`) when there is none."""
    return BACKENDS.lookup(config.get("backend"), key)


@dataclass(kw_only=True)
class BackendChoice(Settings):
    """The setting of a stage that runs a backend (annotate, verify): which one. The chosen backend's
    own settings come from the same config block (`backend_parts`)."""

    backend: str = setting(help="the backend that runs the model (stages/backends): template, transformers, "
                                "vllm, openai, replay")


def backend_parts(config: Mapping[str, Any]) -> list[tuple[str, type[Settings]]]:
    """(owner, settings class) of the backend a stage's config block names, for `Stage.config_parts`."""
    cls = backend_class(config)
    return [(f"backend '{cls.name}'", cls.Config)]


def make_backend(config: Mapping[str, Any], key: str = "backend") -> Backend:
    """Build the backend named by `config['backend']` (see `backend_class` for `key`)."""
    return backend_class(config, key)(config)

