"""The slot layer's math and PEFT loading, checked against a per-row reference and PEFT itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from events.adapter_format import AdapterFormatError, read_peft_adapter
from rollout.lora import (
    BASE_SLOT,
    AdapterRankError,
    MultiLoraLinear,
    MultiLoraModel,
    SlotRouting,
    SlotRoutingError,
    grouped_mm_supported,
)

BACKENDS = ["gather"] + (
    ["grouped"] if grouped_mm_supported(torch.device("cpu"), torch.float32) else []
)


def _random_layer(backend: str, routing: SlotRouting) -> tuple[MultiLoraLinear, list[tuple]]:
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(24, 16, bias=True), routing, max_rank=8, backend=backend)
    slots = []
    for slot, rank in enumerate([8, 3, 5]):
        a, b, scale = torch.randn(rank, 24), torch.randn(16, rank), 0.5 + slot
        layer.set_slot(slot, a, b, scale)
        slots.append((a, b, scale))
    return layer, slots


@pytest.mark.parametrize("backend", BACKENDS)
def test_slot_layer_matches_per_row_reference(backend: str) -> None:
    routing = SlotRouting(num_slots=4)
    layer, slots = _random_layer(backend, routing)
    x = torch.randn(6, 5, 24)
    slot_ids = [2, BASE_SLOT, 0, 1, 0, 3]  # slot 3 is empty: same as base
    with routing.route(slot_ids, torch.device("cpu")):
        y = layer(x)
    for b, s in enumerate(slot_ids):
        want = layer.base(x[b])
        if s not in (BASE_SLOT, 3):
            a, bb, scale = slots[s]
            want = want + scale * (x[b] @ a.T) @ bb.T
        torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-5)


def test_backends_agree() -> None:
    if len(BACKENDS) < 2:
        pytest.skip("torch._grouped_mm unavailable on this CPU build")
    outs = []
    for backend in BACKENDS:
        routing = SlotRouting(num_slots=4)
        layer, _ = _random_layer(backend, routing)
        x = torch.randn(7, 3, 24, generator=torch.Generator().manual_seed(1))
        with routing.route([1, 1, 0, BASE_SLOT, 2, 0, 1], torch.device("cpu")):
            outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_bad_slot_ids_and_missing_routing_raise() -> None:
    routing = SlotRouting(num_slots=2)
    layer, _ = _random_layer("gather", SlotRouting(num_slots=3))
    with (
        pytest.raises(SlotRoutingError, match=r"\[2\]"),
        routing.route([0, 2], torch.device("cpu")),
    ):
        pass
    with pytest.raises(SlotRoutingError, match=r"\[-2\]"), routing.route([-2], torch.device("cpu")):
        pass
    with pytest.raises(SlotRoutingError, match=r"outside MultiLoraModel\.route"):
        layer(torch.randn(1, 1, 24))
    with (
        pytest.raises(SlotRoutingError, match="3 rows"),
        layer.routing.route([0], torch.device("cpu")),
    ):
        layer(torch.randn(3, 1, 24))


def test_peft_adapter_is_read_with_true_rank_and_scale(adapter_dirs: dict[str, Path]) -> None:
    a = read_peft_adapter(adapter_dirs["a"])
    assert (a.rank, a.scale) == (4, 2.0)
    assert len(a.modules) == 4  # q_proj, v_proj in 2 layers
    c = read_peft_adapter(adapter_dirs["c"])  # rsLoRA: alpha / sqrt(r)
    assert c.scale == pytest.approx(4 / 2**0.5)


def test_loaded_model_matches_peft_forward(tiny_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    """A mixed forward equals PEFT's mixed forward (``adapter_names``) row by row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=3, max_rank=8)
    for slot, name in enumerate(["a", "b", "c"]):
        ours.load(slot, read_peft_adapter(adapter_dirs[name]))
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dirs["a"], adapter_name="a"
    )
    for name in ("b", "c"):
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    ids = torch.randint(4, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ours.route([2, BASE_SLOT, 0, 1]):
        got = ours.model(input_ids=ids).logits
    with torch.no_grad():
        want = peft(input_ids=ids, adapter_names=["c", "__base__", "a", "b"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the adapters do change the output


def test_rank_above_max_rank_names_both(tiny_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    lora = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=1, max_rank=4)
    with pytest.raises(AdapterRankError, match=r"rank 8 > max_lora_rank 4"):
        lora.load(0, read_peft_adapter(adapter_dirs["b"]))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tensor_for_unknown_module_names_file_and_tensor(
    tmp_path: Path, tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    bad = _copy(adapter_dirs["a"], tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.9."): v for k, v in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    lora = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=1, max_rank=8)
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors.*layers\.9\."):
        lora.load(0, read_peft_adapter(bad))


def test_malformed_adapter_dirs_raise(tmp_path: Path, adapter_dirs: dict[str, Path]) -> None:
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json not found"):
        read_peft_adapter(tmp_path)
    dora = _copy(adapter_dirs["a"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFormatError, match="use_dora"):
        read_peft_adapter(dora)
    odd = _copy(adapter_dirs["a"], tmp_path / "odd")
    tensors = load_file(odd / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, odd / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"'base_model\.model\.lm_head\.weight'"):
        read_peft_adapter(odd)
    half = _copy(adapter_dirs["a"], tmp_path / "half")
    tensors = load_file(half / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "lora_B" not in k}, half / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterFormatError, match="only \\['lora_A'\\]"):
        read_peft_adapter(half)


def test_adapter_for_another_shape_fails_before_touching_a_slot(
    tmp_path: Path, tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    from ops.models import write_tiny_model
    from tests.rollout_engine.conftest import write_peft_adapter

    narrow = write_tiny_model(tmp_path / "narrow", "llama", hidden_size=32, intermediate_size=64)
    foreign = write_peft_adapter(narrow, tmp_path / "foreign", rank=4, alpha=8, targets=["q_proj"])
    lora = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=1, max_rank=8)
    lora.load(0, read_peft_adapter(adapter_dirs["a"]))
    before = lora.layers["model.layers.0.self_attn.q_proj"].lora_A_S_R_I.clone()
    with pytest.raises(AdapterFormatError, match=r"q_proj\.lora_A\.weight.*\(4, 32\).*64 -> 64"):
        lora.load(0, read_peft_adapter(foreign))
    assert torch.equal(lora.layers["model.layers.0.self_attn.q_proj"].lora_A_S_R_I, before)


def test_reloading_a_slot_leaves_nothing_of_the_adapter_before(
    tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    """A slot that held a rank-8 adapter on more modules, then loaded a smaller one, computes
    exactly what a fresh slot with only the smaller one does (rank padding, modules the new
    adapter lacks and the scale are all rewritten by the batched load)."""
    from transformers import AutoModelForCausalLM

    reused = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=2, max_rank=8)
    reused.load(0, read_peft_adapter(adapter_dirs["b"]))
    reused.load(1, read_peft_adapter(adapter_dirs["b"]))
    reused.load(0, read_peft_adapter(adapter_dirs["c"]))
    fresh = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=2, max_rank=8)
    fresh.load(1, read_peft_adapter(adapter_dirs["b"]))  # the same modules wrapped in both
    fresh.load(0, read_peft_adapter(adapter_dirs["c"]))
    ids = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), reused.route([0, 1]):
        got = reused.model(input_ids=ids).logits
    with torch.no_grad(), fresh.route([0, 1]):
        want = fresh.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cached_load_plans_follow_new_wraps_and_new_shapes(
    tiny_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A load's plan (the views it writes) is cached per slot and adapter shapes: reloading a
    slot after other adapters wrapped more modules, or with other shapes, still zeroes what the
    adapter lacks, and every version gets its own values."""
    from transformers import AutoModelForCausalLM

    from tests.rollout_engine.conftest import ALL_LINEARS, write_peft_adapter

    q_only = read_peft_adapter(
        write_peft_adapter(tiny_dir, tmp_path / "q", rank=4, alpha=8, targets=["q_proj"])
    )
    full = read_peft_adapter(
        write_peft_adapter(tiny_dir, tmp_path / "f", rank=8, alpha=8, targets=ALL_LINEARS, seed=5)
    )
    q_v2 = read_peft_adapter(
        write_peft_adapter(tiny_dir, tmp_path / "q2", rank=4, alpha=8, targets=["q_proj"], seed=9)
    )
    lora = MultiLoraModel(AutoModelForCausalLM.from_pretrained(tiny_dir), num_slots=1, max_rank=8)
    lora.load(0, q_only)  # plans made while only q_proj is wrapped
    lora.load(0, full)  # wraps every linear, fills them
    lora.load(0, q_v2)  # same shapes as q_only: a plan that must zero the new wraps too
    for name, layer in lora.layers.items():
        if name.endswith("q_proj"):
            a, _ = q_v2.weights[name]
            assert torch.equal(layer.lora_A_S_R_I[0, :4], a) and not layer.lora_A_S_R_I[0, 4:].any()
        else:
            assert not layer.lora_A_S_R_I[0].any() and not layer.lora_B_S_O_R[0].any(), name
            assert float(layer.scale_S[0]) == 0.0
    lora.load(0, q_only)  # the cached plan, another version's values
    name = next(n for n in lora.layers if n.endswith("q_proj"))
    assert torch.equal(lora.layers[name].lora_A_S_R_I[0, :4], q_only.weights[name][0])
