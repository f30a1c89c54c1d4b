"""One mixed step: the sample groups of every ready adapter → one batch → one forward/backward.

:func:`mixed_step` is the numeric half of step 4 (Train) of the loop in :mod:`trainer.process`:
it builds the mixed batch (:func:`trainer.batching.group_rows`, :func:`~trainer.batching.pack`),
the per-slot RL loss (:class:`trainer.rl_loss.PPOClipLoss`, each slot with its own clip bounds
and KL weight) and runs :func:`trainer.step.train_step` over all of it. Its result says, per
slot, whether the step counts:

- **trained**: the slot's weights and optimizer moved;
- **skipped**: the slot had rows, but the train step left it untouched (no target tokens,
  non-finite loss or gradient norm), or it had no row because *every* sample of its step was
  unusable (failed rewards: raised, hung past the deadline, NaN; failed prompts; samples over
  the token budget) — a failure, which the process counts, with a reason naming the cause
  (:func:`trainer.skips.every_sample_failed`: the samples' most common reason);
- **empty**: some samples were usable but no group was (every group dropped by the filters:
  fewer than two usable samples, or zero variance under ``filter_zero_variance``), so it had
  no row — not a failure, the step is just redone.

Isolation of failures: a skipped or empty slot contributes no loss and gets no optimizer step,
so the other slots of the same step train exactly as they would alone (:mod:`trainer.step`).
Rows longer than the trainer's token budget (:func:`token_budget`) never enter the batch
(:mod:`trainer.batching`), so one adapter's run-on samples cannot pad the whole mixed batch
to their width.

It touches no bus and no store; what the outcome means for the lifecycle is the process's.
The process is given its step function (:data:`StepFn`): :func:`mixed_step` in one process, or
:class:`trainer.dist_step.DataParallelStep`, the same step spread over ranks, which passes its
own ``train`` to :func:`mixed_step`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from trainer.batch import TrainBatch
from trainer.batching import AdapterRows, RowStats, group_rows, pack
from trainer.client_step import ClientRows, RoutedLoss, client_rows
from trainer.inject import MultiLoraModel
from trainer.losses import LossFn
from trainer.optim import SlotAdamW
from trainer.rl_loss import PPOClipLoss
from trainer.skips import every_sample_failed
from trainer.step import HeldSlots, RowOutputs, SlotMetrics, train_step


@dataclass(frozen=True)
class SlotOutcome:
    """What one mixed step did for one adapter's slot: ``stats`` of its rows, ``result`` of the
    train step (``None``: the slot had no usable group, hence no row)."""

    stats: RowStats
    result: SlotMetrics | None

    @property
    def trained(self) -> bool:
        return self.result is not None and not self.result.skipped

    @property
    def failed(self) -> bool:
        """The step was skipped: the train step skipped the slot, or every sample of the slot
        was unusable (rather than the filters leaving it nothing to train on)."""
        if self.result is None:
            return self.stats.all_failed
        return self.result.skipped

    @property
    def reason(self) -> str:
        """Why the step did not count (``""`` when it trained)."""
        if self.result is None:
            if self.stats.all_failed:
                return every_sample_failed(self.stats.failures, self.stats.samples_seen)
            return "no usable sample group"
        if not self.result.skipped:
            return ""
        return self.result.reason or "skipped by the train step"

    def step_metrics(self, *, staleness: float, step_s: float) -> dict[str, float]:
        """The ``step_done`` metrics of a trained slot: its rows' statistics, the train step's
        loss, gradient norm, learning rate and token count, then the loss's own metrics."""
        m = self.result
        if m is None or m.skipped:
            raise ValueError(f"step_metrics of a slot that did not train ({self.reason})")
        return {
            **self.stats.metrics(),
            "loss": m.loss,
            "grad_norm": m.grad_norm,
            "lr": m.lr,
            "tokens": float(m.tokens),
            "staleness": staleness,
            "step_s": step_s,
            **m.extras,
        }


@dataclass(frozen=True)
class ClientOutcome:
    """What the step computed for one client-driven slot: per datum, its targets' log-probs and
    losses (Tinker's alignment: ``len(tokens) - 1`` entries, entry ``i`` about token ``i + 1``),
    the loss summed over them all, and whether a gradient was accumulated (``skipped``: why
    not, e.g. a non-finite loss; ``""`` when it was, or when it was a forward only)."""

    logprobs: tuple[tuple[float, ...], ...]
    elementwise_loss: tuple[tuple[float, ...], ...]
    loss_sum: float
    tokens: int
    skipped: str = ""


