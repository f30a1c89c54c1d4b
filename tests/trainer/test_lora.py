"""Slot layer: routing, validation, exactness of lower ranks, and agreement of compute paths."""

from __future__ import annotations

import math

import pytest
import torch

from events.errors import ConfigError
from events.specs import OptimSpec
from tests.trainer.helpers import build, random_batch, randomize_b
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT, SlotError, grouped_mm_supported
from trainer.optim import SlotAdamW

SPEC = OptimSpec(lr=1e-2)
pytestmark = pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout")


def _mixed_model(path, kernel="auto"):
    model, opt = build(
        path, {0: (2, 4.0, SPEC), 1: (8, 16.0, SPEC), 3: (5, 5.0, SPEC)}, kernel=kernel
    )
    for slot in (0, 1, 3):
        randomize_b(model, slot, seed=slot)
    return model, opt


def test_forward_without_routing_names_the_fix(tiny_model_dir):
    model, _ = _mixed_model(tiny_model_dir("llama"))
    tokens = torch.randint(4, 100, (2, 6))
    with pytest.raises(SlotError, match="route"):
        model.hf_model(input_ids=tokens)


@pytest.mark.parametrize(
    ("slot_ids", "match"),
    [
        ([0, 4], r"\[4\] are out of range"),
        ([0, -2], r"\[-2\] are out of range"),
        ([2, BASE_SLOT], r"slots \[2\] are not configured"),
    ],
)
def test_bad_slot_ids_raise(tiny_model_dir, slot_ids, match):
    model, _ = _mixed_model(tiny_model_dir("llama"))
    tokens = torch.randint(4, 100, (2, 6))
    with pytest.raises(SlotError, match=match):
        model(tokens, torch.ones_like(tokens), torch.tensor(slot_ids))


def test_routing_is_cleared_after_a_failing_forward(tiny_model_dir):
    model, _ = _mixed_model(tiny_model_dir("llama"))
    tokens = torch.randint(4, 100, (2, 6))
    with pytest.raises(IndexError):
        model(tokens + 1000, torch.ones_like(tokens), torch.tensor([0, 1]))
    out = model(tokens, torch.ones_like(tokens), torch.tensor([0, 1]))
    assert out.shape == (2, 6, 104)


def test_configure_rejects_bad_rank_and_alpha(tiny_model_dir):
    model, _ = _mixed_model(tiny_model_dir("llama"))
    with pytest.raises(SlotError, match=r"rank 9 .* outside 1\.\.8"):
        model.configure_slot(2, 9, 16.0)
    with pytest.raises(SlotError, match="alpha"):
        model.configure_slot(2, 4, 0.0)
    with pytest.raises(SlotError, match="out of range"):
        model.configure_slot(4, 4, 8.0)


def test_lora_dropout_is_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"lora_dropout=0\.1"):
        MultiLoraModel.from_pretrained(tiny_model_dir("llama"), 2, 8, lora_dropout=0.1)


def test_init_is_kaiming_uniform_a_and_zero_b(tiny_model_dir):
    model, _ = _mixed_model(tiny_model_dir("llama"))
    model.configure_slot(2, 4, 8.0, seed=7)
    for name, layer in model.slot_layers():
        a_r_I, bt_r_O = model.layer_weights(2, name)
        bound = 1 / math.sqrt(layer.in_features)
        assert a_r_I.abs().max() <= bound
        assert a_r_I.abs().max() > 0.5 * bound
        assert torch.count_nonzero(bt_r_O) == 0
        assert torch.count_nonzero(layer.lora_A.data[2, 4:]) == 0
    first = model.store.weight_S_R_Q[2].clone()
    model.reset_slot(2, seed=7)
    assert torch.equal(model.store.weight_S_R_Q[2], first)
    model.reset_slot(2, seed=8)
    assert not torch.equal(model.store.weight_S_R_Q[2], first)


def _kernels():
    kernels = ["loop", "segments"]
    probe = torch.zeros(16, 16)
    if hasattr(torch, "_grouped_mm"):
        try:  # the CPU kernel exists from torch 2.9 on; older builds only have the fallback
            torch._grouped_mm(
                probe, probe.view(1, 16, 16), offs=torch.tensor([16], dtype=torch.int32)
            )
            kernels.append("grouped_mm")
        except (RuntimeError, NotImplementedError):
            pass
    return kernels


