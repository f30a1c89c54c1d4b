"""Control-log snapshots and trimming (orchestrator.compaction, events.trim).

The property: a fleet restored from a snapshot and fed the rest of the log equals the fleet of
the whole log (stateful, pure), and on a real Redis :func:`load_fleet` after any number of
compactions and trims equals :meth:`Fleet.replay` of every event ever written. Trimming never
passes an entry a group has not acknowledged; a group nobody reads any more stops pinning the
log after the retention window, while a group whose consumer holds its lease never does.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

from events.codec import encode
from events.errors import ConfigError
from events.lease import Lease
from events.streams import Streams
from events.trim import GroupJanitor, group_floors, older
from orchestrator.compaction import READER_SLOTS, compact, load_fleet, snapshot_key
from orchestrator.fleet import (
    Fleet,
    FleetSnapshot,
    fleet_snapshot,
    forget_ended,
    restore_fleet,
    tombstone_ended,
)
from orchestrator.lifecycle import Phase, is_ended
from tests.orchestrator import builders as b
from tests.orchestrator.test_fleet_stateful import SLOTS, FleetMachine

# --- pure: snapshot + tail == whole log ---------------------------------------------------------


class SnapshotMachine(FleetMachine):
    """The fleet machine, plus snapshots taken at random points of its log."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[tuple[int, bytes]] = []

    @rule()
    def snapshot(self) -> None:
        data = msgspec.msgpack.encode(fleet_snapshot(Fleet.replay(SLOTS, self.log)))
        self.snapshots.append((len(self.log), data))

    def teardown(self) -> None:
        full = Fleet.replay(SLOTS, self.log)
        assert full == self.fleet
        for at, data in self.snapshots:
            restored = restore_fleet(msgspec.msgpack.decode(data, type=FleetSnapshot))
            tail = self.log[at:]
            for event in tail:
                restored = restored.apply(event)
            assert restored == full
            # folded with the readers' wide pool, restored onto the trainer's slots
            wide = Fleet.replay(READER_SLOTS, self.log[:at])
            narrow = restore_fleet(fleet_snapshot(wide), SLOTS)
            for event in tail:
                narrow = narrow.apply(event)
            assert narrow == full


SnapshotMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSnapshotMachine = SnapshotMachine.TestCase


def test_restore_refuses_a_live_slot_beyond_the_pool() -> None:
    state = Fleet(4).apply(b.register("a", "r1")).get("r1")
    assert state is not None
    fleet = Fleet(4).apply(b.register("a", "r1")).apply(b.admitted(state, 3))
    with pytest.raises(ConfigError, match=r"holds slot 3.*at least 4 slots"):
        restore_fleet(fleet_snapshot(fleet), 2)


def test_forget_ended_keeps_arrivals_and_refuses_live() -> None:
    fleet = Fleet(2).apply(b.register("a", "r1")).apply(b.register("b", "r2"))
    r1 = fleet.get("r1")
    assert r1 is not None
    fleet = fleet.apply(b.deregister(r1))
    assert fleet.get("r1") is not None and is_ended(fleet.get("r1"))  # type: ignore[arg-type]
    smaller = forget_ended(fleet, ["r1"])
    assert smaller.get("r1") is None and smaller.current("a") is None
    later = smaller.apply(b.register("c", "r3")).get("r3")
    assert later is not None and later.arrival == 2  # what a full replay gives it
    with pytest.raises(ConfigError, match=r"\['r2'\] are live"):
        forget_ended(fleet, ["r2"])


# --- on a real Redis -----------------------------------------------------------------------------


