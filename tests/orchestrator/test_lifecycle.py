"""The per-registration state machine: every row of the table, every missing row, every guard."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from events.schema import CheckpointSaved, Exported, Retired, RolloutTask, StepDone, Synced
from events.specs import SamplingSpec
from orchestrator import lifecycle
from orchestrator.lifecycle import (
    TRANSITIONS,
    AdapterState,
    Kind,
    Phase,
    Verdict,
    decide,
    explain,
    is_ended,
    is_live,
    transition,
)
from tests.orchestrator import builders as b

STEPS = 3


def _path(phase: Phase | None, *, slotless: bool = False) -> list[Callable[[Any], Any]]:
    """Builders (state -> event) that lead a fresh registration into ``phase``."""
    start: list[Callable[[Any], Any]] = [lambda s: b.register("a", "r1", steps=STEPS)]
    to_admitted = [*start, lambda s: b.admitted(s, slot=1)]
    to_running = [*to_admitted, lambda s: b.sync(s)]
    to_completing = [*to_running] + [lambda s: b.step_done(s)] * STEPS
    paths: dict[Phase | None, list[Callable[[Any], Any]]] = {
        None: [],
        Phase.REGISTERED: start,
        Phase.QUEUED: [*start, lambda s: b.queued(s)],
        Phase.ADMITTED: to_admitted,
        Phase.RUNNING: to_running,
        Phase.COMPLETING: to_completing,
        Phase.COMPLETED: [*to_completing, lambda s: b.completed(s)],
        Phase.CANCELLED: [*(start if slotless else to_running), lambda s: b.deregister(s)],
        Phase.FAILED: [*(start if slotless else to_running), lambda s: b.failed(s)],
        Phase.RETIRED: [*to_completing, lambda s: b.completed(s), lambda s: b.retired(s)],
        Phase.REJECTED: [lambda s: b.rejected("a", "r1")],
    }
    return paths[phase]


def reach(phase: Phase | None, *, slotless: bool = False) -> AdapterState | None:
    state: AdapterState | None = None
    for build in _path(phase, slotless=slotless):
        outcome = decide(state, build(state))
        assert outcome.verdict is Verdict.APPLIED, outcome
        state = outcome.state
    assert (state.phase if state else None) is phase
    return state


def event_of(kind: Kind, state: AdapterState | None) -> Any:
    """A representative, otherwise valid event of ``kind`` for ``state``."""
    if kind is Kind.REGISTER:
        return b.register("a", "r1", steps=STEPS)
    if kind is Kind.REJECT:
        return b.rejected("a", "r1", "rank too big")
    assert state is not None
    if kind is Kind.QUEUE:
        return b.queued(state)
    if kind is Kind.ADMIT:
        return b.admitted(state, slot=state.slot if state.slot is not None else 0)
    if kind is Kind.SYNC:
        return b.sync(state, state.version + 1)
    if kind is Kind.STEP:
        return b.step_done(state)
    if kind is Kind.LAST_STEP:
        return msgspec.structs.replace(b.step_done(state), step=STEPS, version=state.version + 9)
    if kind is Kind.COMPLETE:
        return b.completed(state)
    if kind is Kind.COMPLETE_CANCELLED:
        return b.completed(state, cancelled=True)
    if kind is Kind.DEREGISTER:
        return b.deregister(state)
    if kind is Kind.FAIL:
        return b.failed(state)
    if kind is Kind.RETIRE:
        slot = state.slot if state.slot is not None else 0
        return Retired(adapter=state.name, registration_id="r1", epoch=state.epoch, slot=slot)
    raise AssertionError(kind)


PHASES: list[Phase | None] = [None, *Phase]


@pytest.mark.parametrize(("phase", "kind"), list(TRANSITIONS), ids=lambda x: str(x))
def test_every_row_of_the_table_applies(phase: Phase | None, kind: Kind) -> None:
    state = reach(phase)
    event = event_of(kind, state)
    assert lifecycle.kind_of(state, event) is kind
    outcome = decide(state, event)
    target = TRANSITIONS[(phase, kind)]
    if phase is Phase.QUEUED and kind is Kind.QUEUE:
        assert outcome.verdict is Verdict.DUPLICATE  # a self-loop that changes nothing
    else:
        assert outcome.verdict is Verdict.APPLIED, outcome.reason
        assert outcome.reason == explain(state, event) == ""
    assert outcome.state is not None and outcome.state.phase is target
    assert outcome.state.registration_id == "r1" and outcome.state.name == "a"


MISSING = [(p, k) for p in PHASES for k in Kind if (p, k) not in TRANSITIONS]


@pytest.mark.parametrize(("phase", "kind"), MISSING, ids=lambda x: str(x))
def test_every_missing_row_changes_nothing(phase: Phase | None, kind: Kind) -> None:
    state = reach(phase)
    # with no state yet, an event of a registration never seen
    event = event_of(kind, state if state is not None else reach(Phase.RUNNING))
    outcome = decide(state, event)
    assert outcome.state is state
    if state is None:
        assert outcome.verdict is Verdict.UNKNOWN
    elif kind is Kind.REGISTER:
        assert outcome.verdict is Verdict.DUPLICATE
    else:
        assert outcome.verdict in {Verdict.STALE, Verdict.INVALID}
        assert outcome.reason
    if state is not None and state.phase in lifecycle.TERMINAL and kind is not Kind.REGISTER:
        assert outcome.verdict is Verdict.STALE  # late events never resurrect


@pytest.mark.parametrize(
    ("phase", "kind", "verdict"),
    [
        (Phase.RUNNING, Kind.QUEUE, Verdict.STALE),  # a replayed queued event
        (Phase.RUNNING, Kind.RETIRE, Verdict.INVALID),  # retiring without completing first
        (Phase.RUNNING, Kind.COMPLETE, Verdict.INVALID),
        (Phase.REGISTERED, Kind.SYNC, Verdict.INVALID),
        (Phase.COMPLETING, Kind.DEREGISTER, Verdict.STALE),  # too late to cancel
        (Phase.COMPLETED, Kind.FAIL, Verdict.STALE),
        (Phase.CANCELLED, Kind.STEP, Verdict.STALE),  # a step finished after the cancel
        (Phase.RETIRED, Kind.ADMIT, Verdict.STALE),
    ],
)
def test_missing_rows_are_stale_or_invalid(phase: Phase, kind: Kind, verdict: Verdict) -> None:
    state = reach(phase)
    assert decide(state, event_of(kind, state)).verdict is verdict


def test_table_in_docstring_is_the_table() -> None:
    assert textwrap.indent(lifecycle.render_table(), "    ") in (lifecycle.__doc__ or "")
    assert len(lifecycle.render_table().splitlines()) == len(TRANSITIONS) + 2


def test_full_lifecycle_of_one_registration() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None and (state.slot, state.epoch, state.version) == (1, 1, 0)
    state = transition(state, b.step_done(state, reward=0.25))
    assert (state.phase, state.step, state.version, state.reward_mean) == (
        Phase.RUNNING,
        1,
        1,
        0.25,
    )
    assert state.state_uri == "mem://r1/1"
    state = transition(state, b.sync(state))
    state = transition(state, b.step_done(state))
    state = transition(state, b.step_done(state))
    assert (state.phase, state.step) == (Phase.COMPLETING, STEPS)
    state = transition(state, b.completed(state))
    assert (state.phase, state.reason, state.final_step) == (Phase.COMPLETED, "budget", STEPS)
    assert is_live(state) and state.slot == 1
    state = transition(state, b.retired(state))
    assert (state.phase, state.slot) == (Phase.RETIRED, None)
    assert is_ended(state)


def test_duplicates_change_nothing_not_even_updated_at() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    first = b.step_done(state, t=50.0)
    after = transition(state, first)
    assert after.updated_at == 50.0
    again = msgspec.structs.replace(first, time=99.0)
    outcome = decide(after, again)
    assert outcome.verdict is Verdict.DUPLICATE and outcome.state is after
    older = msgspec.structs.replace(first, step=0, version=7)
    assert decide(after, older).verdict is Verdict.DUPLICATE
    assert decide(after, b.sync(after)).verdict is Verdict.DUPLICATE
    assert decide(after, b.sync(after, 0)).verdict is Verdict.STALE
    assert decide(after, b.register("a", "r1")).verdict is Verdict.DUPLICATE


def test_versions_never_go_down() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    state = transition(state, b.sync(state, 5))
    lower = msgspec.structs.replace(b.step_done(state), version=3)
    outcome = decide(state, lower)
    assert outcome.verdict is Verdict.INVALID and "versions only increase" in outcome.reason
    assert outcome.state is state
    gap = msgspec.structs.replace(b.step_done(state), step=2, version=5)
    state = transition(state, gap)  # steps may skip (after a resume), versions may stay equal
    assert (state.step, state.version) == (2, 5)


def test_epoch_fencing() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    stale = msgspec.structs.replace(b.step_done(state), epoch=state.epoch - 1)
    future = msgspec.structs.replace(b.step_done(state), epoch=state.epoch + 1)
    assert decide(state, stale).verdict is Verdict.STALE
    assert decide(state, future).verdict is Verdict.INVALID
    assert "epoch 2" in explain(state, future)


def test_admission_bumps_the_epoch() -> None:
    registered = reach(Phase.REGISTERED)
    assert registered is not None
    no_bump = msgspec.structs.replace(b.admitted(registered, 0), epoch=0)
    assert decide(registered, no_bump).verdict is Verdict.INVALID
    negative = b.admitted(registered, -1)
    assert decide(registered, negative).verdict is Verdict.INVALID
    running = reach(Phase.RUNNING)
    assert running is not None
    running = transition(running, b.step_done(running))
    same = msgspec.structs.replace(b.admitted(running, 1), epoch=running.epoch)
    assert decide(running, same).verdict is Verdict.DUPLICATE
    moved = msgspec.structs.replace(b.admitted(running, 2), epoch=running.epoch)
    assert decide(running, moved).verdict is Verdict.STALE
    resumed = transition(running, b.admitted(running, 2, start_step=0))
    assert (resumed.phase, resumed.epoch, resumed.slot) == (Phase.ADMITTED, 2, 2)
    assert (resumed.step, resumed.version) == (1, 1)  # start_step never lowers the step
    ahead = transition(running, b.admitted(running, 1, start_step=2))
    assert ahead.step == 2
    assert transition(resumed, b.sync(resumed)).phase is Phase.RUNNING


def test_last_step_is_decided_by_the_budget() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    beyond = msgspec.structs.replace(b.step_done(state), step=STEPS + 5, version=STEPS + 5)
    assert lifecycle.kind_of(state, beyond) is Kind.LAST_STEP
    assert transition(state, beyond).phase is Phase.COMPLETING
    assert lifecycle.kind_of(None, beyond) is Kind.STEP


def test_other_registrations_and_names() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    other = msgspec.structs.replace(b.step_done(state), registration_id="r2")
    assert decide(state, other).verdict is Verdict.FOREIGN
    by_name = msgspec.structs.replace(b.deregister(state), registration_id="")
    assert decide(state, by_name).verdict is Verdict.FOREIGN  # the trainer resolves it first
    renamed = msgspec.structs.replace(b.step_done(state), adapter="b")
    outcome = decide(state, renamed)
    assert outcome.verdict is Verdict.INVALID and "'b'" in outcome.reason


def test_retire_needs_the_held_slot() -> None:
    state = reach(Phase.COMPLETED)
    assert state is not None
    wrong = msgspec.structs.replace(b.retired(state), slot=0)
    assert decide(state, wrong).verdict is Verdict.INVALID
    slotless = reach(Phase.CANCELLED, slotless=True)
    assert slotless is not None and slotless.slot is None and is_ended(slotless)
    assert decide(slotless, event_of(Kind.RETIRE, slotless)).verdict is Verdict.INVALID
    failed = reach(Phase.FAILED, slotless=True)
    assert failed is not None and is_ended(failed) and failed.reason == "non-finite loss"


def test_cancel_keeps_its_reason_through_completion() -> None:
    state = reach(Phase.CANCELLED)
    assert state is not None and state.reason == "user stop" and state.slot == 1
    assert is_live(state)  # holds its slot until retired
    state = transition(state, b.completed(state, cancelled=True))
    assert (state.phase, state.reason, state.final_step) == (Phase.CANCELLED, "user stop", 0)
    state = transition(state, b.retired(state))
    assert (state.phase, state.reason) == (Phase.RETIRED, "user stop")


def test_rejected_registration_keeps_its_reason() -> None:
    state = transition(None, b.rejected("Bad Name", "r9", "adapter name 'Bad Name' is invalid"))
    assert state is not None
    assert (state.phase, state.name, state.spec, state.reason) == (
        Phase.REJECTED,
        "Bad Name",
        None,
        "adapter name 'Bad Name' is invalid",
    )
    assert is_ended(state) and state.steps_total is None
    keyless = b.rejected("x", "")
    keyless = msgspec.structs.replace(keyless, id="1700000000-0")
    rejected_state = transition(None, keyless)
    assert rejected_state is not None and rejected_state.registration_id == "1700000000-0"


def test_non_finite_reward_mean_is_not_shown() -> None:
    state = reach(Phase.RUNNING)
    assert state is not None
    state = transition(state, b.step_done(state, reward=float("nan")))
    assert state.step == 1 and state.reward_mean is None
    no_metric = msgspec.structs.replace(b.step_done(state), metrics={})
    assert transition(state, no_metric).reward_mean is None


@pytest.mark.parametrize(
    "event",
    [
        Synced(adapter="a", registration_id="r1", worker="w", version=1, latency_s=0.1),
        CheckpointSaved(adapter="a", registration_id="r1", step=1, uri="/c"),
        Exported(adapter="a", registration_id="r1", step=1, uri="/e"),
        RolloutTask(
            adapter="a",
            registration_id="r1",
            step=1,
            version=0,
            weights_uri="/w",
            prompt_indices=(0,),
            group_size=2,
            dataset=b.make_spec().dataset,
            rewards=b.make_spec().rewards,
            sampling=SamplingSpec(),
        ),
    ],
)
def test_events_outside_the_lifecycle_are_ignored(event: Any) -> None:
    state = reach(Phase.RUNNING)
    outcome = decide(state, event)
    assert outcome.verdict is Verdict.IGNORED and outcome.state is state
    assert decide(None, event).state is None


def test_unknown_registration() -> None:
    step = StepDone(adapter="a", registration_id="nobody", step=1, version=1)
    outcome = decide(None, step)
    assert outcome.verdict is Verdict.UNKNOWN and outcome.state is None
    assert "nobody" in outcome.reason
