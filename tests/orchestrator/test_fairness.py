"""Flood fairness: one producer's flood of registrations never starves another producer.

The rule (:mod:`orchestrator.fleet`): priority first; within a priority, a registration's round
is the number of slots its producer holds plus its producer's registrations ahead of it, and
rounds are served in order (arrival breaks ties). Admission caps how many registrations one
producer may keep waiting (:mod:`orchestrator.admission`).
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.schema import Admitted, Queued, Rejected
from orchestrator.admission import Admission, Admit, Reject
from orchestrator.client import Producer
from orchestrator.fleet import Fleet, producer_of
from orchestrator.lifecycle import AdapterState
from tests.orchestrator import builders as b
from tests.orchestrator.conftest import KNOWN_REWARDS
from tests.trainer.conftest import tiny_model_dir  # noqa: F401
from tests.trainer.test_process import Bus, bus, spec  # noqa: F401


def _admit_all(fleet: Fleet) -> Fleet:
    """Admit the queue head onto every free slot, as the trainer does after each event."""
    for state, slot in fleet.next_admissions():
        fleet = fleet.apply(b.admitted(state, slot))
    return fleet


def _free(fleet: Fleet, state: AdapterState) -> Fleet:
    """Cancel a slot holder and retire it: its slot is free again."""
    fleet = fleet.apply(b.deregister(state))
    current = fleet.get(state.registration_id)
    assert current is not None
    fleet = fleet.apply(b.completed(current, cancelled=True))
    current = fleet.get(state.registration_id)
    assert current is not None
    return fleet.apply(b.retired(current))


def test_a_flood_of_100_does_not_starve_a_later_single_registration() -> None:
    fleet = Fleet(2)
    for i in range(100):
        fleet = _admit_all(fleet.apply(b.register(f"a{i}", f"a{i}", producer="team-a")))
    fleet = fleet.apply(b.register("b0", "b0", producer="team-b"))
    assert [s.name for s in fleet.running()] == ["a0", "a1"]
    assert fleet.queue_position("b0") == 0  # next, ahead of 98 earlier registrations of team-a
    order = [s.name for s in fleet.waiting()]
    assert order[:3] == ["b0", "a2", "a3"] and order[1:] == [f"a{i}" for i in range(2, 100)]
    # the next free slot goes to b0, whichever slot frees up
    fleet = _admit_all(_free(fleet, fleet.running()[1]))
    assert "b0" in [s.name for s in fleet.running()]
    # and the rest of the flood is served in arrival order after it
    assert [s.name for s in fleet.waiting()] == [f"a{i}" for i in range(2, 100)]


def test_producers_take_turns_and_heavy_holders_yield() -> None:
    fleet = Fleet(3)
    for i in range(3):
        fleet = _admit_all(fleet.apply(b.register(f"a{i}", f"a{i}", producer="a")))
    for name in ("a3", "a4", "b0", "b1", "c0"):
        fleet = fleet.apply(b.register(name, name, producer=name[0]))
    # a holds 3 slots: b and c go first, one each per round; a's fourth waits for round 3
    assert [s.name for s in fleet.waiting()] == ["b0", "c0", "b1", "a3", "a4"]
    # priority still comes first
    fleet = fleet.apply(b.register("a5", "a5", producer="a", priority=1))
    assert fleet.waiting()[0].name == "a5"


def test_anonymous_registrations_are_one_producer_and_keep_arrival_order() -> None:
    fleet = Fleet(1)
    for i, priority in enumerate([0, 1, 0, 2, 1]):
        fleet = fleet.apply(b.register(f"r{i}", f"r{i}", priority=priority))
    assert [s.name for s in fleet.waiting()] == ["r3", "r1", "r4", "r0", "r2"]
    assert {producer_of(s) for s in fleet.waiting()} == {""}


@settings(max_examples=60, deadline=None)
@given(
    producers=st.lists(st.sampled_from("abcd"), min_size=1, max_size=40),
    slots=st.integers(1, 4),
)
def test_the_queue_is_round_robin_across_producers(producers: list[str], slots: int) -> None:
    """Each producer's registrations keep their order; a registration's round (slots its
    producer holds + its rank among that producer's waiting ones) never decreases along the
    queue: the head is always a registration of the producer in the earliest round."""
    fleet = Fleet(slots)
    for i, producer in enumerate(producers):
        fleet = _admit_all(fleet.apply(b.register(f"r{i}", f"r{i}", producer=producer)))
    held = Counter(producer_of(s) for s in fleet.running())
    seen: Counter[str] = Counter()
    rounds = []
    last_arrival: dict[str, int] = {}
    for state in fleet.waiting():
        producer = producer_of(state)
        assert state.arrival > last_arrival.get(producer, -1)  # FIFO within a producer
        last_arrival[producer] = state.arrival
        rounds.append(held[producer] + seen[producer])
        seen[producer] += 1
    assert rounds == sorted(rounds)


# --- the cap on waiting registrations -----------------------------------------------------------


def _capped(limit: int) -> Admission:
    return Admission(
        base_model="m",
        known_rewards=KNOWN_REWARDS,
        probe_dataset=lambda _: 5,
        max_rank=32,
        max_waiting_per_producer=limit,
    )


def test_a_producer_over_its_waiting_limit_is_rejected_others_are_not() -> None:
    admission, fleet = _capped(2), Fleet(1)
    for i in range(3):  # one admitted, two waiting
        event = b.register(f"a{i}", f"a{i}", producer="team-a")
        assert isinstance(admission.check(event, fleet), Admit)
        fleet = _admit_all(fleet.apply(event))
    assert fleet.waiting_of("team-a") == 2
    verdict = admission.check(b.register("a3", "a3", producer="team-a"), fleet)
    assert verdict == Reject(
        "producer 'team-a' already has 2 waiting registrations (limit 2); wait for one to be "
        "admitted or cancel one",
        "spec.producer",
    )
    assert isinstance(admission.check(b.register("b0", "b0", producer="team-b"), fleet), Admit)
    # once one is admitted, team-a may queue again
    fleet = _admit_all(_free(fleet, fleet.running()[0]))
    assert isinstance(admission.check(b.register("a3", "a3", producer="team-a"), fleet), Admit)
    # 0 means no limit
    assert isinstance(_capped(0).check(b.register("a9", "a9", producer="team-a"), fleet), Admit)
    with pytest.raises(ValueError, match="max_waiting_per_producer must be >= 0"):
        _capped(-1)


def test_anonymous_producers_share_one_limit_and_are_told_to_name_themselves() -> None:
    admission, fleet = _capped(1), Fleet(1)
    for i in range(2):
        fleet = _admit_all(fleet.apply(b.register(f"x{i}", f"x{i}")))
    verdict = admission.check(b.register("x2", "x2"), fleet)
    assert isinstance(verdict, Reject) and verdict.field == "spec.producer"
    assert "anonymous producers" in verdict.reason and "limit 1" in verdict.reason
    assert "spec.producer name" in verdict.reason


def test_the_producer_client_names_its_registrations(rclient, streams) -> None:
    from events.codec import Decoder
    from events.schema import IngressEvent

    producer = Producer(rclient, streams, producer="team-a")
    producer.register("a", b.make_spec())
    producer.register("b", b.make_spec(producer="team-z"))  # a spec's own name wins
    decoder = Decoder(IngressEvent)
    entries = rclient.xrange(streams.ingress)
    names = [decoder.decode(f, i.decode()).spec.producer for i, f in entries]
    assert names == ["team-a", "team-z"]
    with pytest.raises(ValueError, match="producer 'Team A' is not a valid name"):
        Producer(rclient, streams, producer="Team A")


# --- through the real trainer handlers, on the bus ------------------------------------------------


@pytest.mark.bus
def test_the_trainer_queues_fairly_and_rejects_a_flood_over_the_limit(
    bus: Bus,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    bus.process.admission = Admission(
        base_model="tiny",
        max_rank=4,
        known_rewards=frozenset({"exact_match"}),
        probe_dataset=lambda _: 40,
        max_waiting_per_producer=2,
    )
    flood = Producer(bus.client, bus.streams, producer="team-a")
    single = Producer(bus.client, bus.streams, producer="team-b")
    ids = [flood.register(f"a{i}", spec(steps=3)) for i in range(4)]
    late = single.register("b0", spec(steps=3))
    bus.consumer.run(burst=True)

    (admitted,) = [e for e in bus.control() if isinstance(e, Admitted)]
    assert admitted.registration_id == ids[0]  # the one slot
    positions = {e.adapter: e.position for e in bus.control() if isinstance(e, Queued)}
    assert positions == {"a1": 0, "a2": 1, "b0": 0}  # b0 jumps the flood's queue
    (rejected,) = [e for e in bus.control() if isinstance(e, Rejected)]
    assert (rejected.adapter, rejected.field) == ("a3", "spec.producer")
    assert "producer 'team-a' already has 2 waiting registrations (limit 2)" in rejected.reason
    assert bus.process.fleet.queue_position(late) == 0
    assert [s.name for s in bus.process.fleet.waiting()] == ["b0", "a1", "a2"]
