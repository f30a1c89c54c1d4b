"""Serialise tensors in the safetensors format with a single copy of their bytes.

``safetensors.torch.save`` copies every tensor to a ``bytes`` object and then again into the
output; for the tens of megabytes a version holds that double copy was the largest part of
publishing one (34 ms for 19 MB on the GPU machine). :func:`to_safetensors` sizes one
``bytearray`` from the header and copies each tensor into its place in it, straight from the
source's memory (strided views and a transpose included), so each tensor is copied once. The
layout is the format's own: an 8-byte little-endian header length, the JSON header (``dtype``,
``shape``, ``data_offsets`` per tensor, optional ``__metadata__``) padded with spaces to a
multiple of 8, then the tensors' bytes back to back, larger dtypes first and by name within a
dtype (as safetensors orders them). ``safetensors.torch.load`` and every reader of the format
read it. It encodes the adapter's on-disk files (:mod:`events.adapter_format`), hence ``events/``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import torch
from torch import Tensor

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def to_safetensors(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytearray:
    """The safetensors encoding of ``tensors`` (CPU tensors, any strides; stored contiguous)."""
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(
                f"tensor {name!r} has dtype {t.dtype}; safetensors supports {list(DTYPES)}"
            )
        if t.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {t.device}; copy it to the CPU first")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = bytearray(8 + len(head) + offset)
    struct.pack_into("<Q", out, 0, len(head))
    out[8 : 8 + len(head)] = head
    start = 8 + len(head)
    for name in order:
        t = tensors[name]
        if t.numel():  # copy straight from the (possibly strided) source: the one copy
            dst = torch.frombuffer(out, dtype=t.dtype, count=t.numel(), offset=start)
            dst.view(t.shape).copy_(t)
            start += t.numel() * t.element_size()
    return out
