"""A checkpoint directory is a PEFT export: ``PeftModel.from_pretrained`` loads it unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from ops.models import write_tiny_model
from orchestrator.artifacts import ArtifactStore, CheckpointStore, verify


def test_checkpoint_of_a_real_adapter_loads_in_peft(tmp_path) -> None:
    base_dir = write_tiny_model(tmp_path / "base", "qwen2")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(0)
    trained = get_peft_model(base, config).eval()
    export = tmp_path / "export"
    trained.save_pretrained(export)
    files = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    files["training_state.safetensors"] = save({"exp_avg_r_Q": torch.zeros(4, 8)})
    files["training_state.json"] = json.dumps({"step": 5, "version": 5, "epoch": 0}).encode()
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    source = artifacts.write_version("ad", "r1", 5, files).uri
    ckpts = CheckpointStore(str(tmp_path / "checkpoints"))
    ref = ckpts.promote(source, "ad", "r1", step=5, version=5, epoch=0, final=True)
    verify(ref.uri)

    ids_B_T = torch.tensor([[1, 10, 20, 30, 40, 50], [1, 60, 61, 62, 63, 64]])
    with torch.no_grad():
        want = trained(input_ids=ids_B_T).logits
        fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base_logits = fresh(input_ids=ids_B_T).logits
        loaded = PeftModel.from_pretrained(fresh, ref.uri).eval()
        got = loaded(input_ids=ids_B_T).logits
    assert Path(ref.uri, "adapter_config.json").is_file()
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.peft_config["default"].r == 4
