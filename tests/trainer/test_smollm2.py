"""The real SmolLM2-135M with 4 slots trains one step on CPU."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from events.specs import OptimSpec
from tests.trainer.helpers import random_batch, slot_weights
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT
from trainer.losses import weighted_nll
from trainer.optim import SlotAdamW
from trainer.step import train_step

SMOLLM2 = Path(os.environ.get("MULTILORA_SMOLLM2", "models/smollm2-135m"))


@pytest.mark.model
@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason=f"no model at {SMOLLM2}")
def test_smollm2_trains_four_slots_in_one_step():
    model = MultiLoraModel.from_pretrained(SMOLLM2, num_slots=4, max_rank=16)
    assert model.model_type == "llama"
    optimizer = SlotAdamW(model.store, model.table)
    for slot, rank in enumerate((4, 8, 16, 8)):
        model.configure_slot(slot, rank, 2.0 * rank, seed=slot)
        optimizer.configure(slot, OptimSpec(lr=1e-3 * (slot + 1)), total_steps=10)
    before = {slot: slot_weights(model, slot) for slot in range(4)}
    batch = random_batch([0, 1, 2, 3, BASE_SLOT, 2], 16, seed=0)
    with torch.no_grad():
        base_before = model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
    metrics = train_step(model, optimizer, batch, weighted_nll)
    assert sorted(metrics) == [0, 1, 2, 3]
    for slot, m in metrics.items():
        assert not m.skipped and m.step == 1 and m.tokens > 0
        assert math.isfinite(m.loss) and m.grad_norm > 0
        assert not torch.equal(slot_weights(model, slot), before[slot])
    with torch.no_grad():
        after = model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
    assert torch.equal(after[4], base_before[4])  # the base row is untouched
    assert not torch.equal(after[0], base_before[0])


@pytest.mark.model
@pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason=f"no model at {SMOLLM2}")
def test_the_converted_model_is_a_plain_checkpoint():
    """The GGUF is dequantized on conversion: the folder must not say it is GGUF-quantized
    (Hugging Face's Trainer, used by the TRL baseline, refuses to train such a model)."""
    import json

    config = json.loads((SMOLLM2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
