"""CUDA checks: the grouped kernel path agrees with the per-slot loop in bf16; a step runs."""

from __future__ import annotations

import math

import pytest
import torch

from events.specs import OptimSpec
from tests.trainer.helpers import random_batch
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT, grouped_mm_supported
from trainer.losses import weighted_nll
from trainer.optim import SlotAdamW
from trainer.step import train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout"),
]


def _model(path, adapter_dtype):
    model = MultiLoraModel.from_pretrained(
        path, 8, 16, dtype=torch.bfloat16, device="cuda", adapter_dtype=adapter_dtype
    )
    for slot, rank in zip((0, 2, 5, 7), (8, 16, 8, 16), strict=True):
        model.configure_slot(slot, rank, 2.0 * rank, seed=slot)
        for name, _ in model.slot_layers():
            _, bt_r_O = model.layer_weights(slot, name)
            bt_r_O.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_kernel_paths_agree_on_cuda(tiny_model_dir, adapter_dtype):
    model = _model(tiny_model_dir("qwen3"), adapter_dtype)
    batch = random_batch([7, 0, 0, 2, 5, 5, 5, 7], 16, seed=0).to("cuda")
    x = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
    print("grouped_mm kernel available:", grouped_mm_supported(x, x.view(1, 16, 16)))
    results = {}
    for kernel in ("loop", "segments"):
        for _, layer in model.slot_layers():
            layer.kernel = kernel
        model.store.zero_grad()
        lp = model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
        (lp * batch.attention_mask_B_T[:, 1:]).sum().backward()
        results[kernel] = (lp.detach(), model.store.grad_S_R_Q.float().clone())
    (lp_loop, g_loop), (lp_seg, g_seg) = results["loop"], results["segments"]
    assert (lp_loop - lp_seg).abs().max() < 0.1
    assert float((g_loop - g_seg).norm() / g_loop.norm()) < 3e-2


def test_train_step_on_cuda_keeps_base_rows_and_steps_slots(tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"), torch.float32)
    optimizer = SlotAdamW(model.store, model.table)
    for slot in (0, 2, 5, 7):
        optimizer.configure(slot, OptimSpec(lr=1e-3), 10)
    batch = random_batch([7, 0, BASE_SLOT, 2, 5, 5, 0, 7], 13, seed=1)
    metrics = train_step(model, optimizer, batch, weighted_nll)
    assert sorted(metrics) == [0, 2, 5, 7]
    assert all(not m.skipped and math.isfinite(m.loss) and m.step == 1 for m in metrics.values())
