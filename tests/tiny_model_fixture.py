"""Pytest plugin: a session-scoped tiny Qwen2.5-VL directory, built once and shared by all tests.

Load it with `pytest_plugins = ["tests.tiny_model_fixture"]` in tests/conftest.py. Building takes a
few seconds; sharing it keeps the model-based tests fast on a small CI machine. Tests must treat the
directory as read-only (copy it first if they need to change it).
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.testing.tiny_model import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny-qwen25vl"), seed=0)
