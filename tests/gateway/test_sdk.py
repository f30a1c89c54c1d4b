"""The official Tinker SDK, unmodified, against the gateway on a real Redis.

A fake completer (``conftest.FakeCompleter``) stands in for the trainer and the rollout workers:
these tests are about the wire, the bus events and the futures, not numerics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
import tinker
from tinker import types

from events.futures import resolve_path
from events.schema import (
    Datum,
    DeregisterRequested,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    RegisterRequested,
    SampleTask,
    SaveWeights,
)
from events.streams import Streams
from tests.gateway.conftest import ALICE, BASE, BOB, FakeCompleter, Running

pytestmark = pytest.mark.bus


@pytest.fixture
def service(gateway: Callable[..., Running]) -> Iterator[tuple[Running, tinker.ServiceClient]]:
    running = gateway()
    client = tinker.ServiceClient(base_url=running.url, api_key=ALICE)
    yield running, client
    client.close("success").result(timeout=10)


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """A next-token datum of ``tokens`` (model input = all but the last, targets = all but the
    first)."""
    inputs = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = weights
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def test_session_start_and_a_model_that_waits_in_the_queue(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter, streams: Streams
) -> None:
    running, client = service
    completer.admit = False
    future = client.create_lora_training_client(base_model=BASE, rank=8, seed=5)
    (register,) = completer.wait_for(RegisterRequested)
    time.sleep(0.3)  # queued: the create_model future keeps answering "try again"
    answer = httpx.post(
        running.url + "/api/v1/retrieve_future",
        json={"request_id": f"{register.adapter}.create"},
        headers={"X-API-Key": ALICE},
    ).json()
    assert answer["type"] == "try_again" and answer["queue_state"] == "paused_capacity"
    assert answer["queue_state_reason"] == "queued for a trainer slot (position 0)"
    spec = register.spec
    assert (spec.driver, spec.rank, spec.alpha, spec.seed) == ("client", 8, 32.0, 5)
    assert register.registration_id == register.adapter
    assert register.adapter.startswith("alice-s")
    completer.set_status(register.adapter, "admitted")
    training = future.result(timeout=10)
    assert training.model_id == register.adapter
    info = training.get_info()
    assert (info.lora_rank, info.model_data.model_name) == (8, BASE)
    session = running.app.sessions.state("alice", client.holder.get_session_id())
    assert session == "active"


def test_forward_backward_reaches_the_bus_in_the_trainers_alignment(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    data = [datum([5, 6, 7, 8], [0.0, 1.0, 0.5]), datum([9, 10])]
    out = training.forward_backward(data, "cross_entropy").result(timeout=10)
    (event,) = completer.wait_for(ForwardBackward)
    assert event.backward and event.loss_fn == "cross_entropy"
    assert event.datums == (
        Datum(tokens=(5, 6, 7, 8), weights=(0.0, 0.0, 1.0, 0.5)),
        Datum(tokens=(9, 10), weights=(0.0, 1.0)),  # no weights given: every target counts
    )
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5] * 3, [-0.5]]
    assert [o["elementwise_loss"].tolist() for o in out.loss_fn_outputs] == [[0.5] * 3, [0.5]]
    assert out.metrics == {"loss:sum": 2.0}

    rl = [
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2]),
            loss_fn_inputs={
                "target_tokens": [2, 3],
                "logprobs": [-1.0, -2.0],
                "advantages": [0.5, -0.25],
            },
        )
    ]
    training.forward(rl, "ppo", loss_fn_config={"clip_low_threshold": 0.7}).result(timeout=10)
    forward = completer.wait_for(ForwardBackward, 2)[1]
    assert not forward.backward and forward.loss_fn == "ppo"
    assert forward.loss_config == {"clip_low_threshold": 0.7}
    assert forward.datums == (
        Datum(
            tokens=(1, 2, 3), weights=(), logprobs=(0.0, -1.0, -2.0), advantages=(0.0, 0.5, -0.25)
        ),
    )


def test_optim_step_carries_the_adam_params(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    adam = types.AdamParams(
        learning_rate=3e-4, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.5
    )
    response = training.optim_step(adam).result(timeout=10)
    (event,) = completer.wait_for(OptimStep)
    assert (event.learning_rate, event.beta1, event.beta2, event.eps) == (3e-4, 0.8, 0.99, 1e-8)
    assert (event.weight_decay, event.grad_clip_norm) == (0.01, 1.5)
    assert event.request_id.startswith(training.model_id + ".")
    assert response.metrics == {"grad_norm": 1.0, "learning_rate": 3e-4}


def test_save_for_sampler_then_sample_from_the_path(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    training.optim_step(types.AdamParams()).result(timeout=10)
    saved = training.save_weights_for_sampler("first").result(timeout=10)
    assert saved.path == f"tinker://{training.model_id}/sampler_weights/first"

    sampler = client.create_sampling_client(model_path=saved.path).result(timeout=10)
    assert sampler.get_base_model() == BASE
    params = types.SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=20, seed=3, stop=["\n\n"]
    )
    prompt = types.ModelInput.from_ints([11, 12, 13])
    result = sampler.sample(prompt, num_samples=2, sampling_params=params).result(timeout=10)
    assert [s.tokens for s in result.sequences] == [[13, 14], [14, 15]]
    assert result.sequences[0].logprobs == [-0.25, -0.75]
    assert result.sequences[0].stop_reason == "length"
    (task,) = completer.wait_for(SampleTask)
    assert (task.adapter, task.version, task.weights_uri) == (
        training.model_id,
        1,
        f"/artifacts/{training.model_id}/v1",
    )
    assert task.prompt_ids == (11, 12, 13) and task.num_samples == 2 and task.seed == 3
    s = task.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.stop) == (
        7,
        0.5,
        0.9,
        20,
        ("\n\n",),
    )
    logprobs = sampler.compute_logprobs(prompt).result(timeout=10)
    assert logprobs == [None, -1.0, -1.0]
    assert completer.wait_for(SampleTask, 2)[1].prompt_logprobs

    quick = training.save_weights_and_get_sampling_client().result(timeout=10)
    again = quick.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result(timeout=10)
    assert len(again.sequences) == 1
    task = completer.wait_for(SampleTask, 3)[2]
    assert task.adapter == training.model_id


def test_a_failed_request_raises_in_the_client(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    completer.fail_next["ForwardBackward"] = "datum 0: token id 99999 is outside the vocabulary"
    with pytest.raises(tinker.RequestFailedError, match="outside the vocabulary") as err:
        training.forward_backward([datum([1, 2, 3])], "cross_entropy").result(timeout=10)
    assert err.value.category == types.RequestErrorCategory.User


def test_a_misaligned_datum_is_refused_naming_it(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 9, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.BadRequestError, match=r"data\[1\]: target_tokens"):
        training.forward_backward([datum([1, 2]), bad], "cross_entropy").result(timeout=10)
    assert completer.events(ForwardBackward) == []


def test_an_unknown_api_key_is_refused(gateway: Callable[..., Running]) -> None:
    running = gateway()
    client = tinker.ServiceClient(base_url=running.url, api_key="tml-not-a-key")
    with pytest.raises(tinker.AuthenticationError, match="unknown API key"):
        client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    answer = httpx.post(running.url + "/api/v1/create_session", json={})
    assert answer.status_code == 401 and "X-API-Key" in answer.json()["detail"]


def test_a_future_survives_a_gateway_restart(
    gateway: Callable[..., Running], completer: FakeCompleter
) -> None:
    first = gateway()
    client = tinker.ServiceClient(base_url=first.url, api_key=ALICE)
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    completer.hold.add("ForwardBackward")
    future = training.forward_backward([datum([1, 2, 3])], "cross_entropy")
    completer.wait_for(ForwardBackward)
    first.server.stop()
    port = int(first.url.rsplit(":", 1)[1])
    gateway(port=port)  # a new process on the same Redis, the same address
    completer.release()
    out = future.result(timeout=20)
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5, -0.5]]
    client.close("success").result(timeout=10)


def test_two_replicas_answer_each_others_futures(
    gateway: Callable[..., Running], completer: FakeCompleter
) -> None:
    """Stateless replicas behind one address: a future created through one is answered by the
    other (for its tenant only)."""
    import httpx

    one, two = gateway(), gateway()
    client = tinker.ServiceClient(base_url=one.url, api_key=ALICE)
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    completer.hold.add("ForwardBackward")
    future = training.forward_backward([datum([1, 2, 3])], "cross_entropy")
    (event,) = completer.wait_for(ForwardBackward)
    completer.release()
    future.result(timeout=20)
    body = {"request_id": event.request_id}
    headers = {"X-API-Key": ALICE}
    answer = httpx.post(two.url + "/api/v1/retrieve_future", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    other = httpx.post(two.url + "/api/v1/retrieve_future", json=body, headers={"X-API-Key": BOB})
    assert other.status_code == 404  # another tenant, whichever replica it asks
    client.close("success").result(timeout=10)


def test_save_state_then_load_it_with_the_optimizer(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    saved = training.save_state("ckpt-1").result(timeout=10)
    assert saved.path == f"tinker://{training.model_id}/weights/ckpt-1"
    (save,) = completer.wait_for(SaveWeights)
    assert (save.kind, save.name) == ("state", "ckpt-1")
    with pytest.warns(FutureWarning):  # deprecated in 0.38.0, still the SDK's in-place load
        loaded = training.load_state_with_optimizer(saved.path).result(timeout=10)
    (load,) = completer.wait_for(LoadWeights)
    assert (load.uri, load.with_optimizer) == (f"/artifacts/{training.model_id}/v0", True)
    assert loaded.model_id == training.model_id
    with pytest.raises(tinker.BadRequestError, match="training checkpoint"):
        client.create_sampling_client(model_path=saved.path).result(timeout=10)


def test_a_training_client_from_state_with_optimizer_starts_from_the_checkpoint(
    service: tuple[Running, tinker.ServiceClient],
    completer: FakeCompleter,
    rclient: redis.Redis,
    streams: Streams,
) -> None:
    running, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=8).result(timeout=10)
    training.optim_step(types.AdamParams()).result(timeout=10)
    saved = training.save_state("a").result(timeout=10)
    state = resolve_path(rclient, streams, saved.path)
    assert state is not None and state.uri == f"/artifacts/{training.model_id}/v1"

    other = tinker.ServiceClient(base_url=running.url, api_key=ALICE)
    try:
        resumed = other.create_training_client_from_state_with_optimizer(saved.path).result(
            timeout=10
        )
        register = completer.wait_for(RegisterRequested, 2)[1]
        spec = register.spec
        assert (spec.driver, spec.rank, spec.alpha) == ("client", 8, 32.0)
        assert (spec.init_from, spec.init_optimizer) == (state.uri, True)
        session = other.holder.get_session_id()
        assert resumed.model_id == f"{session}:train:0"  # the SDK's own id: an alias
        assert register.adapter == register.registration_id == f"alice-{session}-0"
        info = resumed.get_info()
        assert (info.model_id, info.lora_rank) == (resumed.model_id, 8)

        resumed.forward_backward([datum([1, 2, 3])], "cross_entropy").result(timeout=10)
        (event,) = completer.wait_for(ForwardBackward)
        assert (event.adapter, event.registration_id) == (register.adapter, register.adapter)
        assert event.request_id.startswith(register.adapter + ".")
        resumed.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=10)
        assert completer.wait_for(OptimStep, 2)[1].adapter == register.adapter
        again = resumed.save_state("b").result(timeout=10)
        assert again.path == f"tinker://{register.adapter}/weights/b"
        sampler = resumed.save_weights_and_get_sampling_client().result(timeout=10)
        sampler.sample(types.ModelInput.from_ints([4]), 1, types.SamplingParams()).result(
            timeout=10
        )
        assert completer.wait_for(SampleTask)[0].adapter == register.adapter
    finally:
        other.close("success").result(timeout=10)
    released = completer.wait_for(DeregisterRequested)
    assert [e.adapter for e in released] == [register.adapter]  # with its session

    weights_only = client.create_training_client_from_state(saved.path).result(timeout=10)
    register = completer.wait_for(RegisterRequested, 3)[2]
    assert (register.spec.init_from, register.spec.init_optimizer) == (state.uri, False)
    assert weights_only.model_id == f"{client.holder.get_session_id()}:train:1"


def test_a_training_client_from_state_needs_the_tenants_own_saved_state(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    running, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    saved = training.save_state("mine").result(timeout=10)
    for_sampler = training.save_weights_for_sampler("s").result(timeout=10)
    with pytest.raises(tinker.BadRequestError, match="holds sampler weights"):
        client.create_training_client_from_state(for_sampler.path).result(timeout=10)
    with pytest.raises(tinker.NotFoundError, match="not found for this API key"):
        client.create_training_client_from_state(f"{saved.path}-nothing").result(timeout=10)
    bob = tinker.ServiceClient(base_url=running.url, api_key=BOB)
    try:
        with pytest.raises(tinker.NotFoundError, match="not found for this API key"):
            bob.create_training_client_from_state_with_optimizer(saved.path).result(timeout=10)
    finally:
        bob.close("success").result(timeout=10)
    assert len(completer.events(RegisterRequested)) == 1


def test_a_rejected_model_from_state_fails_with_the_reason(
    service: tuple[Running, tinker.ServiceClient], completer: FakeCompleter
) -> None:
    _, client = service
    training = client.create_lora_training_client(base_model=BASE, rank=4).result(timeout=10)
    saved = training.save_state("c").result(timeout=10)
    completer.admit = False
    future = client.create_training_client_from_state(saved.path)
    register = completer.wait_for(RegisterRequested, 2)[1]
    time.sleep(0.3)  # queued: the future keeps answering "try again"
    reason = "init_from '/artifacts/x' holds no readable training state"
    completer.set_status(register.adapter, "rejected", reason=reason)
    with pytest.raises(tinker.RequestFailedError, match="holds no readable training state"):
        future.result(timeout=10)
