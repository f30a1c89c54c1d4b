"""Result records → the SDK's response bodies (what ``retrieve_future`` answers).

One function per outcome: :func:`try_again` (``TryAgainResponse``), :func:`render_failed`
(``RequestFailedResponse``), :func:`render_done` (the response type of the future's kind, from its
:mod:`events.futures` result record):

=============================  ==============================================================
kind                           response (``tinker.types``)
=============================  ==============================================================
``forward_backward``,          ``ForwardBackwardOutput``: per datum ``{"logprobs",
``forward``                    "elementwise_loss"}`` (float32, one entry per target), metrics;
                               protobuf when asked (the SDK always asks), else JSON
``optim_step``                 ``OptimStepResponse`` (``metrics``)
``save_weights_for_sampler``   ``SaveWeightsForSamplerResponseInternal`` (``path``, and
                               ``sampling_session_id`` when the save made one)
``save_weights``               ``SaveWeightsResponse`` (``path``)
``load_weights``               ``LoadWeightsResponse`` (``path``, ``model_id``)
``create_from_state``          ``LoadWeightsResponse`` (the ``tinker://`` path loaded, the
                               model id as the client named it)
``create_model``               ``CreateModelResponse`` (``model_id``)
``unload_model``               ``UnloadModelResponse`` (``model_id``)
``sample``                     ``SampleResponse``: sequences (tokens, logprobs, stop reason),
                               prompt log-probs; protobuf when asked, else JSON
=============================  ==============================================================

A response's ``model_id`` is the id the client named the model by (:class:`Echo`), which differs
from the future's ``model`` (the adapter name) only for a model created from a checkpoint.

The SDK folds the metrics of a chunked ``forward_backward`` by the reduction named after the
colon (``loss:sum``), and fails on a key without exactly one; such keys are sent as
``<key>:mean`` (colons inside the name become ``_``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from events.futures import (
    ForwardBackwardResult,
    FutureRecord,
    LoadWeightsResult,
    OptimStepResult,
    SampleResult,
    SaveWeightsResult,
)
from orchestrator.gateway.protowire import write_forward_backward_output, write_sample_response

Reply = tuple[int, str, bytes]
"""An HTTP answer: status, content type, body."""

JSON = "application/json"
PROTOBUF = "application/x-protobuf"


class Echo(msgspec.Struct, frozen=True, kw_only=True):
    """What a future's response repeats of its request that its completer never sees: kept by
    the gateway on the future's hash (field names as here; ``""``: not set). ``client_model``:
    the client's id of the model when it differs from the model id (an alias); ``load_path``:
    the ``tinker://`` path a ``create_from_state`` loads; ``sampler``: the sampling session a
    ``save_weights_for_sampler`` without a name made."""

    client_model: str = ""
    load_path: str = ""
    sampler: str = ""


def json_reply(payload: Any, status: int = 200) -> Reply:
    return status, JSON, json.dumps(payload).encode()


def error_reply(status: int, message: str, field: str = "") -> Reply:
    """The body of a refused request (FastAPI's ``detail``, plus the field at fault)."""
    body: dict[str, Any] = {"detail": message}
    if field:
        body["field"] = field
    return json_reply(body, status)


def try_again(request_id: str, reason: str = "") -> Reply:
    body: dict[str, Any] = {"type": "try_again", "request_id": request_id}
    if reason.startswith("queued"):
        body.update(queue_state="paused_capacity", queue_state_reason=reason)
    else:
        body["queue_state"] = "active"
    return json_reply(body)


def render_failed(record: FutureRecord) -> Reply:
    return json_reply({"error": record.error or "the request failed", "category": record.category})


def metric_key(key: str) -> str:
    """``key`` in the SDK's ``name:reduction`` form."""
    return key if key.count(":") == 1 else key.replace(":", "_") + ":mean"


def _tensor(values: tuple[float, ...]) -> dict[str, Any]:
    return {"data": list(values), "dtype": "float32", "shape": [len(values)]}


def _forward_backward(result: ForwardBackwardResult, *, proto: bool) -> Reply:
    metrics = {metric_key(k): v for k, v in result.metrics.items() if math.isfinite(v)}
    if proto:
        outputs = {"logprobs": result.logprobs, "elementwise_loss": result.elementwise_loss}
        body = write_forward_backward_output(outputs, metrics, num_datums=len(result.logprobs))
        return 200, PROTOBUF, body
    rows = [
        {"logprobs": _tensor(lp), "elementwise_loss": _tensor(loss)}
        for lp, loss in zip(result.logprobs, result.elementwise_loss, strict=True)
    ]
    return json_reply(
        {"loss_fn_output_type": "ArrayRecord", "loss_fn_outputs": rows, "metrics": metrics}
    )


def _sample(result: SampleResult, *, proto: bool) -> Reply:
    if proto:
        rows = [(s.tokens, s.logprobs, s.stop_reason) for s in result.sequences]
        return 200, PROTOBUF, write_sample_response(rows, result.prompt_logprobs)
    sequences = [
        {"tokens": list(s.tokens), "logprobs": list(s.logprobs), "stop_reason": s.stop_reason}
        for s in result.sequences
    ]
    return json_reply(
        {
            "sequences": sequences,
            "prompt_logprobs": (
                None if result.prompt_logprobs is None else list(result.prompt_logprobs)
            ),
        }
    )


def render_done(record: FutureRecord, *, proto: bool, echo: Echo) -> Reply:
    """The completed future's response (see the module doc). Raises msgspec's errors when the
    stored result does not decode as its kind's record."""
    raw, kind = record.result, record.kind
    model_id = echo.client_model or record.model
    if kind in ("forward_backward", "forward"):
        fb = msgspec.json.decode(raw, type=ForwardBackwardResult)
        return _forward_backward(fb, proto=proto)
    if kind == "sample":
        return _sample(msgspec.json.decode(raw, type=SampleResult), proto=proto)
    if kind == "optim_step":
        step = msgspec.json.decode(raw, type=OptimStepResult)
        return json_reply({"metrics": {k: v for k, v in step.metrics.items() if math.isfinite(v)}})
    if kind == "save_weights_for_sampler":
        saved = msgspec.json.decode(raw, type=SaveWeightsResult)
        body: dict[str, Any] = {"path": saved.path, "type": "save_weights_for_sampler"}
        if echo.sampler:
            body["sampling_session_id"] = echo.sampler
        return json_reply(body)
    if kind == "save_weights":
        saved = msgspec.json.decode(raw, type=SaveWeightsResult)
        return json_reply({"path": saved.path, "type": "save_weights"})
    if kind == "load_weights":
        loaded = msgspec.json.decode(raw, type=LoadWeightsResult)
        return json_reply({"path": loaded.path, "model_id": model_id, "type": "load_weights"})
    if kind == "create_from_state":
        return json_reply({"path": echo.load_path, "model_id": model_id, "type": "load_weights"})
    if kind in ("create_model", "unload_model"):
        return json_reply({"model_id": model_id, "type": kind})
    return render_failed(
        msgspec.structs.replace(record, error=f"unknown future kind {kind!r}", category="server")
    )
