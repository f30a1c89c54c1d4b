"""A checkpoint directory is a PEFT export: ``PeftModel.from_pretrained`` loads it unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save
from transformers import AutoModelForCausalLM

from events.adapter_format import CursorState, SlotScalars, TrainingState, encode_training_state
from events.errors import ConfigError
from ops.models import write_tiny_model
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointStore, verify
from tests.checkpoint.conftest import make_spec


def test_checkpoint_of_a_real_adapter_loads_in_peft(tmp_path) -> None:
    base_dir = write_tiny_model(tmp_path / "base", "qwen2")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    trained = get_peft_model(base, config).eval()
    export = tmp_path / "export"
    trained.save_pretrained(export)
    files = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    files["training_state.safetensors"] = save({"exp_avg_r_Q": torch.zeros(4, 8)})
    files["training_state.json"] = encode_training_state(
        TrainingState(
            adapter="ad",
            registration_id="r1",
            step=5,
            version=5,
            epoch=0,
            cursor=CursorState(n=10, seed=0),
            spec=make_spec(),
            slot=SlotScalars(rank=4, alpha=8.0, step=5, layout_width=8),
        )
    )
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


def test_trainer_version_round_trips_through_a_checkpoint(tmp_path) -> None:
    """Contract with the trainer: its serialised version becomes a checkpoint that verifies,
    names the cursor, restores the slot exactly and loads in PEFT with the same outputs."""
    from orchestrator.checkpoint_store import load_latest
    from trainer.inject import MultiLoraModel
    from trainer.optim import SlotAdamW
    from trainer.publish import VersionInfo, restore_slot, version_files

    base_dir = write_tiny_model(tmp_path / "base", "llama")
    model = MultiLoraModel.from_pretrained(base_dir, 2, 8)
    optimizer = SlotAdamW(model.store, model.table)
    model.configure_slot(1, 4, 8.0, seed=3)
    spec = make_spec(interval=4)
    optimizer.configure(1, spec.optim, spec.steps)  # the settings the training state stores
    for name, _ in model.slot_layers():  # a trained-looking, non-zero B
        model.layer_weights(1, name)[1].normal_(0, 0.05)
    cursor = CursorState(n=50, seed=9, epoch=1, position=12)
    info = VersionInfo(
        adapter="ad", registration_id="r1", step=8, version=8, epoch=0, cursor=cursor, spec=spec
    )
    files = version_files(model, optimizer, 1, info, str(base_dir))
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    source = artifacts.write_version("ad", "r1", 8, files).uri
    ckpts = CheckpointStore(str(tmp_path / "checkpoints"))
    ckpts.set_latest(ckpts.promote(source, "ad", "r1", step=8, version=8, epoch=0))

    ref = load_latest(ckpts.root, "ad")
    assert ref is not None and verify(ref.uri).cursor == cursor
    other = MultiLoraModel.from_pretrained(base_dir, 2, 8)
    restored = restore_slot(
        other,
        SlotAdamW(other.store, other.table),
        0,
        artifacts.read_file(ref.uri, "training_state.safetensors"),
        artifacts.read_file(ref.uri, "training_state.json"),
        artifacts.read_file(ref.uri, "adapter_model.safetensors"),
    )
    assert restored == info
    assert torch.equal(other.store.weight_S_R_Q[0, :4], model.store.weight_S_R_Q[1, :4])
    assert not other.store.weight_S_R_Q[0, 4:].any()
    state = load_safetensors(artifacts.read_file(ref.uri, "training_state.safetensors"))
    assert "weight_r_Q" not in state  # the weights travel once, in the PEFT file
    with pytest.raises(ConfigError, match="adapter_weights"):
        restore_slot(
            other,
            SlotAdamW(other.store, other.table),
            1,
            artifacts.read_file(ref.uri, "training_state.safetensors"),
            artifacts.read_file(ref.uri, "training_state.json"),
        )
    ids_B_T = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        got = PeftModel.from_pretrained(hf, ref.uri).eval()(input_ids=ids_B_T).logits
        want = model(ids_B_T, torch.ones_like(ids_B_T), torch.tensor([1]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
