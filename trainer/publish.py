"""Serialising one adapter version: the PEFT adapter plus the full training state.

A version is the four files of :mod:`events.adapter_format`, written to the artifact store as
one directory (see :mod:`orchestrator.artifacts` for the layout and the atomic write):

- ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT export of the slot at its
  true rank, in the slot's own dtype — what rollout workers (and PEFT, vLLM, SGLang) load, and
  where a restore reads the weights from, so they are written once;
- ``training_state.safetensors``: the slot's AdamW moments (no pickle);
- ``training_state.json``: a :class:`~events.adapter_format.TrainingState` — the adapter's step,
  version and epoch, the data cursor to continue from, the registration's spec (whose ``optim``
  and ``steps`` are the optimizer settings, stored once) and the slot's rank, alpha, optimizer
  step count and store width.

So every published version is a complete resume point: the trainer restarting after a crash
continues from the newest version the control log acknowledges, and the checkpoint process only
has to copy a version to make a durable checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from events.adapter_format import (
    ADAPTER_WEIGHTS,
    STATE_JSON,
    STATE_TENSORS,
    CursorState,
    SlotScalars,
    TrainingState,
    decode_state_tensors,
    decode_training_state,
    encode_state_tensors,
    encode_training_state,
    parse_peft_weights,
)
from events.errors import ConfigError
from events.specs import AdapterSpec
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.peft_io import peft_files
from trainer.slot_state import StateValue, load_slot_state, slot_state_dict

MOMENTS = ("exp_avg_r_Q", "exp_avg_sq_r_Q")
"""The slot-state tensors ``training_state.safetensors`` holds (the weights are the PEFT file's)."""


@dataclass(frozen=True)
class VersionInfo:
    """The scalars of a version that are not slot state."""

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
    """The four files of ``slot``'s current version, as bytes.

    The slot's optimizer must run ``info.spec``'s settings (``optim``, ``steps``): the training
    state stores them once, in the spec; a slot that runs others raises :class:`ConfigError`.
    """
    spec = info.spec
    if optimizer.spec(slot) != spec.optim or optimizer.total_steps(slot) != spec.steps:
        raise ConfigError(
            f"slot {slot} runs {optimizer.spec(slot)} for {optimizer.total_steps(slot)} steps but "
            f"the spec of {info.adapter} asks for {spec.optim} for {spec.steps}; the training "
            "state stores the settings once, in the spec: call optimizer.update_settings(slot, "
            "spec.optim, spec.steps) first"
        )
    state = slot_state_dict(model, optimizer, slot)
    # the same host copy as the moments: one device-to-host transfer
    files = peft_files(model, slot, base_model, weight_r_Q=_tensor(state, "weight_r_Q"))
    files[STATE_TENSORS] = encode_state_tensors({k: _tensor(state, k) for k in MOMENTS})
    scalars = SlotScalars(
        rank=model.table.rank(slot),
        alpha=model.table.alpha(slot),
        step=optimizer.step_count(slot),
        layout_width=model.store.width,
    )
    files[STATE_JSON] = encode_training_state(
        TrainingState(
            adapter=info.adapter,
            registration_id=info.registration_id,
            step=info.step,
            version=info.version,
            epoch=info.epoch,
            cursor=info.cursor,
            spec=spec,
            slot=scalars,
        )
    )
    return files


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
    saved = decode_training_state(state_json)
    spec, scalars = saved.spec, saved.slot
    state: dict[str, StateValue] = {
        **decode_state_tensors(state_tensors),
        "rank": scalars.rank,
        "alpha": scalars.alpha,
        "step": scalars.step,
        "layout_width": scalars.layout_width,
        "total_steps": spec.steps,
        "lr": spec.optim.lr,
        "beta1": spec.optim.betas[0],
        "beta2": spec.optim.betas[1],
        "eps": spec.optim.eps,
        "weight_decay": spec.optim.weight_decay,
        "schedule": spec.optim.schedule,
        "warmup_steps": spec.optim.warmup_steps,
        "min_lr_ratio": spec.optim.min_lr_ratio,
        "max_grad_norm": spec.optim.max_grad_norm,
    }
    if "weight_r_Q" not in state:
        if adapter_weights is None:
            raise ConfigError(
                f"{STATE_TENSORS} of {saved.adapter} v{saved.version} holds no weights; pass the "
                f"version's {ADAPTER_WEIGHTS} (adapter_weights=...)"
            )
        where = f"version {saved.version} of {saved.adapter}"
        state["weight_r_Q"] = _weight_r_Q(model, adapter_weights, scalars.rank, where)
    load_slot_state(model, optimizer, slot, state)
    return VersionInfo(
        adapter=saved.adapter,
        registration_id=saved.registration_id,
        step=saved.step,
        version=saved.version,
        epoch=saved.epoch,
        cursor=saved.cursor,
        spec=spec,
    )


def _weight_r_Q(
    model: MultiLoraModel, adapter_weights: bytes, rank: int, where: str
) -> torch.Tensor:
    """The ``[r, Q]`` slot weight block that :func:`~trainer.peft_io.peft_files` exported."""
    pairs = parse_peft_weights(adapter_weights, rank, where=where)
    dtype = next(iter(pairs.values()))[0].dtype
    weight_r_Q = torch.zeros(rank, model.store.width, dtype=dtype)
    for name, a_r_I, bt_r_O in model.split_layers(weight_r_Q):  # views: filled in place
        if name not in pairs:
            raise ConfigError(
                f"{where}/{ADAPTER_WEIGHTS} lacks the tensors of slot layer {name!r}; it is not "
                "this model's adapter"
            )
        a_r_I.copy_(pairs[name][0])
        bt_r_O.copy_(pairs[name][1].T)
    return weight_r_Q


def _tensor(state: dict[str, StateValue], key: str) -> torch.Tensor:
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"slot state {key!r} is a {type(value).__name__}; slot_state_dict gives tensors"
        )
    return value