class Trainer:
    """A numerics-free trainer that writes a valid, messy control log: registrations that
    collide by name, admissions, steps, cancels, failures, completions, retirements, plus
    duplicated earlier events (at-least-once delivery)."""

    def __init__(self, client: redis.Redis, streams: Streams, seed: int, slots: int = 3) -> None:
        self.client, self.streams = client, streams
        self.rng = random.Random(seed)
        self.fleet = Fleet(slots)
        self.events: list[Any] = []
        self.count = 0
        self.clock = 0.0

    def write(self, event: Any) -> None:
        self.events.append(event)
        self.fleet = self.fleet.apply(event)
        self.client.xadd(self.streams.control, encode(event))

    def t(self) -> float:
        self.clock += 1.0
        return self.clock

    def act(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.15:
            self.count += 1
            name = rng.choice("abcdefg")
            self.write(b.register(name, f"r{self.count}", t=self.t(), steps=rng.randint(1, 4)))
        elif roll < 0.3:
            for state, slot in self.fleet.next_admissions():
                self.write(b.admitted(state, slot, t=self.t()))
                self.write(b.sync(self.fleet.get(state.registration_id), t=self.t()))  # type: ignore[arg-type]
        elif roll < 0.65 and self.fleet.running():
            state = rng.choice(self.fleet.running())
            self.write(b.step_done(state, t=self.t()))
        elif roll < 0.85:
            settling = [s for s in self.fleet.live() if s.slot is not None]
            settling = [s for s in settling if s.phase not in (Phase.ADMITTED, Phase.RUNNING)]
            if settling:
                state = rng.choice(settling)
                if state.phase is Phase.COMPLETING:
                    self.write(b.completed(state, t=self.t()))
                else:
                    self.write(b.retired(state, t=self.t()))
        elif roll < 0.92 and self.fleet.live():
            self.write(b.deregister(rng.choice(self.fleet.live()), t=self.t()))
        elif self.events:
            self.write(rng.choice(self.events))  # redelivered


def test_load_fleet_without_snapshot_is_a_full_replay(
    rclient: redis.Redis, streams: Streams
) -> None:
    fleet, last = load_fleet(rclient, streams, 3)
    assert fleet == Fleet(3) and last == "0-0"
    trainer = Trainer(rclient, streams, seed=1)
    for _ in range(300):
        trainer.act()
    fleet, last = load_fleet(rclient, streams, 3)
    assert fleet == Fleet.replay(3, trainer.events) == trainer.fleet
    assert last == rclient.xrevrange(streams.control, count=1)[0][0].decode()


def test_compacted_and_trimmed_log_loads_the_same_fleet(
    rclient: redis.Redis, streams: Streams
) -> None:
    """Thousands of events, compacted at random points while two groups read behind: the
    log shrinks, no group loses an unacknowledged entry, and the fleet is exact."""
    trainer = Trainer(rclient, streams, seed=7)
    trainer.write(b.register("z", "r0", t=0.5))
    rclient.xgroup_create(streams.control, "fast", id="0")
    rclient.xgroup_create(streams.control, "slow", id="0")
    janitor = GroupJanitor(rclient, streams, retention_s=3600)
    compactions = trimmed = 0
    for round_ in range(16):
        _ack_pending(rclient, streams.control, "slow", "c")
        for _ in range(250):
            trainer.act()
        _read_and_ack(rclient, streams.control, "fast", 10_000)
        _read_and_ack(rclient, streams.control, "slow", 120)  # falls behind, then pending
        rclient.xreadgroup("slow", "c", {streams.control: ">"}, count=5)  # 5 left pending
        floors = group_floors(rclient, streams.control)
        result = compact(rclient, streams, 3, janitor=janitor)
        compactions += result.written
        trimmed += result.trimmed
        first = rclient.xrange(streams.control, count=1)
        if first:  # every entry a group still needs is retained
            assert not older(min(floors.values(), key=_key), first[0][0].decode())
        fleet, _ = load_fleet(rclient, streams, 3)
        assert fleet == Fleet.replay(3, trainer.events), f"round {round_}"
    assert len(trainer.events) > 2500
    assert compactions == 16 and trimmed > 0
    assert rclient.xlen(streams.control) < len(trainer.events)
    assert load_fleet(rclient, streams, 3)[0] == trainer.fleet
    # the readers' wide pool gives the same states
    wide, _ = load_fleet(rclient, streams, READER_SLOTS)
    assert wide.states() == trainer.fleet.states()


def test_compaction_without_groups_trims_to_the_snapshot(
    rclient: redis.Redis, streams: Streams
) -> None:
    trainer = Trainer(rclient, streams, seed=3)
    for _ in range(200):
        trainer.act()
    result = compact(rclient, streams, 3)
    assert result.written and result.trimmed == len(trainer.events)
    assert rclient.xlen(streams.control) == 0
    again = compact(rclient, streams, 3)  # nothing new: no write, nothing trimmed
    assert not again.written and again.trimmed == 0 and again.snapshot_id == result.snapshot_id
    for _ in range(50):
        trainer.act()
    assert load_fleet(rclient, streams, 3)[0] == Fleet.replay(3, trainer.events)


def test_a_stale_compactor_never_moves_the_snapshot_back(
    rclient: redis.Redis, streams: Streams
) -> None:
    trainer = Trainer(rclient, streams, seed=5)
    for _ in range(100):
        trainer.act()
    first = rclient.xrevrange(streams.control, count=1)[0][0].decode()
    compact(rclient, streams, 3)
    for _ in range(100):
        trainer.act()
    second = compact(rclient, streams, 3).snapshot_id
    assert older(first, second)
    # an old fold written late is refused by the script
    from orchestrator.compaction import _WRITE_IF_NEWER

    stale = msgspec.msgpack.encode(fleet_snapshot(Fleet(3)))
    assert rclient.eval(_WRITE_IF_NEWER, 1, snapshot_key(streams), first, stale, "0", 0) == 0
    assert rclient.hget(snapshot_key(streams), "id").decode() == second
    assert load_fleet(rclient, streams, 3)[0] == Fleet.replay(3, trainer.events)


def test_ended_registrations_leave_the_snapshot_after_the_window(
    rclient: redis.Redis, streams: Streams
) -> None:
    rclient.xadd(streams.control, encode(b.register("a", "r1", t=10.0)))
    r1 = Fleet(2).apply(b.register("a", "r1", t=10.0)).get("r1")
    assert r1 is not None
    rclient.xadd(streams.control, encode(b.deregister(r1, t=20.0)))
    rclient.xadd(streams.control, encode(b.register("b", "r2", t=1000.0)))
    kept = compact(rclient, streams, 2, ended_retention_s=100.0, holds_data=lambda s: True)
    assert kept.forgotten == ()
    rclient.xadd(streams.control, encode(b.register("c", "r3", t=1001.0)))
    gone = compact(rclient, streams, 2, ended_retention_s=100.0, holds_data=lambda s: False)
    assert gone.forgotten == ("r1",)
    fleet, _ = load_fleet(rclient, streams, 2)
    assert fleet.get("r1") is None and fleet.get("r2") is not None and fleet.get("r3") is not None


def test_vanished_group_stops_pinning_after_the_retention_window(
    rclient: redis.Redis, streams: Streams
) -> None:
    """A replica that was removed (its consumer idle, no lease) pins the log until the window
    passes, then its group is destroyed and the log is trimmed; a live replica (lease held),
    idle or not, always pins it."""
    for i in range(20):
        rclient.xadd(streams.control, encode(b.register("a", f"r{i}", t=float(i))))
    for group, consumer in (("rollout.gone", "gone"), ("rollout.live", "live")):
        rclient.xgroup_create(streams.control, group, id="0")
        rclient.xreadgroup(group, consumer, {streams.control: ">"}, count=3)  # 3 pending each
    lease = Lease(rclient, streams.lease("live"), ttl_ms=60_000)
    lease.acquire()
    try:
        janitor = GroupJanitor(rclient, streams, retention_s=0.5)
        first = compact(rclient, streams, 2, janitor=janitor)
        assert first.destroyed == () and first.trimmed == 0  # both pin their pending entries
        time.sleep(0.7)
        second = compact(rclient, streams, 2, janitor=janitor)
        assert second.destroyed == ("rollout.gone",)
        assert second.trimmed == 0  # the live one still has entry 0 pending
        _ack_pending(rclient, streams.control, "rollout.live", "live")
        _read_and_ack(rclient, streams.control, "rollout.live", 100, consumer="live")
        third = compact(rclient, streams, 2, janitor=janitor)
        assert third.trimmed == 20 and third.destroyed == ()
        names = {g["name"].decode() for g in rclient.xinfo_groups(streams.control)}
        assert names == {"rollout.live"}
    finally:
        lease.release()


def test_a_group_without_consumers_vanishes_only_after_the_window(
    rclient: redis.Redis, streams: Streams
) -> None:
    rclient.xadd(streams.control, encode(b.register("a", "r1")))
    rclient.xgroup_create(streams.control, "rollout.never", id="0")
    now = [0.0]
    janitor = GroupJanitor(rclient, streams, retention_s=10.0, clock=lambda: now[0])
    assert janitor.vanished(streams.control) == []
    now[0] = 9.0
    assert janitor.vanished(streams.control) == []
    now[0] = 10.0
    assert janitor.vanished(streams.control) == ["rollout.never"]


# --- helpers ---------------------------------------------------------------------------------


def _key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _read_and_ack(
    client: redis.Redis, stream: str, group: str, count: int, *, consumer: str = "c"
) -> None:
    resp = client.xreadgroup(group, consumer, {stream: ">"}, count=count)
    ids = [eid for _, entries in resp or [] for eid, _ in entries]
    if ids:
        client.xack(stream, group, *ids)


def _ack_pending(client: redis.Redis, stream: str, group: str, consumer: str) -> None:
    pending = client.xpending_range(stream, group, "-", "+", 1000, consumername=consumer)
    ids = [p["message_id"] for p in pending]
    if ids:
        client.xack(stream, group, *ids)


def _as_tombstones(fleet: Fleet, before: float) -> Fleet:
    ended = [s.registration_id for s in fleet.states() if is_ended(s) and s.updated_at < before]
    return tombstone_ended(fleet, ended)


def test_tombstones_keep_every_decision_and_shrink_the_snapshot(
    rclient: redis.Redis, streams: Streams
) -> None:
    """Compacted with tombstones at random points of a messy log: the loaded fleet is the full
    replay with its old ended registrations' specs dropped (nothing else differs), every event
    of the log (late ones and redeliveries) gets the same verdict on both, and the snapshot is
    smaller than one that keeps the specs."""
    trainer = Trainer(rclient, streams, seed=11)
    for round_ in range(8):
        for _ in range(250):
            trainer.act()
        result = compact(rclient, streams, 3, tombstone_after_s=50.0)
        fleet, _ = load_fleet(rclient, streams, 3)
        full = Fleet.replay(3, trainer.events)
        assert fleet == _as_tombstones(full, trainer.clock - 50.0), f"round {round_}"
        assert set(result.tombstoned) <= {s.registration_id for s in full.states() if is_ended(s)}
        for event in trainer.events[-400:]:
            assert fleet.explain(event).verdict == full.explain(event).verdict
    fleet, _ = load_fleet(rclient, streams, 3)
    assert any(s.spec is None for s in fleet.states())
    assert all(s.spec is not None for s in fleet.live())
    with_specs = len(msgspec.msgpack.encode(fleet_snapshot(trainer.fleet)))
    stored = len(rclient.hget(snapshot_key(streams), "fleet") or b"")
    assert stored < with_specs / 2, (stored, with_specs)


def test_a_tombstone_still_refuses_its_retried_registration(
    rclient: redis.Redis, streams: Streams
) -> None:
    fleet = Fleet(2).apply(b.register("a", "r1", t=10.0))
    r1 = fleet.get("r1")
    assert r1 is not None
    for event in (b.register("a", "r1", t=10.0), b.deregister(r1, t=20.0)):
        rclient.xadd(streams.control, encode(event))
    rclient.xadd(streams.control, encode(b.register("b", "r2", t=1000.0)))
    result = compact(rclient, streams, 2, tombstone_after_s=100.0)
    assert result.tombstoned == ("r1",)
    loaded, _ = load_fleet(rclient, streams, 2)
    state = loaded.get("r1")
    assert state is not None and state.spec is None and state.phase is Phase.CANCELLED
    again = loaded.apply(b.register("a", "r1", t=1001.0))
    assert again.get("r1") == state  # the retried id is not registered twice
    assert loaded.get("r2") is not None and loaded.get("r2").spec is not None  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="live"):
        tombstone_ended(loaded, ["r2"])
