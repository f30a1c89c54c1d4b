"""Our single-copy safetensors encoder against the safetensors library itself."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from events.safetensors_io import to_safetensors


def test_the_library_reads_back_every_dtype_shape_and_the_metadata(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(7, generator=g).to(torch.float16),
        "steps.i64": torch.tensor([1, 2, 3]),
        "mask.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(6, 8, generator=g)[:, ::2],  # not contiguous
    }
    data = to_safetensors(tensors, metadata={"format": "pt"})
    got = load(bytes(data))
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_byte_for_byte_the_library_encoding() -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(64, 3 + i, generator=g) for i in range(8)}
    tensors["half"] = torch.randn(5, generator=g).to(torch.bfloat16)
    assert bytes(to_safetensors(tensors)) == save(tensors)  # same order, offsets and padding


def test_refuses_device_tensors_and_unknown_dtypes() -> None:
    with pytest.raises(TypeError, match="complex64"):
        to_safetensors({"c": torch.zeros(2, dtype=torch.complex64)})
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            to_safetensors({"g": torch.zeros(2, device="cuda")})
