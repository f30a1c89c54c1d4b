"""Fixtures of the end-to-end suite: a learnable tiny model, a prompt file, a live local stack.

The model is :func:`ops.models.write_tiny_model` (llama, hidden 64, char tokenizer, vocab 104)
with its output head scaled by :data:`ops.models.LEARNABLE_HEAD_SCALE` (its docstring says why:
unscaled, no adapter could make any one character likelier than a few per cent), the same tiny
model ``multilora up`` trains without ``--model``.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.launch import Stack
from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model
from tests.e2e.harness import LiveStack, child_env, stack_options, write_prompts


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e-model") / "tiny-llama"
    return write_tiny_model(path, head_scale=LEARNABLE_HEAD_SCALE)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with ``prompts.jsonl`` (:func:`tests.e2e.harness.write_prompts`)."""
    return write_prompts(tmp_path / "data")


@pytest.fixture
def live_stack(
    tmp_path: Path, data_dir: Path, e2e_model: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., LiveStack]]:
    """``start(**StackOptions overrides) -> LiveStack``: a local stack, stopped at teardown."""
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    started: list[tuple[Stack, LiveStack]] = []
    on_sigterm = signal.getsignal(signal.SIGTERM)  # entering a Stack installs its own handler

    def start(**overrides: Any) -> LiveStack:
        namespace = f"e2e{uuid.uuid4().hex[:8]}"
        options = stack_options(tmp_path / "run", namespace, data_dir, e2e_model, **overrides)
        stack = Stack(options).__enter__()
        live = LiveStack(stack)
        started.append((stack, live))
        return live

    yield start
    for stack, live in started:
        live.close()
        stack.__exit__(None, None, None)
    signal.signal(signal.SIGTERM, on_sigterm)