@dataclass(frozen=True)
class MixedStep:
    """The outcome of each slot of the step, and the train step's ``forward_backward`` and
    ``optimizer`` wall seconds; ``clients``: the outcome of each client-driven slot."""

    outcomes: dict[int, SlotOutcome]
    timings: dict[str, float]
    clients: dict[int, ClientOutcome] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Target tokens of the slots that trained."""
        return sum(o.result.tokens for o in self.outcomes.values() if o.result and o.trained)

    @property
    def adapters(self) -> int:
        return sum(1 for o in self.outcomes.values() if o.trained)


class TrainFn(Protocol):
    """Runs the train step over a built batch (:func:`trainer.step.train_step`'s signature)."""

    def __call__(
        self,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        batch: TrainBatch,
        loss_fn: LossFn,
        *,
        timings: dict[str, float] | None = None,
        held: HeldSlots | None = None,
        outputs: RowOutputs | None = None,
        while_waiting: Callable[[], None] | None = None,
    ) -> dict[int, SlotMetrics]: ...


class StepFn(Protocol):
    """``(model, optimizer, rows, pad_id, clients=..., accumulators=..., while_waiting=...) ->
    MixedStep``: what the trainer process calls per step (``clients``: client-driven slots'
    rows; ``accumulators``: their gradient accumulators, by slot; ``while_waiting``: called
    once while the device computes, see :func:`trainer.step.train_step`)."""

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
    ) -> MixedStep: ...


def token_budget(model: MultiLoraModel) -> int | None:
    """The most tokens (prompt + completion) one row may have: the base model's
    ``max_position_embeddings`` (``None`` when its config gives none: no budget)."""
    positions = getattr(model.hf_model.config, "max_position_embeddings", None)
    return int(positions) if positions else None


def mixed_step(
    model: MultiLoraModel,
    optimizer: SlotAdamW,
    rows: Sequence[AdapterRows],
    pad_id: int,
    *,
    clients: Sequence[ClientRows] = (),
    accumulators: Mapping[int, Tensor] | None = None,
    train: TrainFn = train_step,
    while_waiting: Callable[[], None] | None = None,
) -> MixedStep:
    """Train every adapter of ``rows`` (one per slot) by one step, in one forward/backward;
    with ``clients``, their rows join the same forward/backward (:mod:`trainer.client_step`):
    gradients go to ``accumulators[slot]``, nothing is stepped for them. Samples over the
    model's :func:`token_budget` are left out (counted in their slot's stats)."""
    t_start = time.perf_counter()
    dataset_rows, stats = group_rows(rows, token_budget(model))
    loss_fn: LossFn = PPOClipLoss.from_specs({r.slot: r.loss for r in rows}, model.num_slots)
    held, outputs = None, None
    if clients:
        loss_fn = RoutedLoss.build(loss_fn, clients, model.num_slots)
        accumulators = accumulators or {}
        held = HeldSlots(
            accumulate={c.slot: accumulators[c.slot] for c in clients if c.backward},
            forward_only=frozenset(c.slot for c in clients if not c.backward),
        )
        outputs = RowOutputs()
    all_rows = dataset_rows + client_rows(clients)
    batch = pack(all_rows, pad_id) if all_rows else None
    timings: dict[str, float] = {"pack": time.perf_counter() - t_start}
    results = (
        train(
            model,
            optimizer,
            batch,
            loss_fn,
            timings=timings,
            held=held,
            outputs=outputs,
            while_waiting=while_waiting,
        )
        if batch
        else {}
    )
    if not batch and while_waiting is not None:
        while_waiting()
    outcomes = {r.slot: SlotOutcome(stats[r.slot], results.get(r.slot)) for r in rows}
    client_outcomes = {}
    if outputs is not None:
        client_outcomes = _client_outcomes(clients, results, outputs, len(dataset_rows))
    return MixedStep(outcomes, timings, client_outcomes)


def _client_outcomes(
    clients: Sequence[ClientRows],
    results: Mapping[int, SlotMetrics],
    outputs: RowOutputs,
    first_row: int,
) -> dict[int, ClientOutcome]:
    """Per client slot, its datums' target log-probs and losses, read back from ``outputs``."""
    if outputs.logprobs_B_T is None or outputs.per_token_B_T is None:
        raise ValueError("the train step filled no row outputs for the client slots")
    logprobs_B_T, per_token_B_T = outputs.logprobs_B_T.tolist(), outputs.per_token_B_T.tolist()
    row = first_row
    outcomes: dict[int, ClientOutcome] = {}
    for c in clients:
        lps, losses = [], []
        for d in c.datums:
            n = len(d.tokens)
            lps.append(tuple(logprobs_B_T[row][1:n]))
            losses.append(tuple(per_token_B_T[row][1:n]))
            row += 1
        m = results.get(c.slot)
        skipped = (m.reason or "skipped") if m is not None and m.skipped else ""
        outcomes[c.slot] = ClientOutcome(
            logprobs=tuple(lps),
            elementwise_loss=tuple(losses),
            loss_sum=float(sum(sum(x) for x in losses)),
            tokens=sum(len(x) for x in losses),
            skipped=skipped if c.backward else "",
        )
    return outcomes
