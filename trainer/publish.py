"""Serialising one adapter version: the PEFT adapter plus the full training state.

A version is four files, written to the artifact store as one directory (see
:mod:`orchestrator.artifacts` for the layout and the atomic write):

- ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT export of the slot at its
  true rank — what rollout workers (and PEFT, vLLM, SGLang) load;
- ``training_state.safetensors``: the slot's weights and AdamW moments (no pickle);
- ``training_state.json``: the scalars — optimizer settings and step count, the adapter's step,
  version and epoch, the data cursor to continue from, and the registration's spec.

So every published version is a complete resume point: the trainer restarting after a crash
continues from the newest version the control log acknowledges, and the checkpoint process only
has to copy a version to make a durable checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
from safetensors.torch import load as load_safetensors

from events.specs import AdapterSpec
from orchestrator.cursor import CursorState
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.peft_io import peft_files
from trainer.safetensors_buf import to_safetensors
from trainer.slot_state import load_slot_state, slot_state_dict

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


@dataclass(frozen=True)
class VersionInfo:
    """The scalars of a version that are not optimizer state."""

    adapter: str
    registration_id: str
    step: int
    version: int
    epoch: int
    cursor: CursorState
    spec: AdapterSpec


def version_files(
    model: MultiLoraModel, optimizer: SlotAdamW, slot: int, info: VersionInfo, base_model: str
) -> dict[str, bytes]:
    """The four files of ``slot``'s current version, as bytes."""
    state = slot_state_dict(model, optimizer, slot)
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    meta = {
        "adapter": info.adapter,
        "registration_id": info.registration_id,
        "step": info.step,
        "version": info.version,
        "epoch": info.epoch,
        "cursor": msgspec.to_builtins(info.cursor),
        "spec": msgspec.to_builtins(info.spec),
        "optimizer": scalars,
    }
    weight = state["weight_r_Q"]
    assert isinstance(weight, torch.Tensor)
    files = peft_files(model, slot, base_model, weight_r_Q=weight)  # the same host copy
    files[STATE_TENSORS] = to_safetensors(tensors)
    files[STATE_JSON] = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    return files


def read_version_info(state_json: bytes) -> tuple[VersionInfo, dict[str, Any]]:
    """Parse ``training_state.json``: the version info and the optimizer scalars."""
    meta = json.loads(state_json)
    info = VersionInfo(
        adapter=meta["adapter"],
        registration_id=meta["registration_id"],
        step=int(meta["step"]),
        version=int(meta["version"]),
        epoch=int(meta["epoch"]),
        cursor=msgspec.convert(meta["cursor"], CursorState),
        spec=msgspec.convert(meta["spec"], AdapterSpec),
    )
    return info, meta["optimizer"]


def restore_slot(
    model: MultiLoraModel,
    optimizer: SlotAdamW,
    slot: int,
    state_tensors: bytes,
    state_json: bytes,
) -> VersionInfo:
    """Load a published version's weights and optimizer state into ``slot`` exactly."""
    info, scalars = read_version_info(state_json)
    state: dict[str, Any] = {**scalars, **load_safetensors(state_tensors)}
    load_slot_state(model, optimizer, slot, state)
    return info
