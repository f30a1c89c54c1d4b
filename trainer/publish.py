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
has to copy a version to make a durable checkpoint. The Adam moments are written with every
version, not less often: any version a restart may resume from must resume exactly, and a
version without its moments could only resume approximately.

Two halves, so a version can be written *behind* the step (:mod:`trainer.versions`):
:func:`capture_slot` runs on the step's critical path and only copies the slot's three ``[r, Q]``
blocks off the device (asynchronously on CUDA); :func:`encode_version` builds the files from that
copy on a writer thread, touching no slot, while the next step trains.
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
    encode_peft_adapter,
    encode_state_tensors,
    encode_training_state,
    parse_peft_weights,
)
from events.errors import ConfigError
from events.specs import AdapterSpec
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.slot_state import StateValue, load_slot_state


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


@dataclass(frozen=True)
class CapturedSlot:
    """Host copies of one slot's weights and Adam moments at one moment, plus its scalars.

    Taken right after a step (:func:`capture_slot`), so the next step may change the slot (or
    a new tenant take it) while these are encoded and written. On CUDA the copies are
    asynchronous (pinned host memory, ``non_blocking``): ``ready`` is the event recorded after
    them on the current stream, and :meth:`wait` blocks until they have landed. The copies are
    queued on the stream before the next step's kernels, so they see this step's values.
    """

    weight_r_Q: torch.Tensor
    exp_avg_r_Q: torch.Tensor
    exp_avg_sq_r_Q: torch.Tensor
    rank: int
    alpha: float
    step_count: int
    layout_width: int
    ready: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def capture_slot(
    model: MultiLoraModel, optimizer: SlotAdamW, slot: int, spec: AdapterSpec, adapter: str
) -> CapturedSlot:
    """Copy ``slot``'s state off the device (asynchronously on CUDA) for a version of ``spec``.

    The slot's optimizer must run ``spec``'s settings (``optim``, ``steps``): the training state
    stores them once, in the spec; a slot that runs others raises :class:`ConfigError`.
    """
    if optimizer.spec(slot) != spec.optim or optimizer.total_steps(slot) != spec.steps:
        raise ConfigError(
            f"slot {slot} runs {optimizer.spec(slot)} for {optimizer.total_steps(slot)} steps but "
            f"the spec of {adapter} asks for {spec.optim} for {spec.steps}; the training "
            "state stores the settings once, in the spec: call optimizer.update_settings(slot, "
            "spec.optim, spec.steps) first"
        )
    rank = model.table.rank(slot)
    if rank == 0:
        raise ConfigError(f"slot {slot} is not configured; nothing to save")
    blocks = (
        model.store.weight_S_R_Q[slot, :rank],
        optimizer.exp_avg_S_R_Q[slot, :rank],
        optimizer.exp_avg_sq_S_R_Q[slot, :rank],
    )
    ready: torch.cuda.Event | None = None
    if blocks[0].is_cuda:
        copies = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in blocks]
        for host, block in zip(copies, blocks, strict=True):
            host.copy_(block, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        copies = [b.to("cpu", copy=True) for b in blocks]
    return CapturedSlot(
        weight_r_Q=copies[0],
        exp_avg_r_Q=copies[1],
        exp_avg_sq_r_Q=copies[2],
        rank=rank,
        alpha=model.table.alpha(slot),
        step_count=optimizer.step_count(slot),
        layout_width=model.store.width,
        ready=ready,
    )


def encode_version(
    model: MultiLoraModel, captured: CapturedSlot, info: VersionInfo, base_model: str
) -> dict[str, bytes | bytearray]:
    """The four files of a captured version, as bytes (waits for the capture's copies).

    Reads only the model's layer layout (names, offsets, target modules), never a slot, so it
    may run on a writer thread while the model trains on.
    """
    captured.wait()
    # strided views of the host copy: the encoder copies each once, into the file bytes
    layers = (
        (name, a_r_I, bt_r_O.T) for name, a_r_I, bt_r_O in model.split_layers(captured.weight_r_Q)
    )
    files = encode_peft_adapter(
        layers,
        rank=captured.rank,
        alpha=captured.alpha,
        target_modules=model.target_modules,
        base_model_name_or_path=str(base_model),
    )
    moments = {"exp_avg_r_Q": captured.exp_avg_r_Q, "exp_avg_sq_r_Q": captured.exp_avg_sq_r_Q}
    files[STATE_TENSORS] = encode_state_tensors(moments)
    scalars = SlotScalars(
        rank=captured.rank,
        alpha=captured.alpha,
        step=captured.step_count,
        layout_width=captured.layout_width,
    )
    files[STATE_JSON] = encode_training_state(
        TrainingState(
            adapter=info.adapter,
            registration_id=info.registration_id,
            step=info.step,
            version=info.version,
            epoch=info.epoch,
            cursor=info.cursor,
            spec=info.spec,
            slot=scalars,
        )
    )
    return files


def version_files(
    model: MultiLoraModel, optimizer: SlotAdamW, slot: int, info: VersionInfo, base_model: str
) -> dict[str, bytes | bytearray]:
    """The four files of ``slot``'s current version, as bytes (capture, then encode)."""
    captured = capture_slot(model, optimizer, slot, info.spec, info.adapter)
    return encode_version(model, captured, info, base_model)


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
