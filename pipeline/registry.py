"""Registries by name, filled by decorators and by entry-point plugins.

Stages and CLI commands live in the packages above `pipeline` (`stages`, `train`); the engine must
not import them. They announce themselves through the entry-point groups `stgr.stages` and
`stgr.commands` of pyproject.toml (or a config's `plugins:` list of modules), and the engine looks
names up here, so adding a stage never touches an `if name == ...` chain.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points
from typing import Callable, Iterable, TypeVar

from pipeline.stage import Stage

T = TypeVar("T", bound=type[Stage])

STAGES: dict[str, type[Stage]] = {}
_loaded_groups: set[str] = set()


def register_stage(cls: T) -> T:
    """Class decorator: make a Stage subclass available under its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    existing = STAGES.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    STAGES[cls.name] = cls
    return cls


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


def get_stage(name: str) -> type[Stage]:
    return STAGES[name]


def stage_names() -> list[str]:
    return sorted(STAGES)


CommandFn = Callable[..., int]
