"""The rows of one train step: :class:`TrainBatch`, the record every loss and the step read.

Its own module so that the losses (which read a batch) and the train step (which runs a loss on
one) both import it and not each other; :mod:`trainer.batching` builds it from sample groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from events.errors import MultiLoraError
from trainer.lora import BASE_SLOT


class BatchError(MultiLoraError, ValueError):
    """A train batch's tensors have inconsistent shapes or dtypes."""


@dataclass(frozen=True)
class TrainBatch:
    """The rows of one train step. Per-token fields are ``[B, T]`` aligned with the tokens.

    - ``slot_ids_B`` (int): the slot of each row, or ``BASE_SLOT`` (no loss).
    - ``tokens_B_T`` (int), ``attention_mask_B_T`` (1 = real token; left or right padding).
    - ``loss_mask_B_T``: 1 where token ``t`` is a training target (e.g. completion tokens);
      column 0 and padding are never targets, whatever the mask says.
    - ``advantages_B_T`` (float): per-token weight of each target (RL advantage, or 1 for SFT).
    - ``old_logprobs_B_T`` (float, optional): rollout-time ``log p(token t)``; column 0 unused.
    - ``temperature_B`` (float, optional): the sampling temperature of each row; log-probs are
      then those of ``softmax(logits / T)``, the distribution the rollout sampled from.
    """

    slot_ids_B: Tensor
    tokens_B_T: Tensor
    attention_mask_B_T: Tensor
    loss_mask_B_T: Tensor
    advantages_B_T: Tensor
    old_logprobs_B_T: Tensor | None = None
    temperature_B: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens_B_T.dim() != 2:
            raise BatchError(f"tokens_B_T must be [B, T]; got shape {tuple(self.tokens_B_T.shape)}")
        b, t = self.tokens_B_T.shape
        if t < 2:
            raise BatchError(f"sequences need >= 2 tokens to have a target; got T={t}")
        if tuple(self.slot_ids_B.shape) != (b,):
            raise BatchError(
                f"slot_ids_B has shape {tuple(self.slot_ids_B.shape)}; expected ({b},)"
            )
        for name in ("attention_mask_B_T", "loss_mask_B_T", "advantages_B_T", "old_logprobs_B_T"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, t):
                raise BatchError(f"{name} has shape {tuple(value.shape)}; expected ({b}, {t})")
        for name in ("slot_ids_B", "tokens_B_T"):
            if getattr(self, name).is_floating_point():
                raise BatchError(f"{name} must be an integer tensor")

    @property
    def target_mask_B_T(self) -> Tensor:
        """Bool: token is a target (loss mask, real token, not column 0, not a base row)."""
        mask = self.loss_mask_B_T.bool() & self.attention_mask_B_T.bool()
        mask[:, 0] = False
        return mask & (self.slot_ids_B != BASE_SLOT)[:, None]

    def select(self, rows_B: Tensor) -> TrainBatch:
        """The batch restricted to / reordered by ``rows_B``."""
        old = self.old_logprobs_B_T
        return TrainBatch(
            slot_ids_B=self.slot_ids_B[rows_B],
            tokens_B_T=self.tokens_B_T[rows_B],
            attention_mask_B_T=self.attention_mask_B_T[rows_B],
            loss_mask_B_T=self.loss_mask_B_T[rows_B],
            advantages_B_T=self.advantages_B_T[rows_B],
            old_logprobs_B_T=None if old is None else old[rows_B],
            temperature_B=None if self.temperature_B is None else self.temperature_B[rows_B],
        )

    def to(self, device: torch.device | str) -> TrainBatch:
        old = self.old_logprobs_B_T
        return TrainBatch(
            slot_ids_B=self.slot_ids_B.to(device),
            tokens_B_T=self.tokens_B_T.to(device),
            attention_mask_B_T=self.attention_mask_B_T.to(device),
            loss_mask_B_T=self.loss_mask_B_T.to(device),
            advantages_B_T=self.advantages_B_T.to(device),
            old_logprobs_B_T=None if old is None else old.to(device),
            temperature_B=None if self.temperature_B is None else self.temperature_B.to(device),
        )
