"""Client-driven adapters in the trainer process: requests on ``train.requests``, futures back.

A real Redis and a tiny model; the test plays the gateway (it XADDs the requests a gateway
would) and the rollout workers (it answers the dataset-driven adapter's tasks). What it checks:
a client's forward/backward joins the same mixed step as a dataset-driven adapter; its
``optim_step`` applies exactly what a solo computation on the same datums applies (fp32, 1e-5);
bad requests fail their future and nothing else; a crash between ``forward_backward`` and
``optim_step`` redoes the forward/backward and applies its gradient once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import pytest
import torch

from events.codec import encode, new_id, stamp
from events.futures import ForwardBackwardResult, OptimStepResult, SaveWeightsResult, read
from events.schema import (
    Admitted,
    Datum,
    DeregisterRequested,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    RegisterRequested,
    Rejected,
    SaveWeights,
    StepDone,
    SyncRequested,
)
from events.specs import AdapterSpec
from tests.trainer.test_process import Bus, group_for, spec
from trainer.client_step import (
    ClientRows,
    adam_spec,
    client_batch,
    client_optim_step,
    new_accumulator,
)
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.rl_loss import PPOClipLoss
from trainer.step import HeldSlots, train_step

pytestmark = [pytest.mark.bus]

CLIENT = AdapterSpec(driver="client", rank=2, alpha=4.0, steps=50, seed=3)
DATUMS = (
    Datum(tokens=(5, 6, 7, 8, 9), weights=(0.0, 0.0, 1.0, 1.0, 1.0)),
    Datum(tokens=(11, 12, 13), weights=(0.0, 1.0, 0.5)),
)
ADAM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


@pytest.fixture
def bus1(redis_url, rclient, streams, tmp_path, tiny_model_dir) -> Bus:
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=1, max_rank=4)
    return Bus(redis_url, rclient, streams, tmp_path, model)


@pytest.fixture
def bus2(redis_url, rclient, streams, tmp_path, tiny_model_dir) -> Bus:
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=2, max_rank=4)
    return Bus(redis_url, rclient, streams, tmp_path, model)


def request(bus: Bus, event: msgspec.Struct) -> str:
    bus.client.xadd(bus.streams.requests, encode(stamp(event, source="gateway")))
    return event.request_id  # type: ignore[attr-defined]


def register_client(bus: Bus, name: str = "tc") -> None:
    event = RegisterRequested(adapter=name, registration_id=name, spec=CLIENT)
    bus.client.xadd(bus.streams.ingress, encode(stamp(event, source="gateway")))


def wait_future(bus: Bus, request_id: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = read(bus.client, bus.streams, request_id)
        if record is not None and record.state != "pending":
            return record
        bus.answer(group_for)
        time.sleep(0.02)
    raise AssertionError(f"future {request_id} not answered in {timeout_s} s")


def wait_for(bus: Bus, kind: type, adapter: str, count: int = 1, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = bus.events(kind, adapter)
        if len(found) >= count:
            return found
        bus.answer(group_for)
        time.sleep(0.02)
    raise AssertionError(f"no {kind.__name__} of {adapter} in {timeout_s} s")


@contextmanager
def running(bus: Bus) -> Iterator[None]:
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            bus.consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        yield
    finally:
        bus.consumer.request_stop()
        thread.join(timeout=10)
    if errors:
        raise errors[0]


def fb(name: str = "tc", datums=DATUMS, **kw) -> ForwardBackward:
    return ForwardBackward(adapter=name, request_id=new_id(), datums=datums, **kw)


def solo_update(tiny_model_dir, datums) -> tuple[torch.Tensor, float]:
    """The client's slot after one forward/backward + optim_step alone (slot 0 of a fresh
    model, same rank, alpha and seed), and a check of its gradient against plain autograd."""
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=1, max_rank=4)
    optimizer = SlotAdamW(model.store, model.table)
    model.configure_slot(0, CLIENT.rank, CLIENT.alpha, seed=CLIENT.seed)  # as admission does
    optimizer.configure(0, CLIENT.optim, CLIENT.steps)
    optimizer.reset(0)
    rows = ClientRows(slot=0, datums=datums, loss_fn="cross_entropy", loss_config={})
    acc = new_accumulator(optimizer)
    from trainer.client_step import RoutedLoss

    loss = RoutedLoss.build(PPOClipLoss.from_specs({}, 1), [rows], 1)
    train_step(model, optimizer, client_batch([rows], 0), loss, held=HeldSlots(accumulate={0: acc}))
    # independent: -Σ w·log p by autograd on the same model
    optimizer.zero_grad()
    total = torch.zeros(())
    for d in datums:
        tokens = torch.tensor([d.tokens])
        lp = model.logprobs(tokens, torch.ones_like(tokens), torch.tensor([0]))[0]
        total = total - (torch.tensor(d.weights[1:]) * lp).sum()
    total.backward()
    r = CLIENT.rank
    torch.testing.assert_close(acc[:r], optimizer.store.grad_S_R_Q[0, :r], rtol=1e-5, atol=1e-6)
    adam = adam_spec(**ADAM, weight_decay=0.0, grad_clip_norm=0.0)
    result = client_optim_step(optimizer, 0, acc, r, adam, CLIENT.steps)
    return model.store.weight_S_R_Q[0, :r].clone(), result.grad_norm


def test_client_request_joins_the_mixed_step_and_matches_a_solo_update(
    bus2: Bus, tiny_model_dir, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    bus = bus2
    register_client(bus)
    bus.producer.register("alpha", spec(steps=3))
    bus.process.max_batch_wait_s = 30.0  # a ready request waits for alpha's groups
    with running(bus):
        deadline = time.monotonic() + 20
        while not bus.tasks() and time.monotonic() < deadline:
            time.sleep(0.02)  # alpha's first tasks are out, not answered yet
        fb_id = request(bus, fb())
        time.sleep(0.3)
        opt_id = request(bus, OptimStep(adapter="tc", request_id=new_id(), **ADAM))
        save_id = request(bus, SaveWeights(adapter="tc", request_id=new_id(), name="s1"))
        done = wait_future(bus, fb_id)
        assert done.state == "done", done.error
        result = msgspec.json.decode(done.result, type=ForwardBackwardResult)
        assert [len(x) for x in result.logprobs] == [4, 2]
        assert result.elementwise_loss[0][0] == 0.0  # weight 0: no loss
        assert result.metrics["loss:sum"] == pytest.approx(
            -sum(
                w * lp
                for d, lps in zip(DATUMS, result.logprobs, strict=True)
                for w, lp in zip(d.weights[1:], lps, strict=True)
            )
        )
        opt = wait_future(bus, opt_id)
        assert opt.state == "done", opt.error
        assert msgspec.json.decode(opt.result, type=OptimStepResult).step == 1
        saved = msgspec.json.decode(wait_future(bus, save_id).result, type=SaveWeightsResult)
        assert saved.path == "tinker://tc/sampler_weights/s1" and saved.version == 1
        wait_for(bus, StepDone, "alpha", count=3)
    (step,) = bus.events(StepDone, "tc")
    assert (step.step, step.version) == (1, 1)
    assert [s.version for s in bus.events(SyncRequested, "tc")] == [1]  # only saved weights
    # the same mixed step trained alpha and computed the client's forward/backward
    first_alpha = bus.events(StepDone, "alpha")[0].metrics
    assert result.metrics["mixed_step"] == first_alpha["mixed_step"]
    assert result.metrics["mixed_adapters"] == first_alpha["mixed_adapters"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.process"]
    assert any("alpha 1/3" in line and "1 client request(s)" in line for line in lines), lines
    slot = bus.process.runs["tc"].slot
    mixed = bus.process.model.store.weight_S_R_Q[slot, : CLIENT.rank]
    solo, _ = solo_update(tiny_model_dir, DATUMS)
    torch.testing.assert_close(mixed, solo, rtol=1e-5, atol=1e-6)
    assert not bus.client.xpending(bus.streams.requests, "trainer")["pending"]


def test_bad_requests_fail_their_future_and_nothing_else(bus1: Bus) -> None:
    bus = bus1
    seen: list[tuple[str, str]] = []
    bus.process.clients.observe = lambda kind, outcome: seen.append((kind, outcome))
    register_client(bus)
    with running(bus):
        wait_for(bus, Admitted, "tc")
        unknown = request(bus, fb(name="nobody"))
        too_big = request(bus, fb(datums=(Datum(tokens=(5, 10**6)),)))
        bad_adam = request(bus, OptimStep(adapter="tc", request_id=new_id(), learning_rate=-1.0))
        good = request(bus, fb())
        assert "not training here" in wait_future(bus, unknown).error
        assert "outside the vocabulary" in wait_future(bus, too_big).error
        assert "learning_rate = -1.0 is invalid" in wait_future(bus, bad_adam).error
        assert wait_future(bus, good).state == "done"
        assert wait_future(bus, unknown).category == "user"
    assert bus.events(StepDone, "tc") == []
    assert sorted(seen) == [
        ("forward_backward", "done"),
        ("forward_backward", "refused"),
        ("forward_backward", "refused"),
        ("optim_step", "refused"),
    ]


def test_a_crash_before_optim_step_applies_the_gradient_once(
    bus1: Bus, redis_url, rclient, streams, tmp_path, tiny_model_dir
) -> None:
    bus = bus1
    register_client(bus)
    with running(bus):
        wait_for(bus, Admitted, "tc")
        first = request(bus, fb())
        answer = wait_future(bus, first)
    assert rclient.xpending(streams.requests, "trainer")["pending"] == 1  # folded, not acked
    # a new trainer process (the old one "crashed"): it recovers and gets the entry again
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=1, max_rank=4)
    again = Bus(redis_url, rclient, streams, tmp_path, model)
    with running(again):
        opt = request(again, OptimStep(adapter="tc", request_id=new_id(), **ADAM))
        applied = wait_future(again, opt)
        assert applied.state == "done"
    assert read(rclient, streams, first).result == answer.result  # the first answer stands
    slot = again.process.runs["tc"].slot
    got = again.process.model.store.weight_S_R_Q[slot, : CLIENT.rank]
    solo, grad_norm = solo_update(tiny_model_dir, DATUMS)
    torch.testing.assert_close(got, solo, rtol=1e-5, atol=1e-6)
    # the gradient went in once (twice would double its norm; Adam's first step hides scale)
    metrics = msgspec.json.decode(applied.result, type=OptimStepResult).metrics
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert not rclient.xpending(streams.requests, "trainer")["pending"]


def test_unload_fails_queued_requests_and_frees_the_slot(bus1: Bus) -> None:
    bus = bus1
    register_client(bus)
    with running(bus):
        wait_for(bus, Admitted, "tc")
        done = request(bus, fb())
        assert wait_future(bus, done).state == "done"
        bye = DeregisterRequested(adapter="tc", reason="unload_model")
        bus.client.xadd(bus.streams.ingress, encode(stamp(bye, source="gateway")))
        deadline = time.monotonic() + 20
        while "tc" in bus.process.runs and time.monotonic() < deadline:
            time.sleep(0.05)
        late = request(bus, fb())
        assert "not training here" in wait_future(bus, late).error
    assert not bus.client.xpending(bus.streams.requests, "trainer")["pending"]


def test_save_state_then_load_state_continues_exactly(
    bus2: Bus, redis_url, streams, tmp_path
) -> None:
    """save_state → the checkpoint process keeps it under the client's path; two more updates;
    load_state(with optimizer) → the same update applied again gives the same weights. A new
    registration ``init_from`` that state starts from it (create_training_client_from_state);
    one whose init_from leaves the checkpoint root is rejected."""
    from events.connection import connect
    from events.consumer import Consumer
    from events.futures import resolve_path
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.checkpoint import CheckpointProcess
    from orchestrator.checkpoint_store import CheckpointStore

    bus = bus2
    checkpointer = CheckpointProcess(
        connect(redis_url),
        streams,
        ArtifactStore(str(tmp_path / "artifacts")),
        CheckpointStore(str(tmp_path / "checkpoints")),
    )
    ckpt = Consumer(
        lambda: connect(redis_url),
        streams,
        "checkpoint",
        [checkpointer.subscription()],
        checkpointer.handle,
        block_ms=50,
    )
    thread = threading.Thread(target=ckpt.run, daemon=True)
    thread.start()
    register_client(bus)
    slot_weights = lambda: bus.process.model.store.weight_S_R_Q[0, : CLIENT.rank].clone()  # noqa: E731

    def update() -> None:
        assert wait_future(bus, request(bus, fb())).state == "done"
        step = wait_future(bus, request(bus, OptimStep(adapter="tc", request_id=new_id(), **ADAM)))
        assert step.state == "done", step.error

    try:
        with running(bus):
            wait_for(bus, Admitted, "tc")
            update()
            save = request(
                bus, SaveWeights(adapter="tc", request_id=new_id(), name="a", kind="state")
            )
            saved = wait_future(bus, save)
            assert saved.state == "done", saved.error
            path = msgspec.json.decode(saved.result, type=SaveWeightsResult).path
            assert path == "tinker://tc/weights/a"
            update()
            expected = slot_weights()
            record = resolve_path(bus.client, streams, path)
            assert record is not None and record.kind == "state" and record.step == 1
            load = LoadWeights(
                adapter="tc", request_id=new_id(), uri=record.uri, with_optimizer=True
            )
            assert wait_future(bus, request(bus, load)).state == "done"
            assert not torch.equal(slot_weights(), expected)  # back at the saved weights
            update()
            torch.testing.assert_close(slot_weights(), expected, rtol=1e-6, atol=1e-7)
            bus.process.versions.restore("probe", "probe", 1, record.uri)  # the saved weights
            at_save = bus.process.model.store.weight_S_R_Q[1, : CLIENT.rank].clone()
            bus.process.model.release_slot(1)
            bus.process.optimizer.release(1)
            from_state = msgspec.structs.replace(CLIENT, init_from=record.uri, init_optimizer=True)
            event = RegisterRequested(adapter="tc2", registration_id="tc2", spec=from_state)
            bus.client.xadd(bus.streams.ingress, encode(stamp(event, source="gateway")))
            escape = msgspec.structs.replace(from_state, init_from=str(tmp_path / "artifacts"))
            event = RegisterRequested(adapter="tc3", registration_id="tc3", spec=escape)
            bus.client.xadd(bus.streams.ingress, encode(stamp(event, source="gateway")))
            (admitted,) = wait_for(bus, Admitted, "tc2")
            got = bus.process.model.store.weight_S_R_Q[admitted.slot, : CLIENT.rank]
            torch.testing.assert_close(got, at_save, rtol=0, atol=0)
            step_count = bus.process.optimizer.step_count(admitted.slot)
            assert step_count == 1  # the saved state's Adam update count came along
            (rejected,) = wait_for(bus, Rejected, "tc3")
            assert rejected.field == "spec.init_from" and "not under" in rejected.reason
    finally:
        ckpt.request_stop()
        thread.join(timeout=10)
    steps = [e.step for e in bus.events(StepDone, "tc")]
    assert steps == [1, 2, 3, 4]  # the load counts as a step: the log only moves forward


def test_a_data_parallel_trainer_rejects_client_adapters(bus1: Bus) -> None:
    bus = bus1
    bus.process.client_adapters = False  # what trainer.main.build sets for --ranks > 1
    register_client(bus)
    with running(bus):
        (rejected,) = wait_for(bus, Rejected, "tc")
    assert rejected.field == "spec.driver" and "--ranks 1" in rejected.reason


def test_a_client_adapter_with_resume_and_no_checkpoint_starts_fresh(bus1: Bus) -> None:
    bus = bus1
    spec = msgspec.structs.replace(CLIENT, resume=True)
    event = RegisterRequested(adapter="tc", registration_id="tc", spec=spec)
    bus.client.xadd(bus.streams.ingress, encode(stamp(event, source="gateway")))
    with running(bus):
        (admitted,) = wait_for(bus, Admitted, "tc")
        assert wait_future(bus, request(bus, fb())).state == "done"
    assert admitted.resumed_from == "" and admitted.start_step == 0


def test_forward_backwards_held_past_the_cap_are_refused_until_optim_step(
    bus1: Bus, monkeypatch
) -> None:
    import trainer.clients

    monkeypatch.setattr(trainer.clients, "MAX_FOLDED", 2)
    bus = bus1
    register_client(bus)
    with running(bus):
        wait_for(bus, Admitted, "tc")
        held = [request(bus, fb()) for _ in range(2)]
        assert all(wait_future(bus, r).state == "done" for r in held)
        third = wait_future(bus, request(bus, fb()))
        assert third.state == "failed" and "call optim_step" in third.error
        forward = wait_future(bus, request(bus, fb(backward=False)))  # a forward holds nothing
        assert forward.state == "done"
        step = wait_future(bus, request(bus, OptimStep(adapter="tc", request_id=new_id(), **ADAM)))
        assert step.state == "done"
        assert wait_future(bus, request(bus, fb())).state == "done"  # room again
