"""The step computing on its own thread (:mod:`trainer.compute`) while the loop goes on.

A step function the test holds inside the step makes "while a step computes" a state the test
controls. What must hold: groups landing meanwhile are held at once (not after the step
returns); nothing but the compute thread touches the slots while a step is in flight (no slot
configured, reset, released, restored or copied by the loop); a settle that would end a run
waits for the landing; and an overlapped run decides exactly what an inline one does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import trainer.versions as versions
from events.codec import encode, stamp
from events.schema import Admitted, Completed, RolloutTask, StepDone, SyncRequested
from tests.trainer.test_process import Bus, group_for, spec
from tests.trainer.test_write_behind import run_in_thread, stop, wait_until
from trainer.inject import MultiLoraModel
from trainer.mixed_step import mixed_step
from trainer.process import TrainerProcess

pytestmark = [pytest.mark.bus]


class HeldStep:
    """:func:`mixed_step`, held before it starts on the mixed steps numbered in ``hold`` (from
    1) until :meth:`go`."""

    def __init__(self, hold: set[int]) -> None:
        self.hold = hold
        self.count = 0
        self.entered = threading.Semaphore(0)
        self._go = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        if self.count in self.hold:
            self.entered.release()
            assert self._go.wait(30), "the test never let the step go"
        return mixed_step(*args, **kwargs)

    def go(self) -> None:
        self._go.set()


class SlotWatch:
    """Records every call that moves or reads a slot made by a thread other than the compute
    thread while a step is in flight (each one a race with the step)."""

    def __init__(self, process: TrainerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
        self.process = process
        self.violations: list[str] = []
        for owner, names in (
            (process.model, ("configure_slot", "release_slot")),
            (process.optimizer, ("configure", "reset", "release", "update_settings")),
        ):
            for name in names:
                monkeypatch.setattr(owner, name, self._spy(name, getattr(owner, name)))
        for name in ("capture_slot", "restore_slot"):
            monkeypatch.setattr(versions, name, self._spy(name, getattr(versions, name)))

    def _spy(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            launched = self.process.launched
            mine = threading.current_thread().name.startswith("compute")
            if launched is not None and not launched.result.done() and not mine:
                self.violations.append(f"{name} on {threading.current_thread().name}")
            return call(*args, **kwargs)

        return spy


def answer(bus: Bus, task: RolloutTask) -> None:
    bus.client.xadd(bus.streams.groups, encode(stamp(group_for(task), source="test")))
    bus.answered.add(task.id)


@pytest.fixture
def make_bus(redis_url, rclient, tmp_path, tiny_model_dir) -> Callable[..., Bus]:
    from events.streams import Streams

    def make(slots: int = 2, **process: object) -> Bus:
        model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=slots, max_rank=4)
        streams = Streams(namespace=f"t{time.monotonic_ns()}")
        return Bus(redis_url, rclient, streams, tmp_path / streams.namespace, model, **process)

    return make


def test_groups_landing_while_a_step_computes_are_held_before_it_returns(make_bus) -> None:
    held = HeldStep({1})
    bus = make_bus(slots=1, step_fn=held)
    bus.producer.register("alpha", spec(steps=3))  # max_staleness 1: steps 1 and 2 issued
    thread, errors = run_in_thread(bus)
    try:
        deadline = time.monotonic() + 30
        while len(bus.tasks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        first, second = sorted(bus.tasks(), key=lambda t: t.step)
        answer(bus, first)
        assert held.entered.acquire(timeout=30), "step 1 never started"
        answer(bus, second)  # lands while step 1 computes
        run = bus.process.runs["alpha"]
        deadline = time.monotonic() + 10
        while not run.pending.get(2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert run.pending.get(2), "step 2's group was not held while step 1 computed"
        assert bus.process.steps_trained == 0
        held.go()
        wait_until("alpha completed", lambda: bool(bus.events(Completed, "alpha")), bus)
    finally:
        held.go()
        stop(bus, thread, errors)
    assert [(d.step, d.version) for d in bus.events(StepDone, "alpha")] == [(1, 1), (2, 2), (3, 3)]


def test_nothing_touches_the_slots_while_a_step_computes(make_bus, monkeypatch) -> None:
    """Step 1 trains alpha's last step and beta's first; step 2 (beta alone) is held. Meanwhile
    alpha's version becomes durable — settling it would release alpha's slot, so it waits for
    the landing — and gamma registers, which is admitted (its slot configured) only after the
    step has landed."""
    held = HeldStep({2})
    bus = make_bus(slots=3, step_fn=held, max_batch_wait_s=10.0)
    watch = SlotWatch(bus.process, monkeypatch)
    bus.producer.register("alpha", spec(steps=1))
    bus.producer.register("beta", spec(steps=3, seed=1))
    thread, errors = run_in_thread(bus)
    try:
        wait_until("step 1 trained", lambda: bus.process.steps_trained == 2, bus)
        assert held.entered.acquire(timeout=30), "step 2 never started"
        (alpha_version,) = [b for b in bus.process.behind if b.versions]
        deadline = time.monotonic() + 10
        while not alpha_version.durable() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert alpha_version.durable()
        time.sleep(0.3)  # idle hooks run beside the step
        assert not bus.events(Completed, "alpha"), "alpha's slot released while a step computed"
        bus.producer.register("gamma", spec(steps=1, seed=2))
        time.sleep(0.3)
        assert not bus.events(Admitted, "gamma"), "gamma admitted while a step computed"
        held.go()
        wait_until("all completed", bus.ended, bus)
    finally:
        held.go()
        stop(bus, thread, errors)
    assert watch.violations == []
    for name, steps in (("alpha", 1), ("beta", 3), ("gamma", 1)):
        assert [d.step for d in bus.events(StepDone, name)] == list(range(1, steps + 1))
        assert bus.events(Completed, name)[0].reason == "budget"
    kinds = [(type(e).__name__, e.adapter) for e in bus.control()]
    assert kinds.index(("StepDone", "alpha")) < kinds.index(("Completed", "alpha"))


def run_log(bus: Bus) -> list[tuple[str, int, int, str]]:
    bus.producer.register("alpha", spec(steps=3))
    bus.producer.register("beta", spec(steps=2, seed=1))
    bus.run(group_for)
    return [
        (e.adapter, e.step, e.version, e.sha256)
        for e in bus.control()
        if isinstance(e, SyncRequested)
    ]


def test_overlapped_steps_decide_what_inline_steps_decide(make_bus) -> None:
    """The same registrations and rollouts, stepped inline and overlapped: the same versions,
    bit for bit (each version's PEFT weights hash), in the same order."""
    inline = run_log(make_bus(max_batch_wait_s=10.0, overlap_steps=False))
    overlapped = run_log(make_bus(max_batch_wait_s=10.0))
    assert len(inline) == 2 + 3 + 2
    assert overlapped == inline
