"""Fixtures for the embedded engine tests: a tiny random Llama and real PEFT adapters on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ops.models import write_tiny_model

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (rank, alpha, target modules, rslora)
ADAPTER_SPECS: dict[str, tuple[int, int, list[str], bool]] = {
    "a": (4, 8, ["q_proj", "v_proj"], False),
    "b": (8, 16, ALL_LINEARS, False),
    "c": (2, 4, ["o_proj", "down_proj", "up_proj"], True),
}


def write_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    alpha: int,
    targets: list[str],
    rslora: bool = False,
    seed: int = 0,
    std: float = 0.5,
) -> Path:
    """Save a real PEFT LoRA for the model at ``base_dir`` with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and OpenMP workers spinning against other
    processes on a shared CI host slow small ops by 10x or more; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def adapter_dirs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_peft_adapter(
            tiny_dir, root / name, rank=r, alpha=alpha, targets=targets, rslora=rs, seed=i + 1
        )
        for i, (name, (r, alpha, targets, rs)) in enumerate(ADAPTER_SPECS.items())
    }


@pytest.fixture(scope="session")
def version_dirs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1..4 of one adapter (same shape, different weights), as the trainer publishes."""
    root = tmp_path_factory.mktemp("versions")
    return {
        v: write_peft_adapter(
            tiny_dir, root / f"v{v}", rank=4, alpha=8, targets=["q_proj", "v_proj"], seed=100 + v
        )
        for v in range(1, 5)
    }


@pytest.fixture
def make_engine(tiny_dir: Path) -> Callable[..., object]:
    from rollout.engine import Engine

    def build(**kwargs: object) -> Engine:
        kwargs.setdefault("max_loras", 4)
        kwargs.setdefault("max_lora_rank", 8)
        return Engine.from_pretrained(tiny_dir, **kwargs)  # type: ignore[arg-type]

    return build
