"""RL loss and batch building: advantages, clipping, KL, masks, dropped groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from events.schema import PromptGroup, Sample
from events.specs import LossSpec
from trainer.batch import TrainBatch
from trainer.batching import AdapterRows, build_batch
from trainer.rl_loss import KL_MAX, PPOClipLoss, group_advantages


def sample(ids, reward, *, failed=False, lp=-0.5) -> Sample:
    return Sample(
        completion_ids=tuple(ids),
        logprobs=tuple(lp for _ in ids),
        text="",
        reward=reward,
        failed=failed,
    )


def test_group_advantages() -> None:
    adv = group_advantages([1.0, 0.0, 0.0, 1.0], "grpo")
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert group_advantages([2.0, 0.0], "drgrpo") == pytest.approx([1.0, -1.0])
    assert group_advantages([0.5, 0.5], "grpo") == [0.0, 0.0]


def test_build_batch_rows_masks_and_drops() -> None:
    g_ok = PromptGroup(
        prompt_index=0,
        prompt_ids=(5, 6),
        samples=(sample([7, 8], 1.0), sample([9], 0.0), sample([3], 0.0, failed=True)),
    )
    g_flat = PromptGroup(
        prompt_index=1, prompt_ids=(5,), samples=(sample([7], 1.0), sample([8], 1.0))
    )
    g_one = PromptGroup(prompt_index=2, prompt_ids=(5,), samples=(sample([7], 1.0),))
    rows = AdapterRows(
        slot=2, loss=LossSpec(filter_zero_variance=True), groups=[g_ok, g_flat, g_one]
    )
    batch, stats = build_batch([rows], pad_id=0)
    assert batch is not None
    assert batch.tokens_B_T.tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    assert batch.loss_mask_B_T.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    assert batch.attention_mask_B_T.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.advantages_B_T[0, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert batch.advantages_B_T[1, 2].item() == pytest.approx(-1.0, abs=1e-5)
    assert batch.old_logprobs_B_T is not None and batch.old_logprobs_B_T[0, 2].item() == -0.5
    assert stats[2].groups == 1 and stats[2].groups_dropped == 2 and stats[2].samples_failed == 1
    none, _ = build_batch([AdapterRows(slot=0, loss=LossSpec(), groups=[g_one])], pad_id=0)
    assert none is None


def grad(t: Tensor) -> Tensor:
    assert t.grad is not None, "no gradient reached the tensor"
    return t.grad


def _batch(adv: float, old: float) -> TrainBatch:
    samples = (sample([2], adv, lp=old), sample([3], -adv, lp=old))
    g = PromptGroup(prompt_index=0, prompt_ids=(1,), samples=samples)
    batch, _ = build_batch([AdapterRows(slot=0, loss=LossSpec(advantage="drgrpo"), groups=[g])], 0)
    assert batch is not None
    return batch


def test_on_policy_loss_is_policy_gradient_and_clip_stops_gradient() -> None:
    loss_fn = PPOClipLoss.from_specs({0: LossSpec(clip_low=0.2, clip_high=0.28)}, num_slots=2)
    assert not loss_fn.needs_reference
    batch = _batch(adv=1.0, old=math.log(0.5))
    logp = torch.full(batch.tokens_B_T.shape, math.log(0.5), requires_grad=True)
    loss, metrics = loss_fn(logp, batch, None)
    assert loss[0, 1].item() == pytest.approx(-1.0) and loss[1, 1].item() == pytest.approx(1.0)
    assert metrics["clip_frac"][:, 1].sum().item() == 0
    loss[:, 1].sum().backward()
    assert grad(logp)[0, 1].item() == pytest.approx(-1.0)  # d(-ρA)/dlogp = -ρA at ρ=1
    # ratio 2 > 1 + 0.28 with positive advantage: clipped, no gradient
    logp2 = torch.full(batch.tokens_B_T.shape, math.log(1.0), requires_grad=True)
    loss2, metrics2 = loss_fn(logp2, batch, None)
    loss2[0, 1].backward()
    assert grad(logp2)[0, 1].item() == 0.0
    assert metrics2["clip_frac"][0, 1].item() == 1.0


def test_kl_term_only_for_slots_with_a_coefficient() -> None:
    loss_fn = PPOClipLoss.from_specs({0: LossSpec(kl_coef=0.5)}, num_slots=1)
    assert loss_fn.needs_reference
    batch = _batch(adv=1.0, old=-1.0)
    logp = torch.full(batch.tokens_B_T.shape, -1.0)
    same, m = loss_fn(logp, batch, logp.clone())
    assert m["kl"][:, 1].abs().max().item() == 0.0
    far, m2 = loss_fn(logp, batch, logp - 1.0)
    expected_kl = math.exp(-1.0) + 1.0 - 1.0
    assert m2["kl"][0, 1].item() == pytest.approx(expected_kl)
    assert (far - same)[0, 1].item() == pytest.approx(0.5 * expected_kl)


def test_dual_clip_bounds_negative_advantage_tokens_far_above_the_behaviour_policy() -> None:
    batch = _batch(adv=1.0, old=math.log(0.1))  # row 1 has advantage -1
    # ratio 0.9 / 0.1 = 9 > c = 3: the negative-advantage token's loss is c·|A|, no gradient
    logp = torch.full(batch.tokens_B_T.shape, math.log(0.9), requires_grad=True)
    dual = PPOClipLoss.from_specs({0: LossSpec(clip_ratio_c=3.0)}, num_slots=1)
    loss, metrics = dual(logp, batch, None)
    assert loss[1, 1].item() == pytest.approx(3.0)
    assert metrics["clip_frac"][1, 1].item() == 1.0
    loss[1, 1].backward()
    assert grad(logp)[1, 1].item() == 0.0
    # without the dual clip the same token costs ρ·|A| = 9 and keeps its gradient
    plain = PPOClipLoss.from_specs({0: LossSpec(clip_ratio_c=0.0)}, num_slots=1)
    logp0 = logp.detach().clone().requires_grad_(True)
    loss0, _ = plain(logp0, batch, None)
    assert loss0[1, 1].item() == pytest.approx(9.0)
    loss0[1, 1].backward()
    assert grad(logp0)[1, 1].item() == pytest.approx(9.0)
    # positive advantages are untouched by it (PPO's upper clip already applies there)
    assert loss[0, 1].item() == pytest.approx(loss0[0, 1].item())
    # below c the dual clip changes nothing
    near = torch.full(batch.tokens_B_T.shape, math.log(0.25))
    assert dual(near, batch, None)[0][1, 1].item() == pytest.approx(2.5)


def test_kl_term_is_bounded_for_tokens_the_policy_has_made_unlikely() -> None:
    loss_fn = PPOClipLoss.from_specs({0: LossSpec(kl_coef=1.0)}, num_slots=1)
    batch = _batch(adv=0.0, old=-1.0)
    logp = torch.full(batch.tokens_B_T.shape, -15.0, requires_grad=True)
    loss, metrics = loss_fn(logp, batch, torch.full_like(logp, -1.0))  # exp(14) ≈ 1.2e6
    assert metrics["kl"][0, 1].item() == KL_MAX
    loss[0, 1].backward()
    assert grad(logp)[0, 1].item() == 0.0
