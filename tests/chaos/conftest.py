"""Fixtures of the chaos suite: the e2e suite's tiny model and prompts, and a chaos stack.

The stack is the local one of :mod:`tests.e2e.harness` (one torch thread per process) with two
rollout workers whose ``regex`` reward is scored remotely (``--remote-reward regex``, a 10 s
deadline per batch) by the RQ ``rewards`` worker :class:`tests.chaos.harness.ChaosStack`
starts. ``REDIS_URL`` is unset for these tests: the harness kills the embedded Redis, which it
cannot do to a server it did not start.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ops.launch import Stack
from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model
from tests.chaos.harness import ChaosOptions, ChaosStack, chaos_stack_options
from tests.e2e.harness import LiveStack, child_env, write_prompts


@pytest.fixture(scope="session")
def chaos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chaos-model") / "tiny-llama"
    return write_tiny_model(path, head_scale=LEARNABLE_HEAD_SCALE)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with ``prompts.jsonl`` (:func:`tests.e2e.harness.write_prompts`)."""
    return write_prompts(tmp_path / "data")


@pytest.fixture
def chaos_stack(
    tmp_path: Path, data_dir: Path, chaos_model: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., ChaosStack]]:
    """``start(options, trainer_command=(), **StackOptions overrides) -> ChaosStack``: a chaos
    stack, stopped at teardown."""
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    started: list[tuple[Stack, LiveStack]] = []
    on_sigterm = signal.getsignal(signal.SIGTERM)  # entering a Stack installs its own handler

    def start(
        options: ChaosOptions, trainer_command: Sequence[str] = (), **overrides: Any
    ) -> ChaosStack:
        namespace = f"chaos{uuid.uuid4().hex[:8]}"
        stack_opts = chaos_stack_options(
            tmp_path / "run", namespace, data_dir, chaos_model, **overrides
        )
        stack = Stack(stack_opts).__enter__()
        live = LiveStack(stack)
        started.append((stack, live))
        return ChaosStack(live, options, trainer_command=trainer_command)

    yield start
    for stack, live in started:
        live.close()
        stack.__exit__(None, None, None)
    signal.signal(signal.SIGTERM, on_sigterm)
