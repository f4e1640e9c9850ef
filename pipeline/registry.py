"""One registry for everything a config names: stages, source adapters, backends, filter rules and the
synthetic source's task writers.

A `Registry` maps names to classes (or functions) with one behaviour everywhere:
- an entry is identified by `module.qualname`; registering the same one again is a no-op that keeps
  the newest object, because Ray's workers (and a reload, or `python -m`) import a module again and
  its classes come back as new objects of the same name;
- a different entry under a taken name is an error naming both, so two plugins never silently
  replace each other;
- an unknown name is one `UnknownName` (a ConfigError: one line, exit 2) naming the config key that
  asked, `verify.backend: unknown backend 'x' (known: openai, template, ...)`, whoever asked;
- a registry may fill itself: given `package`, it imports every module of that package the first time
  it is read, so a new adapter or backend is one new file;
- a registry given `schema` publishes each entry's settings defaults (`Settings.defaults`) for
  Hydra as `stgr/<schema>/<name>`, the node a yaml file's `defaults:` list names.

Stages and CLI commands live in the packages above `pipeline` (`stages`, `train`); the engine does
not import them. They announce themselves through the entry-point groups `stgr.stages` and
`stgr.commands` of pyproject.toml (or a config's `plugins:` list of modules), and the engine looks
names up here, so adding a stage never touches an `if name == ...` chain.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Generic, Iterable, Iterator, Mapping, TypeVar

from pipeline.errors import ConfigError
from pipeline.stage import Stage

T = TypeVar("T")
E = TypeVar("E")

_loaded_groups: set[str] = set()


class UnknownName(ConfigError):
    """A config names an entry no registry holds; the message names the key that asked."""


def identity(entry: Any) -> str:
    """`module.qualname`: what makes two registrations the same entry."""
    return f"{entry.__module__}.{entry.__qualname__}"


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (see the module docstring); read-only as a Mapping."""

    instances: ClassVar[list["Registry[Any]"]] = []

    def __init__(self, kind: str, *, package: str | None = None, schema: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self.schema = schema
        self._entries: dict[str, T] = {}
        self._loaded = package is None
        Registry.instances.append(self)

    def register(self, entry: E | None = None, *, name: str | None = None,
                 aliases: Iterable[str] = ()) -> E | Callable[[E], E]:
        """Decorator: `@REG.register` (the entry's own `name` and `aliases`), or `@REG.register(name=...)`."""
        if entry is None:
            return lambda later: self.register(later, name=name, aliases=aliases)
        key = name or getattr(entry, "name", "")
        if not key:
            raise ValueError(f"{identity(entry)} has no `name` to register it as a {self.kind}")
        for alias in (key, *aliases, *getattr(entry, "aliases", ())):
            existing = self._entries.get(alias)
            if existing is not None and identity(existing) != identity(entry):
                raise ValueError(f"{self.kind} name '{alias}' is taken by {identity(existing)}; "
                                 f"{identity(entry)} cannot register under it")
            self._entries[alias] = entry
        return entry

    def lookup(self, name: Any, key: str) -> T:
        """The entry named `name`, or UnknownName naming the config `key` that asked."""
        self._load()
        known = ", ".join(sorted(self._entries)) or "none"
        if name is None or name == "???":
            raise UnknownName(f"{key}: required but missing; name a {self.kind} (known: {known})")
        if not isinstance(name, str) or name not in self._entries:
            raise UnknownName(f"{key}: unknown {self.kind} {name!r} (known: {known})")
        return self._entries[name]

    def primary(self) -> dict[str, T]:
        """Each entry once, under its own name (aliases left out)."""
        self._load()
        return {k: v for k, v in self._entries.items() if getattr(v, "name", k) == k}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the imported modules register into this registry
        import_modules(str(self.package))

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


def import_modules(package: str) -> None:
    """Import every module directly inside `package` (each registers what it defines)."""
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__, prefix=package + "."):
        importlib.import_module(info.name)


STAGES: Registry[type[Stage]] = Registry("stage", schema="stage")
register_stage = STAGES.register


def get_stage(name: str) -> type[Stage]:
    return STAGES.lookup(name, "stage")


def load_entry_points(group: str) -> dict[str, object]:
    """Load every entry point of `group` once; returns name -> loaded object."""
    loaded = {}
    for ep in entry_points(group=group):
        loaded[ep.name] = ep.load()
    _loaded_groups.add(group)
    return loaded


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import the installed stage plugins and any extra modules a config names.

    Extra modules resolve from the working directory too, as they would with `python -m`, so a
    project's own stages need no packaging to be used in a build.
    """
    if "stgr.stages" not in _loaded_groups:
        for hook in load_entry_points("stgr.stages").values():
            hook()
    modules = list(modules)
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        importlib.import_module(name)
