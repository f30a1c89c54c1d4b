"""The adapter on-disk format: writer → reader round trips, one refusal list, one rsLoRA scale."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IGNORED_CONFIG,
    UNSUPPORTED_CONFIG,
    AdapterFormatError,
    CursorState,
    SlotScalars,
    TrainingState,
    decode_state_tensors,
    decode_training_state,
    encode_peft_adapter,
    encode_state_tensors,
    encode_training_state,
    lora_scale,
    parse_peft_adapter,
    parse_peft_weights,
    read_peft_adapter,
)
from ops.models import write_tiny_model
from tests.checkpoint.conftest import make_spec


def _layers(rank: int, pad: int = 0, seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Two modules' ``(name, A [rank+pad, 6], B [5, rank+pad])``; B is a transposed view."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            f"model.layers.{i}.self_attn.q_proj",
            torch.randn(rank + pad, 6, generator=g),
            torch.randn(rank + pad, 5, generator=g).T,
        )
        for i in range(2)
    ]


def _write(root: Path, files: dict[str, bytes | bytearray], **config: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
    base = json.loads(files[ADAPTER_CONFIG])
    (root / ADAPTER_CONFIG).write_text(json.dumps({**base, **config}))
    return root


def test_writer_to_reader_round_trip_at_the_true_rank(tmp_path: Path) -> None:
    layers = _layers(rank=3, pad=2)  # stored at max rank 5: only the first 3 are the adapter's
    files = encode_peft_adapter(
        layers,
        rank=3,
        alpha=6.0,
        target_modules=["q_proj"],
        base_model_name_or_path="tiny",
        dtype=torch.bfloat16,
    )
    config = json.loads(files[ADAPTER_CONFIG])
    assert config["r"] == 3 and config["lora_alpha"] == 6 and config["peft_type"] == "LORA"
    assert (
        not set(config)
        - IGNORED_CONFIG
        - set(UNSUPPORTED_CONFIG)
        - {"peft_type", "r", "lora_alpha", "use_rslora", "bias", "init_lora_weights"}
    )
    from_bytes = parse_peft_adapter(files[ADAPTER_CONFIG], files[ADAPTER_WEIGHTS], where="mem")
    from_dir = read_peft_adapter(_write(tmp_path / "a", files))
    for adapter in (from_bytes, from_dir):
        assert (adapter.rank, adapter.alpha, adapter.use_rslora) == (3, 6.0, False)
        assert adapter.scale == 2.0
        assert adapter.modules == tuple(name for name, _, _ in layers)
        for name, a, b in layers:
            got_a, got_b = adapter.weights[name]
            assert got_a.dtype == torch.bfloat16 and got_a.shape == (3, 6)
            assert torch.equal(got_a, a[:3].to(torch.bfloat16))
            assert torch.equal(got_b, b[:, :3].to(torch.bfloat16))
    pairs = parse_peft_weights(files[ADAPTER_WEIGHTS], 3, where="mem")
    assert all(torch.equal(pairs[n][0], from_bytes.weights[n][0]) for n in pairs)
    with pytest.raises(AdapterFormatError, match=r"mem/adapter_model\.safetensors: .*rank r=4"):
        parse_peft_weights(files[ADAPTER_WEIGHTS], 4, where="mem")
    with pytest.raises(AdapterFormatError, match="do not hold rank 6"):
        encode_peft_adapter(
            layers, rank=6, alpha=1.0, target_modules=[], base_model_name_or_path=""
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [(k, True) for k in ("use_dora", "use_qalora", "lora_bias", "fan_in_fan_out")]
    + [
        ("modules_to_save", ["lm_head"]),
        ("rank_pattern", {"q_proj": 2}),
        ("alpha_pattern", {"q_proj": 2}),
        ("trainable_token_indices", [1, 2]),
        ("alora_invocation_tokens", [5]),
        ("layer_replication", [[0, 2]]),
    ],
)
def test_every_unsupported_feature_is_refused_naming_key_and_fix(
    tmp_path: Path, key: str, value: object
) -> None:
    files = encode_peft_adapter(
        _layers(2), rank=2, alpha=4.0, target_modules=["q_proj"], base_model_name_or_path="tiny"
    )
    root = _write(tmp_path / key, files, **{key: value})
    with pytest.raises(AdapterFormatError, match=rf"{key}=.*not supported.*without {key}"):
        read_peft_adapter(root)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type='IA3'; only 'LORA'"),
        ({"bias": "all"}, "bias='all'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not a plain LoRA"),
        ({"init_lora_weights": "loftq"}, "path_initial_model_for_weight_conversion"),
        ({"brand_new_feature": {"on": 1}}, "unknown PEFT config key brand_new_feature"),
        ({"r": 0}, "r=0; the rank must be an integer >= 1"),
        ({"lora_alpha": "8"}, "lora_alpha='8'"),
    ],
)
def test_malformed_configs_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    files = encode_peft_adapter(
        _layers(2), rank=2, alpha=4.0, target_modules=["q_proj"], base_model_name_or_path="tiny"
    )
    with pytest.raises(AdapterFormatError, match=rf"adapter_config\.json: .*{re.escape(message)}"):
        read_peft_adapter(_write(tmp_path / "x", files, **config))
    # harmless keys, plain inits and unset unknown keys load
    ok = {"lora_dropout": 0.3, "init_lora_weights": "gaussian", "new_flag": False, "eva_config": {}}
    assert read_peft_adapter(_write(tmp_path / "ok", files, **ok)).rank == 2


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    files = encode_peft_adapter(
        _layers(2), rank=2, alpha=4.0, target_modules=["q_proj"], base_model_name_or_path="tiny"
    )
    root = _write(tmp_path / "a", files)
    (root / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors is not a readable"):
        read_peft_adapter(root)
    (root / ADAPTER_CONFIG).write_text("{oops")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is not JSON"):
        read_peft_adapter(root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def _trainer_export(tiny: Path, out: Path, rank: int, alpha: float, **config: object) -> Path:
    """A trained-looking slot of the trainer's model, exported, with ``config`` keys patched."""
    from trainer.inject import MultiLoraModel
    from trainer.peft_io import peft_files

    model = MultiLoraModel.from_pretrained(tiny, 2, 8)
    model.configure_slot(1, rank, alpha, seed=1)
    for name, _ in model.slot_layers():
        model.layer_weights(1, name)[1].normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return _write(out, peft_files(model, 1, str(tiny)), **config)


