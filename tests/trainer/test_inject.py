"""Injection into HF families, frozen base, bit-exact base rows, padding-invariant log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from events.errors import ConfigError
from events.specs import OptimSpec
from tests.trainer.helpers import build, random_batch, randomize_b
from trainer.inject import MultiLoraModel, position_ids_from_mask
from trainer.lora import BASE_SLOT, SlotLinear

FAMILIES = ["llama", "qwen2", "qwen3"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = OptimSpec(lr=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_projection_is_wrapped_and_the_base_is_frozen(tiny_model_dir, family):
    model = MultiLoraModel.from_pretrained(tiny_model_dir(family), 3, 4)
    names = [name for name, _ in model.slot_layers()]
    expected = [
        f"model.layers.{i}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}"
        for i in range(2)
        for p in PROJECTIONS
    ]
    assert sorted(names) == sorted(expected)
    assert model.target_modules == tuple(sorted(PROJECTIONS))
    assert not isinstance(model.hf_model.lm_head, SlotLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_Bt")) for n in trainable)
    assert len(trainable) == 2 * len(expected)
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_unsupported_model_type_names_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        MultiLoraModel.wrap(gpt2, 2, 4)


def test_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json missing"):
        MultiLoraModel.from_pretrained(tmp_path / "nope", 2, 4)


def _tiny_in_memory(config_cls, **extra):
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_fused_projections_and_moe_experts():
    from transformers import Phi3Config, Qwen3MoeConfig

    phi3 = MultiLoraModel.wrap(_tiny_in_memory(Phi3Config, pad_token_id=0), 2, 4)
    assert phi3.target_modules == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")
    moe = MultiLoraModel.wrap(
        _tiny_in_memory(
            Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
        ),
        2,
        4,
    )
    names = [name for name, _ in moe.slot_layers()]
    assert names and not any("experts" in n or n.endswith("mlp.gate") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for model in (phi3, moe):
        model.configure_slot(1, 4, 8.0)
        randomize_b(model, 1, seed=0)
        tokens = torch.randint(1, 64, (2, 5))
        logits = model(tokens, torch.ones_like(tokens), torch.tensor([1, BASE_SLOT]))
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "rows",
    [[0, BASE_SLOT, 2, BASE_SLOT, 0], [BASE_SLOT, BASE_SLOT, 0, 0, 2], [0, 2, 2, 0, 0]],
    ids=["interleaved", "slot-sorted", "no-base"],
)
def test_base_rows_are_bit_identical_to_the_unwrapped_model(tiny_model_dir, family, rows):
    path = tiny_model_dir(family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model, _ = build(path, {0: (4, 8.0, SPEC), 2: (8, 8.0, SPEC)})
    randomize_b(model, 0, seed=1)
    randomize_b(model, 2, seed=2)
    batch = random_batch(rows, 11, seed=4)
    mask = batch.attention_mask_B_T
    ours = model(batch.tokens_B_T, mask, batch.slot_ids_B)
    with torch.no_grad():
        theirs = reference(
            input_ids=batch.tokens_B_T,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
        ).logits
    for row, slot in enumerate(rows):
        if slot == BASE_SLOT:
            assert torch.equal(ours[row], theirs[row])
        else:
            assert not torch.allclose(ours[row], theirs[row], atol=1e-3)
    if BASE_SLOT not in rows:  # adapter rows: the same values whatever the row order
        order = torch.tensor([4, 0, 3, 1, 2])
        shuffled = model(batch.tokens_B_T[order], mask[order], batch.slot_ids_B[order])
        torch.testing.assert_close(shuffled, ours[order], rtol=1e-5, atol=1e-6)
    all_base = model(batch.tokens_B_T, mask, torch.full((5,), BASE_SLOT))
    assert torch.equal(all_base, theirs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logprobs_ignore_left_or_right_padding(tiny_model_dir, family):
    model, _ = build(tiny_model_dir(family), {1: (4, 8.0, SPEC)})
    randomize_b(model, 1, seed=3)
    right = random_batch([1, BASE_SLOT, 1], 10, seed=6, padding="right")
    left = random_batch([1, BASE_SLOT, 1], 10, seed=6, padding="left")
    lp_right = model.logprobs(right.tokens_B_T, right.attention_mask_B_T, right.slot_ids_B)
    lp_left = model.logprobs(left.tokens_B_T, left.attention_mask_B_T, left.slot_ids_B)
    for row in range(3):
        n = int(right.attention_mask_B_T[row].sum())
        alone = right.tokens_B_T[row : row + 1, :n]
        lp_alone = model.logprobs(alone, torch.ones_like(alone), right.slot_ids_B[row : row + 1])[0]
        torch.testing.assert_close(lp_right[row, : n - 1], lp_alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp_left[row, 10 - n :], lp_alone, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(lp_left[row]).all()


def test_reference_logprobs_are_the_base_model_without_grad(tiny_model_dir):
    model, _ = build(tiny_model_dir("llama"), {0: (4, 8.0, SPEC)})
    randomize_b(model, 0, seed=0)
    batch = random_batch([0, 0], 8, seed=1)
    args = (batch.tokens_B_T, batch.attention_mask_B_T)
    ref = model.logprobs(*args, batch.slot_ids_B, adapters=False)
    base = model.logprobs(*args, torch.tensor([BASE_SLOT, BASE_SLOT]))
    adapted = model.logprobs(*args, batch.slot_ids_B)
    assert not ref.requires_grad and adapted.requires_grad
    assert ref.shape == (2, 7)
    assert torch.equal(ref, base.detach())
    assert not torch.allclose(ref, adapted)
