"""The GRPO-family RL loss: group-normalised advantages, DAPO's asymmetric PPO clip, optional KL.

Per prompt, ``G`` samples with rewards ``r_G`` give advantages (one per sample, broadcast over the
sample's completion tokens)::

    grpo:    A_i = (r_i - mean(r_G)) / (std(r_G) + eps)
    drgrpo:  A_i =  r_i - mean(r_G)                       (Dr. GRPO: no std normalisation)

Per completion token ``t`` of a row routed to slot ``s``, with ``ρ_t = exp(log π_θ(t) - log μ(t))``
the importance ratio against the *rollout* log-probs ``μ`` (the behaviour policy that sampled the
token, possibly ``max_staleness`` versions old)::

    pg_t   = -min(ρ_t · A, clip(ρ_t, 1 - ε_low[s], 1 + ε_high[s]) · A)
    pg_t   = min(pg_t, -c[s] · A)          when A < 0 and c[s] > 0   (dual clip, Ye et al. 2020)
    kl_t   = min(exp(ref_t - logp_t) - (ref_t - logp_t) - 1, KL_MAX)         (k3 estimator)
    loss_t = pg_t + β[s] · kl_t

The dual clip bounds what one token with a negative advantage can do when the current policy
already makes it far likelier than the (possibly stale) behaviour policy did: without it such a
token's loss grows with ``ρ`` without limit and a single stale sample can dominate a step.
The k3 estimator is clamped at :data:`KL_MAX` for the same reason: a sampled token the policy
has since made far less likely than the base model does gives ``exp(ref - logp)`` in the
thousands, and one such token's gradient would outweigh the whole step's.

``ref_t`` is the base model's log-prob (the same forward with the adapter switched off); it is
computed only when some slot has ``β > 0``. The train step normalises per adapter by that adapter's
own completion-token count (DAPO's token-level normalisation), so long answers are not
down-weighted and adapters never share a normaliser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from events.specs import LossSpec
from trainer.batch import TrainBatch
from trainer.lora import BASE_SLOT
from trainer.losses import LossOutput

KL_MAX = 10.0
"""Upper bound of one token's k3 KL term (beyond it the token adds no KL gradient)."""


def group_advantages(rewards_G: Sequence[float], kind: str, eps: float = 1e-6) -> list[float]:
    """Advantages of one prompt's samples (see the module docstring), in float64; ``std`` is
    the population one; rewards too large to sum give non-finite advantages (the train step
    then skips the slot). Plain Python: it runs per prompt group as each group lands, on the
    trainer's critical path when it waits for rollouts, and a handful of small tensor ops cost
    several times more than the arithmetic."""
    n = len(rewards_G)
    mean = sum(rewards_G) / n
    centred_G = [r - mean for r in rewards_G]
    if kind == "drgrpo":
        return centred_G
    std = math.sqrt(sum(c * c for c in centred_G) / n) if n > 1 else 0.0
    return [c / (std + eps) for c in centred_G]


@dataclass(frozen=True)
class PPOClipLoss:
    """Per-slot PPO/DAPO loss; ``*_S`` tensors are indexed by slot id (length ``num_slots``)."""

    clip_low_S: Tensor
    clip_high_S: Tensor
    kl_coef_S: Tensor
    clip_ratio_c_S: Tensor

    @classmethod
    def from_specs(cls, specs: dict[int, LossSpec], num_slots: int) -> PPOClipLoss:
        """Build from each present slot's LossSpec (absent slots get harmless defaults)."""
        low, high, kl = torch.zeros(num_slots), torch.zeros(num_slots), torch.zeros(num_slots)
        dual = torch.zeros(num_slots)
        for slot, spec in specs.items():
            low[slot], high[slot], kl[slot] = spec.clip_low, spec.clip_high, spec.kl_coef
            dual[slot] = spec.clip_ratio_c
        return cls(low, high, kl, dual)

    @property
    def needs_reference(self) -> bool:
        return bool((self.kl_coef_S > 0).any())

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        if batch.old_logprobs_B_T is None:
            raise ValueError("PPOClipLoss needs the rollout log-probs (batch.old_logprobs_B_T)")
        device = logprobs_B_T.device
        slot_B = batch.slot_ids_B.clamp(min=0)
        live_B = (batch.slot_ids_B != BASE_SLOT).to(logprobs_B_T.dtype)
        low_B = self.clip_low_S.to(device)[slot_B][:, None]
        high_B = self.clip_high_S.to(device)[slot_B][:, None]
        kl_B = self.kl_coef_S.to(device)[slot_B][:, None] * live_B[:, None]
        adv_B_T = batch.advantages_B_T.to(logprobs_B_T.dtype)
        log_ratio_B_T = (logprobs_B_T - batch.old_logprobs_B_T.to(logprobs_B_T.dtype)).clamp(
            -20.0, 20.0
        )
        ratio_B_T = torch.exp(log_ratio_B_T)
        clipped_B_T = torch.minimum(torch.maximum(ratio_B_T, 1.0 - low_B), 1.0 + high_B)
        surrogate_B_T = torch.minimum(ratio_B_T * adv_B_T, clipped_B_T * adv_B_T)
        loss_B_T = -surrogate_B_T
        clip_mask_B_T = (ratio_B_T < 1.0 - low_B) | (ratio_B_T > 1.0 + high_B)
        if bool((self.clip_ratio_c_S > 0).any()):
            c_B = self.clip_ratio_c_S.to(device)[slot_B][:, None]
            dual_B_T = (adv_B_T < 0) & (c_B > 0) & (ratio_B_T > c_B)
            loss_B_T = torch.where(dual_B_T, -c_B * adv_B_T, loss_B_T)
            clip_mask_B_T = clip_mask_B_T | dual_B_T
        metrics = {
            "clip_frac": clip_mask_B_T.float().detach(),
            "ratio": ratio_B_T.detach(),
            "neg_logprob": -logprobs_B_T.detach(),
        }
        if ref_logprobs_B_T is not None:
            delta_B_T = ref_logprobs_B_T.to(logprobs_B_T.dtype) - logprobs_B_T
            kl_B_T = (torch.exp(delta_B_T) - delta_B_T - 1.0).clamp(max=KL_MAX)
            loss_B_T = loss_B_T + kl_B * kl_B_T
            metrics["kl"] = kl_B_T.detach()
        return loss_B_T, metrics
