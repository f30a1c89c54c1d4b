"""Per-token loss functions for the train step, behind one Protocol.

Every per-token tensor a loss sees is aligned with ``batch.tokens_B_T``: entry ``[b, t]`` is
about token ``t`` as a *target*, predicted from tokens ``< t`` (so column 0 is never a target).
A loss returns a per-token loss ``[B, T]`` and named per-token metrics ``[B, T]``; the train
step masks both with the batch's target mask and reduces them per slot (each slot by its own
token count), so a loss never normalizes and never needs to know about slots — unless it has
per-slot settings, which it reads from ``batch.slot_ids_B``.

A loss that needs the base model's log-probs (a KL anchor) sets ``needs_reference = True``; the
train step then runs the reference forward (adapters off, no grad) and passes it in, otherwise
it passes ``None``. Rollout-time log-probs (for importance ratios) are ``batch.old_logprobs_B_T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor

from trainer.batch import TrainBatch

LossOutput = tuple[Tensor, dict[str, Tensor]]
"""``(per_token_loss_B_T, {metric name: per-token values [B, T]})``."""


class LossFn(Protocol):
    """A per-token loss: ``(logprobs_B_T, batch, ref_logprobs_B_T | None) -> LossOutput``.

    ``logprobs_B_T`` (float32, with grad) are the adapters' log-probs of each target token;
    ``ref_logprobs_B_T`` the base model's (no grad), given only when ``needs_reference``.
    Values at non-target positions are arbitrary and masked out by the caller; a loss must not
    produce non-finite values at target positions unless the inputs there are non-finite.
    """

    @property
    def needs_reference(self) -> bool: ...

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput: ...


@dataclass(frozen=True)
class WeightedNll:
    """Token-level cross-entropy weighted by the advantages: ``loss = -A_t · log p(token_t)``.

    With all advantages 1 this is plain supervised fine-tuning; with per-sample advantages it is
    REINFORCE. Metrics: ``nll`` (``-log p``, detached).
    """

    needs_reference: ClassVar[bool] = False

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        per_token_B_T = -batch.advantages_B_T * logprobs_B_T
        return per_token_B_T, {"nll": -logprobs_B_T.detach()}


weighted_nll = WeightedNll()
"""The stateless :class:`WeightedNll` instance."""