def _set_kernel(model, kernel):
    for _, layer in model.slot_layers():
        layer.kernel = kernel


@pytest.mark.parametrize(
    "rows",
    [[1, BASE_SLOT, 0, 3, 1, 0, BASE_SLOT], [2, 3, 0, 1, 2]],
    ids=["some-slots", "all-slots"],
)
def test_compute_paths_agree_on_outputs_and_gradients(tiny_model_dir, rows):
    model, _ = _mixed_model(tiny_model_dir("qwen3"))
    model.configure_slot(2, 3, 9.0, seed=2)
    randomize_b(model, 2, seed=2)
    batch = random_batch(rows, 12, seed=3)
    results = {}
    for kernel in _kernels():
        _set_kernel(model, kernel)
        model.store.zero_grad()
        logits = model(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
        (logits.square().mean()).backward()
        results[kernel] = (logits.detach(), model.store.grad_S_R_Q.clone())
    ref_logits, ref_grad = results["loop"]
    assert ref_grad.abs().sum() > 0
    for kernel, (logits, grad) in results.items():
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6, msg=kernel)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, msg=kernel)


def test_grouped_mm_is_not_used_for_cpu_fp32():
    x = torch.zeros(16, 16)
    assert not grouped_mm_supported(x, torch.zeros(2, 16, 16))


@pytest.mark.parametrize("kernel", ["loop", "segments"])
def test_padded_ranks_get_no_gradient_and_stay_zero(tiny_model_dir, kernel):
    model, opt = _mixed_model(tiny_model_dir("llama"), kernel=kernel)
    batch = random_batch([0, 1, 3, 0], 10, seed=5)
    opt.zero_grad()
    model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B).sum().backward()
    grad = model.store.grad_S_R_Q
    for slot in (0, 1, 3):
        rank = model.table.rank(slot)
        assert grad[slot, :rank].abs().sum() > 0
        assert torch.count_nonzero(grad[slot, rank:]) == 0
    for _ in range(3):
        opt.step([0, 1, 3])
    weight = model.store.weight_S_R_Q
    for slot in (0, 1, 3):
        assert torch.count_nonzero(weight[slot, model.table.rank(slot) :]) == 0
        assert torch.count_nonzero(opt.exp_avg_S_R_Q[slot, model.table.rank(slot) :]) == 0


def test_lower_rank_equals_a_model_of_that_max_rank(tiny_model_dir):
    """A rank-3 slot in a max-rank-8 model computes exactly what a max-rank-3 model does."""
    path = tiny_model_dir("qwen2")
    big, _ = build(path, {1: (3, 6.0, SPEC)}, max_rank=8)
    small, _ = build(path, {0: (3, 6.0, SPEC)}, num_slots=1, max_rank=3)
    randomize_b(big, 1, seed=4)
    for name, _ in big.slot_layers():
        for src, dst in zip(big.layer_weights(1, name), small.layer_weights(0, name), strict=True):
            dst.copy_(src)
    batch = random_batch([0, 0], 9, seed=2)
    args = (batch.tokens_B_T, batch.attention_mask_B_T)
    out_big = big(*args, torch.tensor([1, 1]))
    out_small = small(*args, torch.tensor([0, 0]))
    torch.testing.assert_close(out_big, out_small, rtol=1e-6, atol=1e-6)


def test_replaced_grads_are_detected(tiny_model_dir):
    model, opt = _mixed_model(tiny_model_dir("llama"))
    batch = random_batch([0, 1], 8, seed=1)
    model.zero_grad(set_to_none=True)
    model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B).sum().backward()
    with pytest.raises(SlotError, match=r"optimizer.zero_grad\(\)"):
        opt.step([0, 1])
    opt.zero_grad()
    assert model.store.grads_attached()


def test_two_slot_models_in_one_process_do_not_share_state(tiny_model_dir):
    a, _ = _mixed_model(tiny_model_dir("llama"))
    b = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), 2, 4)
    assert isinstance(SlotAdamW(b.store, b.table), SlotAdamW)
    assert a.routing is not b.routing and a.store is not b.store
    assert not b.table.is_configured(0)
