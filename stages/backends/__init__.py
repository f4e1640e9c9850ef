"""Model backends shared by `annotate`, `verify` and evaluation: one interface, chosen by name.

A backend turns chat requests (text plus frames labelled with their times) into completions. The
annotator, the verifier and `stgr eval` all go through it, so a model that works for one works for
all. Backends register with `register_backend`; heavy libraries are imported in `__init__`/`load`.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, TypeVar


@dataclass(frozen=True)
class LabelledImage:
    """One frame as JPEG bytes, with the text shown just before it (e.g. `Frame 3 at 1.5 s:`)."""

    jpeg: bytes
    label: str = ""


@dataclass(frozen=True)
class ChatRequest:
    """A single-turn chat: optional system text, the labelled images, then the user prompt."""

    prompt: str
    images: tuple[LabelledImage, ...] = ()
    system: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def sampling(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, **dict(self.extra)}

    def frames_digest(self) -> str:
        h = hashlib.sha256()
        for image in self.images:
            h.update(hashlib.sha256(image.jpeg).digest())
            h.update(image.label.encode())
        return h.hexdigest()

    def cache_key(self, model_id: str) -> str:
        """hash(model + revision, prompt, frames digest, sampling params): what a response depends on."""
        payload = json.dumps(
            {"model": model_id, "system": self.system, "prompt": self.prompt,
             "frames": self.frames_digest(), "sampling": self.sampling()},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


class Backend(ABC):
    """Generates completions for batches of requests. One instance per worker (it holds the model)."""

    name: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    @property
    def model_id(self) -> str:
        """Model name plus revision: part of every cache key."""
        return f"{self.config.get('model', self.name)}@{self.config.get('revision') or 'main'}"

    @abstractmethod
    def generate(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One completion per request, in order."""


BACKENDS: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(cls: B) -> B:
    BACKENDS[cls.name] = cls
    return cls


def make_backend(config: Mapping[str, Any]) -> Backend:
    """Build the backend named by `config['backend']`; the modules of this package self-register."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)
    name = config.get("backend")
    if name not in BACKENDS:
        raise KeyError(f"annotator.backend: unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name](config)

