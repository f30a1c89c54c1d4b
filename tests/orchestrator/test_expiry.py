"""Expiry of retired registrations' keys and the dead-letter cap, on a real Redis.

Status hashes of ended registrations get a TTL, only while they still show that registration;
a name registered again has its TTL removed; expired names leave the index. Dead letters are
capped both where admission writes them and by the checkpoint process's pass.
"""

from __future__ import annotations

from pathlib import Path

import redis

from events.consumer import Delivery
from events.effects import COMMIT_LUA, Effects
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.fleet import Fleet
from orchestrator.housekeeping import Housekeeper
from orchestrator.ingress import dead_letter_effects, ingress_subscription
from orchestrator.lifecycle import AdapterState
from orchestrator.status import expire_status, fleet_status_effects, read_one
from tests.orchestrator import builders as b

TTL = 3600


def _commit(client: redis.Redis, effects: Effects) -> None:
    client.register_script(COMMIT_LUA)(args=["t", effects.plan([])])


class Trainer:
    """Applies events to its fleet and writes the status projection, as the trainer does."""

    def __init__(self, client: redis.Redis, streams: Streams) -> None:
        self.client, self.streams = client, streams
        self.fleet = Fleet(2)

    def apply(self, event: object) -> None:
        before, self.fleet = self.fleet, self.fleet.apply(event)
        _commit(self.client, fleet_status_effects(self.streams, before, self.fleet))

    def state(self, reg: str) -> AdapterState:
        state = self.fleet.get(reg)
        assert state is not None
        return state


def test_ended_status_expires_and_a_new_registration_persists(
    rclient: redis.Redis, streams: Streams
) -> None:
    trainer = Trainer(rclient, streams)
    trainer.apply(b.register("a", "r1"))
    trainer.apply(b.register("live", "r9"))
    key = streams.status("a")
    assert expire_status(rclient, streams, trainer.fleet, ttl_s=TTL).expiring == ()
    assert rclient.ttl(key) == -1
    trainer.apply(b.deregister(trainer.state("r1")))  # cancelled while waiting: ended
    ended = trainer.fleet
    first = expire_status(rclient, streams, ended, ttl_s=TTL)
    assert first.expiring == ("a",)
    assert 0 < rclient.ttl(key) <= TTL
    assert rclient.ttl(streams.status("live")) == -1  # a live one is never touched
    assert expire_status(rclient, streams, ended, ttl_s=TTL).expiring == ()  # set once

    trainer.apply(b.register("a", "r2"))  # the name is taken again
    assert read_one(rclient, streams, "a").registration_id == "r2"  # type: ignore[union-attr]
    assert rclient.ttl(key) == -1  # the trainer's write for the new registration PERSISTs it
    # a sweep with a fold that lags (still shows r1 ended) never expires r2's hash
    assert expire_status(rclient, streams, ended, ttl_s=TTL).expiring == ()
    assert rclient.ttl(key) == -1
    rclient.expire(key, TTL)
    swept = expire_status(rclient, streams, trainer.fleet, ttl_s=TTL)
    assert swept.persisted == ("a",) and rclient.ttl(key) == -1


def test_expired_names_leave_the_index(rclient: redis.Redis, streams: Streams) -> None:
    trainer = Trainer(rclient, streams)
    trainer.apply(b.register("a", "r1"))
    trainer.apply(b.deregister(trainer.state("r1")))
    assert rclient.sismember(streams.status_index, "a")
    rclient.delete(streams.status("a"))  # what its TTL running out does
    assert expire_status(rclient, streams, trainer.fleet, ttl_s=TTL).unindexed == ("a",)
    assert not rclient.sismember(streams.status_index, "a")


def _letter(streams: Streams, i: int) -> Delivery:
    sub = ingress_subscription(streams, "trainer")
    return Delivery(sub, f"{i + 1}-0", None, 1, {"event": "{bad"}, "bad JSON")


def test_dead_letters_are_capped(rclient: redis.Redis, streams: Streams, tmp_path: Path) -> None:
    effects = dead_letter_effects(streams, _letter(streams, 0), "bad", consumer="t", now=1.0)
    assert effects.commands[0][:5] == ["XADD", streams.dead, "MAXLEN", "~", "10000"]
    for i in range(400):
        letter = dead_letter_effects(
            streams, _letter(streams, i), "bad", consumer="t", now=1.0, maxlen=50
        )
        _commit(rclient, letter)
    capped = rclient.xlen(streams.dead)
    assert capped < 400  # approximate: whole stream nodes (100 entries) go at once
    # the runtime's own letters are uncapped: the checkpoint process's pass trims them
    for i in range(300):
        rclient.xadd(streams.dead, {"dead": str(i)})
    keeper = Housekeeper(
        rclient,
        streams,
        ArtifactStore(str(tmp_path / "artifacts")),
        checkpoint_group="checkpoint",
        dead_maxlen=20,
    )
    done = keeper.run_once()
    assert done.dead_trimmed > 0
    assert rclient.xlen(streams.dead) <= 20 + 100
