"""The three protobuf messages of the Tinker wire protocol, read and written by hand.

The SDK (``tinker==0.38.0``) sends ``forward_backward`` as a protobuf ``ForwardBackwardRequest``
(``Content-Type: application/x-protobuf``) and accepts ``ForwardBackwardOutput`` and
``SampleResponse`` results *only* as protobuf (it asks with ``Accept: application/x-protobuf``
and refuses JSON for those two types). This module speaks exactly that subset of the SDK's
``tinker_public.proto`` — field numbers below — with a ~60-line wire codec, so the gateway needs
neither the SDK nor the protobuf runtime.

Wire format (https://protobuf.dev/programming-guides/encoding/): a message is a run of
``(key, value)`` with ``key = field_number << 3 | wire_type``; wire type 0 is a varint, 1 eight
bytes, 2 a length-prefixed byte string (strings, bytes, sub-messages, packed repeated scalars,
map entries ``{1: key, 2: value}``), 5 four bytes. Unknown fields are skipped (forward
compatibility); a truncated or malformed message raises :class:`ProtoError`.

Read (``ForwardBackwardRequest``)::

    1 model_id string · 2 seq_id int32 · 3 data repeated Datum · 4 loss_fn string
    5 loss_fn_config map<string, double> (legacy) · 6 forward_only bool
    7 loss_fn_config_v2 map<string, {1 number double | 2 text string}> (preferred when set)
    Datum: 1 model_input repeated Chunk · 2 loss_fn_inputs map<string, Tensor>
           3, 4 provenance spans (refused)
    Chunk: oneof {1 encoded_text {1 tokens bytes: int32 LE} | 2 image | 3 dmel}
    Tensor: oneof {1 dense bytes | 2 sparse_csr} · 3 dtype enum · 4 shape repeated int64
    DType: 1 float32 · 2 int64 · 3 int32 · 4 bfloat16

Written (``ForwardBackwardOutput``, ``SampleResponse``)::

    ForwardBackwardOutput: 1 loss_fn_output_type string · 2 loss_fn_outputs repeated ArrayRecord
                           3 metrics map<string, double>
    ArrayRecord: 1 type_tag string · 2 fields map<string, BatchedTensor> · 3 num_datums int64
    BatchedTensor: 1 data bytes · 2 offsets bytes (int64 LE byte offsets, num_datums + 1)
                   3 dtype enum · 4 trailing_shape repeated int64
    SampleResponse: 1 sequences repeated SampledSequence · 2 prompt_logprobs bytes (float32 LE,
                    NaN where none)
    SampledSequence: 1 stop_reason enum (0 stop, 1 length) · 2 tokens bytes (int32 LE)
                     3 logprobs bytes (float32 LE)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence

import msgspec
import numpy as np

from events.errors import MultiLoraError

DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
STOP_REASONS = {"stop": 0, "length": 1}


class ProtoError(MultiLoraError, ValueError):
    """A protobuf body could not be read; the message names the field."""


# --- the codec ----------------------------------------------------------------------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ProtoError("truncated or overlong varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def fields(buf: bytes, where: str = "body") -> Iterator[tuple[int, int, int | bytes]]:
    """``(field_number, wire_type, value)`` of every field of one message, in order."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i : i + size], i + size
        else:
            raise ProtoError(f"{where}: field {number} has unsupported wire type {wire}")
        if i > n:
            raise ProtoError(f"{where}: field {number} runs past the end of the message")
        yield number, wire, value


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: two's complement, ten bytes
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _double_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack("<d", value)


def _str(value: int | bytes, where: str) -> str:
    if not isinstance(value, bytes):
        raise ProtoError(f"{where}: expected a string, got a number")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ProtoError(f"{where}: not valid UTF-8") from None


