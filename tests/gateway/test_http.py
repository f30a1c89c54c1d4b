"""The gateway's refusals and its session and model lifecycle, over plain HTTP and the SDK.

Raw HTTP where the SDK would retry for minutes (429, 5xx) or cannot send the request at all
(malformed bodies); the official SDK where it shows what a client sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from events.schema import DeregisterRequested, ForwardBackward, RegisterRequested
from events.streams import Streams
from orchestrator.gateway.protowire import read_forward_backward
from orchestrator.gateway.records import model_id_for
from tests.gateway.conftest import ALICE, BASE, BOB, FakeCompleter, Running

pytestmark = pytest.mark.bus


def post(running: Running, route: str, body: Any, key: str = ALICE, **headers: str) -> Any:
    content = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(
        f"{running.url}/api/v1/{route}", headers={"X-API-Key": key, **headers}, **content
    )


def fwdbwd_body(model: str, seq_id: int, tokens: list[int]) -> bytes:
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:]},
        )
    ]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=model,
        seq_id=seq_id,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


PROTO = {"Content-Type": "application/x-protobuf"}


def make_model(running: Running, key: str = ALICE) -> tuple[str, str]:
    """A session and an admitted model of the key's tenant: ``(session_id, model_id)``."""
    session = post(running, "create_session", {"tags": [], "sdk_version": "x"}, key).json()
    body = {
        "session_id": session["session_id"],
        "model_seq_id": 0,
        "base_model": BASE,
        "lora_config": {"rank": 4},
    }
    created = post(running, "create_model", body, key).json()
    answer = post(running, "retrieve_future", {"request_id": created["request_id"]}, key).json()
    assert answer == {"model_id": created["model_id"], "type": "create_model"}
    return session["session_id"], created["model_id"]


def test_start_up_routes_answer_what_the_sdk_needs(gateway: Callable[..., Running]) -> None:
    running = gateway(max_context_length=2048)
    assert httpx.get(running.url + "/api/v1/healthz").json() == {"status": "ok"}
    config = post(running, "client/config", {"sdk_version": "0.38.0"}).json()
    assert config["parallel_fwdbwd_chunks"] is False and config["pjwt_auth_enabled"] is False
    assert config["use_pyqwest_transport"] is False and config["proto_compress_fwdbwd"] is False
    assert post(running, "telemetry", {"events": []}).json() == {"status": "accepted"}
    caps = httpx.get(
        running.url + "/api/v1/get_server_capabilities", headers={"X-API-Key": ALICE}
    ).json()
    assert caps["supported_models"][0]["model_name"] == BASE
    assert caps["supported_models"][0]["max_context_length"] == 2048
    session = post(running, "create_session", {"tags": []}).json()["session_id"]
    assert post(running, "session_heartbeat", {"session_id": session}).status_code == 200
    assert post(running, "session_heartbeat", {"session_id": session}, BOB).status_code == 404


