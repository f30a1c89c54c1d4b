"""Train step: isolation of adapters in mixed batches, skips, slot reuse, loss plumbing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from events.specs import OptimSpec
from tests.trainer.helpers import build, random_batch, rel_diff, slot_weights
from trainer.batch import BatchError, TrainBatch
from trainer.lora import BASE_SLOT
from trainer.losses import LossOutput, weighted_nll
from trainer.step import train_step

ADAPTERS = {
    0: (2, 4.0, OptimSpec(lr=2e-2, max_grad_norm=0.05, weight_decay=0.05)),
    1: (8, 16.0, OptimSpec(lr=5e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.2)),
    3: (5, 5.0, OptimSpec(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
}
ROWS = [1, 0, 3, 1, 1, BASE_SLOT, 0, 1]  # batch shares 2 / 4 / 1 rows, plus a base row
STEPS = 5


def _rows_of(batch: TrainBatch, slot: int) -> TrainBatch:
    return batch.select(torch.nonzero(batch.slot_ids_B == slot).flatten())


@pytest.mark.parametrize("kernel", ["loop", "segments"])
def test_mixed_training_equals_solo_training(tiny_model_dir, kernel):
    path = tiny_model_dir("qwen3")
    mixed, mixed_opt = build(path, ADAPTERS, kernel=kernel)
    start = {slot: slot_weights(mixed, slot) for slot in ADAPTERS}
    solo = {slot: build(path, {slot: ADAPTERS[slot]}, kernel=kernel) for slot in ADAPTERS}
    for k in range(STEPS):
        batch = random_batch(ROWS, 12, seed=k)
        metrics = train_step(mixed, mixed_opt, batch, weighted_nll)
        assert sorted(metrics) == sorted(ADAPTERS)
        for slot, (model, opt) in solo.items():
            alone = train_step(model, opt, _rows_of(batch, slot), weighted_nll)[slot]
            assert not metrics[slot].skipped and not alone.skipped
            assert metrics[slot].tokens == alone.tokens
            assert metrics[slot].loss == pytest.approx(alone.loss, rel=1e-5)
            assert metrics[slot].grad_norm == pytest.approx(alone.grad_norm, rel=1e-4)
            assert metrics[slot].step == k + 1
    assert metrics[0].grad_norm > ADAPTERS[0][2].max_grad_norm  # clipping was active
    for slot, (model, _) in solo.items():
        theta_mixed, theta_solo = slot_weights(mixed, slot), slot_weights(model, slot)
        assert rel_diff(theta_mixed, theta_solo) <= 1e-5
        # the stronger check: the *change* of the weights matches too
        delta_solo = theta_solo - start[slot]
        assert delta_solo.norm() > 1e-3
        assert rel_diff(theta_mixed - start[slot], delta_solo) <= 1e-4
        for moments in ("exp_avg_S_R_Q", "exp_avg_sq_S_R_Q"):
            ours = getattr(mixed_opt, moments)[slot]
            assert rel_diff(ours, getattr(solo[slot][1], moments)[slot]) <= 1e-4


def test_metrics_are_per_slot_means_over_own_tokens(tiny_model_dir):
    model, opt = build(tiny_model_dir("llama"), {0: ADAPTERS[0], 1: ADAPTERS[1]})
    batch = random_batch([0, 1, 1, 0, 1], 9, seed=3)
    with torch.no_grad():
        lp = model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
    metrics = train_step(model, opt, batch, weighted_nll)
    target = batch.target_mask_B_T[:, 1:]
    per_token = -batch.advantages_B_T[:, 1:] * lp
    for slot in (0, 1):
        rows = batch.slot_ids_B == slot
        mask = target & rows[:, None]
        assert metrics[slot].tokens == int(mask.sum())
        assert metrics[slot].loss == pytest.approx(float(per_token[mask].mean()), rel=1e-5)
        assert metrics[slot].extras["nll"] == pytest.approx(float(-lp[mask].mean()), rel=1e-5)
        assert metrics[slot].lr == ADAPTERS[slot][2].lr * (1 if slot == 0 else 0.5)


def _snapshot(model, opt, slot):
    return (
        model.store.weight_S_R_Q[slot].clone(),
        opt.exp_avg_S_R_Q[slot].clone(),
        opt.exp_avg_sq_S_R_Q[slot].clone(),
        opt.step_count(slot),
    )


def _assert_unchanged(before, after):
    for a, b in zip(before[:3], after[:3], strict=True):
        assert torch.equal(a, b)
    assert before[3] == after[3]


def test_nan_loss_skips_only_that_adapter(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    model, opt = build(path, {0: ADAPTERS[0], 1: ADAPTERS[1]})
    solo, solo_opt = build(path, {0: ADAPTERS[0]})
    first = random_batch([0, 1], 9, seed=0)
    train_step(model, opt, first, weighted_nll)
    train_step(solo, solo_opt, _rows_of(first, 0), weighted_nll)
    batch = random_batch([0, 1, 1, 0], 9, seed=1)
    advantages = batch.advantages_B_T.clone()
    advantages[1, -1] = float("nan")
    poisoned = TrainBatch(
        batch.slot_ids_B,
        batch.tokens_B_T,
        batch.attention_mask_B_T,
        batch.loss_mask_B_T,
        advantages,
    )
    poisoned.loss_mask_B_T[1, -1] = 1
    poisoned.attention_mask_B_T[1, -1] = 1
    before = _snapshot(model, opt, 1)
    metrics = train_step(model, opt, poisoned, weighted_nll)
    assert metrics[1].skipped and metrics[1].reason == "non-finite loss"
    assert metrics[1].step == 1
    _assert_unchanged(before, _snapshot(model, opt, 1))
    assert not metrics[0].skipped and metrics[0].step == 2
    train_step(solo, solo_opt, _rows_of(poisoned, 0), weighted_nll)
    assert rel_diff(slot_weights(model, 0), slot_weights(solo, 0)) <= 1e-6


@dataclass(frozen=True)
class InfiniteGradientFor:
    """weighted_nll, plus a term worth 0 whose gradient is +inf on one slot's rows."""

    slot: int
    needs_reference: ClassVar[bool] = False

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        loss_B_T, extras = weighted_nll(logprobs_B_T, batch, ref_logprobs_B_T)
        rows = torch.nonzero(batch.slot_ids_B == self.slot).flatten()
        picked = logprobs_B_T[rows]
        return loss_B_T.index_add(0, rows, torch.sqrt(picked - picked.detach())), extras


