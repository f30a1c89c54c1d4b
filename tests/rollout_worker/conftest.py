"""Fixtures for the rollout worker tests: a tiny random Llama, real PEFT versions, small datasets,
and the same worker on a hand-written fake backend (:mod:`tests.rollout_worker.fakes`).

The Redis-protocol server is the session's shared one (``tests/conftest.py``); every test gets its
own namespace (``streams``), so nothing needs flushing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ops.models import write_tiny_model
from tests.rollout_worker.fakes import FakeBackend, write_fake_version
from tests.rollout_worker.helpers import write_peft_adapter

# one JSONL dataset: arithmetic questions with numeric answers; row 3 is very long
ROWS = [
    {"prompt": "1+2=", "answer": "3"},
    {"prompt": "4+4=", "answer": "8"},
    {"prompt": "9-5=", "answer": "4"},
    {"prompt": "long " * 60, "answer": "0"},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact store root (adapter versions are published under it)."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def versions(tiny_dir: Path, artifacts: Path) -> dict[int, Path]:
    """Versions 0..2 of one adapter (same shape, different non-zero weights), as published."""
    return {
        v: write_peft_adapter(tiny_dir, artifacts / "math" / f"v{v}", seed=10 + v) for v in range(3)
    }


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


@pytest.fixture
def make_worker(tiny_dir: Path, data_root: Path, streams, tmp_path) -> Callable[..., object]:
    """Build a :class:`RolloutWorker` on the embedded engine (fresh engine per call)."""
    from rollout.backend import EmbeddedBackend, WeightsFetcher
    from rollout.engine import Engine
    from rollout.reward_builtins import builtin_registry
    from rollout.worker import RolloutWorker

    def build(name: str = "w1", **kwargs: object) -> RolloutWorker:
        engine = Engine.from_pretrained(tiny_dir, max_loras=4, max_lora_rank=8, keep_versions=2)
        kwargs.setdefault("registry", builtin_registry())
        kwargs.setdefault("allowed_roots", [data_root])
        kwargs.setdefault("max_prompt_tokens", 256)
        kwargs.setdefault("weights", WeightsFetcher(tmp_path / "weights" / name))
        return RolloutWorker(
            name=name,
            streams=streams,
            backend=EmbeddedBackend(engine),
            **kwargs,  # type: ignore[arg-type]
        )

    return build


@pytest.fixture(scope="session")
def fake_versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 0..2 of one adapter for :class:`FakeBackend` (different weight bytes each)."""
    root = tmp_path_factory.mktemp("fake-artifacts")
    return {v: write_fake_version(root / "math" / f"v{v}", seed=10 + v) for v in range(3)}


@pytest.fixture
def make_fake_worker(data_root: Path, streams, tmp_path) -> Callable[..., object]:
    """Build a :class:`RolloutWorker` on a fresh :class:`FakeBackend` (no model, milliseconds)."""
    from rollout.backend import WeightsFetcher
    from rollout.reward_builtins import builtin_registry
    from rollout.worker import RolloutWorker

    def build(name: str = "w1", **kwargs: object) -> RolloutWorker:
        kwargs.setdefault("registry", builtin_registry())
        kwargs.setdefault("allowed_roots", [data_root])
        kwargs.setdefault("max_prompt_tokens", 256)
        kwargs.setdefault("weights", WeightsFetcher(tmp_path / "weights" / name))
        return RolloutWorker(
            name=name,
            streams=streams,
            backend=FakeBackend(),
            **kwargs,  # type: ignore[arg-type]
        )

    return build
