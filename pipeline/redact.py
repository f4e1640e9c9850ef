"""Secrets: how an API key travels to the workers, and why it never reaches a file.

A stage names the environment variables it needs (settings marked `env`, e.g. `annotator.api_key_env`);
the driver reads their values once (`Secrets.from_env`) and hands them to each unit inside its
`UnitTask`, a Ray task argument held in memory. Not in `runtime_env.env_vars`: Ray's runtime-env
agent writes those to its log under the session's temp directory. A worker installs what it was
given (`install`) into its own process environment, where the backend reads it.

Every text the project writes from what it was told (ledger rows, error notes, unit failures,
hence the manifest and the card, which summarise the ledger) goes through `scrub`, which replaces
each known secret value, raw, JSON-escaped or URL-quoted, by `[REDACTED:<variable>]`: an endpoint
that echoes the key in an error body then leaves only the variable's name behind. Values shorter
than `MIN_SECRET_LENGTH` are not treated as secrets (replacing a 3-letter value would garble text).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping
from urllib.parse import quote

if TYPE_CHECKING:
    from pipeline.config import BuildPlan

#: Secrets that are never configured by a stage but may be in the driver's environment (credentials
#: of an object-store run directory, a hub token): scrubbed, never forwarded.
AMBIENT_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MIN_SECRET_LENGTH = 6


class Secrets:
    """Secret values by variable name; picklable, and its repr shows only the names."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = {name: value for name, value in (values or {}).items()
                        if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH}

    @classmethod
    def from_env(cls, names: Iterable[str]) -> "Secrets":
        """The values of the variables `names` that are set in this process's environment."""
        return cls({name: os.environ[name] for name in names if name in os.environ})

    def names(self) -> list[str]:
        return sorted(self._values)

    def items(self) -> list[tuple[str, str]]:
        # longest first, so a secret that contains another is replaced whole
        return sorted(self._values.items(), key=lambda kv: -len(kv[1]))

    def __repr__(self) -> str:
        return f"Secrets({self.names()})"


_installed = Secrets()


def secret_names(plan: "BuildPlan | None") -> list[str]:
    """The variables the plan's stages name in their settings marked `env` (e.g. `annotator.api_key_env`)."""
    if plan is None:
        return []
    names = []
    for spec in plan.nodes.values():
        for key in spec.stage_cls.marked_keys(spec.config, "env"):
            name = spec.config.get(key)
            if isinstance(name, str) and name:
                names.append(name)
    return list(dict.fromkeys(names))


def install(secrets: Secrets) -> None:
    """Make `secrets` (plus the ambient secrets of this process) what `scrub` removes, and set them in
    this process's environment, where a backend reads its key (`os.environ[api_key_env]`) as it does
    outside a build (`stgr eval`, a notebook)."""
    global _installed
    for name, value in secrets.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    _installed = Secrets({**dict(Secrets.from_env(AMBIENT_SECRETS).items()), **dict(secrets.items())})


def _forms(value: str) -> list[str]:
    """The ways a value shows up in text: as is, escaped inside a JSON string, URL-quoted."""
    return list(dict.fromkeys([value, json.dumps(value)[1:-1], quote(value, safe="")]))


def scrub(text: str, secrets: Secrets | None = None) -> str:
    """`text` with every form of every secret replaced by `[REDACTED:<variable>]`."""
    for name, value in (secrets if secrets is not None else _installed).items():
        for form in _forms(value):
            if form in text:
                text = text.replace(form, f"[REDACTED:{name}]")
    return text


def scrub_value(value: Any, secrets: Secrets | None = None) -> Any:
    """`scrub` applied to every string inside `value` (a ledger row, a record): other values kept."""
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {k: scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v, secrets) for v in value)
    return value
