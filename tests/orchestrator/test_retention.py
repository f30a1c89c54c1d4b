"""The version retention rule (orchestrator.retention), as a table: pure, no Redis, no disk."""

from __future__ import annotations

import pytest

from orchestrator.fleet import Fleet
from orchestrator.lifecycle import AdapterState, Phase
from orchestrator.retention import Pins, doomed_versions, keep_from, plan
from tests.orchestrator import builders as b


def state(phase: Phase, version: int, *, staleness: int = 1, slot: int | None = 0) -> AdapterState:
    return AdapterState(
        name="a",
        registration_id="r1",
        phase=phase,
        epoch=1,
        slot=slot,
        version=version,
        spec=b.make_spec(max_staleness=staleness),
    )


RUNNING, RETIRED = Phase.RUNNING, Phase.RETIRED


@pytest.mark.parametrize(
    ("phase", "slot", "newest", "staleness", "stored", "pinned", "doomed"),
    [
        # live: keep newest - staleness - 1 and above (v >= 10 - 1 - 1 = 8)
        (RUNNING, 0, 10, 1, range(11), (), [0, 1, 2, 3, 4, 5, 6, 7]),
        (RUNNING, 0, 10, 0, range(11), (), [0, 1, 2, 3, 4, 5, 6, 7, 8]),
        (RUNNING, 0, 10, 4, range(11), (), [0, 1, 2, 3, 4]),
        # the trainer wrote ahead of the log: 11 and 12 are newer than the newest acknowledged
        (RUNNING, 0, 10, 1, range(13), (), [0, 1, 2, 3, 4, 5, 6, 7]),
        # pinned: a checkpoint due from 3, a worker serving 5, a saved sampler path at 0
        (RUNNING, 0, 10, 1, range(11), (0, 3, 5), [1, 2, 4, 6, 7]),
        # young registrations keep everything
        (RUNNING, 0, 1, 1, range(2), (), []),
        (RUNNING, 0, 0, 0, [0], (), []),
        (Phase.ADMITTED, 0, 2, 0, range(3), (), [0]),
        # settling (completing, cancelled or failed, still holding the slot) is live
        (Phase.COMPLETING, 0, 6, 1, range(7), (), [0, 1, 2, 3]),
        (Phase.CANCELLED, 0, 6, 1, range(7), (), [0, 1, 2, 3]),
        # ended: everything that is not pinned (a final checkpoint due, a saved path)
        (RETIRED, None, 6, 1, range(7), (), [0, 1, 2, 3, 4, 5, 6]),
        (RETIRED, None, 6, 1, range(7), (6,), [0, 1, 2, 3, 4, 5]),
        (RETIRED, None, 6, 1, range(7), (2, 6), [0, 1, 3, 4, 5]),
        (Phase.FAILED, None, 3, 1, range(4), (), [0, 1, 2, 3]),
        (RETIRED, None, 6, 1, [], (), []),
    ],
)
def test_doomed_versions(
    phase: Phase,
    slot: int | None,
    newest: int,
    staleness: int,
    stored: range | list[int],
    pinned: tuple[int, ...],
    doomed: list[int],
) -> None:
    s = state(phase, newest, staleness=staleness, slot=slot)
    assert doomed_versions(s, stored, pinned) == doomed


def test_never_the_newest_nor_anything_newer() -> None:
    for staleness in range(4):
        for newest in range(8):
            s = state(RUNNING, newest, staleness=staleness)
            gone = doomed_versions(s, range(newest + 3))
            assert all(v < newest for v in gone)
            assert all(v < keep_from(s) for v in gone)
            assert newest not in gone


def test_a_live_state_without_spec_keeps_everything() -> None:
    s = AdapterState(name="a", registration_id="r1", phase=RUNNING, slot=0, version=9)
    assert doomed_versions(s, range(10)) == []


def test_pins_of_an_ended_registration_ignore_workers() -> None:
    pins = Pins(
        checkpointing={"r1": frozenset({4})},
        served={"r1": frozenset({5})},
        saved={"r1": frozenset({1})},
    )
    assert pins.of(state(RUNNING, 9)) == {1, 4, 5}
    assert pins.of(state(RETIRED, 9, slot=None)) == {1, 4}


def test_plan_over_a_fleet() -> None:
    """Directories the fleet does not know (or under another name) are left alone; an ended
    registration's directory goes with its last unpinned version."""
    fleet = Fleet(2).apply(b.register("a", "r1", steps=10)).apply(b.register("b", "r2"))
    r1, r2 = fleet.get("r1"), fleet.get("r2")
    assert r1 is not None and r2 is not None
    fleet = fleet.apply(b.admitted(r1, 0)).apply(b.admitted(r2, 1))
    for _ in range(6):
        r1 = fleet.get("r1")
        assert r1 is not None
        fleet = fleet.apply(b.step_done(r1, t=5.0 + r1.step))
    r2 = fleet.get("r2")
    assert r2 is not None
    fleet = fleet.apply(b.deregister(r2))
    r2 = fleet.get("r2")
    assert r2 is not None
    fleet = fleet.apply(b.retired(r2))
    stored = {("a", "r1"): list(range(7)), ("b", "r2"): [0, 1], ("c", "r9"): [0], ("b", "r1"): [0]}
    dirs = sorted(stored)
    keep_saved = Pins(saved={"r2": frozenset({1})})
    assert plan(fleet, dirs, lambda a, r: stored[(a, r)], Pins()) == {
        ("a", "r1"): ([0, 1, 2, 3], False),  # newest 6: keeps 4..6
        ("b", "r2"): ([0, 1], True),
    }
    assert plan(fleet, dirs, lambda a, r: stored[(a, r)], keep_saved)[("b", "r2")] == ([0], False)
