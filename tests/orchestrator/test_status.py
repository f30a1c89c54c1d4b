"""The status projection: pure effect building, and one round trip through a real Redis."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import redis

from events.effects import Effects
from events.errors import SchemaError
from events.schema import CheckpointSaved, Exported, Rejected, Synced
from events.streams import Streams
from orchestrator.fleet import Fleet
from orchestrator.ingress import invalid_rejection
from orchestrator.lifecycle import Phase
from orchestrator.status import (
    MAX_STATUS_NAME,
    SKIP_FIELD,
    SKIPS_FIELD,
    AdapterStatus,
    RejectionNote,
    SkipNote,
    checkpoint_effects,
    fleet_status_effects,
    has_status,
    invalid_entry_name,
    read_status,
    status_effects,
    sync_effects,
)
from tests.orchestrator import builders as b


class Projector:
    """Applies events to a fleet and commits the status effects they cause (as the trainer)."""

    def __init__(self, client: redis.Redis, streams: Streams, slots: int) -> None:
        self.client = client
        self.streams = streams
        self.fleet = Fleet(slots)

    def commit(self, effects: Effects) -> int:
        pipe = self.client.pipeline(transaction=True)
        for command in effects.commands:
            pipe.execute_command(*command)
        pipe.execute()
        return len(effects)

    def apply(self, event: Any) -> int:
        before, self.fleet = self.fleet, self.fleet.apply(event)
        return self.commit(fleet_status_effects(self.streams, before, self.fleet))

    def admit(self) -> None:
        for state, slot in self.fleet.next_admissions():
            self.apply(b.admitted(state, slot))
            self.apply(b.sync(self.get(state.registration_id)))

    def get(self, registration_id: str) -> Any:
        state = self.fleet.get(registration_id)
        assert state is not None
        return state

    def rows(self) -> dict[str, AdapterStatus]:
        return {row.name: row for row in read_status(self.client, self.streams)}


def fields_of(row: AdapterStatus, **expected: object) -> bool:
    """Whether ``row`` has the ``expected`` field values (prints the difference otherwise)."""
    actual = {name: getattr(row, name) for name in expected}
    assert actual == expected
    return True


def test_status_effects_write_trainer_fields_and_drop_absent_ones() -> None:
    streams = Streams(namespace="ns")
    state = Fleet(1).apply(b.register("a", "r1", t=10.0)).get("r1")
    assert state is not None
    effects = status_effects(streams, state, queue_position=3)
    assert effects.commands[0][:2] == ["HSET", "ns:status:a"]
    fields = dict(zip(effects.commands[0][2::2], effects.commands[0][3::2], strict=True))
    assert fields["phase"] == "registered" and fields["queue_position"] == "3"
    assert fields["steps_total"] == "3" and fields["registered_at"] == "10.0"
    assert effects.commands[1] == ["HDEL", "ns:status:a", "slot", "reward_mean"]
    assert effects.commands[2] == ["PERSIST", "ns:status:a"]  # live: no expiry pending
    assert effects.commands[3] == ["SADD", "ns:status", "a"]
    junk = Fleet(1).apply(Rejected(adapter="x" * (MAX_STATUS_NAME + 1), reason="bad", id="e"))
    assert len(status_effects(streams, junk.states()[0])) == 0


@pytest.mark.bus
def test_status_round_trip(rclient: redis.Redis, streams: Streams) -> None:
    p = Projector(rclient, streams, slots=1)
    p.apply(b.register("a", "r1", steps=10, t=1.0))
    p.admit()
    p.apply(b.step_done(p.get("r1"), reward=0.75, t=5.0))
    p.apply(b.register("b", "r2", t=6.0))
    p.apply(b.register("c", "r3", priority=1, t=7.0))  # jumps the queue
    p.apply(b.rejected("a", "r4", "adapter 'a' is already registered", t=8.0))
    p.apply(b.rejected("Bad Name", "r5", "adapter name 'Bad Name' is invalid", t=9.0))
    p.apply(Rejected(adapter="", reason="malformed JSON", id="1-0"))  # no name: no status
    for event in [
        Synced(adapter="a", registration_id="r1", worker="w1", version=1, latency_s=0.5, time=20),
        Synced(adapter="a", registration_id="r1", worker="w2", version=0, latency_s=0.2, time=21),
        Synced(adapter="a", registration_id="r0", worker="w3", version=9, latency_s=9.0, time=22),
    ]:
        p.commit(sync_effects(streams, event))
    p.commit(
        checkpoint_effects(
            streams,
            CheckpointSaved(adapter="a", registration_id="r1", step=1, uri="file:///c/a/r1/1"),
        )
    )
    p.commit(
        checkpoint_effects(
            streams, Exported(adapter="a", registration_id="r1", step=1, uri="file:///e/a/r1/1")
        )
    )
    skip = SkipNote(step=2, reason="non-finite loss", in_a_row=1, time=6.0, registration_id="r1")
    fields = {SKIPS_FIELD: "3", SKIP_FIELD: msgspec.json.encode(skip).decode()}
    p.commit(Effects().hset(streams.status("a"), fields))  # the trainer's write of a skip

    rows = p.rows()
    assert list(rows) == ["Bad Name", "a", "b", "c"]
    a = rows["a"]
    assert fields_of(a, registration_id="r1", phase="running", slot=0, epoch=1, step=1)
    assert fields_of(a, steps_total=10, version=1)
    assert a.reward_mean == 0.75 and a.queue_position is None and a.updated_at == 5.0
    assert a.synced == (("w1", 1), ("w2", 0))  # w3 synced another registration of the name
    assert a.last_sync_latency_s == 0.2
    assert (a.last_checkpoint_step, a.last_checkpoint_uri) == (1, "file:///c/a/r1/1")
    assert a.export_uri == "file:///e/a/r1/1"
    assert (a.skips, a.last_skip) == (3, skip) and rows["b"].last_skip is None
    assert a.last_rejection == RejectionNote(
        registration_id="r4", reason="adapter 'a' is already registered", time=8.0
    )
    assert (rows["c"].phase, rows["c"].queue_position) == ("registered", 0)
    assert (rows["b"].phase, rows["b"].queue_position, rows["b"].slot) == ("registered", 1, None)
    bad = rows["Bad Name"]
    assert (bad.phase, bad.reason) == ("rejected", "adapter name 'Bad Name' is invalid")

    # a redelivered event writes nothing
    step = b.step_done(p.get("r1"), reward=0.1)
    assert p.apply(step) > 0
    before = p.rows()
    assert p.apply(step) == 0 and p.apply(b.register("b", "r2", t=6.0)) == 0
    assert p.rows() == before

    # a is cancelled and retires: c takes the slot, b moves up
    for build in (b.deregister, lambda s: b.completed(s, cancelled=True), b.retired):
        p.apply(build(p.get("r1")))
    p.admit()
    rows = p.rows()
    assert (rows["a"].phase, rows["a"].slot, rows["a"].reason) == ("retired", None, "user stop")
    assert (rows["c"].phase, rows["c"].slot, rows["c"].queue_position) == ("running", 0, None)
    assert rows["b"].queue_position == 0

    # a new registration of "a": the old registration's syncs and checkpoints are not shown
    p.apply(b.register("a", "r6", t=30.0))
    a = p.rows()["a"]
    assert (a.registration_id, a.phase, a.queue_position, a.step) == ("r6", "registered", 1, 0)
    assert a.synced == () and a.last_sync_latency_s is None
    assert a.last_checkpoint_step is None and a.export_uri == ""
    assert (a.skips, a.last_skip) == (None, None)  # r1's skips were r1's
    assert p.fleet.get("r6") is not None and p.fleet.get("r6").phase is Phase.REGISTERED  # type: ignore[union-attr]


@pytest.mark.bus
def test_malformed_status_value_is_a_loud_error(rclient: redis.Redis, streams: Streams) -> None:
    rclient.sadd(streams.status_index, "a")
    rclient.hset(streams.status("a"), mapping={"phase": "running", "slot": "two"})
    with pytest.raises(SchemaError, match=r"status hash .*status:a.*'slot' = 'two'"):
        read_status(rclient, streams)
    rclient.hset(streams.status("a"), mapping={"slot": "2", "sync:w1": "{not json"})
    with pytest.raises(SchemaError, match="'sync:w1'"):
        read_status(rclient, streams)


@pytest.mark.bus
def test_undecodable_entries_each_get_a_status_of_their_own(
    rclient: redis.Redis, streams: Streams
) -> None:
    """Two entries without a usable adapter name used to share the name ``""`` (the second
    hid the first, and neither had a status); now each has its own key."""
    p = Projector(rclient, streams, slots=1)
    entries = {"1-0": "{not json", "2-0": "[]", "3-0": '{"adapter": "typo", "spec": 1}'}
    for entry, raw in entries.items():
        p.apply(invalid_rejection(entry, {"event": raw}, f"malformed entry {entry}"))
    rows = p.rows()
    assert list(rows) == ["<invalid:1-0>", "<invalid:2-0>", "typo"]
    for entry, name in zip(entries, rows, strict=True):
        assert (rows[name].phase, rows[name].reason) == ("rejected", f"malformed entry {entry}")
    assert invalid_entry_name("1-0") == "<invalid:1-0>" and has_status(invalid_entry_name("1-0"))