def test_dora_gets_one_error_from_trainer_import_and_rollout_load(
    tiny: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from rollout.lora import MultiLoraModel as RolloutModel
    from trainer.inject import MultiLoraModel
    from trainer.peft_io import import_peft

    dora = _trainer_export(tiny, tmp_path / "dora", 4, 8.0, use_dora=True)
    trainer = MultiLoraModel.from_pretrained(tiny, 2, 8)
    with pytest.raises(AdapterFormatError) as from_trainer:
        import_peft(trainer, 0, dora)
    assert not trainer.table.is_configured(0)
    rollout = RolloutModel(AutoModelForCausalLM.from_pretrained(tiny), num_slots=1, max_rank=8)
    with pytest.raises(AdapterFormatError) as from_rollout:
        rollout.load(0, read_peft_adapter(dora))  # what Engine.load_adapter does
    assert str(from_trainer.value) == str(from_rollout.value)
    assert "use_dora=True (DoRA" in str(from_trainer.value)
    assert "re-train or merge the adapter without use_dora" in str(from_trainer.value)


@pytest.mark.parametrize("rank", [3, 8])
def test_rslora_scale_is_the_same_in_trainer_and_rollout(
    tiny: Path, tmp_path: Path, rank: int
) -> None:
    """PEFT's rsLoRA: ``alpha / sqrt(r)``; the trainer folds it into alpha, rollout applies it."""
    from transformers import AutoModelForCausalLM

    from rollout.lora import MultiLoraModel as RolloutModel
    from trainer.inject import MultiLoraModel
    from trainer.peft_io import import_peft

    rs = _trainer_export(tiny, tmp_path / "rs", rank, 5.0, use_rslora=True)
    adapter = read_peft_adapter(rs)
    assert adapter.scale == lora_scale(rank, 5.0, True) == pytest.approx(5.0 / math.sqrt(rank))
    trainer = MultiLoraModel.from_pretrained(tiny, 2, 8)
    import_peft(trainer, 0, rs)
    rollout = RolloutModel(AutoModelForCausalLM.from_pretrained(tiny), num_slots=1, max_rank=8)
    rollout.load(0, adapter)
    scales = {float(layer.scale_S[0]) for layer in rollout.layers.values()}
    assert scales == {float(trainer.table.scale_S[0])}
    assert trainer.table.scale_S[0].item() == pytest.approx(5.0 / math.sqrt(rank), rel=1e-6)
    ids_B_T = torch.randint(4, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rollout.route([0, 0]):
        got = rollout.model(input_ids=ids_B_T).logits
    want = trainer(ids_B_T, torch.ones_like(ids_B_T), torch.tensor([0, 0])).detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _state(**changes: object) -> TrainingState:
    state = TrainingState(
        adapter="ad",
        registration_id="r1",
        step=8,
        version=9,
        epoch=2,
        cursor=CursorState(n=50, seed=3, epoch=1, position=7),
        spec=make_spec(interval=4),
        slot=SlotScalars(rank=4, alpha=8.0, step=8, layout_width=96),
    )
    return msgspec.structs.replace(state, **changes)


def test_training_state_round_trip_and_the_earlier_layout() -> None:
    state = _state()
    data = encode_training_state(state)
    assert data.endswith(b"}\n") and decode_training_state(data) == state
    assert data.count(b'"lr"') == 1  # the optimizer settings are stored once, in spec.optim
    legacy = msgspec.to_builtins(state)
    slot = legacy.pop("slot")
    optim = legacy["spec"]["optim"]
    legacy["optimizer"] = {**slot, "total_steps": 100, "lr": optim["lr"], "beta1": 0.9}
    assert decode_training_state(json.dumps(legacy).encode()) == state
    newer = {**msgspec.to_builtins(state), "added_later": 1}  # a newer writer's optional field
    assert decode_training_state(json.dumps(newer).encode()) == state


def test_bad_training_states_name_the_file() -> None:
    with pytest.raises(AdapterFormatError, match=r"v1/training_state\.json is not JSON"):
        decode_training_state(b"{", where="v1/training_state.json")
    with pytest.raises(AdapterFormatError, match=r"is not a training state: .*\$\.slot"):
        decode_training_state(json.dumps({**msgspec.to_builtins(_state()), "slot": 3}).encode())
    with pytest.raises(AdapterFormatError, match="missing required field `adapter`"):
        decode_training_state(json.dumps({"step": 5, "version": 5}).encode())


def test_state_tensors_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"exp_avg_r_Q": torch.randn(4, 9, generator=g), "exp_avg_sq_r_Q": torch.rand(4, 9)}
    data = encode_state_tensors(tensors)
    assert bytes(data) == save(tensors)
    got = decode_state_tensors(bytes(data))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    with pytest.raises(AdapterFormatError, match=r"training_state\.safetensors is not a readable"):
        decode_state_tensors(b"\x00" * 3)


def test_the_checkpoint_process_stays_free_of_torch() -> None:
    code = "import sys, orchestrator.checkpoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reading_an_adapter_again_and_again_keeps_no_memory(tmp_path: Path) -> None:
    """A rollout worker reads every version it serves, for weeks: a read must leave nothing
    behind (safetensors' ``load_file`` kept two small objects per tensor per call)."""
    import gc
    import tracemalloc

    files = encode_peft_adapter(
        [
            (f"model.layers.{i}.self_attn.q_proj", torch.ones(2, 6), torch.ones(6, 2))
            for i in range(16)
        ],
        rank=2,
        alpha=4.0,
        target_modules=["q_proj"],
        base_model_name_or_path="tiny",
    )
    root = _write(tmp_path / "a", files)
    for _ in range(3):
        read_peft_adapter(root)
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.take_snapshot()
        for _ in range(200):
            read_peft_adapter(root)
        gc.collect()
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "lineno"))
    finally:
        tracemalloc.stop()
    assert grown < 16_000, f"{grown} bytes kept by 200 reads"  # load_file kept ~360 KB here
