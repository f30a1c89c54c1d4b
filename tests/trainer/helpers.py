"""Batch builders and model helpers shared by the trainer tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from events.specs import OptimSpec
from trainer.batch import TrainBatch
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW

VOCAB_LOW, VOCAB_HIGH = 4, 104  # char-tokenizer ids that are not special tokens


def random_batch(
    slot_ids: Sequence[int],
    seq_len: int,
    seed: int,
    *,
    padding: str = "right",
    min_len: int = 4,
) -> TrainBatch:
    """Random rows of random real length in ``[min_len, seq_len]``; the later half are targets.

    ``padding`` is ``"right"`` or ``"left"`` (pad id 0, attention mask 0 there).
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(slot_ids)
    tokens = torch.zeros(b, seq_len, dtype=torch.long)
    mask = torch.zeros(b, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_len, dtype=torch.long)
    for row in range(b):
        n = int(torch.randint(min_len, seq_len + 1, (1,), generator=gen))
        real = torch.randint(VOCAB_LOW, VOCAB_HIGH, (n,), generator=gen)
        span = slice(0, n) if padding == "right" else slice(seq_len - n, seq_len)
        tokens[row, span] = real
        mask[row, span] = 1
        targets = torch.zeros(n, dtype=torch.long)
        targets[n // 2 :] = 1
        loss_mask[row, span] = targets
    advantages = torch.randn(b, seq_len, generator=gen)
    return TrainBatch(
        slot_ids_B=torch.tensor(list(slot_ids), dtype=torch.long),
        tokens_B_T=tokens,
        attention_mask_B_T=mask,
        loss_mask_B_T=loss_mask,
        advantages_B_T=advantages,
    )


def build(
    path: Path,
    adapters: dict[int, tuple[int, float, OptimSpec]],
    *,
    num_slots: int = 4,
    max_rank: int = 8,
    total_steps: int = 10,
    kernel: str = "auto",
) -> tuple[MultiLoraModel, SlotAdamW]:
    """A slot model plus optimizer with ``adapters[slot] = (rank, alpha, spec)``, seed = slot."""
    model = MultiLoraModel.from_pretrained(path, num_slots, max_rank, kernel=kernel)  # type: ignore[arg-type]
    optimizer = SlotAdamW(model.store, model.table)
    for slot, (rank, alpha, spec) in adapters.items():
        model.configure_slot(slot, rank, alpha, seed=100 + slot)
        optimizer.configure(slot, spec, total_steps)
    return model, optimizer


def slot_weights(model: MultiLoraModel, slot: int) -> Tensor:
    """The slot's true-rank block ``[r, Q]`` (a copy)."""
    return model.store.weight_S_R_Q[slot, : model.table.rank(slot)].clone()


def randomize_b(model: MultiLoraModel, slot: int, seed: int, std: float = 0.05) -> None:
    """Give ``slot`` a non-zero B (true rank only) so its adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, _ in model.slot_layers():
        _, bt_r_O = model.layer_weights(slot, name)
        bt_r_O.copy_(torch.randn(bt_r_O.shape, generator=gen) * std)


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())
