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

:func:`check_header` is the reading side's gate, run before any tensor is materialised: the
header must be well formed (a length that fits the file and the format's 100 MB limit, a JSON
object of ``{dtype, shape, data_offsets}`` entries whose byte ranges lie in the data section
and match ``prod(shape) * itemsize``) and every dtype must be one the caller allows
(:data:`FLOAT_DTYPES` for adapter weights and Adam moments: an integer, bool or fp8 tensor is
not a LoRA factor). The format holds no code, so unlike a pickle it cannot run anything; the
gate turns a malformed or unexpected file into :class:`SafetensorsHeaderError` naming the file,
the tensor and the fix instead of a library error deep in a load.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
"""The dtypes an adapter's weights and its Adam moments may have."""

ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
"""Bytes per element of the dtypes :func:`check_header` can size."""

MAX_HEADER_BYTES = 100_000_000
"""The format's own header limit (the safetensors library refuses larger headers too)."""


class SafetensorsHeaderError(ValueError):
    """A safetensors file is malformed, or holds a tensor of a dtype the reader does not allow."""


def check_header(
    prefix: bytes | bytearray | memoryview,
    total_bytes: int,
    *,
    allowed_dtypes: frozenset[str] = FLOAT_DTYPES,
    where: str,
) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header, validated (see the module doc).

    ``prefix`` holds at least the file's first ``8 + header length`` bytes (the whole file is
    fine); ``total_bytes`` is the file's size; ``where`` names the file in errors.
    """

    def bad(what: str) -> SafetensorsHeaderError:
        return SafetensorsHeaderError(
            f"{where} is not a readable safetensors file ({what}); re-export it with "
            "safetensors.torch.save_file (or PeftModel.save_pretrained)"
        )

    view = memoryview(prefix)
    if total_bytes < 8 or len(view) < 8:
        raise bad(f"{total_bytes} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > MAX_HEADER_BYTES or 8 + n > total_bytes:
        raise bad(f"header length {n} does not fit a file of {total_bytes} bytes")
    if len(view) < 8 + n:
        raise bad(f"only {len(view)} bytes of a {8 + n}-byte header were given")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (UnicodeDecodeError, ValueError) as err:
        raise bad(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    data_bytes = total_bytes - 8 - n
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise bad(f"tensor {name!r} is described by a {type(entry).__name__}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in allowed_dtypes:
            raise SafetensorsHeaderError(
                f"{where}: tensor {name!r} has dtype {dtype!r}; only {sorted(allowed_dtypes)} "
                "are allowed here: convert the tensor (e.g. tensor.float()) and save it again"
            )
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}, not a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        size = math.prod(shape) * ITEMSIZE.get(dtype, 0)
        if not begin <= end <= data_bytes or end - begin != size:
            raise bad(
                f"tensor {name!r} ({dtype} {shape}) spans bytes [{begin}, {end}) of a "
                f"{data_bytes}-byte data section; it needs {size} bytes inside it"
            )
    return entries


def check_file(
    path: str | Path, *, allowed_dtypes: frozenset[str] = FLOAT_DTYPES
) -> dict[str, Any]:
    """:func:`check_header` of the file at ``path``, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        total = f.seek(0, 2)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 + n <= min(total, 8 + MAX_HEADER_BYTES):
                f.seek(8)
                head += f.read(n)
    return check_header(head, total, allowed_dtypes=allowed_dtypes, where=str(path))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
