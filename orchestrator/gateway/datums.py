"""Tinker datums → the trainer's :class:`~events.schema.Datum` (the token alignment shift).

A Tinker datum is *already shifted*: ``model_input`` holds ``x_0 .. x_N-1``, and the per-target
loss inputs have ``N`` entries, entry ``i`` being about the target ``target_tokens[i]`` predicted
from ``x_0 .. x_i``. The trainer's datum holds the whole sequence ``tokens = x_0 .. x_N`` and
loss inputs of length ``N + 1`` where entry ``t`` is about token ``t`` (entry 0 is never a
target). So, for every datum::

    tokens          = model_input + [target_tokens[-1]]
    weights'[0]     = 0,  weights'[i + 1]    = weights[i]      (the same for logprobs, advantages)

**Limitation.** This only works for next-token targets: ``target_tokens[:-1]`` must equal
``model_input[1:]``. A datum whose targets are not its own input shifted by one (distillation onto
other tokens, 2-D ``target_tokens``) cannot be expressed as one sequence and is refused with a 400
naming the datum index.

Per loss (the SDK's names): ``cross_entropy`` takes ``target_tokens`` and ``weights`` (missing
weights mean all ones: every target counts); ``importance_sampling`` and ``ppo`` take
``target_tokens``, ``logprobs`` (the sampler's) and ``advantages``. Any other key is refused, not
ignored, so a client never trains on something it did not ask for. Values must be finite (JSON on
the bus cannot carry NaN or infinity). Float32 values are written with their shortest decimal
(``0.3``, not ``0.30000001192092896``), which rounds back to the same float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from events.schema import Datum, LossFnName
from orchestrator.gateway.errors import HttpError, bad_request
from orchestrator.gateway.protowire import (
    DTYPE_BFLOAT16,
    DTYPE_FLOAT32,
    DTYPE_INT32,
    DTYPE_INT64,
    WireDatum,
    WireTensor,
)

LOSS_INPUTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "cross_entropy": (frozenset({"target_tokens"}), frozenset({"weights"})),
    "importance_sampling": (frozenset({"target_tokens", "logprobs", "advantages"}), frozenset()),
    "ppo": (frozenset({"target_tokens", "logprobs", "advantages"}), frozenset()),
}
"""Per loss function: the required loss-input keys and the optional ones."""

_NUMPY: dict[int, np.dtype] = {
    DTYPE_FLOAT32: np.dtype("<f4"),
    DTYPE_INT64: np.dtype("<i8"),
    DTYPE_INT32: np.dtype("<i4"),
    DTYPE_BFLOAT16: np.dtype("<u2"),
}


def loss_fn_name(name: str) -> LossFnName:
    """The loss function, or a 400 listing the supported ones."""
    if name not in LOSS_INPUTS:
        raise bad_request(
            "loss_fn", f"{name!r} is not supported here; use one of {sorted(LOSS_INPUTS)}"
        )
    return name  # type: ignore[return-value]


def loss_config(config: dict[str, float | str]) -> dict[str, float]:
    """``loss_fn_config`` as the bus carries it (numbers only)."""
    out: dict[str, float] = {}
    for key, value in config.items():
        if isinstance(value, str) or not math.isfinite(value):
            raise bad_request(
                f"loss_fn_config.{key}", f"{value!r} is not supported; give a finite number"
            )
        out[key] = float(value)
    return out


def _values(tensor: WireTensor, where: str) -> np.ndarray:
    """The tensor's entries as a 1-D array (bfloat16 widened to float32)."""
    if tensor.sparse:
        raise bad_request(where, "sparse tensors are not supported; send it dense")
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise bad_request(where, f"unknown dtype {tensor.dtype}; use float32 or int64")
    if len(tensor.dense) % dtype.itemsize:
        raise bad_request(where, f"{len(tensor.dense)} bytes is not a whole number of {dtype}")
    values = np.frombuffer(tensor.dense, dtype=dtype)
    if tensor.dtype == DTYPE_BFLOAT16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    if len(tensor.shape) > 1:
        raise bad_request(
            where,
            f"shape {list(tensor.shape)} is not supported; give one entry per target "
            "(a 1-D tensor)",
        )
    if tensor.shape and tensor.shape[0] != values.size:
        raise bad_request(where, f"shape {list(tensor.shape)} but {values.size} values")
    return values


def _shifted(values: np.ndarray, where: str) -> tuple[float, ...]:
    """``(0, *values)`` as short floats; 400 on a non-finite value."""
    floats = values.astype(np.float32)
    if not np.isfinite(floats).all():
        bad = int(np.flatnonzero(~np.isfinite(floats))[0])
        raise bad_request(where, f"entry {bad} is {floats[bad]}; every value must be finite")
    return (0.0, *(float(str(v)) for v in floats))


def to_bus_datum(datum: WireDatum, index: int, loss_fn: LossFnName) -> Datum:
    """One Tinker datum in the trainer's alignment (see the module docstring)."""
    where = f"data[{index}]"
    if datum.chunk_kinds:
        raise bad_request(
            f"{where}.model_input",
            f"{datum.chunk_kinds[0]} chunks are not supported; send token (encoded_text) chunks",
        )
    if datum.has_spans:
        raise bad_request(f"{where}.model_input_spans", "provenance spans are not supported")
    required, optional = LOSS_INPUTS[loss_fn]
    given = set(datum.loss_fn_inputs)
    missing, unknown = sorted(required - given), sorted(given - required - optional)
    if missing:
        raise bad_request(f"{where}.loss_fn_inputs", f"{loss_fn} needs {missing[0]!r}")
    if unknown:
        raise bad_request(
            f"{where}.loss_fn_inputs.{unknown[0]}",
            f"not an input of {loss_fn}; it takes {sorted(required | optional)}",
        )
    n = len(datum.tokens)
    if n == 0:
        raise bad_request(f"{where}.model_input", "is empty; a datum needs at least one token")
    arrays = {}
    for key, tensor in datum.loss_fn_inputs.items():
        values = _values(tensor, f"{where}.loss_fn_inputs.{key}")
        if values.size != n:
            raise bad_request(
                f"{where}.loss_fn_inputs.{key}",
                f"has {values.size} entries for {n} model input tokens; give one per token",
            )
        arrays[key] = values
    targets = arrays["target_tokens"].astype(np.int64).tolist()
    if targets[:-1] != list(datum.tokens[1:]):
        raise HttpError(
            400,
            f"{where}: target_tokens[:-1] != model_input[1:]; this gateway trains next-token "
            "targets only (each datum must be one sequence: model_input plus its last target)",
            field=f"{where}.loss_fn_inputs.target_tokens",
        )
    weights = arrays.get("weights")
    if loss_fn == "cross_entropy" and weights is None:
        weights = np.ones(n, dtype=np.float32)

    def shifted(key: str, values: np.ndarray | None) -> tuple[float, ...]:
        return () if values is None else _shifted(values, f"{where}.loss_fn_inputs.{key}")

    return Datum(
        tokens=(*datum.tokens, targets[-1]),
        weights=shifted("weights", weights),
        logprobs=shifted("logprobs", arrays.get("logprobs")),
        advantages=shifted("advantages", arrays.get("advantages")),
    )


def to_bus_datums(data: Sequence[WireDatum], loss_fn: LossFnName) -> tuple[Datum, ...]:
    """Every datum of a request; 400 for an empty request or the first bad datum."""
    if not data:
        raise bad_request("data", "is empty; send at least one datum")
    return tuple(to_bus_datum(d, i, loss_fn) for i, d in enumerate(data))