def _bytes(value: int | bytes, where: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtoError(f"{where}: expected bytes, got a number")
    return value


def _int(value: int | bytes, where: str) -> int:
    if not isinstance(value, int):
        raise ProtoError(f"{where}: expected a number, got bytes")
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(value: int | bytes, where: str) -> list[int]:
    """A repeated integer field's entries from one occurrence (packed or not)."""
    if isinstance(value, int):
        return [_int(value, where)]
    out, i = [], 0
    while i < len(value):
        v, i = _read_varint(value, i)
        out.append(_int(v, where))
    return out


# --- ForwardBackwardRequest ---------------------------------------------------------------------


class WireTensor(msgspec.Struct, frozen=True, kw_only=True):
    """A ``TensorData`` as sent: ``dtype`` (proto enum), ``shape``, the dense bytes."""

    dtype: int
    shape: tuple[int, ...]
    dense: bytes
    sparse: bool = False


class WireDatum(msgspec.Struct, frozen=True, kw_only=True):
    """One datum as sent: its model input's tokens (text chunks joined), its loss inputs.

    ``chunk_kinds`` names every non-text chunk (``image``, ``dmel``) and ``has_spans`` whether
    provenance spans came along, so the caller can refuse them with a message.
    """

    tokens: tuple[int, ...]
    loss_fn_inputs: dict[str, WireTensor]
    chunk_kinds: tuple[str, ...] = ()
    has_spans: bool = False


class WireForwardBackward(msgspec.Struct, frozen=True, kw_only=True):
    """A ``ForwardBackwardRequest`` as sent (``loss_fn_config`` values: number or text)."""

    model_id: str
    seq_id: int
    data: tuple[WireDatum, ...]
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool


def _tensor(buf: bytes, where: str) -> WireTensor:
    dtype, shape, dense, sparse = 0, [], b"", False
    for number, _, value in fields(buf, where):
        if number == 1:
            dense = _bytes(value, f"{where}.dense")
        elif number == 2:
            sparse = True
        elif number == 3:
            dtype = _int(value, f"{where}.dtype")
        elif number == 4:
            shape.extend(_ints(value, f"{where}.shape"))
    return WireTensor(dtype=dtype, shape=tuple(shape), dense=dense, sparse=sparse)


def _map_entry(buf: bytes, where: str) -> tuple[str, int | bytes]:
    key = ""
    val: int | bytes = b""
    for number, _, value in fields(buf, where):
        if number == 1:
            key = _str(value, f"{where} key")
        elif number == 2:
            val = value
    return key, val


def _datum(buf: bytes, where: str) -> WireDatum:
    tokens: list[int] = []
    inputs: dict[str, WireTensor] = {}
    kinds: list[str] = []
    spans = False
    for number, _, value in fields(buf, where):
        if number == 1:
            for kind, _, chunk in fields(_bytes(value, f"{where}.model_input"), where):
                if kind == 1:
                    for n, _, raw in fields(_bytes(chunk, where), f"{where}.model_input"):
                        if n == 1:
                            data = _bytes(raw, f"{where}.model_input.tokens")
                            if len(data) % 4:
                                raise ProtoError(f"{where}.model_input: tokens are not int32s")
                            tokens.extend(np.frombuffer(data, dtype="<i4").tolist())
                else:
                    kinds.append({2: "image", 3: "dmel"}.get(kind, f"chunk type {kind}"))
        elif number == 2:
            name, raw = _map_entry(_bytes(value, f"{where}.loss_fn_inputs"), where)
            inputs[name] = _tensor(_bytes(raw, where), f"{where}.loss_fn_inputs.{name}")
        elif number in (3, 4):
            spans = True
    return WireDatum(
        tokens=tuple(tokens), loss_fn_inputs=inputs, chunk_kinds=tuple(kinds), has_spans=spans
    )


def read_forward_backward(body: bytes) -> WireForwardBackward:
    """Decode a ``ForwardBackwardRequest``; raises :class:`ProtoError` naming the field."""
    model_id, seq_id, loss_fn, forward_only = "", 0, "", False
    data: list[WireDatum] = []
    legacy: dict[str, float | str] = {}
    config: dict[str, float | str] = {}
    for number, _, value in fields(body):
        if number == 1:
            model_id = _str(value, "model_id")
        elif number == 2:
            seq_id = _int(value, "seq_id")
        elif number == 3:
            data.append(_datum(_bytes(value, "data"), f"data[{len(data)}]"))
        elif number == 4:
            loss_fn = _str(value, "loss_fn")
        elif number == 5:
            name, raw = _map_entry(_bytes(value, "loss_fn_config"), "loss_fn_config")
            legacy[name] = struct.unpack("<d", _bytes(raw, "loss_fn_config"))[0] if raw else 0.0
        elif number == 6:
            forward_only = bool(_int(value, "forward_only"))
        elif number == 7:
            name, raw = _map_entry(_bytes(value, "loss_fn_config_v2"), "loss_fn_config_v2")
            config[name] = _config_value(_bytes(raw, "loss_fn_config_v2"), name)
    return WireForwardBackward(
        model_id=model_id,
        seq_id=seq_id,
        data=tuple(data),
        loss_fn=loss_fn,
        loss_fn_config=config or legacy,
        forward_only=forward_only,
    )


def _config_value(buf: bytes, name: str) -> float | str:
    where = f"loss_fn_config.{name}"
    result: float | str = 0.0
    for number, _, value in fields(buf, where):
        if number == 1:
            result = struct.unpack("<d", _bytes(value, where))[0]
        elif number == 2:
            result = _str(value, where)
    return result


# --- ForwardBackwardOutput and SampleResponse ---------------------------------------------------


def _batched_float32(rows: Sequence[Sequence[float]]) -> bytes:
    """A ``BatchedTensor`` of float32 rows, one per datum (ragged: the offsets say where)."""
    arrays = [np.asarray(r, dtype="<f4") for r in rows]
    offsets = np.cumsum([0, *(a.nbytes for a in arrays)], dtype="<i8")
    data = b"".join(a.tobytes() for a in arrays)
    return _len_field(1, data) + _len_field(2, offsets.tobytes()) + _int_field(3, DTYPE_FLOAT32)


def write_forward_backward_output(
    outputs: Mapping[str, Sequence[Sequence[float]]],
    metrics: Mapping[str, float],
    *,
    num_datums: int,
    output_type: str = "ArrayRecord",
) -> bytes:
    """One ``ForwardBackwardOutput`` whose single ``ArrayRecord`` holds, per name in
    ``outputs``, one float32 row per datum (the SDK shows each as a 1-D ``TensorData``)."""
    record = _len_field(1, output_type.encode())
    for name, rows in outputs.items():
        entry = _len_field(1, name.encode()) + _len_field(2, _batched_float32(rows))
        record += _len_field(2, entry)
    record += _int_field(3, num_datums)
    out = _len_field(1, output_type.encode()) + _len_field(2, record)
    for key, value in metrics.items():
        out += _len_field(3, _len_field(1, key.encode()) + _double_field(2, value))
    return out


def write_sample_response(
    sequences: Sequence[tuple[Sequence[int], Sequence[float], str]],
    prompt_logprobs: Sequence[float | None] | None,
) -> bytes:
    """A ``SampleResponse``: ``(tokens, logprobs, stop_reason)`` per sequence; prompt log-probs
    (``None`` entries become NaN, which the SDK shows as ``None`` again) when asked for."""
    out = b""
    for tokens, logprobs, stop_reason in sequences:
        seq = _int_field(1, STOP_REASONS[stop_reason])
        seq += _len_field(2, np.asarray(tokens, dtype="<i4").tobytes())
        seq += _len_field(3, np.asarray(logprobs, dtype="<f4").tobytes())
        out += _len_field(1, seq)
    if prompt_logprobs is not None:
        values = [np.nan if v is None else v for v in prompt_logprobs]
        out += _len_field(2, np.asarray(values, dtype="<f4").tobytes())
    return out
