"""Fixtures for the trainer tests: tiny random HF models on disk (one per family, per session)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ops.models import Family, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], Path]:
    """``tiny_model_dir(family)`` → a folder with a tiny random causal LM (written once)."""
    cache: dict[Family, Path] = {}

    def get(family: Family = "llama") -> Path:
        if family not in cache:
            cache[family] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return get
