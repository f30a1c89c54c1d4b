"""Versions written behind the step: the next step trains while a version is written, and the
control log still reads as if each version had been written before the next step started.

The artifact store's writes are held at a gate the test opens, so "while the version is being
written" is a state the test controls rather than a race it hopes for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from events.schema import Completed, DeregisterRequested, StepDone, SyncRequested
from orchestrator.artifacts import ArtifactStore, PublishedVersion
from tests.trainer.test_process import Bus, group_for, spec
from trainer.inject import MultiLoraModel

pytestmark = [pytest.mark.bus]


@pytest.fixture
def bus(redis_url, rclient, streams, tmp_path, tiny_model_dir) -> Bus:
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=1, max_rank=4)
    return Bus(redis_url, rclient, streams, tmp_path, model)


class Gate:
    """Holds every ``write_version`` of a version >= ``from_version`` until :meth:`open`."""

    def __init__(self, store: ArtifactStore, from_version: int) -> None:
        self.opened = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.from_version = from_version
        write = store.write_version

        def gated(adapter: str, registration_id: str, version: int, files: Any) -> PublishedVersion:
            if version >= self.from_version:
                self.waiting.release()
                self.opened.wait(timeout=60)
            return write(adapter, registration_id, version, files)

        store.write_version = gated  # type: ignore[method-assign]

    def open(self) -> None:
        self.opened.set()


def run_in_thread(bus: Bus) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            bus.consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread, errors


def wait_until(what: str, check: Callable[[], bool], bus: Bus, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        bus.answer(group_for)
        time.sleep(0.01)


def stop(bus: Bus, thread: threading.Thread, errors: list[BaseException]) -> None:
    bus.consumer.request_stop()
    thread.join(timeout=20)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def test_the_next_step_trains_while_the_version_is_written(bus: Bus) -> None:
    gate = Gate(bus.process.artifacts, from_version=1)
    bus.producer.register("alpha", spec(steps=3))  # max_staleness 1: steps 1 and 2 issued at once
    thread, errors = run_in_thread(bus)
    try:
        # step 1 trained and its version held at the gate; step 2 trains anyway
        wait_until("step 2 trained", lambda: bus.process.steps_trained == 2, bus)
        assert bus.events(StepDone, "alpha") == [], "step_done published before its version"
        assert [s.version for s in bus.events(SyncRequested, "alpha")] == [0]
        assert all(t.version == 0 for t in bus.tasks()), "a task was sent to unwritten weights"
        gate.open()
        wait_until("alpha completed", lambda: bool(bus.events(Completed, "alpha")), bus)
    finally:
        gate.open()
        stop(bus, thread, errors)
    done = bus.events(StepDone, "alpha")
    assert [(d.step, d.version) for d in done] == [(1, 1), (2, 2), (3, 3)]
    assert [s.version for s in bus.events(SyncRequested, "alpha")] == [0, 1, 2, 3]
    store = bus.process.artifacts
    for d in done:  # each announced version is on the store, and it is the step's
        assert d.state_uri == store.version_dir("alpha", d.registration_id, d.version)
        assert store.describe(d.state_uri).version == d.version
    tasks = bus.tasks()  # tasks of step k were issued at a version that was already announced
    assert max(t.version for t in tasks if t.step == 3) <= 2
    for d in done:  # each step names the tasks whose groups it trained on: its own
        own = {
            t.id
            for t in tasks
            if (t.registration_id, t.epoch, t.step) == (d.registration_id, d.epoch, d.step)
        }
        assert d.tasks and set(d.tasks) <= own


def test_a_cancel_commits_after_the_step_being_written(bus: Bus) -> None:
    gate = Gate(bus.process.artifacts, from_version=1)
    bus.producer.register("alpha", spec(steps=5))
    thread, errors = run_in_thread(bus)
    try:
        wait_until("a version at the gate", lambda: gate.waiting.acquire(timeout=0.01), bus)
        opener = threading.Timer(0.5, gate.open)
        opener.start()
        bus.producer.deregister("alpha")  # handled while the write is held: it waits for it
        wait_until("alpha cancelled", lambda: bool(bus.events(Completed, "alpha")), bus)
    finally:
        gate.open()
        stop(bus, thread, errors)
    log = [e for e in bus.control() if e.adapter == "alpha"]
    kinds = [type(e).__name__ for e in log]
    first_done = kinds.index("StepDone")
    assert first_done < kinds.index("DeregisterRequested") < kinds.index("Completed"), kinds
    (completed,) = bus.events(Completed, "alpha")
    last = bus.events(StepDone, "alpha")[-1]
    assert completed.reason == "cancelled"
    assert (completed.step, completed.version) == (last.step, last.version)
    assert bus.events(DeregisterRequested, "alpha")


def test_a_warm_stop_commits_the_step_being_written(bus: Bus) -> None:
    gate = Gate(bus.process.artifacts, from_version=1)
    bus.producer.register("alpha", spec(steps=5))
    thread, errors = run_in_thread(bus)
    try:
        wait_until("a version at the gate", lambda: gate.waiting.acquire(timeout=0.01), bus)
        threading.Timer(0.3, gate.open).start()
    finally:
        stop(bus, thread, errors)  # returns only after the held step committed
    assert [d.step for d in bus.events(StepDone, "alpha")] == list(
        range(1, bus.process.steps_trained + 1)
    )
    assert bus.process.behind == []


def test_a_captured_version_is_encoded_once_released(bus: Bus, monkeypatch) -> None:
    """A version's encoding (interpreter work) waits at its gate until the trainer releases it
    (the next step's device work runs, or the loop goes idle), and at most GATE_MAX_S."""
    import trainer.versions as versions

    bus.producer.register("alpha", spec(steps=3))
    thread, errors = run_in_thread(bus)
    try:
        wait_until("step 1 trained", lambda: bus.process.steps_trained >= 1, bus)
    finally:
        stop(bus, thread, errors)
    run = bus.process.runs["alpha"]
    started = threading.Event()
    encode = versions.encode_version

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.set()
        return encode(*args, **kwargs)

    monkeypatch.setattr(versions, "encode_version", spy)
    publisher = bus.process.versions
    (held,) = publisher.write_behind([run])
    assert not started.wait(0.1), "encoded before it was released"
    publisher.release()
    assert started.wait(5), "not encoded after release()"
    held.write.exception(timeout=30)
    started.clear()
    t0 = time.monotonic()
    (unreleased,) = publisher.write_behind([run])
    assert started.wait(5)
    assert time.monotonic() - t0 >= 0.9 * versions.GATE_MAX_S  # the safety net, not sooner
    unreleased.write.exception(timeout=30)