def test_infinite_gradient_skips_only_that_adapter(tiny_model_dir):
    path = tiny_model_dir("llama")
    model, opt = build(path, {0: ADAPTERS[0], 3: ADAPTERS[3]})
    solo, solo_opt = build(path, {0: ADAPTERS[0]})
    batch = random_batch([3, 0, 3, 0], 10, seed=2)
    before = _snapshot(model, opt, 3)
    metrics = train_step(model, opt, batch, InfiniteGradientFor(slot=3))
    assert metrics[3].skipped and metrics[3].reason == "non-finite gradient norm"
    assert metrics[3].loss == metrics[3].loss  # the loss itself is finite: only the gradient is not
    train_step(solo, solo_opt, _rows_of(batch, 0), weighted_nll)
    _assert_unchanged(before, _snapshot(model, opt, 3))
    assert not metrics[0].skipped
    assert rel_diff(slot_weights(model, 0), slot_weights(solo, 0)) <= 1e-6


def test_slot_with_no_target_tokens_is_skipped_without_a_step(tiny_model_dir):
    model, opt = build(tiny_model_dir("llama"), {0: ADAPTERS[0], 1: ADAPTERS[1]})
    batch = random_batch([0, 1], 8, seed=0)
    batch.loss_mask_B_T[1] = 0
    metrics = train_step(model, opt, batch, weighted_nll)
    assert metrics[1].skipped and metrics[1].reason == "no target tokens"
    assert metrics[1].tokens == 0 and opt.step_count(1) == 0
    assert not metrics[0].skipped and opt.step_count(0) == 1


def test_reused_slot_keeps_no_trace_of_the_previous_tenant(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    model, opt = build(path, {2: ADAPTERS[1]})
    for k in range(3):
        train_step(model, opt, random_batch([2, 2], 9, seed=k), weighted_nll)
    assert opt.step_count(2) == 3
    model.store.grad_S_R_Q[2] = 1.0  # stale gradients must go too
    new_spec = OptimSpec(lr=3e-2)
    model.release_slot(2)
    opt.release(2)
    model.configure_slot(2, 4, 8.0, seed=55)
    opt.configure(2, new_spec, 7)
    fresh, fresh_opt = build(path, {})
    fresh.configure_slot(2, 4, 8.0, seed=55)
    fresh_opt.configure(2, new_spec, 7)
    _assert_unchanged(_snapshot(fresh, fresh_opt, 2), _snapshot(model, opt, 2))
    assert torch.count_nonzero(model.store.grad_S_R_Q[2]) == 0
    assert opt.current_lr(2) == fresh_opt.current_lr(2)
    for k in range(2):
        batch = random_batch([2, 2], 9, seed=10 + k)
        a = train_step(model, opt, batch, weighted_nll)[2]
        b = train_step(fresh, fresh_opt, batch, weighted_nll)[2]
        assert a == b
    _assert_unchanged(_snapshot(fresh, fresh_opt, 2), _snapshot(model, opt, 2))


@dataclass
class ReferenceProbe:
    """Records the reference log-probs it receives."""

    needs_reference: bool
    seen: list = field(default_factory=list)

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        self.seen.append(ref_logprobs_B_T)
        return weighted_nll(logprobs_B_T, batch, ref_logprobs_B_T)


def test_reference_logprobs_are_computed_only_when_asked(tiny_model_dir):
    model, opt = build(tiny_model_dir("llama"), {0: ADAPTERS[0]})
    batch = random_batch([0, 0], 8, seed=4)
    without = ReferenceProbe(needs_reference=False)
    train_step(model, opt, batch, without)
    assert without.seen == [None]
    with_ref = ReferenceProbe(needs_reference=True)
    train_step(model, opt, batch, with_ref)
    (ref,) = with_ref.seen
    assert ref.shape == batch.tokens_B_T.shape and not ref.requires_grad
    base = model.logprobs(
        batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B, adapters=False
    )
    assert torch.equal(ref[:, 1:], base) and torch.count_nonzero(ref[:, 0]) == 0


def test_batch_shapes_are_validated():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    ones = torch.ones(2, 5)
    with pytest.raises(BatchError, match=r"slot_ids_B has shape \(3,\)"):
        TrainBatch(torch.zeros(3, dtype=torch.long), tokens, ones, ones, ones)
    with pytest.raises(BatchError, match=r"advantages_B_T has shape \(2, 4\)"):
        TrainBatch(torch.zeros(2, dtype=torch.long), tokens, ones, ones, ones[:, :4])
    with pytest.raises(BatchError, match="integer"):
        TrainBatch(torch.zeros(2, dtype=torch.long), tokens.float(), ones, ones, ones)
