"""Everything that makes one adapter's training resumable, as a flat dict, for any slot.

:func:`slot_state_dict` captures a slot's weights and Adam moments at its true rank (the
``[:r]`` prefix of its ``[R, Q]`` store block, so the state does not depend on the slot index or
the model's max rank), its update count (= schedule position) and its optimizer settings.
:func:`load_slot_state` puts it into any slot of a model with the same layer layout and the
training continues bit for bit as if never interrupted (data order and RNG are the caller's).

Keys (all scalars are plain Python values; tensors are on CPU, contiguous)::

    weight_r_Q, exp_avg_r_Q, exp_avg_sq_r_Q     [r, Q] tensors (weight in the slot dtype)
    rank, alpha, step, total_steps, layout_width
    lr, beta1, beta2, eps, weight_decay, schedule, warmup_steps, min_lr_ratio, max_grad_norm

``layout_width`` is ``Q``, the store width; loading into a model whose ``Q`` differs (another
base model or family) raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from events.errors import ConfigError
from events.specs import OptimSpec
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW

StateValue = Tensor | int | float | str
"""Values of a slot state dict (``schedule`` is the one string)."""


def slot_state_dict(
    model: MultiLoraModel, optimizer: SlotAdamW, slot: int
) -> dict[str, StateValue]:
    """Snapshot ``slot``'s weights, moments, step and settings (copies on CPU)."""
    rank = model.table.rank(slot)
    if rank == 0:
        raise ConfigError(f"slot {slot} is not configured; nothing to save")
    spec = optimizer.spec(slot)
    return {
        "weight_r_Q": model.store.weight_S_R_Q[slot, :rank].to("cpu", copy=True),
        "exp_avg_r_Q": optimizer.exp_avg_S_R_Q[slot, :rank].to("cpu", copy=True),
        "exp_avg_sq_r_Q": optimizer.exp_avg_sq_S_R_Q[slot, :rank].to("cpu", copy=True),
        "rank": rank,
        "alpha": model.table.alpha(slot),
        "step": optimizer.step_count(slot),
        "total_steps": optimizer.total_steps(slot),
        "layout_width": model.store.width,
        "lr": spec.lr,
        "beta1": spec.betas[0],
        "beta2": spec.betas[1],
        "eps": spec.eps,
        "weight_decay": spec.weight_decay,
        "schedule": spec.schedule,
        "warmup_steps": spec.warmup_steps,
        "min_lr_ratio": spec.min_lr_ratio,
        "max_grad_norm": spec.max_grad_norm,
    }


def load_slot_state(
    model: MultiLoraModel, optimizer: SlotAdamW, slot: int, state: dict[str, StateValue]
) -> None:
    """Make ``slot`` exactly the saved adapter: config, weights, moments, step, settings."""
    width = int(_scalar(state, "layout_width"))
    if width != model.store.width:
        raise ConfigError(
            f"slot state has layout width {width} but this model's is {model.store.width}; "
            "it was saved from a different base model"
        )
    rank = int(_scalar(state, "rank"))
    spec = OptimSpec(
        lr=float(_scalar(state, "lr")),
        betas=(float(_scalar(state, "beta1")), float(_scalar(state, "beta2"))),
        eps=float(_scalar(state, "eps")),
        weight_decay=float(_scalar(state, "weight_decay")),
        schedule=str(state["schedule"]),  # type: ignore[arg-type]
        warmup_steps=int(_scalar(state, "warmup_steps")),
        min_lr_ratio=float(_scalar(state, "min_lr_ratio")),
        max_grad_norm=float(_scalar(state, "max_grad_norm")),
    )
    if spec.schedule not in ("constant", "cosine"):
        raise ConfigError(f"slot state has unknown schedule {spec.schedule!r}")
    tensors: dict[str, Tensor] = {}
    for key in ("weight_r_Q", "exp_avg_r_Q", "exp_avg_sq_r_Q"):
        value = state.get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) != (rank, width):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(f"slot state {key} is {shape}; expected a tensor of {(rank, width)}")
        tensors[key] = value
    model.table.configure(slot, rank, float(_scalar(state, "alpha")))
    optimizer.configure(slot, spec, int(_scalar(state, "total_steps")))
    with torch.no_grad():
        model.store.weight_S_R_Q[slot].zero_()
        model.store.weight_S_R_Q[slot, :rank].copy_(tensors["weight_r_Q"])
        optimizer.exp_avg_S_R_Q[slot, :rank].copy_(tensors["exp_avg_r_Q"])
        optimizer.exp_avg_sq_S_R_Q[slot, :rank].copy_(tensors["exp_avg_sq_r_Q"])
    optimizer.set_step_count(slot, int(_scalar(state, "step")))


def _scalar(state: dict[str, StateValue], key: str) -> int | float:
    if key not in state:
        raise ConfigError(f"slot state lacks {key!r}; it was not written by slot_state_dict")
    value = state[key]
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, str):
        raise ConfigError(f"slot state {key!r} is the string {value!r}; expected a number")
    return value
