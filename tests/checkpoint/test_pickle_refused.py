"""Only safetensors load: a pickled adapter is refused by every loader and never unpickled.

The pickle written here is real (``torch.save`` of a dict of LoRA tensors) and carries a bomb:
an object whose unpickling creates a marker file. Every test checks the marker is absent, so a
loader that refused the directory *after* unpickling it would fail. Malformed safetensors
headers and tensors of a dtype a LoRA factor cannot have are refused too.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import save

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    STATE_JSON,
    STATE_TENSORS,
    AdapterFormatError,
    PickleRefused,
    decode_state_tensors,
    encode_peft_adapter,
    parse_peft_weights,
    read_peft_adapter,
)
from events.safetensors_io import SafetensorsHeaderError, check_header
from events.schema import SyncRequested
from orchestrator.checkpoint_store import MANIFEST, CheckpointStore, verify
from orchestrator.storage import ArtifactError
from tests.checkpoint.conftest import version_files
from tests.rollout_worker.conftest import data_root, make_worker, tiny_dir  # noqa: F401
from tests.rollout_worker.helpers import admitted, registered, task

REPO = Path(__file__).resolve().parents[2]
LOAD_PATH_PACKAGES = ("events", "orchestrator", "trainer", "rollout", "ops")


def _explode(marker: str) -> None:
    Path(marker).write_text("unpickled")


class _Bomb:
    """Unpickling this object runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_explode, (str(self.marker),))


def _pickled_adapter(directory: Path, marker: Path, *, rank: int = 2, width: int = 8) -> Path:
    """A PEFT directory whose weights are ``adapter_model.bin`` (torch.save), no safetensors."""
    directory.mkdir(parents=True)
    a = torch.randn(rank, width)
    b = torch.randn(width, rank)
    tensors = {
        f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": a,
        f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": b,
        "bomb": _Bomb(marker),
    }
    torch.save(tensors, directory / "adapter_model.bin")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none"}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    return directory


