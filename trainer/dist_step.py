"""The mixed step spread over ``R`` data-parallel ranks, each holding the whole slot model.

Rank 0 (the trainer process, the only one on the bus) builds the batch as
:func:`trainer.mixed_step.mixed_step` does, sorts its rows by slot and cuts them into ``R``
contiguous shares of about equal token counts (:func:`split_rows`). Per step, what crosses
between the ranks is:

1. **the order** (:class:`StepOrder`, pickled through the rank group's control channel): each
   rank's share of the rows, the loss (its per-slot settings), the step's slots, and the
   settings of every slot handed off this step (below);
2. **hand-off tensors** (broadcast from rank 0, only for the slots handed off): the slot's
   true-rank weights and Adam moments, ``[r, Q]`` each;
3. **per-slot sums** (all-reduce of ``[2 + K, S + 1]``): target tokens, loss and metrics, summed
   before anything is normalised, so every rank divides by the slot's global token count and
   takes the same skip decisions (:func:`trainer.step.train_step` with a reducer);
4. **slot gradients** (all-reduce, one flat buffer): the true-rank gradient blocks of the slots
   that step, local loss sum / global tokens on each rank, so the sum is the whole batch's
   gradient. Only LoRA tensors cross; the frozen base never does.

Every rank then applies the same per-slot AdamW to the same gradients, so the slots of the
step hold the same weights, moments and counters on every rank afterwards.

**The hand-off rule.** Slots are configured, reset, released and restored only on rank 0, by the
process, outside the train step; the other ranks never see those calls. Instead, rank 0 keeps a
token per slot — ``(revision, update count)``, where ``revision`` is
:attr:`trainer.batching.AdapterRows.revision` (the process passes the registration id) and the
update count is the slot optimizer's — recorded after every step the ranks took part in. Before
a step, each slot of the batch whose token differs (or whose revision is ``None``) is handed
off: its full state (:mod:`trainer.slot_state`: weights, moments, update count, settings) goes to
every rank, which loads it. A slot that only train steps moved keeps its token, so nothing but
the step's data is sent. Whoever puts another state into a slot without a new registration
(none of today's callers) must pass a new revision.

Failure: a rank that dies breaks the next collective (or is seen dead before the step); rank 0
raises the group's :class:`~trainer.ranks.RankError` naming it, the trainer exits non-zero, and
its restart resumes every adapter from its last durable version under a new epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from events.errors import ConfigError, MultiLoraError
from trainer.batch import TrainBatch
from trainer.batching import AdapterRows
from trainer.client_step import ClientRows
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT
from trainer.losses import LossFn
from trainer.mixed_step import MixedStep, mixed_step
from trainer.optim import SlotAdamW
from trainer.slot_state import StateValue, load_slot_state, slot_state_dict
from trainer.step import (
    HeldSlots,
    RowOutputs,
    SlotMetrics,
    StepReducer,
    present_slots,
    train_step,
)

STATE_TENSORS = ("weight_r_Q", "exp_avg_r_Q", "exp_avg_sq_r_Q")
"""The tensors of a slot state, in the order a hand-off broadcasts them."""


@dataclass(frozen=True)
class SlotHandoff:
    """A slot's state minus its tensors (those follow by broadcast, in :data:`STATE_TENSORS`
    order): the scalars of :func:`trainer.slot_state.slot_state_dict`."""

    slot: int
    settings: dict[str, int | float | str]

    @property
    def rank(self) -> int:
        return int(self.settings["rank"])


@dataclass(frozen=True)
class StepOrder:
    """What one rank runs for one step: its ``share`` of the rows (CPU), the ``loss_fn``, the
    step's ``slots`` (all ranks' rows together) and the slots handed off before it."""

    share: TrainBatch
    loss_fn: LossFn
    slots: tuple[int, ...]
    handoffs: tuple[SlotHandoff, ...] = ()


@dataclass(frozen=True)
class Stop:
    """Rank 0 is stopping: every other rank leaves the group and exits 0."""

    reason: str = "rank 0 stopping"


RankMessage = StepOrder | Stop
"""What rank 0 scatters to the ranks, one per rank, on the control channel."""


class RankComm(StepReducer, Protocol):
    """What a data-parallel step needs from its rank group (:class:`trainer.ranks.RankGroup`)."""

    @property
    def rank(self) -> int: ...

    @property
    def world(self) -> int: ...

    def scatter(self, messages: Sequence[RankMessage] | None) -> RankMessage:
        """Rank 0 passes one message per rank and gets its own; the others pass ``None``."""
        ...

    def broadcast_(self, tensor: Tensor) -> None:
        """Overwrite ``tensor`` with rank 0's (rank 0's is sent)."""
        ...

    def check(self) -> None:
        """Raise a :class:`MultiLoraError` naming a rank that has died."""
        ...

    def failure(self, exc: BaseException) -> MultiLoraError | None:
        """The error naming the rank whose death caused ``exc`` (``None``: no rank died)."""
        ...


def split_rows(batch: TrainBatch, world: int) -> list[TrainBatch]:
    """``world`` shares of ``batch``: rows sorted by slot (stable), cut into contiguous runs of
    about equal real-token counts, each trimmed of the padding columns it does not need.

    Every share has at least one row: with fewer rows than ranks, a rank gets one row routed to
    ``BASE_SLOT`` (no loss, no gradient) so that it still takes part in the collectives.
    """
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    order_B = torch.argsort(batch.slot_ids_B.cpu(), stable=True)
    ordered = batch.select(order_B)
    b = ordered.slot_ids_B.shape[0]
    cum_B = ordered.attention_mask_B_T.sum(1).double().cumsum(0)
    total = float(cum_B[-1]) if b else 0.0
    cuts = [0]
    for r in range(1, world):
        if b <= world:  # a row each while they last
            cuts.append(min(r, b))
            continue
        target = total * r / world
        k = int(torch.searchsorted(cum_B, torch.tensor(target, dtype=torch.float64)))
        # rows [0, k) reach just under the target, [0, k + 1) reach it: take the nearer
        below = float(cum_B[k - 1]) if k > 0 else 0.0
        above = float(cum_B[k]) if k < b else total
        cut = k + 1 if above - target < target - below else k
        cuts.append(min(max(cut, cuts[-1] + 1), b - (world - r)))  # a row at least, each
    cuts.append(b)
    shares = []
    for lo, hi in itertools.pairwise(cuts):
        if hi > lo:
            shares.append(_trim(ordered.select(torch.arange(lo, hi))))
        else:
            idle = ordered.select(torch.arange(0, 1))
            shares.append(dataclasses.replace(idle, slot_ids_B=torch.full((1,), BASE_SLOT)))
    return shares


def _trim(batch: TrainBatch) -> TrainBatch:
    """Drop trailing columns no row attends to (pure padding: invisible to the loss)."""
    real_T = batch.attention_mask_B_T.bool().any(0)
    width = max(2, int(real_T.nonzero().max()) + 1 if real_T.any() else 2)
    if width >= batch.tokens_B_T.shape[1]:
        return batch
    old = batch.old_logprobs_B_T
    return dataclasses.replace(
        batch,
        tokens_B_T=batch.tokens_B_T[:, :width],
        attention_mask_B_T=batch.attention_mask_B_T[:, :width],
        loss_mask_B_T=batch.loss_mask_B_T[:, :width],
        advantages_B_T=batch.advantages_B_T[:, :width],
        old_logprobs_B_T=None if old is None else old[:, :width],
    )


def handoff_of(model: MultiLoraModel, optimizer: SlotAdamW, slot: int) -> SlotHandoff:
    """Rank 0: the hand-off record of ``slot`` (its tensors are broadcast from the store)."""
    state = slot_state_dict(model, optimizer, slot)
    settings = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
    return SlotHandoff(slot, settings)


def exchange_handoffs(
    model: MultiLoraModel,
    optimizer: SlotAdamW,
    handoffs: Sequence[SlotHandoff],
    comm: RankComm,
) -> None:
    """Every rank: rank 0 broadcasts each handed-off slot's tensors from its store; the others
    receive them and load the whole state into the same slot."""
    device = model.store.weight_S_R_Q.device
    for handoff in handoffs:
        slot, rank = handoff.slot, handoff.rank
        if comm.rank == 0:
            sources = (
                model.store.weight_S_R_Q[slot, :rank],
                optimizer.exp_avg_S_R_Q[slot, :rank],
                optimizer.exp_avg_sq_S_R_Q[slot, :rank],
            )
            for tensor in sources:  # contiguous: the [:r] prefix of a row of [S, R, Q]
                comm.broadcast_(tensor)
            continue
        dtypes = (model.store.weight_S_R_Q.dtype, torch.float32, torch.float32)
        state: dict[str, StateValue] = dict(handoff.settings)
        for key, dtype in zip(STATE_TENSORS, dtypes, strict=True):
            tensor = torch.empty((rank, model.store.width), dtype=dtype, device=device)
            comm.broadcast_(tensor)
            state[key] = tensor
        load_slot_state(model, optimizer, slot, state)


def run_order(
    model: MultiLoraModel,
    optimizer: SlotAdamW,
    order: StepOrder,
    comm: RankComm,
    *,
    timings: dict[str, float] | None = None,
) -> dict[int, SlotMetrics]:
    """Every rank, every step: take the hand-offs, then train on the share with the group."""
    exchange_handoffs(model, optimizer, order.handoffs, comm)
    return train_step(
        model,
        optimizer,
        order.share,
        order.loss_fn,
        timings=timings,
        slots=order.slots,
        reducer=comm,
    )


class DataParallelStep:
    """Rank 0's step function (a :data:`trainer.mixed_step.StepFn`): the process calls it as it
    calls :func:`~trainer.mixed_step.mixed_step`; the rank group does the rest."""

    def __init__(self, comm: RankComm) -> None:
        if comm.rank != 0:
            raise ValueError(f"DataParallelStep runs on rank 0; this is rank {comm.rank}")
        self.comm = comm
        self._synced: dict[int, tuple[str, int]] = {}
        self.last_handoffs: tuple[int, ...] = ()
        """The slots handed off before the latest step (what tests and logs read)."""

    def __call__(
        self,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        rows: Sequence[AdapterRows],
        pad_id: int,
        *,
        clients: Sequence[ClientRows] = (),
        accumulators: Mapping[int, Tensor] | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> MixedStep:
        if while_waiting is not None:
            while_waiting()  # the ranks' step syncs as it goes: nothing to overlap with here
        if clients:
            raise ConfigError(
                "client-driven adapters (the Tinker gateway) train in a one-rank trainer for now; "
                "start the trainer with --ranks 1 to serve them"
            )
        revisions = {r.slot: r.revision for r in rows}

        def train(
            model: MultiLoraModel,
            optimizer: SlotAdamW,
            batch: TrainBatch,
            loss_fn: LossFn,
            *,
            timings: dict[str, float] | None = None,
            held: HeldSlots | None = None,
            outputs: RowOutputs | None = None,
            while_waiting: Callable[[], None] | None = None,
        ) -> dict[int, SlotMetrics]:
            return self.train(model, optimizer, batch, loss_fn, revisions, timings=timings)

        return mixed_step(model, optimizer, rows, pad_id, train=train)

    def train(
        self,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        batch: TrainBatch,
        loss_fn: LossFn,
        revisions: Mapping[int, str | None],
        *,
        timings: dict[str, float] | None = None,
    ) -> dict[int, SlotMetrics]:
        """One step of ``batch`` over the group (the hand-off rule of the module docstring).

        ``timings`` as :func:`~trainer.step.train_step`'s, its ``forward_backward`` counting
        from the orders' dispatch (splitting, hand-offs and scatter included).
        """
        t_start = time.perf_counter()
        slots = present_slots(batch)
        stale = [s for s in slots if not self._in_sync(optimizer, s, revisions.get(s))]
        handoffs = tuple(handoff_of(model, optimizer, s) for s in stale)
        self.last_handoffs = tuple(stale)
        orders = [
            StepOrder(share, loss_fn, tuple(slots), handoffs)
            for share in split_rows(batch, self.comm.world)
        ]
        for slot in slots:
            self._synced.pop(slot, None)  # until this step has completed on every rank
        self.comm.check()
        try:
            own = self.comm.scatter(orders)
            if not isinstance(own, StepOrder):
                raise MultiLoraError(f"rank 0 received {type(own).__name__}, not its StepOrder")
            metrics = run_order(model, optimizer, own, self.comm, timings=timings)
            if timings is not None:
                elapsed = time.perf_counter() - t_start
                timings["forward_backward"] = elapsed - timings.get("optimizer", 0.0)
        except RuntimeError as exc:  # what a collective raises when a peer is gone
            failure = self.comm.failure(exc)
            if failure is None:
                raise
            raise failure from exc
        for slot in slots:
            revision = revisions.get(slot)
            if revision is not None:
                self._synced[slot] = (revision, optimizer.step_count(slot))
        return metrics

    def _in_sync(self, optimizer: SlotAdamW, slot: int, revision: str | None) -> bool:
        """Whether every rank holds ``slot``'s current state (its token is the recorded one)."""
        return revision is not None and self._synced.get(slot) == (
            revision,
            optimizer.step_count(slot),
        )
