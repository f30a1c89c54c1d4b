"""The numeric half of client-driven adapters: their rows, losses and ``optim_step``.

A client-driven adapter (a Tinker-SDK client behind the gateway) hands the trainer datums and
a loss name instead of sample groups. Its rows join the mixed step of the dataset-driven
adapters (one forward, one backward, :func:`trainer.mixed_step.mixed_step`), with these
differences, all per slot so nothing couples two adapters:

- **Loss** (the Tinker SDK's definitions, summed over target tokens, not averaged), per target
  token ``t`` with log-prob ``logp_t`` under the adapter, sampler log-prob ``q_t``, weight
  ``w_t`` and advantage ``A_t``::

      cross_entropy:        loss_t = -w_t · logp_t
      importance_sampling:  loss_t = -exp(logp_t - q_t) · A_t
      ppo:                  loss_t = -min(ρ_t · A_t, clip(ρ_t, lo, hi) · A_t)

  with ``ρ_t = exp(logp_t - q_t)``

  (``lo``/``hi``: ``loss_config``'s ``clip_low_threshold`` / ``clip_high_threshold``, default
  0.8 / 1.2, ratio bounds as in the SDK.)
- **No optimizer step** in the mixed step: the slot's gradient is added to its accumulator
  (:class:`trainer.step.HeldSlots`); the client's ``optim_step`` later applies AdamW to the
  accumulated gradient with the request's settings (:func:`client_optim_step`) and zeroes it.

Batch rows: a datum's ``tokens`` are the row; every entry after the first is a target (loss
mask 1), its weight or advantage in ``advantages_B_T`` and its sampler log-prob in
``old_logprobs_B_T``; sampling temperature 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from events.schema import Datum, LossFnName
from events.specs import OptimSpec
from trainer.batch import TrainBatch
from trainer.batching import PackedRow, pack
from trainer.losses import LossFn, LossOutput
from trainer.optim import SlotAdamW, SlotStepResult

LOSS_KINDS: tuple[LossFnName, ...] = ("cross_entropy", "importance_sampling", "ppo")
"""Index ``k + 1`` of a loss name is its code in :class:`RoutedLoss`'s ``kind_S`` (0: not a
client slot)."""

PPO_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


class ClientRequestError(ValueError):
    """A client's request cannot be carried out as given (the message names the value)."""


@dataclass(frozen=True)
class ClientRows:
    """One client-driven adapter's part of a step: its slot, datums and loss."""

    slot: int
    datums: Sequence[Datum]
    loss_fn: LossFnName
    loss_config: Mapping[str, float]
    backward: bool = True


