"""Fixtures of the end-to-end suite: a learnable tiny model, a prompt file, a live local stack.

The model is :func:`ops.models.write_tiny_model` (llama, hidden 64, char tokenizer, vocab 104)
with its output head scaled by :data:`HEAD_SCALE`. Why: with the default init (std 0.02) a
logit is at most ``|w_token| * |h| = 0.02 * sqrt(64) * sqrt(64) ~ 1.3`` for the RMS-normalised
last hidden state ``h``, so no adapter on the attention/MLP layers can make any one character
likelier than ~4 %: nothing could be learned. Scaled by 8 the reachable logit range is ~10 while
the initial distribution stays broad (logit std ~1.3), so rewarded characters become dominant
within a few dozen steps.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.launch import Stack
from ops.models import write_tiny_model
from tests.e2e.harness import LiveStack, child_env, stack_options

HEAD_SCALE = 8.0
PROMPTS = ("x:", "y:", "z:", "w:", "v:", "u:", "t:", "s:")


def scale_output_head(model_dir: Path, factor: float) -> None:
    """Multiply ``lm_head.weight`` of the safetensors checkpoint in ``model_dir`` by ``factor``."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * factor
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_tiny_model(tmp_path_factory.mktemp("e2e-model") / "tiny-llama")
    scale_output_head(path, HEAD_SCALE)
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with ``prompts.jsonl`` (8 one-character prompts like ``"x:"``, empty labels)."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [json.dumps({"prompt": p, "answer": ""}) for p in PROMPTS]
    (folder / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    return folder


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
