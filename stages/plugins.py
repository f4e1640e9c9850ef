"""Entry point `stgr.stages`: import every stage module of this package so their classes register.

Walking the package instead of listing modules means a new stage is one new file, nothing else.
Stage modules must import heavy libraries (torch, transformers, vllm) lazily, inside `setup()`.
"""
from __future__ import annotations

import importlib
import pkgutil

import stages


def load_stages() -> None:
    for info in pkgutil.walk_packages(stages.__path__, prefix="stages."):
        if info.name.rsplit(".", 1)[-1].startswith("_") or info.name.startswith("stages.commands"):
            continue
        importlib.import_module(info.name)
