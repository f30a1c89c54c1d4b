"""One training step for every adapter in a batch: one forward, one backward, per-slot updates.

Loss normalization is per adapter: slot ``s``'s loss is the sum of its per-token losses over its
own target tokens divided by its own target-token count, and the step minimizes
``Σ_s loss_s``. Since rows of different slots never interact (attention is per row, base
weights are frozen, each slot's parameters only see its own rows), the gradient reaching slot
``s`` is exactly the gradient of ``loss_s`` alone: the same as training it solo on its rows.
Clipping, schedule and Adam state are per slot too (:class:`trainer.optim.SlotAdamW`).

Skips (reported in :class:`SlotMetrics`, state untouched, step counter not bumped):
``"no target tokens"``, ``"non-finite loss"`` (the slot is left out of the backward) and
``"non-finite gradient norm"`` (from the optimizer). Other slots step normally.

Rows routed to ``BASE_SLOT`` may be present (e.g. padding rows); they carry no loss. Rows are
sorted by slot and ``T`` is right-padded to a multiple of 8 before the forward (so slot layers
slice contiguous segments and the grouped GEMM kernel applies); neither changes any result.

Data parallel (:mod:`trainer.dist_step`): each rank runs :func:`train_step` on its share of the
rows with the step's ``slots`` and a :class:`StepReducer`. The per-slot sums (target tokens,
loss, metrics) are summed over the ranks *before* anything is normalised or decided, so every
rank divides by the slot's global token count and takes the same skip decisions; the slot
gradients (local sum / global tokens) are summed before the optimizer, so every rank applies the
same update. Without a reducer nothing of this runs (one process, no ``torch.distributed``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.batch import TrainBatch
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT
from trainer.losses import LossFn
from trainer.optim import SlotAdamW


@dataclass(frozen=True)
class SlotMetrics:
    """What one train step did for one slot.

    ``loss``: the slot's normalized loss; ``grad_norm``: its gradient norm before clipping (NaN
    when skipped before the backward); ``tokens``: its target tokens; ``lr``: the rate used (or
    that would have been); ``step``: the slot's update count after the step; ``extras``: the
    loss's per-token metrics averaged over the slot's target tokens.
    """

    slot: int
    loss: float
    grad_norm: float
    tokens: int
    lr: float
    step: int
    skipped: bool
    reason: str | None = None
    extras: dict[str, float] = field(default_factory=dict)


TIME_MULTIPLE = 8
"""The train step right-pads ``T`` to a multiple of this (grouped GEMM segment alignment)."""


def pad_time(batch: TrainBatch, multiple: int) -> TrainBatch:
    """Right-pad every per-token field to a multiple of ``multiple`` tokens (mask 0, no loss).

    Causal attention and mask-derived positions make this invisible to the real tokens.
    """
    extra = -batch.tokens_B_T.shape[1] % multiple
    if extra == 0:
        return batch
    old = batch.old_logprobs_B_T
    return dataclasses.replace(
        batch,
        tokens_B_T=F.pad(batch.tokens_B_T, (0, extra)),
        attention_mask_B_T=F.pad(batch.attention_mask_B_T, (0, extra)),
        loss_mask_B_T=F.pad(batch.loss_mask_B_T, (0, extra)),
        advantages_B_T=F.pad(batch.advantages_B_T, (0, extra)),
        old_logprobs_B_T=None if old is None else F.pad(old, (0, extra)),
    )


class StepReducer(Protocol):
    """How the ranks of a data-parallel step combine their parts (sums, in place, on every rank).

    :class:`trainer.ranks.RankGroup` implements it with all-reduces; a one-process step has none.
    """

    def sum_stats(self, stats_N_S: Tensor) -> None:
        """Sum the per-slot statistics ``[N, S + 1]`` (tokens, loss, metrics) over the ranks."""
        ...

    def sum_grads(self, grads: Sequence[Tensor]) -> None:
        """Sum these gradient tensors (the stepped slots' true-rank blocks) over the ranks."""
        ...


def prepare_batch(batch: TrainBatch, device: torch.device) -> TrainBatch:
    """The batch as the step runs it: rows sorted by slot (stable), ``T`` padded, on ``device``."""
    order_B = torch.argsort(batch.slot_ids_B.cpu(), stable=True)  # contiguous slot segments
    return pad_time(batch.select(order_B), TIME_MULTIPLE).to(device)


def present_slots(batch: TrainBatch) -> list[int]:
    """The adapter slots with rows in ``batch``, sorted (``BASE_SLOT`` rows left out)."""
    return sorted({s for s in batch.slot_ids_B.tolist() if s != BASE_SLOT})


@dataclass(frozen=True)
class SlotSums:
    """Per-slot sums over a batch's target tokens; index ``S`` (the last) bins the base rows.

    ``loss_S`` keeps its graph (the backward starts from it); the others are detached.
    ``logprobs_B_T`` / ``per_token_B_T``: each target's log-prob and loss (column 0 unused).
    """

    tokens_S: Tensor
    loss_S: Tensor
    extras_K_S: dict[str, Tensor]
    logprobs_B_T: Tensor
    per_token_B_T: Tensor

    def stats_N_S(self) -> Tensor:
        """``[2 + K, S + 1]``: tokens, loss, then each metric (what the ranks sum)."""
        return torch.stack([self.tokens_S, self.loss_S.detach(), *self.extras_K_S.values()])


def slot_sums(model: MultiLoraModel, batch: TrainBatch, loss_fn: LossFn) -> SlotSums:
    """Forward (and the reference forward if the loss needs it), per-token loss, per-slot sums."""
    args = (batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
    logprobs_B_T = F.pad(model.logprobs(*args, temperature_B=batch.temperature_B), (1, 0))
    ref_B_T = None
    if loss_fn.needs_reference:
        ref = model.logprobs(*args, adapters=False, temperature_B=batch.temperature_B)
        ref_B_T = F.pad(ref, (1, 0))
    per_token_B_T, extras = loss_fn(logprobs_B_T, batch, ref_B_T)

    target_B_T = batch.target_mask_B_T
    num_slots = model.num_slots
    bins_B = torch.where(batch.slot_ids_B == BASE_SLOT, num_slots, batch.slot_ids_B)

    def per_slot_sum(values_B_T: Tensor) -> Tensor:
        row_B = torch.where(target_B_T, values_B_T, 0.0).sum(1)
        return row_B.new_zeros(num_slots + 1).index_add(0, bins_B, row_B)

    return SlotSums(
        tokens_S=per_slot_sum(torch.ones_like(per_token_B_T, dtype=torch.float32)),
        loss_S=per_slot_sum(per_token_B_T),
        extras_K_S={k: per_slot_sum(v.detach().float()) for k, v in extras.items()},
        logprobs_B_T=logprobs_B_T.detach(),
        per_token_B_T=per_token_B_T.detach(),
    )


def skip_reasons(
    slots: Sequence[int], tokens: Sequence[float], losses: Sequence[float]
) -> dict[int, str]:
    """The slots the step leaves out of the backward, and why (from the normalised sums)."""
    skipped: dict[int, str] = {}
    for slot in slots:
        if tokens[slot] == 0:
            skipped[slot] = "no target tokens"
        elif not math.isfinite(losses[slot]):
            skipped[slot] = "non-finite loss"
    return skipped


@dataclass(frozen=True)
class HeldSlots:
    """The client-driven slots of a step (:mod:`trainer.clients`): they take part in the forward
    and backward but not in the optimizer step.

    Their loss is the *sum* over their target tokens (the Tinker convention: the client weights
    its tokens), not the per-slot mean; the gradient of each slot in ``accumulate`` is added to
    its accumulator (``[R, Q]``, the store's layout; only ``[:rank]`` is touched) for a later
    ``optim_step``; the slots in ``forward_only`` get no backward at all.
    """

    accumulate: Mapping[int, Tensor] = field(default_factory=dict)
    forward_only: frozenset[int] = frozenset()

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(self.accumulate) | self.forward_only


@dataclass
class RowOutputs:
    """Filled by :func:`train_step` when given: per row of the batch *as passed in* (not
    sorted), each target's log-prob and loss, ``[B, T]`` on the CPU (column 0 unused)."""

    logprobs_B_T: Tensor | None = None
    per_token_B_T: Tensor | None = None


def train_step(
    model: MultiLoraModel,
    optimizer: SlotAdamW,
    batch: TrainBatch,
    loss_fn: LossFn,
    *,
    timings: dict[str, float] | None = None,
    slots: Sequence[int] | None = None,
    reducer: StepReducer | None = None,
    held: HeldSlots | None = None,
    outputs: RowOutputs | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> dict[int, SlotMetrics]:
    """Train every slot present in ``batch`` by one step; return metrics keyed by slot.

    ``while_waiting`` is called once the forward is launched, right before the host first
    waits for the device (the trainer lets its version writers run then, so they do not
    compete with the step's own host work for the interpreter).

    ``held`` slots are forwarded (and, unless forward-only, backwarded into their accumulators)
    but not stepped; their metrics' ``loss`` is the summed loss and ``step`` unchanged.
    ``outputs``, when given, receives every row's target log-probs and per-token losses.

    ``timings``, when given, receives ``forward_backward`` and ``optimizer`` wall seconds (the
    device is synchronised at each boundary, so the split is right on CUDA too).

    ``slots`` and ``reducer`` make this one rank's part of a data-parallel step (see the module
    docstring): ``slots`` are the slots of the whole step (this rank's rows may hold only some),
    and the metrics are the whole step's, the same on every rank.
    """
    t_start = time.perf_counter()
    device = model.store.weight_S_R_Q.device
    held = held or HeldSlots()
    if held.slots and reducer is not None:
        raise ValueError("held (client-driven) slots are not supported in a data-parallel step")
    order_B = torch.argsort(batch.slot_ids_B.cpu(), stable=True)
    width = batch.tokens_B_T.shape[1]
    batch = prepare_batch(batch, device)
    slots = present_slots(batch) if slots is None else sorted(slots)
    for slot in slots:
        optimizer.spec(slot)  # raises for a slot without optimizer settings
    optimizer.zero_grad()
    if outputs is not None:
        outputs.logprobs_B_T = None
        outputs.per_token_B_T = None

    sums = slot_sums(model, batch, loss_fn)
    stats_N_S = sums.stats_N_S()
    if reducer is not None:
        reducer.sum_stats(stats_N_S)
    tokens_S = stats_N_S[0].clamp(min=1)
    if held.slots:  # summed, not averaged: divide by 1
        summed = torch.tensor(sorted(held.slots), device=tokens_S.device)
        tokens_S = tokens_S.index_fill(0, summed, 1.0)
    loss_S = sums.loss_S / tokens_S  # local sum / global tokens: the ranks' parts add up
    host_N_S = torch.cat([stats_N_S[:1], stats_N_S[1:] / tokens_S])
    if while_waiting is not None:
        while_waiting()
    host = host_N_S.tolist()
    tokens, losses, extra_rows = host[0], host[1], host[2:]
    if outputs is not None:
        inverse_B = torch.empty_like(order_B)
        inverse_B[order_B] = torch.arange(len(order_B))
        outputs.logprobs_B_T = sums.logprobs_B_T[inverse_B.to(device), :width].cpu()
        outputs.per_token_B_T = sums.per_token_B_T[inverse_B.to(device), :width].cpu()

    skipped = skip_reasons([s for s in slots if s not in held.forward_only], tokens, losses)
    backward = [s for s in slots if s not in skipped and s not in held.forward_only]
    live = [s for s in backward if s not in held.accumulate]
    if backward:
        total = loss_S[torch.tensor(backward, device=loss_S.device)].sum()
        if total.requires_grad:  # False only on a rank whose rows hold none of ``live``
            with warnings.catch_warnings():
                # Slot parameters are views into one flat store, so autograd notes that their
                # .grad views are not dense; accumulation into them is intended (see SlotStore).
                warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
                total.backward()
        if reducer is not None:
            grad = optimizer.store.grad_S_R_Q
            reducer.sum_grads([grad[s, : model.table.rank(s)] for s in live])
    for slot, accumulator_R_Q in held.accumulate.items():
        if slot in backward:
            rank = model.table.rank(slot)
            accumulator_R_Q[:rank] += optimizer.store.grad_S_R_Q[slot, :rank]
    t_backward = _synced_clock(device)
    stepped = optimizer.step(live)
    if timings is not None:
        timings["forward_backward"] = t_backward - t_start
        timings["optimizer"] = _synced_clock(device) - t_backward

    metrics: dict[int, SlotMetrics] = {}
    for slot in slots:
        result = stepped.get(slot)
        reason = skipped.get(slot) or (result.reason if result else None)
        if slot in held.slots and slot not in skipped:
            reason = None  # not stepped by design: its optim_step comes later
        metrics[slot] = SlotMetrics(
            slot=slot,
            loss=losses[slot],
            grad_norm=result.grad_norm if result else float("nan"),
            tokens=int(tokens[slot]),
            lr=result.lr if result else optimizer.current_lr(slot),
            step=optimizer.step_count(slot),
            skipped=reason is not None,
            reason=reason,
            extras={k: row[slot] for k, row in zip(sums.extras_K_S, extra_rows, strict=True)},
        )
    return metrics


def _synced_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
