"""Fixtures for the checkpoint tests: version directories with the trainer's layout.

A fake version holds small real tensors (``safetensors.torch.save``): a LoRA pair as the PEFT
weights, Adam moments and a uint8 tensor as the training state, and ``training_state.json``, a
:class:`~events.adapter_format.TrainingState` (step, version, epoch, cursor, spec, slot scalars)
encoded as the trainer writes it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from events.adapter_format import CursorState, SlotScalars, TrainingState, encode_training_state
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
    *,
    step: int,
    version: int,
    epoch: int = 0,
    spec: AdapterSpec | None = None,
    width: int = 16,
    adapter: str = "ad",
    registration_id: str = "r1",
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
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "tiny",
    }
    scalars = TrainingState(
        adapter=adapter,
        registration_id=registration_id,
        step=step,
        version=version,
        epoch=epoch,
        cursor=CursorState(n=100, seed=7, epoch=0, position=(step * 4) % 100),
        spec=spec or make_spec(),
        slot=SlotScalars(rank=4, alpha=8.0, step=step, layout_width=width),
    )
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": save(weights, metadata={"format": "pt"}),
        "training_state.safetensors": save(state),
        "training_state.json": encode_training_state(scalars),
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
    files = version_files(
        step=step,
        version=version,
        epoch=epoch,
        spec=spec,
        width=width,
        adapter=adapter,
        registration_id=registration_id,
    )
    return store.write_version(adapter, registration_id, version, files)


@pytest.fixture
def artifacts(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "artifacts"))
