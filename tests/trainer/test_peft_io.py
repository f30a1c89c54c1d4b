"""PEFT interop: our export loads in peft.PeftModel with identical logits, and back."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from events.adapter_format import AdapterFormatError
from events.errors import ConfigError
from events.specs import OptimSpec
from tests.trainer.helpers import build, random_batch, randomize_b
from trainer.lora import BASE_SLOT
from trainer.losses import weighted_nll
from trainer.peft_io import export_slot, import_peft, peft_files
from trainer.step import train_step

SPEC = OptimSpec(lr=2e-2)
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def _peft_logits(peft_model, batch):
    with torch.no_grad():
        return peft_model(
            input_ids=batch.tokens_B_T, attention_mask=batch.attention_mask_B_T
        ).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_exported_slot_loads_in_peft_with_the_same_logits(tiny_model_dir, family, tmp_path):
    path = tiny_model_dir(family)
    model, opt = build(path, {0: (8, 8.0, SPEC), 2: (4, 12.0, SPEC)})
    for k in range(2):  # trained: B is non-zero
        train_step(model, opt, random_batch([0, 2, 2], 10, seed=k), weighted_nll)
    started = time.perf_counter()
    export_slot(model, 2, tmp_path / "adapter", base_model_path=path)
    print(f"export_slot ({family}, r=4): {1000 * (time.perf_counter() - started):.1f} ms")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(path)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        q_proj = dict(model.slot_layers())["model.layers.0.self_attn.q_proj"]
        assert f.get_tensor(key).shape == (4, q_proj.in_features)
        assert f.get_tensor(key.replace("lora_A", "lora_B")).shape == (q_proj.out_features, 4)
        assert len(list(f.keys())) == 2 * 7 * 2

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path / "adapter"
    )
    batch = random_batch([2, 2, 2], 10, seed=9)
    ours = model(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B).detach()
    theirs = _peft_logits(peft_model, batch)
    base = model(batch.tokens_B_T, batch.attention_mask_B_T, torch.full((3,), BASE_SLOT))
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    mask = batch.attention_mask_B_T.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)


def _peft_adapter(path, out, **config):
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = get_peft_model(
        hf, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **config)
    )
    peft_model.save_pretrained(out)
    return peft_model


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        {"r": 6, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
        {"r": 8, "lora_alpha": 16, "target_modules": ["o_proj", "down_proj"], "use_rslora": True},
    ],
    ids=["all-linear", "q-v-with-dropout", "rslora"],
)
def test_peft_adapter_imported_into_a_slot_gives_peft_logits(tiny_model_dir, tmp_path, config):
    path = tiny_model_dir("qwen3")
    peft_model = _peft_adapter(path, tmp_path / "peft", **config)
    peft_model.eval()
    model, _ = build(path, {0: (2, 2.0, SPEC), 3: (8, 8.0, SPEC)})
    randomize_b(model, 3, seed=5)  # the previous tenant's weights must vanish
    import_peft(model, 3, tmp_path / "peft")
    assert model.table.rank(3) == config["r"]
    batch = random_batch([3, 3, 0], 10, seed=2)
    ours = model(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B).detach()
    theirs = _peft_logits(peft_model, batch)
    mask = batch.attention_mask_B_T.bool()
    mask[2] = False
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
    # and back out again: the export reproduces the same adapter
    export_slot(model, 3, tmp_path / "again", base_model_path=path)
    again = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path / "again"
    )
    torch.testing.assert_close(_peft_logits(again, batch)[mask], theirs[mask], rtol=1e-5, atol=1e-5)


def test_import_refuses_what_slots_cannot_express(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    model, _ = build(path, {0: (2, 2.0, SPEC)}, max_rank=8)
    _peft_adapter(path, tmp_path / "big", r=16, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="r=16 but this model's max_rank is 8"):
        import_peft(model, 1, tmp_path / "big")
    _peft_adapter(
        path, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True
    )
    with pytest.raises(AdapterFormatError, match="use_dora=True"):
        import_peft(model, 1, tmp_path / "dora")
    _peft_adapter(
        path,
        tmp_path / "mts",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        import_peft(model, 1, tmp_path / "mts")
    _peft_adapter(
        path,
        tmp_path / "pattern",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
    )
    with pytest.raises(AdapterFormatError, match="rank_pattern"):
        import_peft(model, 1, tmp_path / "pattern")
    assert not model.table.is_configured(1)  # a refused import leaves the slot untouched


def test_export_of_a_free_slot_is_refused(tiny_model_dir, tmp_path):
    model, _ = build(tiny_model_dir("llama"), {})
    with pytest.raises(ConfigError, match="slot 1 is not configured"):
        export_slot(model, 1, tmp_path / "x", base_model_path="m")


def test_split_layers_of_a_host_copy_are_the_slot_layer_weights(tiny_model_dir):
    model, opt = build(tiny_model_dir("qwen3"), {1: (4, 8.0, SPEC), 3: (8, 16.0, SPEC)})
    train_step(model, opt, random_batch([1, 3, 3], 10, seed=0), weighted_nll)
    for slot, rank in ((1, 4), (3, 8)):
        block_r_Q = model.store.weight_S_R_Q[slot, :rank].clone()
        split = list(model.split_layers(block_r_Q))
        assert [name for name, _, _ in split] == [name for name, _ in model.slot_layers()]
        for name, a_r_I, bt_r_O in split:
            want_a, want_bt = model.layer_weights(slot, name)
            assert torch.equal(a_r_I, want_a) and torch.equal(bt_r_O, want_bt), name
    with pytest.raises(ConfigError, match="weight block"):
        peft_files(model, 1, "m", weight_r_Q=torch.zeros(4, 3))
