"""Typed settings: what a stage, a source adapter, a backend or a filter rule reads from its config
block, declared once as a dataclass whose fields carry the one default and a line of help.

Why: a default written at every read (`config.get("fps", 2.0)`) and again in a yaml file drifts, and
nobody can tell which one a build used. Here each setting is one field:

    @dataclass(kw_only=True)
    class Config(StageConfig):
        fps: float = setting(2.0, "uniform frames per second over the clip", gt=0)

and everything else is read off the fields: the defaults Hydra composes (`Settings.defaults`, which
`pipeline.config` stores for the yaml files' `defaults:` lists, so a yaml file keeps only what differs),
the checks of a config (`Settings.problems`: types from the annotations, `gt`/`ge`/`le` bounds,
required fields, each one line `key: message`), and what the engine does with a key (`run`: how to
run, left out of the fingerprint; `path`: a local path made absolute; `env`: names an environment
variable the workers need).

Values are kept as written: an int given for a float field stays an int (Python's numeric tower
admits it), so a config's fingerprint is what its yaml says, not a coerced copy of it.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import MISSING, Field, dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

from pipeline.errors import ConfigError

#: What Hydra writes for a value that must be given (`model: ???`); a required field's default.
REQUIRED = "???"

S = TypeVar("S", bound="Settings")


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            run: bool = False, path: bool = False, env: bool = False, gt: float | None = None,
            ge: float | None = None, le: float | None = None) -> Any:
    """A field of a settings dataclass: its default (none: required), one line of help, what the
    engine does with it (`run`, `path`, `env`: see the module docstring) and numeric bounds.

    A list or dict default is copied for every instance, so no two configs share one; `factory`
    computes a default that is only known when it is asked for (the registered filter rules)."""
    metadata = {"help": help, "run": run, "path": path, "env": env, "gt": gt, "ge": ge, "le": le}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class Settings:
    """Base of every settings class. Subclasses add fields with `setting(...)`, and override `check`
    for what one field's type and bounds cannot say (a relation between two fields)."""

    @classmethod
    def fields(cls) -> tuple[Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def names(cls, mark: str | None = None) -> tuple[str, ...]:
        """The field names, or those whose `setting(...)` set `mark` (run, path, env)."""
        return tuple(f.name for f in cls.fields() if mark is None or f.metadata.get(mark))

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata.get("help", "") for f in cls.fields() if f.name == name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (`???` for a required one): the node a yaml file's defaults list names."""
        return {f.name: _default(f) for f in cls.fields()}

    @classmethod
    def problems(cls, config: Mapping[str, Any], owner: str) -> list[str]:
        """What is wrong with the declared fields of `config` (other keys are not looked at), as
        `key: message` lines; `owner` says who requires a missing field ("stage 'sample'")."""
        hints = _hints(cls)
        wrong, bounds = [], []
        for f in cls.fields():
            value = config.get(f.name, _default(f))
            if _default(f) == REQUIRED and (value is None or value == REQUIRED):
                wrong.append(f"{f.name}: required by {owner} but missing")
            elif problem := type_problem(value, hints[f.name]):
                wrong.append(f"{f.name}: {problem}")
            elif problem := _bound_problem(value, f.metadata):
                bounds.append(f"{f.name}: {problem}")
        # `check` reads typed values: it runs when every field has its type (bounds may be off)
        return wrong + bounds + ([] if wrong else cls.build(config).check())

    @classmethod
    def build(cls: type[S], config: Mapping[str, Any]) -> S:
        """An instance from the declared keys of `config`, defaults for the rest (no checks: `from_config`)."""
        return cls(**{name: config[name] for name in cls.names() if name in config})

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any], owner: str) -> S:
        """An instance from `config`, or ConfigError naming the first problem's key."""
        found = cls.problems(config, owner)
        if found:
            raise ConfigError(found[0])
        return cls.build(config)

    def check(self) -> list[str]:
        """Problems no single field's type or bounds can show, as `key: message` lines."""
        return []

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}


def unknown_keys(config: Mapping[str, Any], known: Sequence[str], owner: str) -> list[str]:
    """`key: unknown key (did you mean fps?)` for every key of `config` no settings class declares:
    a typo would otherwise be a setting nobody reads."""
    found = []
    for key in config:
        if key in known:
            continue
        hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.75)
        found.append(f"{key}: unknown key for {owner}" + (f" (did you mean {hint[0]}?)" if hint else
                                                         f"; it takes {', '.join(sorted(known))}"))
    return found


def type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` is not of the annotated type `hint` (None when it is)."""
    if _matches(value, hint):
        return None
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    if typing.get_origin(hint) is Literal:
        return f"expected one of {', '.join(map(str, typing.get_args(hint)))}, got {got}"
    return f"expected {_type_name(hint)}, got {got}"


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence) or (isinstance(container, type) and issubclass(container, (list, tuple))):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if container in (dict, Mapping) or (isinstance(container, type) and issubclass(container, Mapping)):
        item = args[1] if len(args) == 2 else Any
        return isinstance(value, Mapping) and all(_matches(v, item) for v in value.values())
    return isinstance(value, container)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return f"a mapping to {_type_name(args[1])}" if len(args) == 2 else "a mapping"
    if hint in (dict, Mapping):
        return "a mapping"
    if hint is bool:
        return "true or false"
    return getattr(hint, "__name__", str(hint))


def _bound_problem(value: Any, metadata: Mapping[str, Any]) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    gt, ge, le = metadata.get("gt"), metadata.get("ge"), metadata.get("le")
    if ge is not None and le is not None and not ge <= value <= le:
        return f"must lie in [{ge:g}, {le:g}], got {value}"
    if gt is not None and not value > gt:
        return f"must be > {gt:g}, got {value}"
    if ge is not None and not value >= ge:
        return f"must be >= {ge:g}, got {value}"
    if le is not None and not value <= le:
        return f"must be <= {le:g}, got {value}"
    return None


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return REQUIRED


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
