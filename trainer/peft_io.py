"""PEFT-format export and import of one slot.

The format itself (file names, tensor layout, the one list of supported PEFT config keys, the
scale) is :mod:`events.adapter_format`; this module maps it onto slots. :func:`peft_files` copies
the slot's ``[r, Q]`` weight block to the CPU once, splits it per layer (in the slot dtype unless
``dtype`` says otherwise) and encodes both files in memory; :func:`export_slot` writes each to a
temporary name and renames it, so a reader never sees a half-written file. PEFT, vLLM and SGLang
load the export unchanged.

:func:`import_peft` loads any adapter the format's reader accepts, and refuses, naming the tensor
or the rank, one that does not fit this model: a tensor for a module that is not a slot layer, a
shape that is not the layer's, a rank above ``max_rank``. Decisions:

- rsLoRA (``use_rslora``) is folded into alpha: the slot gets ``alpha' = scale · r`` with the
  reader's scale ``alpha / sqrt(r)``, so it computes PEFT's scale; a later export writes
  ``alpha'`` with ``use_rslora: false``.
- ``lora_dropout`` is ignored: it only acts in training mode and slot layers never apply it.
- Wrapped modules the adapter does not target get zero weights (no effect on outputs).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    encode_peft_adapter,
    read_peft_adapter,
)
from events.errors import ConfigError
from trainer.inject import MultiLoraModel


def peft_files(
    model: MultiLoraModel,
    slot: int,
    base_model_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    weight_r_Q: Tensor | None = None,
) -> dict[str, bytes | bytearray]:
    """``slot`` as the two files of a PEFT LoRA adapter (name → content), built in memory.

    ``weight_r_Q`` is the slot's ``[r, Q]`` weight block when the caller already copied it to
    the CPU; otherwise it is copied here, in one device-to-host transfer.
    """
    rank = model.table.rank(slot)
    if rank == 0:
        raise ConfigError(f"slot {slot} is not configured; nothing to export")
    if weight_r_Q is None:
        weight_r_Q = model.store.weight_S_R_Q[slot, :rank].to("cpu", copy=True)
    if tuple(weight_r_Q.shape) != (rank, model.store.width):
        raise ConfigError(
            f"weight block is {tuple(weight_r_Q.shape)}; slot {slot} needs "
            f"{(rank, model.store.width)}"
        )
    # strided views of the host copy: the encoder copies each once, into the file bytes
    layers = (
        (name, a_r_I, bt_r_O.T) for name, a_r_I, bt_r_O in model.split_layers(weight_r_Q.cpu())
    )
    return encode_peft_adapter(
        layers,
        rank=rank,
        alpha=model.table.alpha(slot),
        target_modules=model.target_modules,
        base_model_name_or_path=str(base_model_path),
        dtype=dtype,
    )


def export_slot(
    model: MultiLoraModel,
    slot: int,
    out_dir: str | Path,
    base_model_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``slot`` as a PEFT LoRA adapter into ``out_dir`` (created); return ``out_dir``."""
    files = peft_files(model, slot, base_model_path, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # the config last: its presence marks completion
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, out / name)
    return out


def import_peft(model: MultiLoraModel, slot: int, adapter_dir: str | Path) -> None:
    """Load the PEFT LoRA adapter in ``adapter_dir`` into ``slot`` (configured from its file).

    The slot gets the adapter's rank, its scale (rsLoRA folded into alpha, module doc) and
    exactly its weights; optimizer state is not touched (reset or restore it separately). A
    refused adapter (:class:`~events.adapter_format.AdapterFormatError` for the format,
    :class:`~events.errors.ConfigError` for a misfit) leaves the slot untouched.
    """
    adapter = read_peft_adapter(adapter_dir)
    if adapter.rank > model.max_rank:
        raise ConfigError(
            f"adapter in {adapter.path} has r={adapter.rank} but this model's max_rank is "
            f"{model.max_rank}; build the model with max_rank >= r"
        )
    layers = dict(model.slot_layers())
    for module, (a_r_I, b_O_r) in adapter.weights.items():
        layer = layers.get(module)
        if layer is None:
            raise ConfigError(
                f"adapter tensor '{PEFT_PREFIX}{module}.lora_A.weight' in {adapter.path} "
                f"targets {module!r}, which is not a slot layer of this {model.model_type!r} "
                f"model (slot layers: {model.target_modules})"
            )
        a_shape, b_shape = (adapter.rank, layer.in_features), (layer.out_features, adapter.rank)
        if tuple(a_r_I.shape) != a_shape or tuple(b_O_r.shape) != b_shape:
            raise ConfigError(
                f"adapter tensors for {module!r} have shapes {tuple(a_r_I.shape)} and "
                f"{tuple(b_O_r.shape)}; expected {a_shape} and {b_shape} for r={adapter.rank}"
            )
    model.table.configure(slot, adapter.rank, adapter.scale * adapter.rank)
    model.store.weight_S_R_Q[slot].zero_()
    model.store.grad_S_R_Q[slot].zero_()
    for module, (a_r_I, b_O_r) in adapter.weights.items():
        a_dst, bt_dst = model.layer_weights(slot, module)
        a_dst.copy_(a_r_I)
        bt_dst.copy_(b_O_r.T)
