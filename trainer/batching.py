"""Turn scored sample groups into one mixed :class:`~trainer.batch.TrainBatch`.

Every sample becomes one row: ``prompt_ids + completion_ids``, right-padded. Targets are the
completion tokens; their advantage is the sample's group-normalised advantage and their old
log-prob is the rollout log-prob the worker returned (column ``t`` holds ``log μ(token_t)``),
under the adapter's sampling temperature, which the row carries so the trainer scores the same
tempered distribution.

Samples whose reward failed are left out of their group (no advantage can be computed for them);
a group with fewer than two usable samples gives no learning signal and is dropped, as is a group
whose rewards are all equal when the adapter asked for ``filter_zero_variance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from events.schema import PromptGroup
from events.specs import LossSpec
from trainer.batch import TrainBatch
from trainer.rl_loss import group_advantages


@dataclass(frozen=True)
class AdapterRows:
    """One adapter's contribution to a step: its slot, loss settings and sample groups.

    ``revision`` names what was last put into the slot outside a train step (the process: the
    registration id; ``None``: unknown), so a data-parallel step can tell a slot that only its
    own steps moved from one configured or restored since (:mod:`trainer.dist_step`).
    """

    slot: int
    loss: LossSpec
    groups: Sequence[PromptGroup]
    temperature: float = 1.0
    revision: str | None = None


@dataclass
class RowStats:
    """Per-slot statistics of what went into the batch (for ``step_done`` metrics)."""

    samples: int = 0
    groups: int = 0
    groups_dropped: int = 0
    samples_failed: int = 0
    reward_sum: float = 0.0
    length_sum: int = 0
    rewards: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {
            "reward_mean": self.reward_sum / n,
            "response_length": self.length_sum / n,
            "samples": float(self.samples),
            "groups": float(self.groups),
            "groups_dropped": float(self.groups_dropped),
            "samples_failed": float(self.samples_failed),
        }


@dataclass(frozen=True)
class PackedRow:
    """One row of a train batch before padding: its slot, tokens, the first target position
    (``loss_from``: targets are ``tokens[loss_from:]``), per-token advantages and rollout
    log-probs (both ``len(tokens)`` long) and its sampling temperature."""

    slot: int
    tokens: Sequence[int]
    loss_from: int
    advantages: Sequence[float]
    old_logprobs: Sequence[float]
    temperature: float = 1.0


def group_rows(adapters: Sequence[AdapterRows]) -> tuple[list[PackedRow], dict[int, RowStats]]:
    """The rows of every usable sample group (see the module docstring) and per-slot stats."""
    rows: list[PackedRow] = []
    stats: dict[int, RowStats] = {}
    for item in adapters:
        st = stats.setdefault(item.slot, RowStats())
        for group in item.groups:
            usable = [s for s in group.samples if not s.failed and len(s.completion_ids) > 0]
            st.samples_failed += len(group.samples) - len(usable)
            rewards = [s.reward for s in usable]
            flat = len(set(rewards)) <= 1
            if len(usable) < 2 or (flat and item.loss.filter_zero_variance):
                st.groups_dropped += 1
                continue
            st.groups += 1
            n_prompt = len(group.prompt_ids)
            for sample, adv in zip(
                usable, group_advantages(rewards, item.loss.advantage), strict=True
            ):
                n = len(sample.completion_ids)
                rows.append(
                    PackedRow(
                        slot=item.slot,
                        tokens=[*group.prompt_ids, *sample.completion_ids],
                        loss_from=n_prompt,
                        advantages=[0.0] * n_prompt + [adv] * n,
                        old_logprobs=[0.0] * n_prompt + list(sample.logprobs),
                        temperature=item.temperature,
                    )
                )
                st.samples += 1
                st.reward_sum += sample.reward
                st.length_sum += n
                st.rewards.append(sample.reward)
    return rows, stats


def pack(rows: Sequence[PackedRow], pad_id: int) -> TrainBatch:
    """The rows as one right-padded :class:`TrainBatch` (``rows`` must not be empty)."""
    width = max(len(r.tokens) for r in rows)
    b = len(rows)
    tokens_B_T = torch.full((b, width), pad_id, dtype=torch.long)
    attn_B_T = torch.zeros((b, width), dtype=torch.long)
    loss_B_T = torch.zeros((b, width), dtype=torch.long)
    adv_B_T = torch.zeros((b, width), dtype=torch.float32)
    old_B_T = torch.zeros((b, width), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = len(row.tokens)
        tokens_B_T[i, :n] = torch.tensor(row.tokens)
        attn_B_T[i, :n] = 1
        loss_B_T[i, row.loss_from : n] = 1
        adv_B_T[i, :n] = torch.tensor(row.advantages, dtype=torch.float32)
        old_B_T[i, :n] = torch.tensor(row.old_logprobs, dtype=torch.float32)
    return TrainBatch(
        slot_ids_B=torch.tensor([r.slot for r in rows], dtype=torch.long),
        tokens_B_T=tokens_B_T,
        attention_mask_B_T=attn_B_T,
        loss_mask_B_T=loss_B_T,
        advantages_B_T=adv_B_T,
        old_logprobs_B_T=old_B_T,
        temperature_B=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
    )


def build_batch(
    adapters: Sequence[AdapterRows], pad_id: int
) -> tuple[TrainBatch | None, dict[int, RowStats]]:
    """The mixed batch (None when no adapter has a usable group) and per-slot stats."""
    rows, stats = group_rows(adapters)
    return (pack(rows, pad_id) if rows else None), stats
