"""PEFT-format export and import of one slot.

Export writes ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as
``peft.PeftModel.save_pretrained`` lays them out for a LoRA on a causal LM: tensors
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``) sliced to the slot's true rank, ``r``, ``lora_alpha`` (scale ``alpha / r``),
``target_modules``, ``base_model_name_or_path`` and ``task_type="CAUSAL_LM"``. PEFT, vLLM and
SGLang load it unchanged. The slot's ``[r, Q]`` weight block is copied to the CPU once and sliced
per layer (in the slot dtype unless ``dtype`` says otherwise); :func:`peft_files` builds both
files in memory, and :func:`export_slot` writes each to a temporary name and renames it, so a
reader never sees a half-written file.

Import accepts what a plain LoRA needs and refuses, naming the key, what slot layers cannot
express: DoRA, ``modules_to_save``, biases, per-module rank/alpha patterns, ``fan_in_fan_out``
(GPT-2 style Conv1D), and any tensor for a module that is not a slot layer. Decisions:

- ``use_rslora`` is folded into alpha: rsLoRA's scale ``alpha / sqrt(r)`` equals ours with
  ``alpha' = alpha * sqrt(r)``; a later export writes ``alpha'`` with ``use_rslora: false``.
- ``lora_dropout`` is ignored: it only acts in training mode and slot layers never apply it.
- Wrapped modules the adapter does not target get zero weights (no effect on outputs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from events.errors import ConfigError
from trainer.inject import MultiLoraModel
from trainer.safetensors_buf import to_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_UNSUPPORTED: dict[str, object] = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
}
"""Config keys whose non-default values an import refuses (default shown)."""


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
    tensors: dict[str, Tensor] = {}
    for name, a_r_I, bt_r_O in model.split_layers(weight_r_Q.cpu()):
        out_dtype = dtype or a_r_I.dtype
        # strided views of the host copy: to_safetensors copies each once, into the file bytes
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a_r_I.to(out_dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = bt_r_O.T.to(out_dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": rank,
        "lora_alpha": _json_number(model.table.alpha(slot)),
        "target_modules": list(model.target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    return {
        WEIGHTS_NAME: to_safetensors(tensors, metadata={"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


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
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # the config last: its presence marks completion
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(files[name])
        os.replace(tmp, out / name)
    return out


def import_peft(model: MultiLoraModel, slot: int, adapter_dir: str | Path) -> None:
    """Load the PEFT LoRA adapter in ``adapter_dir`` into ``slot`` (configured from its file).

    The slot gets the adapter's rank and alpha (rsLoRA folded in) and exactly its weights;
    optimizer state is not touched (reset or restore it separately).
    """
    adapter = Path(adapter_dir)
    config = json.loads((adapter / CONFIG_NAME).read_text())
    rank, alpha = _check_config(config, adapter, model.max_rank)
    layers = dict(model.slot_layers())
    loaded: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(adapter / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
            module, kind = _parse_key(key)
            if module not in layers:
                raise ConfigError(
                    f"adapter tensor {key!r} targets {module!r}, which is not a slot layer of "
                    f"this {model.model_type!r} model (slot layers: {model.target_modules})"
                )
            loaded.setdefault(module, {})[kind] = f.get_tensor(key)
    for module, pair in loaded.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(f"adapter in {adapter} has only {sorted(pair)} for {module!r}")
        layer = layers[module]
        a_shape, b_shape = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(pair["lora_A"].shape) != a_shape or tuple(pair["lora_B"].shape) != b_shape:
            raise ConfigError(
                f"adapter tensors for {module!r} have shapes {tuple(pair['lora_A'].shape)} and "
                f"{tuple(pair['lora_B'].shape)}; expected {a_shape} and {b_shape} for r={rank}"
            )
    model.table.configure(slot, rank, alpha)
    model.store.weight_S_R_Q[slot].zero_()
    model.store.grad_S_R_Q[slot].zero_()
    for module, pair in loaded.items():
        a_r_I, bt_r_O = model.layer_weights(slot, module)
        a_r_I.copy_(pair["lora_A"])
        bt_r_O.copy_(pair["lora_B"].T)


def _check_config(config: dict, adapter: Path, max_rank: int) -> tuple[int, float]:
    if config.get("peft_type") != "LORA":
        raise ConfigError(
            f"adapter in {adapter} has peft_type {config.get('peft_type')!r}; only LORA"
        )
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value not in (default, [], {}, False, None):
            raise ConfigError(
                f"adapter in {adapter} sets {key}={value!r}, which slot layers do not support; "
                f"re-train or merge it without {key}"
            )
    if config.get("bias", "none") != "none":
        raise ConfigError(f"adapter in {adapter} has bias={config['bias']!r}; only 'none'")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ConfigError(
                f"adapter in {adapter} sets {key}={config[key]!r}; per-module ranks/alphas are "
                "not supported by slot layers (one rank and alpha per adapter)"
            )
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if not 1 <= rank <= max_rank:
        raise ConfigError(
            f"adapter in {adapter} has r={rank} but this model's max_rank is {max_rank}; "
            "build the model with max_rank >= r"
        )
    if config.get("use_rslora", False):
        alpha *= math.sqrt(rank)
    return rank, alpha


def _parse_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A[.<adapter>].weight`` → ``(module, "lora_A")``."""
    parts = key.split(".")
    if not key.startswith(PEFT_PREFIX) or parts[-1] != "weight":
        raise ConfigError(f"unexpected tensor {key!r} in a PEFT LoRA file")
    body = parts[2:-1]
    for kind in ("lora_A", "lora_B"):
        if kind in body:
            i = body.index(kind)
            if i < len(body) - 2:
                break
            return ".".join(body[:i]), kind
    raise ConfigError(f"tensor {key!r} is not a LoRA A/B weight (embedding or magnitude tensors?)")


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
