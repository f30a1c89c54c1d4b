"""Per-slot AdamW: torch.optim.AdamW's math per slot, own schedule/clipping, only given slots."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from events.errors import ConfigError
from events.specs import OptimSpec
from trainer.lora import SlotError, SlotStore, SlotTable
from trainer.optim import SlotAdamW, lr_at

pytestmark = pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout")


def _store(num_slots=3, max_rank=4, widths=(5, 7, 3)):
    table = SlotTable(num_slots, max_rank, torch.device("cpu"))
    store = SlotStore(num_slots, max_rank, widths, torch.float32, torch.device("cpu"))
    params = [store.new_param(i) for i in range(len(widths))]
    return table, store, params


def test_lr_schedule_values():
    spec = OptimSpec(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(spec, k, 14) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(spec, 4, 14) == pytest.approx(1.0)
    assert lr_at(spec, 9, 14) == pytest.approx(0.55)
    assert lr_at(spec, 14, 14) == pytest.approx(0.1)
    assert lr_at(spec, 50, 14) == pytest.approx(0.1)
    const = OptimSpec(lr=2.0, warmup_steps=2)
    assert [lr_at(const, k, 10) for k in range(4)] == [1.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "spec",
    [
        OptimSpec(lr=3e-2, weight_decay=0.1, max_grad_norm=0.5),
        OptimSpec(
            lr=1e-2,
            betas=(0.8, 0.95),
            eps=1e-6,
            schedule="cosine",
            warmup_steps=2,
            max_grad_norm=0.0,
        ),
    ],
)
def test_one_slot_matches_torch_adamw_with_clipping_and_schedule(spec):
    table, store, params = _store()
    optimizer = SlotAdamW(store, table)
    table.configure(1, 3, 6.0)
    optimizer.configure(1, spec, total_steps=6)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.data[1, :3] = torch.randn(p.shape[1:], generator=gen)[:3]
    # the reference: one tensor per parameter, true rank only
    ref = [p.data[1, :3].clone().requires_grad_(True) for p in params]
    torch_opt = torch.optim.AdamW(
        ref, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay
    )
    for k in range(6):
        grads = [torch.randn(r.shape, generator=gen) * 3 for r in ref]
        optimizer.zero_grad()
        for p, g in zip(params, grads, strict=True):
            p.grad[1, :3] = g
        result = optimizer.step([1])[1]
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(
            ref, spec.max_grad_norm if spec.max_grad_norm > 0 else math.inf
        )
        for group in torch_opt.param_groups:
            group["lr"] = lr_at(spec, k, 6)
        torch_opt.step()
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-6)
        assert result.lr == lr_at(spec, k, 6) and result.step == k + 1 and not result.skipped
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.data[1, :3], r.detach(), rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(p.data[1, 3:]) == 0


def test_only_given_slots_step_and_each_clips_by_its_own_norm():
    table, store, _params = _store()
    optimizer = SlotAdamW(store, table)
    for slot in range(3):
        table.configure(slot, 4, 4.0)
        optimizer.configure(slot, OptimSpec(lr=0.1, max_grad_norm=1.0), 10)
    store.weight_S_R_Q.normal_()
    before = store.weight_S_R_Q.clone()
    store.grad_S_R_Q[0] = 100.0  # huge norm: clipped
    store.grad_S_R_Q[1] = 1e-3  # tiny norm: not clipped
    store.grad_S_R_Q[2] = 5.0  # not stepped
    results = optimizer.step([1, 0])
    assert sorted(results) == [0, 1]
    assert results[0].grad_norm > 100 and results[1].grad_norm < 1
    assert torch.equal(store.weight_S_R_Q[2], before[2])
    assert optimizer.step_count(2) == 0 and torch.count_nonzero(optimizer.exp_avg_S_R_Q[2]) == 0
    # clipping slot 0 does not scale slot 1's gradient
    assert torch.allclose(store.grad_S_R_Q[1], torch.full_like(store.grad_S_R_Q[1], 1e-3))
    assert optimizer.step_count(0) == optimizer.step_count(1) == 1


def test_non_finite_gradient_skips_only_that_slot():
    table, store, _ = _store()
    optimizer = SlotAdamW(store, table)
    for slot in (0, 1):
        table.configure(slot, 2, 4.0)
        optimizer.configure(slot, OptimSpec(lr=0.1), 10)
    store.weight_S_R_Q.normal_()
    before = store.weight_S_R_Q.clone()
    store.grad_S_R_Q[:, :2] = 1.0
    store.grad_S_R_Q[0, 1, 3] = float("inf")
    results = optimizer.step([0, 1])
    assert results[0].skipped and results[0].reason == "non-finite gradient norm"
    assert not results[1].skipped
    assert torch.equal(store.weight_S_R_Q[0], before[0])
    assert optimizer.step_count(0) == 0 and torch.count_nonzero(optimizer.exp_avg_S_R_Q[0]) == 0
    assert not torch.equal(store.weight_S_R_Q[1], before[1])


def test_reset_zeroes_moments_step_and_grads():
    table, store, _ = _store()
    optimizer = SlotAdamW(store, table)
    table.configure(2, 4, 4.0)
    optimizer.configure(2, OptimSpec(lr=0.1), 10)
    store.grad_S_R_Q[2] = 1.0
    optimizer.step([2])
    store.grad_S_R_Q[2] = 1.0
    optimizer.reset(2)
    assert optimizer.step_count(2) == 0
    for t in (optimizer.exp_avg_S_R_Q, optimizer.exp_avg_sq_S_R_Q, store.grad_S_R_Q):
        assert torch.count_nonzero(t[2]) == 0


def test_chunked_update_equals_one_chunk():
    results = []
    for chunk in (1 << 28, 1):
        table, store, _ = _store()
        optimizer = SlotAdamW(store, table, chunk_elements=chunk)
        for slot, rank in enumerate((1, 4, 3)):
            table.configure(slot, rank, 4.0)
            optimizer.configure(slot, OptimSpec(lr=0.1 * (slot + 1), weight_decay=0.01), 10)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            store.grad_S_R_Q.copy_(torch.randn(store.grad_S_R_Q.shape, generator=gen))
            optimizer.step([0, 1, 2])
        results.append(store.weight_S_R_Q.clone())
    assert torch.equal(results[0], results[1])


def test_bad_settings_and_unconfigured_slots_raise():
    table, store, _ = _store()
    optimizer = SlotAdamW(store, table)
    with pytest.raises(ConfigError, match="lr=-1"):
        optimizer.configure(0, OptimSpec(lr=-1.0), 10)
    with pytest.raises(ConfigError, match="betas"):
        optimizer.configure(0, OptimSpec(betas=(0.9, 1.0)), 10)
    with pytest.raises(ConfigError, match="total_steps=0"):
        optimizer.configure(0, OptimSpec(), 0)
    with pytest.raises(SlotError, match="no optimizer settings"):
        optimizer.step([0])
    optimizer.configure(0, OptimSpec(), 5)
    with pytest.raises(SlotError, match="not configured in the model"):
        optimizer.step([0])


def test_max_grad_norm_zero_means_no_clipping_and_a_negative_one_is_refused():
    """The rule of OptimSpec's docstring: ``> 0`` clips, ``0`` does not, ``< 0`` is an error
    (refused by the decoder, and by ``configure`` for a spec built in code)."""
    table, store, _ = _store()
    optimizer = SlotAdamW(store, table)
    for slot, max_norm in ((0, 0.0), (1, 1e30), (2, 1.0)):
        table.configure(slot, 4, 4.0)
        optimizer.configure(slot, OptimSpec(lr=0.1, max_grad_norm=max_norm), 10)
    store.weight_S_R_Q.zero_()
    store.grad_S_R_Q.fill_(100.0)
    optimizer.step([0, 1, 2])
    assert torch.equal(store.weight_S_R_Q[0], store.weight_S_R_Q[1])  # 0: as if never clipped
    assert optimizer.exp_avg_S_R_Q[2].abs().max() < optimizer.exp_avg_S_R_Q[0].abs().max()
    with pytest.raises(ConfigError, match=r"max_grad_norm=-1.0 must be >= 0 \(0: no clipping\)"):
        optimizer.configure(0, OptimSpec(max_grad_norm=-1.0), 10)
    with pytest.raises(msgspec.ValidationError, match=r">= 0.0 - at `\$.max_grad_norm`"):
        msgspec.json.decode(b'{"max_grad_norm": -1.0}', type=OptimSpec)
    assert msgspec.json.decode(b'{"max_grad_norm": 0}', type=OptimSpec).max_grad_norm == 0
