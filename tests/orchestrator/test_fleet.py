"""The fleet: slot pool, wait queue order, fencing, whole-view guards and replay."""

from __future__ import annotations

import msgspec
import pytest

from events.errors import ConfigError
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import Phase, Verdict
from tests.orchestrator import builders as b


def admit_all(fleet: Fleet, log: list[object]) -> Fleet:
    """What the trainer does after every change: admit the queue head, publish version 0."""
    for state, slot in fleet.next_admissions():
        for build in (lambda s, slot=slot: b.admitted(s, slot), b.sync):
            event = build(fleet.get(state.registration_id))
            log.append(event)
            fleet = fleet.apply(event)
    return fleet


def publish(fleet: Fleet, log: list[object], event: object) -> Fleet:
    outcome = fleet.explain(event)
    assert outcome.verdict is Verdict.APPLIED, outcome.reason
    log.append(event)
    return fleet.apply(event)


def test_needs_a_slot() -> None:
    with pytest.raises(ConfigError, match="slots=0"):
        Fleet(0)


def test_queue_is_priority_then_fifo_and_slots_go_lowest_first() -> None:
    fleet, log = Fleet(2), []
    for i, (name, priority) in enumerate([("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 2)]):
        fleet = publish(fleet, log, b.register(name, f"r{i}", priority=priority))
    assert [s.name for s in fleet.waiting()] == ["e", "b", "d", "a", "c"]
    assert [fleet.queue_position(f"r{i}") for i in range(5)] == [3, 1, 4, 2, 0]
    assert [(s.name, slot) for s, slot in fleet.next_admissions()] == [("e", 0), ("b", 1)]
    fleet = admit_all(fleet, log)
    assert fleet.free_slots() == () and fleet.next_admissions() == []
    assert [s.name for s in fleet.running()] == ["e", "b"]
    assert [s.name for s in fleet.waiting()] == ["d", "a", "c"]
    assert fleet.queue_position("r4") is None
    # b finishes by cancel: its slot 1 goes to d, the next in line
    state = fleet.get("r1")
    assert state is not None
    for build in (b.deregister, lambda s: b.completed(s, cancelled=True), b.retired):
        fleet = publish(fleet, log, build(fleet.get("r1")))
    assert fleet.free_slots() == (1,)
    fleet = admit_all(fleet, log)
    assert [(s.name, s.slot) for s in fleet.running()] == [("e", 0), ("d", 1)]
    assert Fleet.replay(2, log) == fleet


def test_accepts_group_fences_registration_epoch_phase_and_version() -> None:
    fleet, log = Fleet(1), []
    fleet = publish(fleet, log, b.register("a", "r1"))
    fleet = admit_all(fleet, log)
    state = fleet.get("r1")
    assert state is not None and state.phase is Phase.RUNNING
    assert fleet.accepts_group("a", "r1", state.epoch, 0)
    assert not fleet.accepts_group("a", "r1", state.epoch, 1)  # version not published yet
    assert not fleet.accepts_group("a", "r1", state.epoch - 1, 0)  # older epoch
    assert not fleet.accepts_group("b", "r1", state.epoch, 0)  # wrong name
    assert not fleet.accepts_group("a", "r2", state.epoch, 0)  # unknown registration
    fleet = publish(fleet, log, b.step_done(state))
    state = fleet.get("r1")
    assert state is not None
    assert fleet.accepts_group("a", "r1", 1, 1) and fleet.accepts_group("a", "r1", 1, 0)
    # a trainer restart re-admits under epoch 2: epoch-1 work is discarded
    fleet = publish(fleet, log, b.admitted(state, 0, start_step=state.step))
    assert not fleet.accepts_group("a", "r1", 1, 1) and fleet.accepts_group("a", "r1", 2, 1)
    fleet = publish(fleet, log, b.deregister(fleet.get("r1")))  # type: ignore[arg-type]
    assert not fleet.accepts_group("a", "r1", 2, 1)  # cancelled, slot still held
    assert fleet.free_slots() == () and fleet.is_active_name("a")
    fleet = publish(fleet, log, b.retired(fleet.get("r1")))  # type: ignore[arg-type]
    assert not fleet.is_active_name("a") and fleet.free_slots() == (0,)
    # a new registration of the same name is a new state; the old one stays fenced
    fleet = publish(fleet, log, b.register("a", "r2"))
    fleet = admit_all(fleet, log)
    new = fleet.get("r2")
    assert new is not None and new.slot == 0 and new.epoch == 1
    assert fleet.accepts_group("a", "r2", 1, 0)
    assert not fleet.accepts_group("a", "r1", 1, 0) and not fleet.accepts_group("a", "r1", 2, 0)
    assert fleet.current("a") == new
    assert Fleet.replay(1, log) == fleet


def test_whole_view_guards() -> None:
    fleet, log = Fleet(2), []
    fleet = publish(fleet, log, b.register("a", "r1"))
    dup = b.register("a", "r2")  # written to the log without admission
    outcome = fleet.explain(dup)
    assert outcome.verdict is Verdict.APPLIED and outcome.state is not None
    assert outcome.state.phase is Phase.REJECTED
    assert "already has the live registration 'r1'" in outcome.state.reason
    fleet = publish(fleet, log, dup)
    assert fleet.current("a") == fleet.get("r1")
    fleet = publish(fleet, log, b.rejected("a", "r3", "adapter 'a' is already registered"))
    assert fleet.current("a") == fleet.get("r1")  # the live one is shown, not the rejection
    assert fleet.get("r3") is not None and fleet.get("r3").phase is Phase.REJECTED  # type: ignore[union-attr]
    fleet = publish(fleet, log, b.register("b", "r4"))
    state_a, state_b = fleet.get("r1"), fleet.get("r4")
    assert state_a is not None and state_b is not None
    fleet = publish(fleet, log, b.admitted(state_a, 1))
    clash = b.admitted(state_b, 1)
    assert "held by registration 'r1'" in fleet.explain(clash).reason
    assert fleet.apply(clash) is fleet
    missing = b.admitted(state_b, 2)
    assert "does not exist" in fleet.explain(missing).reason
    by_name = msgspec.structs.replace(b.deregister(state_b), registration_id="", id="x1")
    assert fleet.explain(by_name).verdict is Verdict.UNKNOWN


def test_replay_with_duplicates_equals_the_live_fleet() -> None:
    fleet, log = Fleet(1), []
    fleet = publish(fleet, log, b.register("a", "r1", steps=2))
    fleet = publish(fleet, log, b.register("b", "r2", steps=1))
    fleet = admit_all(fleet, log)
    for _ in range(2):
        fleet = publish(fleet, log, b.step_done(fleet.get("r1")))  # type: ignore[arg-type]
    a = fleet.get("r1")
    assert a is not None and a.phase is Phase.COMPLETING and not fleet.running()
    fleet = publish(fleet, log, b.completed(a))
    fleet = publish(fleet, log, b.retired(fleet.get("r1")))  # type: ignore[arg-type]
    fleet = admit_all(fleet, log)
    assert [s.name for s in fleet.running()] == ["b"]
    doubled = [e for event in log for e in (event, event)] + log
    assert Fleet.replay(1, doubled) == fleet == Fleet.replay(1, log)
    assert fleet != Fleet.replay(1, log[:-1]) and fleet != Fleet(2)
    assert "b:running" in repr(fleet)


def test_changed_lists_new_and_modified_states() -> None:
    fleet = Fleet(1).apply(b.register("a", "r1"))
    after = fleet.apply(b.register("b", "r2"))
    assert [s.registration_id for s in after.changed(fleet)] == ["r2"]
    assert after.changed(after) == ()
    assert [s.registration_id for s in after.changed(Fleet(1))] == ["r1", "r2"]