@pytest.fixture
def pickled(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "unpickled.marker"
    return _pickled_adapter(tmp_path / "pickled", marker), marker


def _refused(message: str, directory: Path) -> None:
    assert str(directory) in message and "adapter_model.bin (pickle)" in message, message
    assert "loads only safetensors" in message and "convert it" in message, message


def test_the_pickle_bomb_would_go_off_if_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    directory = _pickled_adapter(tmp_path / "x", marker)
    torch.load(directory / "adapter_model.bin", weights_only=False)  # what no loader may do
    assert marker.read_text() == "unpickled"


def test_the_format_reader_refuses_a_pickled_adapter(pickled: tuple[Path, Path]) -> None:
    directory, marker = pickled
    with pytest.raises(PickleRefused) as info:
        read_peft_adapter(directory)
    _refused(str(info.value), directory)
    for suffix in (".pt", ".pth", ".ckpt"):
        (directory / "adapter_model.bin").rename(directory / f"adapter_model{suffix}")
        with pytest.raises(PickleRefused, match=rf"adapter_model\{suffix} \(pickle\)"):
            read_peft_adapter(directory)
        (directory / f"adapter_model{suffix}").rename(directory / "adapter_model.bin")
    assert not marker.exists()


def test_the_trainer_import_refuses_a_pickled_adapter(
    pickled: tuple[Path, Path],
    tiny_dir: Path,  # noqa: F811 (the rollout worker tests' fixture, imported above)
) -> None:
    from trainer.inject import MultiLoraModel
    from trainer.peft_io import import_peft

    directory, marker = pickled
    model = MultiLoraModel.from_pretrained(tiny_dir, 2, 8)
    with pytest.raises(PickleRefused) as info:
        import_peft(model, 1, directory)
    _refused(str(info.value), directory)
    assert model.table.rank(1) == 0  # the slot is untouched
    assert not marker.exists()


def test_the_rollout_engine_refuses_a_pickled_adapter(
    pickled: tuple[Path, Path],
    tiny_dir: Path,  # noqa: F811 (the rollout worker tests' fixture, imported above)
) -> None:
    from rollout.backend import AdapterLoadError, EmbeddedBackend
    from rollout.engine import Engine

    directory, marker = pickled
    engine = Engine.from_pretrained(tiny_dir, max_loras=2, max_lora_rank=8, keep_versions=2)
    with pytest.raises(AdapterLoadError) as info:
        EmbeddedBackend(engine).load("math", 1, str(directory))
    _refused(str(info.value), directory)
    assert engine.loaded_adapters() == []
    assert not marker.exists()


@pytest.mark.bus
def test_the_rollout_worker_fails_the_task_and_the_sync_instead_of_crashing(
    pickled: tuple[Path, Path],
    make_worker,  # noqa: F811
    data_root: Path,  # noqa: F811
) -> None:
    from rollout.worker import SyncError

    directory, marker = pickled
    worker = make_worker("w1")
    worker.on_control(registered("math", "r1"))
    worker.on_control(admitted("math", "r1", epoch=1))
    effects = worker.on_task(task("math", "r1", directory, version=1, epoch=1))
    cmd = effects.commands[0]
    group = msgspec.json.decode(dict(zip(cmd[3::2], cmd[4::2], strict=True))["event"])
    samples = [s for pg in group["groups"] for s in pg["samples"]]
    assert samples and all(s["failed"] for s in samples)
    assert all(ADAPTER_WEIGHTS in s["reason"] for s in samples), samples[0]["reason"]
    event = SyncRequested(
        adapter="math",
        registration_id="r1",
        epoch=1,
        version=2,
        step=2,
        uri=str(directory),
        sha256="0" * 64,
        bytes=1,
    )
    with pytest.raises(SyncError, match=ADAPTER_WEIGHTS.replace(".", r"\.")):
        worker.on_control(event, "1-1")
    assert not marker.exists()


def test_the_checkpoint_store_refuses_and_never_copies_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    source = tmp_path / "artifacts" / "ad" / "r1" / "v000001"
    source.mkdir(parents=True)
    files = version_files(step=1, version=1)
    for name, data in files.items():
        if name != ADAPTER_WEIGHTS:
            (source / name).write_bytes(data)
    torch.save({"bomb": _Bomb(marker)}, source / "adapter_model.bin")
    store = CheckpointStore(str(tmp_path / "ckpt"))
    with pytest.raises(ArtifactError, match=r"adapter_model\.bin \(pickle\); multilora loads"):
        store.promote(str(source), "ad", "r1", step=1, version=1, epoch=0)
    # beside the safetensors file a pickle is left alone, and not copied into the checkpoint
    (source / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
    ref = store.promote(str(source), "ad", "r1", step=1, version=1, epoch=0)
    step_dir = Path(ref.uri)
    assert "adapter_model.bin" not in ref.manifest.files
    assert not (step_dir / "adapter_model.bin").exists()
    assert verify(ref.uri).step == 1
    # a step directory whose safetensors weights were swapped for a pickle is refused
    (step_dir / ADAPTER_WEIGHTS).unlink()
    torch.save({"bomb": _Bomb(marker)}, step_dir / "adapter_model.bin")
    with pytest.raises(ArtifactError, match=r"adapter_model\.bin \(pickle\)"):
        verify(ref.uri)
    assert (step_dir / MANIFEST).exists() and {STATE_JSON, STATE_TENSORS} <= set(ref.manifest.files)
    assert not marker.exists()


# --- safetensors headers and dtypes ------------------------------------------------------------


def _weights(dtype: torch.dtype) -> bytes:
    a = torch.ones(2, 4).to(dtype)
    b = torch.ones(4, 2).to(dtype)
    return save({f"{PEFT_PREFIX}m.lora_A.weight": a, f"{PEFT_PREFIX}m.lora_B.weight": b})


def test_tensors_of_a_dtype_a_lora_factor_cannot_have_are_refused(tmp_path: Path) -> None:
    assert set(parse_peft_weights(_weights(torch.bfloat16), 2, where="x")) == {"m"}
    for dtype, tag in ((torch.int8, "I8"), (torch.uint8, "U8"), (torch.bool, "BOOL")):
        with pytest.raises(AdapterFormatError, match=rf"dtype '{tag}'; only \['BF16'"):
            parse_peft_weights(_weights(dtype), 2, where="x")
    with pytest.raises(AdapterFormatError, match="dtype 'I64'"):
        decode_state_tensors(save({"exp_avg_r_Q": torch.zeros(2, 3, dtype=torch.int64)}))
    # the file reader checks the header before it maps any tensor
    files = encode_peft_adapter(
        [("m", torch.ones(2, 4), torch.ones(4, 2))],
        rank=2,
        alpha=4.0,
        target_modules=["m"],
        base_model_name_or_path="tiny",
    )
    root = tmp_path / "a"
    root.mkdir()
    (root / ADAPTER_CONFIG).write_bytes(files[ADAPTER_CONFIG])
    (root / ADAPTER_WEIGHTS).write_bytes(_weights(torch.int8))
    with pytest.raises(AdapterFormatError, match="dtype 'I8'"):
        read_peft_adapter(root)


def _file(header: object, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


MALFORMED = [
    (b"short", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 1 << 40) + b"{}", "does not fit a file"),
    (struct.pack("<Q", 3) + b"{x}", "not JSON"),
    (_file([1, 2]), "JSON list, not an object"),
    (_file({"t": 5}), "described by a int"),
    (_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "shape [-1]"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}), "not [begin, end]"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), "spans bytes [0, 8)"),
    (
        _file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8),
        "needs 8 bytes",
    ),
]


@pytest.mark.parametrize(("data", "words"), MALFORMED)
def test_malformed_headers_are_refused_naming_the_file(data: bytes, words: str) -> None:
    with pytest.raises(SafetensorsHeaderError, match=r"f\.safetensors is not a readable") as info:
        check_header(data, len(data), where="f.safetensors")
    assert words in str(info.value)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        decode_state_tensors(data)


def test_no_load_path_calls_torch_load() -> None:
    """``torch.load`` unpickles: it appears in no module of the service (this test is the grep)."""
    offenders = []
    for package in LOAD_PATH_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                match node:
                    case ast.Attribute(value=ast.Name(id="torch"), attr="load"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
                    case ast.ImportFrom(module="torch", names=names) if any(
                        alias.name == "load" for alias in names
                    ):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
