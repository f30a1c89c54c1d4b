"""Fixtures for the checkpoint tests: version directories with the trainer's layout.

A fake version holds small real tensors (``safetensors.torch.save``): a LoRA pair as the PEFT
weights, Adam moments and a uint8 RNG state as the training state, and ``training_state.json``
with step, version, epoch, cursor, spec and RNG seeds, exactly as the trainer writes them.
"""

from __future__ import annotations

import json

import msgspec
import pytest
import torch
from safetensors.torch import save

from events.specs import AdapterSpec, DatasetSpec, RewardSpec
from orchestrator.artifacts import ArtifactStore, PublishedVersion


def make_spec(*, interval: int = 2, keep: int = 3) -> AdapterSpec:
    return AdapterSpec(
        dataset=DatasetSpec(kind="jsonl", path="data.jsonl"),
        rewards=(RewardSpec(name="exact_match"),),
        rank=4,
        checkpoint_interval=interval,
        keep_checkpoints=keep,
    )


def version_files(
    *, step: int, version: int, epoch: int = 0, spec: AdapterSpec | None = None, width: int = 16
) -> dict[str, bytes]:
    """The four files of one version; tensor values depend on (step, epoch) so versions differ."""
    gen = torch.Generator().manual_seed(1000 * epoch + step)
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            4, width, generator=gen
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            width, 4, generator=gen
        ),
    }
    state = {
        "exp_avg_r_Q": torch.randn(4, width, generator=gen),
        "exp_avg_sq_r_Q": torch.rand(4, width, generator=gen),
        "rng_torch_cpu": torch.randint(0, 256, (64,), dtype=torch.uint8, generator=gen),
    }
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}  # fmt: skip
    scalars = {
        "step": step,
        "version": version,
        "epoch": epoch,
        "cursor": {"n": 100, "seed": 7, "epoch": 0, "position": (step * 4) % 100},
        "rng_seeds": {"sampling": 11 + step},
        "lr_step": step,
        "spec": msgspec.to_builtins(spec or make_spec()),
    }
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save(weights, metadata={"format": "pt"}),
        "training_state.safetensors": save(state),
        "training_state.json": json.dumps(scalars).encode(),
    }


def write_fake_version(
    store: ArtifactStore,
    adapter: str,
    registration_id: str,
    step: int,
    *,
    version: int | None = None,
    epoch: int = 0,
    spec: AdapterSpec | None = None,
    width: int = 16,
) -> PublishedVersion:
    version = step if version is None else version
    files = version_files(step=step, version=version, epoch=epoch, spec=spec, width=width)
    return store.write_version(adapter, registration_id, version, files)


@pytest.fixture
def artifacts(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))
