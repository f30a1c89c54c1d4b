"""Stateful property test of the fleet under duplicated, late, replayed and foreign events.

A well-behaved trainer (the rules) registers adapters (names collide on purpose), admits through
``next_admissions``, steps, cancels, fails, completes, retires and restarts; interleaved with that,
earlier events of the log are delivered again (duplicates, and late arrivals out of order), and
events of ended registrations or stale epochs arrive. Every event goes into the log, so the log
holds exactly what a consumer would have seen. The invariants hold after every step, and
replaying the whole log from scratch gives an equal fleet.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from events.schema import DeregisterRequested
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import (
    TRAINING,
    WAITING,
    AdapterState,
    Phase,
    Verdict,
    is_ended,
    is_live,
)
from tests.orchestrator import builders as b

SLOTS = 2
NAMES = st.sampled_from(["a", "b", "c", "d"])
CANCELLABLE = frozenset({Phase.REGISTERED, Phase.QUEUED, Phase.ADMITTED, Phase.RUNNING})
FAILABLE = CANCELLABLE | {Phase.COMPLETING}
SETTLED = frozenset({Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED})
SETTLING = SETTLED | {Phase.COMPLETING}


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fleet = Fleet(SLOTS)
        self.log: list[Any] = []
        self.count = 0
        self.clock = 0.0
        self.queue_key: dict[str, tuple[int, int]] = {}  # registration -> (-priority, arrival)
        self.seen: dict[str, AdapterState] = {}

    # --- helpers -----------------------------------------------------------------------------

    def t(self) -> float:
        self.clock += 1.0
        return self.clock

    def publish(self, event: Any, expect: Verdict = Verdict.APPLIED) -> None:
        """Deliver an event the trainer publishes now; it must have the expected verdict."""
        outcome = self.fleet.explain(event)
        assert outcome.verdict is expect, (outcome, event)
        before = self.fleet
        self.log.append(event)
        self.fleet = self.fleet.apply(event)
        assert (self.fleet is before) == (expect is not Verdict.APPLIED)

    def noop(self, event: Any) -> None:
        """Deliver an event that must change nothing (duplicate, late, stale or foreign)."""
        before = self.fleet
        self.log.append(event)
        self.fleet = self.fleet.apply(event)
        assert self.fleet is before, (self.fleet.explain(event), event)

    def state(self, registration_id: str) -> AdapterState:
        state = self.fleet.get(registration_id)
        assert state is not None
        return state

    def expected_queue(self) -> list[str]:
        waiting = [s.registration_id for s in self.fleet.states() if s.phase in WAITING]
        return sorted(waiting, key=self.queue_key.__getitem__)

    # --- the trainer -------------------------------------------------------------------------

    @rule(name=NAMES, priority=st.integers(0, 2), steps=st.integers(1, 3), raw=st.booleans())
    def register(self, name: str, priority: int, steps: int, raw: bool) -> None:
        reg = f"r{self.count}"
        self.count += 1
        event = b.register(name, reg, priority=priority, steps=steps, t=self.t())
        if not self.fleet.is_active_name(name):
            self.queue_key[reg] = (-priority, self.count)
            self.publish(event)
        else:  # admission refuses the duplicate name, or the fleet does for a raw write
            live = self.fleet.current(name)
            self.publish(event if raw else b.rejected(name, reg, "name taken", t=self.t()))
            assert self.state(reg).phase is Phase.REJECTED
            assert self.fleet.current(name) == live

    @rule()
    def admit(self) -> None:
        queue = self.expected_queue()
        free = self.fleet.free_slots()
        pairs = self.fleet.next_admissions()
        k = min(len(queue), len(free))
        assert [s.registration_id for s, _ in pairs] == queue[:k]
        assert [slot for _, slot in pairs] == list(free[:k])
        for state, slot in pairs:
            self.publish(b.admitted(state, slot, t=self.t()))
            self.publish(b.sync(self.state(state.registration_id), t=self.t()))
        for position, state in enumerate(self.fleet.waiting()):
            expect = Verdict.APPLIED if state.phase is Phase.REGISTERED else Verdict.DUPLICATE
            self.publish(b.queued(state, position, t=self.t()), expect)

    @precondition(lambda self: self.fleet.running())
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        state = data.draw(st.sampled_from(self.fleet.running()))
        self.publish(b.step_done(state, reward=float(state.step), t=self.t()))
        after = self.state(state.registration_id)
        assert after.phase is (
            Phase.COMPLETING if after.step >= (after.steps_total or 0) else Phase.RUNNING
        )
        self.publish(b.sync(after, t=self.t()), Verdict.DUPLICATE)  # same version as the step

    def settling(self) -> list[AdapterState]:
        return [s for s in self.fleet.live() if s.phase in SETTLING and s.slot is not None]

    def over(self) -> list[AdapterState]:
        return [s for s in self.fleet.states() if not is_live(s) or s.phase in SETTLED]

    @precondition(lambda self: self.settling())
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """Completion and retirement, one event at a time so they interleave with the rest."""
        candidates = self.settling()
        state = data.draw(st.sampled_from(candidates))
        if state.phase is Phase.COMPLETING:
            self.publish(b.completed(state, t=self.t()))
        elif state.phase is Phase.CANCELLED and state.final_step is None:
            self.publish(b.completed(state, cancelled=True, t=self.t()))
        else:
            self.publish(b.retired(state, t=self.t()))
            assert state.slot in self.fleet.free_slots()

    @precondition(lambda self: self.fleet.live())
    @rule(data=st.data(), by_name=st.booleans())
    def deregister(self, data: st.DataObject, by_name: bool) -> None:
        state = data.draw(st.sampled_from(self.fleet.live()))
        if by_name:  # not resolved to a registration: must not touch any
            self.noop(DeregisterRequested(adapter=state.name, id=f"x{self.t()}"))
            return
        event = b.deregister(state, t=self.t())
        if state.phase in CANCELLABLE:
            self.publish(event)
            assert self.fleet.accepts_group(state.name, state.registration_id, 0, 0) is False
        else:
            self.noop(event)

    @precondition(lambda self: any(s.phase in FAILABLE for s in self.fleet.live()))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        state = data.draw(st.sampled_from([s for s in self.fleet.live() if s.phase in FAILABLE]))
        self.publish(b.failed(state, t=self.t()))

    @rule()
    def restart(self) -> None:
        """The trainer restarts: rebuild from the log, then re-admit under a new epoch."""
        rebuilt = Fleet.replay(SLOTS, self.log)
        assert rebuilt == self.fleet
        self.fleet = rebuilt
        for state in rebuilt.running():
            assert state.slot is not None
            self.publish(b.admitted(state, state.slot, start_step=state.step, t=self.t()))
            self.publish(b.sync(self.state(state.registration_id), t=self.t()))

    # --- the unreliable world ----------------------------------------------------------------

    @precondition(lambda self: self.log)
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """Any earlier event again: a duplicate, or a late (reordered) delivery."""
        self.noop(data.draw(st.sampled_from(self.log)))

    @precondition(lambda self: self.over())
    @rule(data=st.data(), which=st.integers(0, 5))
    def late_event(self, data: st.DataObject, which: int) -> None:
        """Work of an ended, cancelled, failed or completed registration arrives late."""
        state = data.draw(st.sampled_from(self.over()))
        events = [
            b.step_done(state),
            b.admitted(state, state.slot if state.slot is not None else 0),
            b.queued(state),
            b.deregister(state),
            b.sync(state, state.version + 1),
            b.failed(state),
        ]
        self.noop(events[which])

    @precondition(lambda self: self.fleet.running())
    @rule(data=st.data())
    def stale_epoch_step(self, data: st.DataObject) -> None:
        """A zombie trainer of an older epoch reports a step."""
        state = data.draw(st.sampled_from(self.fleet.running()))
        self.noop(msgspec.structs.replace(b.step_done(state), epoch=state.epoch - 1))

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def slots_are_exclusive(self) -> None:
        holders = [s for s in self.fleet.states() if s.slot is not None]
        slots = [s.slot for s in holders]
        assert len(slots) == len(set(slots)) <= SLOTS
        assert all(0 <= slot < SLOTS for slot in slots)  # type: ignore[operator]
        assert all(is_live(s) for s in holders)
        assert self.fleet.free_slots() == tuple(sorted(set(range(SLOTS)) - set(slots)))
        for s in holders:
            assert self.fleet.slot_owner(s.slot) == s  # type: ignore[arg-type]

    @invariant()
    def one_live_registration_per_name(self) -> None:
        live = [s for s in self.fleet.states() if is_live(s)]
        names = [s.name for s in live]
        assert len(names) == len(set(names))
        assert list(self.fleet.live()) == live
        for s in live:
            assert self.fleet.is_active_name(s.name) and self.fleet.current(s.name) == s
        for s in self.fleet.states():
            if s.name not in names:
                assert not self.fleet.is_active_name(s.name)

    @invariant()
    def monotonic_and_no_resurrection(self) -> None:
        for s in self.fleet.states():
            prev = self.seen.get(s.registration_id)
            if prev is not None:
                assert s.step >= prev.step and s.version >= prev.version
                assert s.epoch >= prev.epoch and s.arrival == prev.arrival
                if is_ended(prev):
                    assert s == prev
            self.seen[s.registration_id] = s

    @invariant()
    def fencing(self) -> None:
        for s in self.fleet.states():
            accepts = s.phase in TRAINING
            name, reg = s.name, s.registration_id
            assert self.fleet.accepts_group(name, reg, s.epoch, s.version) is accepts
            assert self.fleet.accepts_group(name, reg, s.epoch, 0) is accepts
            assert not self.fleet.accepts_group(name, reg, s.epoch - 1, s.version)
            assert not self.fleet.accepts_group(name, reg, s.epoch + 1, s.version)
            assert not self.fleet.accepts_group(name, reg, s.epoch, s.version + 1)

    @invariant()
    def queue_order_and_running(self) -> None:
        assert [s.registration_id for s in self.fleet.waiting()] == self.expected_queue()
        training = [s for s in self.fleet.states() if s.phase in TRAINING]
        assert list(self.fleet.running()) == sorted(training, key=lambda s: s.slot or 0)

    def teardown(self) -> None:
        assert Fleet.replay(SLOTS, self.log) == self.fleet


FleetMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFleetMachine = FleetMachine.TestCase
