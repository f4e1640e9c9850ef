"""Shared test setup: offline, Ray without an auth token, and the real fixtures of ../shared."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

pytest_plugins = ["tests.tiny_model_fixture"]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = Path(os.environ.get("STGR_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real clips and annotation files of ../shared/fixtures (never copied into the repo)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_FIXTURES} (set STGR_FIXTURES)")
    return SHARED_FIXTURES


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[str]:
    """A folder for an embedded Ray's session files (`cluster.temp_dir=`), shared by a module's builds."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)
