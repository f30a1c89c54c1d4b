"""Serialising one adapter version: the PEFT adapter plus the full training state.

A version is four files, written to the artifact store as one directory (see
:mod:`orchestrator.artifacts` for the layout and the atomic write):

- ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT export of the slot at its
  true rank, in the slot's own dtype — what rollout workers (and PEFT, vLLM, SGLang) load, and
  where a restore reads the weights from (:func:`weights_from_peft`), so they are written once;
- ``training_state.safetensors``: the slot's AdamW moments (no pickle);
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

from events.errors import ConfigError
from events.specs import AdapterSpec
from orchestrator.cursor import CursorState
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.peft_io import PEFT_PREFIX, WEIGHTS_NAME, peft_files
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
) -> dict[str, bytes | bytearray]:
    """The four files of ``slot``'s current version, as bytes."""
    state = slot_state_dict(model, optimizer, slot)
    # the weights travel once, in the PEFT file; the training state holds the moments
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k != "weight_r_Q"}
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
    adapter_weights: bytes | None = None,
) -> VersionInfo:
    """Load a published version's weights and optimizer state into ``slot`` exactly.

    ``adapter_weights`` is the version's ``adapter_model.safetensors``: the training state of a
    version holds only the moments, the weights are in the PEFT file. (A training state that
    holds ``weight_r_Q`` itself, as versions of earlier releases do, restores without it.)
    """
    info, scalars = read_version_info(state_json)
    state: dict[str, Any] = {**scalars, **load_safetensors(state_tensors)}
    if "weight_r_Q" not in state:
        if adapter_weights is None:
            raise ConfigError(
                f"{STATE_TENSORS} of {info.adapter} v{info.version} holds no weights; pass the "
                f"version's {WEIGHTS_NAME} (adapter_weights=...)"
            )
        state["weight_r_Q"] = weights_from_peft(model, load_safetensors(adapter_weights))
    load_slot_state(model, optimizer, slot, state)
    return info


def weights_from_peft(model: MultiLoraModel, peft_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``[r, Q]`` slot weight block that :func:`~trainer.peft_io.peft_files` exported."""
    a_key = next((k for k in peft_tensors if k.endswith(".lora_A.weight")), None)
    if a_key is None:
        raise ConfigError(f"{WEIGHTS_NAME} holds no lora_A tensors")
    rank = peft_tensors[a_key].shape[0]
    weight_r_Q = torch.zeros(rank, model.store.width, dtype=peft_tensors[a_key].dtype)
    for name, a_r_I, bt_r_O in model.split_layers(weight_r_Q):  # views: filled in place
        try:
            a_r_I.copy_(peft_tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"])
            bt_r_O.copy_(peft_tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"].T)
        except KeyError as err:
            raise ConfigError(
                f"{WEIGHTS_NAME} lacks {err.args[0]}; it is not this model's"
            ) from None
    return weight_r_Q