def test_another_tenants_models_futures_and_paths_are_not_found(
    gateway: Callable[..., Running], completer: FakeCompleter
) -> None:
    running = gateway()
    _, model = make_model(running)
    bob_session = post(running, "create_session", {}, BOB).json()["session_id"]
    for route, body in [
        ("get_info", {"model_id": model}),
        ("optim_step", {"model_id": model, "seq_id": 1, "adam_params": {}}),
        ("retrieve_future", {"request_id": f"{model}.create"}),
        ("unload_model", {"model_id": model}),
    ]:
        answer = post(running, route, body, BOB)
        assert answer.status_code == 404, route
        assert "not found for this API key" in answer.json()["detail"]
    assert (
        post(running, "forward_backward", fwdbwd_body(model, 1, [1, 2]), BOB, **PROTO).status_code
        == 404
    )

    saved = post(
        running, "save_weights_for_sampler", {"model_id": model, "path": "mine", "seq_id": 1}
    )
    path = post(running, "retrieve_future", {"request_id": saved.json()["request_id"]}).json()[
        "path"
    ]
    alice = tinker.ServiceClient(base_url=running.url, api_key=ALICE)
    bob = tinker.ServiceClient(base_url=running.url, api_key=BOB)
    try:
        assert alice.create_sampling_client(model_path=path).result(timeout=10)
        with pytest.raises(tinker.NotFoundError, match="not found for this API key"):
            bob.create_sampling_client(model_path=path).result(timeout=10)
    finally:
        alice.close("success").result(timeout=10)
        bob.close("success").result(timeout=10)
    sample = {"prompt": {"chunks": [{"tokens": [1]}]}, "sampling_params": {}, "model_path": path}
    assert post(running, "asample", sample, BOB).status_code == 404
    assert post(running, "session_heartbeat", {"session_id": bob_session}, BOB).status_code == 200


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        (
            "optim_step",
            {"model_id": "{model}", "adam_params": {"learning_rate": "x"}},
            "adam_params.learning_rate",
        ),
        (
            "create_model",
            {
                "session_id": "{session}",
                "model_seq_id": 1,
                "base_model": BASE,
                "lora_config": {"rank": 999},
            },
            "lora_config.rank",
        ),
        (
            "create_model",
            {
                "session_id": "{session}",
                "model_seq_id": 1,
                "base_model": "other",
                "lora_config": {"rank": 4},
            },
            "base_model",
        ),
        (
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [1]}]},
                "base_model": BASE,
                "sampling_params": {"stop": [7]},
            },
            "sampling_params.stop",
        ),
        (
            "asample",
            {
                "prompt": {"chunks": [{"tokens": [1]}]},
                "base_model": BASE,
                "sampling_params": {},
                "topk_prompt_logprobs": 5,
            },
            "topk_prompt_logprobs",
        ),
        ("save_weights", {"model_id": "{model}", "path": "../escape"}, "path"),
        (
            "load_weights",
            {"session_id": "{session}", "path": "tinker://{model}/weights/a", "optimizer": True},
            "model_id",
        ),
        (
            "load_weights",
            {
                "session_id": "{session}",
                "model_seq_id": 1,
                "path": "tinker://{model}/weights/a",
                "optimizer": False,
                "weights_access_token": "other-account",
            },
            "weights_access_token",
        ),
        (
            "load_weights",
            {
                "session_id": "{session}",
                "model_seq_id": 1,
                "path": "tinker://{model}/weights/a",
                "optimizer": False,
                "base_model": "other",
            },
            "base_model",
        ),
        ("forward_backward", b"\xff\xff\xff", "body"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(
    gateway: Callable[..., Running],
    completer: FakeCompleter,
    route: str,
    body: Any,
    field: str,
) -> None:
    running = gateway()
    session, model = make_model(running)
    if isinstance(body, dict):
        body = {
            k: v.format(model=model, session=session) if isinstance(v, str) else v
            for k, v in body.items()
        }
    answer = (
        post(running, route, body, **PROTO)
        if isinstance(body, bytes)
        else post(running, route, body)
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field
    assert field.split(".")[-1] in answer.json()["detail"]


def test_pending_requests_over_the_tenants_limit_are_429(
    gateway: Callable[..., Running], completer: FakeCompleter
) -> None:
    running = gateway(max_inflight=2)
    _, model = make_model(running)
    completer.hold.add("ForwardBackward")
    first = post(running, "forward_backward", fwdbwd_body(model, 1, [1, 2]), **PROTO)
    assert first.status_code == 200
    again = post(running, "forward_backward", fwdbwd_body(model, 1, [1, 2]), **PROTO)
    assert again.json() == first.json()  # a retried submission: the same future, no new event
    assert (
        post(running, "forward_backward", fwdbwd_body(model, 2, [1, 2]), **PROTO).status_code == 200
    )
    refused = post(running, "forward_backward", fwdbwd_body(model, 3, [1, 2]), **PROTO)
    assert refused.status_code == 429 and "limit is 2" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "1"
    assert len(completer.wait_for(ForwardBackward, 2)) == 2
    completer.release()
    post(running, "retrieve_future", {"request_id": first.json()["request_id"]})
    assert (
        post(running, "forward_backward", fwdbwd_body(model, 3, [1, 2]), **PROTO).status_code == 200
    )
    too_big = post(running, "forward_backward", b"x" * 5_000_000, **PROTO)
    assert too_big.status_code == 413


def test_unload_and_session_expiry_release_models(
    gateway: Callable[..., Running], completer: FakeCompleter, streams: Streams
) -> None:
    running = gateway(session_lease_s=30)
    session, model = make_model(running)
    unload = post(running, "unload_model", {"model_id": model}).json()
    (cancel,) = completer.wait_for(DeregisterRequested)
    assert (cancel.adapter, cancel.registration_id) == (model, model)
    answer = post(running, "retrieve_future", {"request_id": unload["request_id"]}).json()
    assert answer == {"model_id": model, "type": "unload_model"}
    later = post(running, "optim_step", {"model_id": model, "adam_params": {}})
    assert later.status_code == 400 and "was unloaded" in later.json()["detail"]

    body = {
        "session_id": session,
        "model_seq_id": 1,
        "base_model": BASE,
        "lora_config": {"rank": 4},
    }
    second = post(running, "create_model", body).json()["model_id"]
    sessions = running.app.sessions
    assert sessions.sweep(now=time.time()) == []  # heard from just now
    assert sessions.sweep(now=time.time() + 31) == [session]
    assert sessions.sweep(now=time.time() + 31) == []  # once
    events = completer.wait_for(DeregisterRequested, 2)
    assert [e.adapter for e in events] == [model, second]  # the unloaded one is not repeated
    assert post(running, "session_heartbeat", {"session_id": session}).status_code == 410


def test_the_protobuf_reader_matches_the_sdks_writer() -> None:
    body = fwdbwd_body("m", 7, [3, 4, 5])
    request = read_forward_backward(body)
    assert (request.model_id, request.seq_id, request.loss_fn) == ("m", 7, "cross_entropy")
    assert request.data[0].tokens == (3, 4)


def test_a_model_from_state_answers_to_its_alias_for_its_tenant_only(
    gateway: Callable[..., Running], completer: FakeCompleter
) -> None:
    running = gateway()
    session, model = make_model(running)
    saved = post(running, "save_weights", {"model_id": model, "path": "a", "seq_id": 1}).json()
    path = post(running, "retrieve_future", {"request_id": saved["request_id"]}).json()["path"]
    body = {"session_id": session, "model_seq_id": 1, "path": path, "optimizer": True}
    created = post(running, "load_weights", body).json()
    alias, created_model = f"{session}:train:1", model_id_for("alice", session, 1)
    assert created == {"request_id": f"{created_model}.create", "model_id": alias}
    assert post(running, "load_weights", body).json() == created  # a retry: no second event
    answer = post(running, "retrieve_future", {"request_id": created["request_id"]}).json()
    assert answer == {"path": path, "model_id": alias, "type": "load_weights"}
    registers = completer.wait_for(RegisterRequested, 2)
    time.sleep(0.1)
    assert len(completer.events(RegisterRequested)) == 2
    assert registers[1].adapter == created_model

    assert post(running, "get_info", {"model_id": alias}).json()["model_id"] == alias
    for route, payload in [
        ("get_info", {"model_id": alias}),
        ("optim_step", {"model_id": alias, "seq_id": 1, "adam_params": {}}),
        ("unload_model", {"model_id": alias}),
        ("get_info", {"model_id": f"{session}:train:7"}),
    ]:
        assert post(running, route, payload, BOB).status_code == 404, route
    assert post(running, "get_info", {"model_id": f"{session}:train:7"}).status_code == 404
    unload = post(running, "unload_model", {"model_id": alias}).json()
    assert unload["model_id"] == alias
    answer = post(running, "retrieve_future", {"request_id": unload["request_id"]}).json()
    assert answer == {"model_id": alias, "type": "unload_model"}
    (cancel,) = completer.wait_for(DeregisterRequested)
    assert cancel.adapter == created_model
    later = post(running, "optim_step", {"model_id": alias, "adam_params": {}})
    assert later.status_code == 400 and alias in later.json()["detail"]
