"""Entry point `stgr.commands`: every module here with a `register(subparsers)` adds subcommands.

A module per command family keeps the CLI open to extension without a central list.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil


def register(subparsers: argparse._SubParsersAction) -> None:
    for info in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
        module = importlib.import_module(info.name)
        hook = getattr(module, "register", None)
        if hook is not None:
            hook(subparsers)