def check_datums(datums: Sequence[Datum], vocab_size: int, max_tokens: int) -> None:
    """Raise :class:`ClientRequestError` for a datum the step cannot take (named by index)."""
    for i, d in enumerate(datums):
        n = len(d.tokens)
        if n < 2:
            raise ClientRequestError(f"datum {i} has {n} tokens; a datum needs at least 2")
        if n > max_tokens:
            raise ClientRequestError(
                f"datum {i} has {n} tokens, more than this trainer's limit of {max_tokens}; "
                "shorten it or split it"
            )
        for field in ("weights", "logprobs", "advantages"):
            values = getattr(d, field)
            if values and len(values) != n:
                raise ClientRequestError(
                    f"datum {i}: {field} has {len(values)} entries for {n} tokens; give one per "
                    "token (or none)"
                )
        bad = [t for t in d.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ClientRequestError(
                f"datum {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )


def check_loss_config(loss_fn: LossFnName, config: Mapping[str, float]) -> None:
    """Raise :class:`ClientRequestError` for settings ``loss_fn`` does not take or cannot use."""
    allowed = set(PPO_CLIP_DEFAULTS) if loss_fn == "ppo" else set()
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ClientRequestError(
            f"loss_fn_config key {unknown[0]!r} is not a setting of {loss_fn}; "
            f"use {sorted(allowed) or 'none'}"
        )
    if loss_fn == "ppo":
        lo, hi = ppo_bounds(config)
        if not 0 <= lo <= 1 <= hi:
            raise ClientRequestError(
                f"ppo clip thresholds ({lo}, {hi}) are invalid; use 0 <= low <= 1 <= high"
            )


def ppo_bounds(config: Mapping[str, float]) -> tuple[float, float]:
    merged = {**PPO_CLIP_DEFAULTS, **config}
    return float(merged["clip_low_threshold"]), float(merged["clip_high_threshold"])


def client_rows(clients: Sequence[ClientRows]) -> list[PackedRow]:
    """The rows of every client datum (see the module docstring), in order."""
    rows = []
    for c in clients:
        for d in c.datums:
            n = len(d.tokens)
            weight = d.weights if c.loss_fn == "cross_entropy" else d.advantages
            rows.append(
                PackedRow(
                    slot=c.slot,
                    tokens=d.tokens,
                    loss_from=1,
                    advantages=weight or [0.0] * n,
                    old_logprobs=d.logprobs or [0.0] * n,
                )
            )
    return rows


def client_batch(clients: Sequence[ClientRows], pad_id: int) -> TrainBatch:
    """The client rows alone as a batch (a solo step's)."""
    return pack(client_rows(clients), pad_id)


@dataclass(frozen=True)
class RoutedLoss:
    """The dataset-driven slots' loss on their rows, each client slot's Tinker loss on its own.

    ``kind_S``: per slot, 0 (a dataset-driven slot: ``dataset`` applies) or the code of its
    client loss (``LOSS_KINDS``); ``low_S`` / ``high_S``: ppo ratio bounds. The metrics are the
    dataset loss's (zero on client rows: a client's metrics are its summed loss).
    """

    dataset: LossFn
    kind_S: Tensor
    low_S: Tensor
    high_S: Tensor

    @classmethod
    def build(cls, dataset: LossFn, clients: Sequence[ClientRows], num_slots: int) -> RoutedLoss:
        kind, low, high = (
            torch.zeros(num_slots, dtype=torch.long),
            torch.zeros(num_slots),
            torch.zeros(num_slots),
        )
        for c in clients:
            kind[c.slot] = LOSS_KINDS.index(c.loss_fn) + 1
            low[c.slot], high[c.slot] = ppo_bounds(c.loss_config)
        return cls(dataset, kind, low, high)

    @property
    def needs_reference(self) -> bool:
        return self.dataset.needs_reference

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        device = logprobs_B_T.device
        kind_B = self.kind_S.to(device)[batch.slot_ids_B.clamp(min=0)]
        client_B = kind_B > 0
        old = batch.old_logprobs_B_T
        old_B_T = torch.zeros_like(logprobs_B_T) if old is None else old.to(logprobs_B_T.dtype)
        # the client branch only ever sees client rows' values (others: a harmless ratio of 1)
        q_B_T = torch.where(client_B[:, None], old_B_T, logprobs_B_T.detach())
        ratio_B_T = torch.exp(logprobs_B_T - q_B_T)
        adv_B_T = torch.where(client_B[:, None], batch.advantages_B_T.to(logprobs_B_T.dtype), 0.0)
        low_B = self.low_S.to(device)[batch.slot_ids_B.clamp(min=0)][:, None]
        high_B = self.high_S.to(device)[batch.slot_ids_B.clamp(min=0)][:, None]
        clipped_B_T = torch.minimum(torch.maximum(ratio_B_T, low_B), high_B)
        by_kind = {
            1: -adv_B_T * logprobs_B_T,
            2: -ratio_B_T * adv_B_T,
            3: -torch.minimum(ratio_B_T * adv_B_T, clipped_B_T * adv_B_T),
        }
        client_B_T = torch.zeros_like(logprobs_B_T)
        for code, values_B_T in by_kind.items():
            client_B_T = torch.where((kind_B == code)[:, None], values_B_T, client_B_T)
        if bool(client_B.all()):
            return client_B_T, {}
        dataset_B_T, extras = self.dataset(logprobs_B_T, batch, ref_logprobs_B_T)
        per_token_B_T = torch.where(client_B[:, None], client_B_T, dataset_B_T)
        return per_token_B_T, {k: torch.where(client_B[:, None], 0.0, v) for k, v in extras.items()}


def adam_spec(
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_clip_norm: float,
) -> OptimSpec:
    """The slot settings of one ``optim_step`` (constant schedule: the client schedules its
    learning rate itself); raises :class:`ClientRequestError` naming a bad value."""
    checks = [
        ("learning_rate", learning_rate, learning_rate > 0, "use a learning rate > 0"),
        ("beta1", beta1, 0 <= beta1 < 1, "use 0 <= beta1 < 1"),
        ("beta2", beta2, 0 <= beta2 < 1, "use 0 <= beta2 < 1"),
        ("eps", eps, eps > 0, "use eps > 0"),
        ("weight_decay", weight_decay, weight_decay >= 0, "use weight_decay >= 0"),
        ("grad_clip_norm", grad_clip_norm, grad_clip_norm >= 0, "use >= 0 (0: no clipping)"),
    ]
    for name, value, ok, fix in checks:
        if not ok:
            raise ClientRequestError(f"adam_params.{name} = {value!r} is invalid; {fix}")
    return OptimSpec(
        lr=learning_rate,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        schedule="constant",
        max_grad_norm=grad_clip_norm,
    )


def client_optim_step(
    optimizer: SlotAdamW,
    slot: int,
    accumulator_R_Q: Tensor,
    rank: int,
    spec: OptimSpec,
    total_steps: int,
) -> SlotStepResult:
    """Apply one AdamW update to ``slot`` from its accumulated gradient with ``spec``'s
    settings, then zero the accumulator. Other slots' weights and gradients are untouched
    (the store's gradient is zeroed first, so only this slot's block is non-zero)."""
    optimizer.update_settings(slot, spec, total_steps)
    optimizer.zero_grad()
    optimizer.store.grad_S_R_Q[slot, :rank] = accumulator_R_Q[:rank]
    result = optimizer.step([slot])[slot]
    optimizer.zero_grad()
    accumulator_R_Q.zero_()
    return result


def new_accumulator(optimizer: SlotAdamW) -> Tensor:
    """A zero gradient accumulator of one slot (``[R, Q]``, the store's dtype and device)."""
    return torch.zeros_like(optimizer.store.grad_S_R_Q[0])
