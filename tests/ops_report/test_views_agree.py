"""Every reader's view of the control log agrees with the trainer's (:meth:`Fleet.replay`).

A scripted trainer (two slots) registers, queues, admits, steps, restarts, cancels, fails,
completes and retires adapters, with redelivered and late events in between; after every event of
the recorded log, ``multilora status``'s rows, the per-adapter metrics and the checkpoint
process's registrations are compared with the fleet replayed from the same prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from events.codec import stamp
from events.consumer import Delivery, Subscription
from events.effects import Effects
from events.metrics import metrics_registry
from events.schema import Completed
from events.streams import Streams
from ops.report import fold_control
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint import CheckpointProcess
from orchestrator.checkpoint_store import CheckpointStore
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import AdapterState, Phase, is_live, transition
from orchestrator.metrics import PHASES, AdapterMetrics
from orchestrator.registrations import adopt, fold
from orchestrator.status import fleet_status_effects, read_status, state_status
from tests.checkpoint.conftest import write_fake_version
from tests.orchestrator import builders as b

SLOTS = 2


class ScriptedTrainer:
    """Publishes what the trainer would, applying each event to its fleet; keeps the log."""

    def __init__(self) -> None:
        self.fleet = Fleet(SLOTS)
        self.log: list[Any] = []
        self.clock = 0.0
        self.positions: dict[str, int] = {}

    def t(self) -> float:
        self.clock += 1.0
        return self.clock

    def publish(self, event: Any) -> None:
        event = stamp(event, source="trainer")
        self.log.append(event)
        self.fleet = self.fleet.apply(event)

    def state(self, registration_id: str) -> AdapterState:
        state = self.fleet.get(registration_id)
        assert state is not None
        return state

    def admit(self) -> None:
        for state, slot in self.fleet.next_admissions():
            self.publish(b.admitted(state, slot, t=self.t()))
            self.publish(b.sync(self.state(state.registration_id), t=self.t()))
        for position, state in enumerate(self.fleet.waiting()):
            if self.positions.get(state.registration_id) != position:
                self.positions[state.registration_id] = position
                self.publish(b.queued(state, position, t=self.t()))

    def register(self, name: str, reg: str, **spec: object) -> None:
        if self.fleet.is_active_name(name):  # admission refuses it before the log
            self.publish(b.rejected(name, reg, "name taken", t=self.t()))
        else:
            self.publish(b.register(name, reg, t=self.t(), **spec))
        self.admit()

    def step(self, reg: str) -> None:
        self.publish(b.step_done(self.state(reg), reward=0.1 * self.clock, t=self.t()))
        state = self.state(reg)
        if state.phase is Phase.COMPLETING:
            self.publish(b.completed(state, t=self.t()))
            self.publish(b.retired(self.state(reg), t=self.t()))
            self.admit()

    def cancel(self, reg: str) -> None:
        held = self.state(reg).slot is not None
        self.publish(b.deregister(self.state(reg), t=self.t()))
        self.publish(b.completed(self.state(reg), cancelled=True, t=self.t()))
        if held:
            self.publish(b.retired(self.state(reg), t=self.t()))
        self.admit()

    def fail(self, reg: str) -> None:
        self.publish(b.failed(self.state(reg), t=self.t()))
        self.publish(b.retired(self.state(reg), t=self.t()))
        self.admit()

    def restart(self) -> None:
        """Replay the log, then re-admit every running registration under a new epoch."""
        self.fleet = Fleet.replay(SLOTS, self.log)
        for state in self.fleet.running():
            assert state.slot is not None
            self.publish(b.admitted(state, state.slot, start_step=state.step, t=self.t()))

    def again(self, index: int) -> None:
        """An earlier event of the log delivered again (a duplicate or a late arrival)."""
        self.log.append(self.log[index])
        self.fleet = self.fleet.apply(self.log[index])


def recorded_log() -> list[Any]:
    t = ScriptedTrainer()
    t.register("a", "ra1")
    t.register("b", "rb1", steps=5)
    t.register("c", "rc1", priority=1)
    t.register("d", "rd1")
    t.step("ra1")
    t.step("rb1")
    t.register("a", "ra2")  # the name is taken: rejected
    t.publish(b.rejected("e", "re1", "rank 99 exceeds max_rank 8", t=t.t()))
    t.again(3)  # a redelivered event
    t.restart()
    t.again(10)  # a step of the epoch before the restart, late
    t.step("ra1")
    t.cancel("rd1")  # cancelled while queued
    t.step("rb1")
    t.cancel("rb1")  # cancelled while running: c gets the slot
    t.step("ra1")  # a's budget: completing, completed, retired
    t.step("rc1")
    t.again(len(t.log) - 8)  # a late event of a registration that retired since
    t.register("a", "ra3")
    t.fail("rc1")
    t.step("ra3")
    return t.log


def checkpoint_process(client: redis.Redis, streams: Streams, tmp_path: Path) -> CheckpointProcess:
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    for event in recorded_log():  # the final promotions read these versions
        if isinstance(event, Completed) and event.epoch >= 1:
            write_fake_version(artifacts, event.adapter, event.registration_id, event.step)
    checkpoints = CheckpointStore(str(tmp_path / "checkpoints"))
    return CheckpointProcess(client, streams, artifacts, checkpoints)


def commit(client: redis.Redis, effects: Effects) -> None:
    pipe = client.pipeline(transaction=True)
    for command in effects.commands:
        pipe.execute_command(*command)
    pipe.execute()


def phase_gauges(registry: Any, name: str) -> dict[str, float]:
    return {
        p: registry.get_sample_value("multilora_adapter_state", {"adapter": name, "phase": p})
        for p in PHASES
    }


@pytest.mark.bus
def test_every_view_agrees_with_the_fleet_after_every_event(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    log = recorded_log()
    registry = metrics_registry(process_metrics=False)
    metrics = AdapterMetrics(registry)
    process = checkpoint_process(rclient, streams, tmp_path)
    subscription = Subscription(streams.control, "checkpoint", None)  # type: ignore[arg-type]
    phases_seen: set[Phase] = set()
    fleet = Fleet(SLOTS)
    for n, event in enumerate(log, start=1):
        before, fleet = fleet, Fleet.replay(SLOTS, log[:n])
        commit(rclient, fleet_status_effects(streams, before, fleet))  # as the trainer does
        metrics.observe(event)
        commit(rclient, process.handle(Delivery(subscription, f"{n}-0", event, deliveries=1)))
        rows = fold_control(log[:n]).rows()
        names = {s.name for s in fleet.states()}
        assert set(rows) == names
        hashes = {row.name: row for row in read_status(rclient, streams)}
        for name, row in rows.items():  # the log's rows are the trainer's fields of the hashes
            stored = msgspec.structs.replace(
                hashes[name],
                queue_position=None,
                last_rejection=None,
                last_checkpoint_step=None,  # the checkpoint process's fields: its events are
                last_checkpoint_uri="",  # on the stream, not in this test's log
                export_uri="",
            )
            assert row == stored, (n, event)
        for name in names:
            shown = fleet.current(name)
            assert shown is not None
            phases_seen.add(shown.phase)
            # the CLI row: the projection the trainer writes for its current registration (but
            # for the queue position, which only the status hash has)
            assert rows[name] == state_status(shown), (n, event)
            # the metrics: one phase gauge at 1, the live registration's
            live = [s for s in fleet.live() if s.name == name]
            gauges = phase_gauges(registry, name)
            if live:
                assert {p: v for p, v in gauges.items() if v} == {live[0].phase.value: 1.0}
                step = registry.get_sample_value("multilora_adapter_step", {"adapter": name})
                assert step == live[0].step
            else:
                assert set(gauges.values()) == {None}, (n, event)
        # the checkpoint process: the stored state of each admitted, not retired, registration
        for state in fleet.states():
            stored = process.stored(state.registration_id)
            if state.epoch >= 1 and is_live(state):
                assert stored is not None
                assert (stored.epoch, stored.spec) == (state.epoch, state.spec)
            elif state.phase is Phase.RETIRED:
                assert stored is None
    assert phases_seen == set(Phase)


def test_adopt_starts_a_registration_only_at_an_event_with_its_spec() -> None:
    registered = b.register("a", "r1", t=1.0)
    state = transition(None, registered)
    assert state is not None and adopt(registered) == state
    admitted = b.admitted(state, 1, t=3.0)
    adopted = adopt(admitted)
    assert adopted is not None
    assert (adopted.phase, adopted.epoch, adopted.slot, adopted.spec) == (
        Phase.ADMITTED,
        1,
        1,
        state.spec,
    )
    assert adopt(b.queued(state, 2)) is not None
    assert adopt(b.queued(state, 2)).phase is Phase.QUEUED  # type: ignore[union-attr]
    assert adopt(msgspec.structs.replace(admitted, epoch=0)) is None  # not a valid admission
    running = transition(adopted, b.sync(adopted))
    for event in (b.step_done(running), b.sync(running), b.retired(running)):
        assert adopt(event) is None  # no spec: could be late work of an ended registration
    assert fold(None, admitted) == adopted and fold(adopted, b.sync(adopted)) == running
