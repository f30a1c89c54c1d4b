"""The lifecycle of one adapter registration: a pure state machine over control-log events.

:func:`transition` ``(state, event) -> state`` is a pure function of its inputs (no clock, no I/O),
so a process rebuilds the same view by replaying the control log, and tests drive it directly.
:func:`decide` returns the same new state plus a :class:`Verdict` and a reason, for logging.

Phases (the table below is the complete list of moves)::

    registered ─► queued ─► admitted ─► running ─► completing ─► completed ─► retired
    registered ─► rejected
    registered | queued | admitted | running ─► cancelled ─► retired
    registered | queued | admitted | running | completing ─► failed ─► retired
    admitted | running ─► admitted      (re-admission after a trainer restart, epoch bumped)

Events are classified into :class:`Kind` s: the event type, except that a ``step_done`` reaching the
step budget (``step >= spec.steps``) is ``step_done(last)`` and a ``completed`` with
``reason="cancelled"`` is ``completed(cancelled)``. The transition table :data:`TRANSITIONS`,
keyed by (phase, kind); ``-`` is "no state yet"::

    phase        kind                  -> phase
    -----------  --------------------  -----------
    -            register_requested    registered
    -            rejected              rejected
    registered   rejected              rejected
    registered   queued                queued
    registered   admitted              admitted
    registered   deregister_requested  cancelled
    registered   failed                failed
    queued       queued                queued
    queued       admitted              admitted
    queued       deregister_requested  cancelled
    queued       failed                failed
    admitted     admitted              admitted
    admitted     sync_requested        running
    admitted     step_done             running
    admitted     step_done(last)       completing
    admitted     deregister_requested  cancelled
    admitted     failed                failed
    running      admitted              admitted
    running      sync_requested        running
    running      step_done             running
    running      step_done(last)       completing
    running      deregister_requested  cancelled
    running      failed                failed
    completing   sync_requested        completing
    completing   completed             completed
    completing   failed                failed
    completed    retired               retired
    cancelled    completed(cancelled)  cancelled
    cancelled    retired               retired
    failed       retired               retired

Meaning of the phases (who acts on them):

- ``registered``: admission accepted the spec and republished it on the control log; it waits
  for a slot, like ``queued`` (``queued`` only records that the trainer said so).
- ``admitted``: the trainer gave it slot ``slot`` under ``epoch``; ``running`` once the trainer
  published weights (``sync_requested``, version 0 at admission) or took a step.
- ``completing``: the step budget is reached; no more tasks, in-flight work is discarded. The
  trainer then publishes ``completed`` (the checkpoint process takes the final checkpoint and
  export from it) and ``retired`` (the slot is reset for the next tenant).
- ``cancelled``: a deregistration before or during training; the trainer publishes
  ``completed(cancelled)`` and ``retired`` when it held a slot. ``failed``: e.g. repeated
  non-finite losses; ``retired`` follows when it held a slot.
- ``retired`` and ``rejected`` are terminal; so are ``cancelled`` and ``failed`` without a slot
  (they never got one, so nothing is retired). :func:`is_ended` says which states are over.

Rules beyond the table (each one makes replay and duplicate delivery safe):

- Routing: an event for another ``registration_id`` is ``FOREIGN`` and changes nothing (a new
  registration of the same name is a new state). That includes a ``deregister_requested`` without
  ``registration_id``: the trainer resolves a by-name cancel to the live registration before it
  republishes it on the control log, because a by-name cancel replayed later would hit a newer
  registration of the name. ``register_requested`` for an existing state is always a
  ``DUPLICATE`` (its idempotency key is the registration id).
- Fencing: every trainer-produced kind except ``admitted`` must carry the state's ``epoch``;
  an older epoch is ``STALE``, a newer one ``INVALID``. Every ``admitted`` must bump the epoch
  (the first one from 0 to >= 1; a re-admission after a trainer restart to a higher one); one
  with the current epoch and slot is a ``DUPLICATE``, an older one ``STALE``.
- Monotonic: a ``step_done`` with ``step <= state.step`` is a ``DUPLICATE``; versions never go
  down (``step_done`` with a lower version is ``INVALID``, ``sync_requested`` with a lower one
  ``STALE``). An admission's ``start_step`` only raises ``step``.
- A (phase, kind) pair missing from the table changes nothing: ``STALE`` when the kind belongs
  to an earlier stage than the phase (a late or replayed event, e.g. ``queued`` while running,
  anything after ``retired``), else ``INVALID`` (a protocol violation worth logging loudly).
- An applicable event that changes no field is a ``DUPLICATE``; ``updated_at`` moves only when
  something changed, so replays never touch the status projection.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, overload

import msgspec

from events.schema import (
    Admitted,
    Completed,
    DeregisterRequested,
    Failed,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    StepDone,
    SyncRequested,
    event_type,
)
from events.specs import AdapterSpec

REWARD_MEAN_METRIC = "reward_mean"
"""Key of ``StepDone.metrics`` whose value the state (and the status projection) shows."""


class Phase(enum.StrEnum):
    REGISTERED = "registered"
    QUEUED = "queued"
    ADMITTED = "admitted"
    RUNNING = "running"
    COMPLETING = "completing"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    RETIRED = "retired"
    REJECTED = "rejected"


class Kind(enum.StrEnum):
    """What an event means to the lifecycle (see the module docstring for the two split kinds)."""

    REGISTER = "register_requested"
    REJECT = "rejected"
    QUEUE = "queued"
    ADMIT = "admitted"
    SYNC = "sync_requested"
    STEP = "step_done"
    LAST_STEP = "step_done(last)"
    COMPLETE = "completed"
    COMPLETE_CANCELLED = "completed(cancelled)"
    DEREGISTER = "deregister_requested"
    FAIL = "failed"
    RETIRE = "retired"


class Verdict(enum.StrEnum):
    """Why a state did or did not change. Only ``APPLIED`` changes anything."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already applied (replay or at-least-once redelivery)
    STALE = "stale"  # older epoch, or a late event of an earlier stage
    FOREIGN = "foreign"  # another registration's event
    UNKNOWN = "unknown"  # no state yet, and this event cannot start one
    IGNORED = "ignored"  # not a lifecycle event (synced, checkpoint_saved, rollout work ...)
    INVALID = "invalid"  # not allowed in this phase: a protocol violation


TRANSITIONS: dict[tuple[Phase | None, Kind], Phase] = {  # None: no state yet
    (None, Kind.REGISTER): Phase.REGISTERED,
    (None, Kind.REJECT): Phase.REJECTED,
    (Phase.REGISTERED, Kind.REJECT): Phase.REJECTED,
    (Phase.REGISTERED, Kind.QUEUE): Phase.QUEUED,
    (Phase.REGISTERED, Kind.ADMIT): Phase.ADMITTED,
    (Phase.REGISTERED, Kind.DEREGISTER): Phase.CANCELLED,
    (Phase.REGISTERED, Kind.FAIL): Phase.FAILED,
    (Phase.QUEUED, Kind.QUEUE): Phase.QUEUED,
    (Phase.QUEUED, Kind.ADMIT): Phase.ADMITTED,
    (Phase.QUEUED, Kind.DEREGISTER): Phase.CANCELLED,
    (Phase.QUEUED, Kind.FAIL): Phase.FAILED,
    (Phase.ADMITTED, Kind.ADMIT): Phase.ADMITTED,
    (Phase.ADMITTED, Kind.SYNC): Phase.RUNNING,
    (Phase.ADMITTED, Kind.STEP): Phase.RUNNING,
    (Phase.ADMITTED, Kind.LAST_STEP): Phase.COMPLETING,
    (Phase.ADMITTED, Kind.DEREGISTER): Phase.CANCELLED,
    (Phase.ADMITTED, Kind.FAIL): Phase.FAILED,
    (Phase.RUNNING, Kind.ADMIT): Phase.ADMITTED,
    (Phase.RUNNING, Kind.SYNC): Phase.RUNNING,
    (Phase.RUNNING, Kind.STEP): Phase.RUNNING,
    (Phase.RUNNING, Kind.LAST_STEP): Phase.COMPLETING,
    (Phase.RUNNING, Kind.DEREGISTER): Phase.CANCELLED,
    (Phase.RUNNING, Kind.FAIL): Phase.FAILED,
    (Phase.COMPLETING, Kind.SYNC): Phase.COMPLETING,
    (Phase.COMPLETING, Kind.COMPLETE): Phase.COMPLETED,
    (Phase.COMPLETING, Kind.FAIL): Phase.FAILED,
    (Phase.COMPLETED, Kind.RETIRE): Phase.RETIRED,
    (Phase.CANCELLED, Kind.COMPLETE_CANCELLED): Phase.CANCELLED,
    (Phase.CANCELLED, Kind.RETIRE): Phase.RETIRED,
    (Phase.FAILED, Kind.RETIRE): Phase.RETIRED,
}

WAITING = frozenset({Phase.REGISTERED, Phase.QUEUED})
"""Phases that wait for a slot (the wait queue)."""

TRAINING = frozenset({Phase.ADMITTED, Phase.RUNNING})
"""Phases whose rollout work is accepted and trained on."""

TERMINAL = frozenset({Phase.RETIRED, Phase.REJECTED})

# Stage of each phase: a kind whose source phases all lie at an earlier stage than the current
# phase is late (STALE), not a protocol violation.
_STAGE: dict[Phase | None, int] = {
    None: -1,
    Phase.REGISTERED: 0,
    Phase.QUEUED: 1,
    Phase.ADMITTED: 2,
    Phase.RUNNING: 3,
    Phase.COMPLETING: 4,
    Phase.COMPLETED: 5,
    Phase.CANCELLED: 5,
    Phase.FAILED: 5,
    Phase.RETIRED: 6,
    Phase.REJECTED: 6,
}
_LATEST_SOURCE: dict[Kind, int] = {
    kind: max(_STAGE[p] for (p, k) in TRANSITIONS if k is kind) for kind in Kind
}
_FENCED = frozenset(Kind) - {Kind.REGISTER, Kind.REJECT, Kind.ADMIT, Kind.DEREGISTER}


class AdapterState(msgspec.Struct, frozen=True, kw_only=True):
    """One registration's lifecycle state (a value: every change makes a new one).

    ``registration_id`` identifies the registration (the producer's id, or the event id of its
    ``register_requested``); ``epoch`` is the fencing token (0 until admitted); ``slot`` is set
    from admission until retirement; ``step``/``version`` are the last optimizer step and
    published weights version (both only increase); ``state_uri`` is the durable training state
    of the last step (the resume point). ``spec`` is None only for a registration rejected
    before its spec could be decoded. ``arrival`` is the order in which the owning fleet first
    saw the registration (the FIFO tie-break of the wait queue); ``registered_at`` and
    ``updated_at`` are event times (seconds since the epoch), never the local clock.
    ``reason`` says why a registration was rejected, cancelled or failed (``"budget"`` when
    completed). ``reward_mean`` is the last step's reward mean (None when absent or not finite).
    ``final_step`` is the step of the ``completed`` event.
    """

    name: str
    registration_id: str
    phase: Phase
    epoch: int = 0
    slot: int | None = None
    step: int = 0
    version: int = 0
    spec: AdapterSpec | None = None
    priority: int = 0
    arrival: int = 0
    registered_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    reward_mean: float | None = None
    state_uri: str = ""
    final_step: int | None = None

    @property
    def steps_total(self) -> int | None:
        """The step budget, or None without a spec."""
        return self.spec.steps if self.spec is not None else None


class Outcome(msgspec.Struct, frozen=True):
    """The result of :func:`decide`: the (possibly unchanged) state, a verdict and a reason."""

    state: AdapterState | None
    verdict: Verdict
    reason: str = ""


def registration_key(event: Any) -> str:
    """The registration an event belongs to: its ``registration_id``, else its event ``id``.

    Admission assigns ``registration_id`` before republishing a registration on the control log,
    so the fallback only matters for ``rejected`` events of undecodable ingress entries.
    """
    return str(event.registration_id or event.id)


def kind_of(state: AdapterState | None, event: Any) -> Kind | None:
    """The lifecycle kind of ``event`` (None: the event does not concern the lifecycle)."""
    if isinstance(event, StepDone):
        budget = state.steps_total if state is not None else None
        return Kind.LAST_STEP if budget is not None and event.step >= budget else Kind.STEP
    if isinstance(event, Completed):
        return Kind.COMPLETE_CANCELLED if event.reason == "cancelled" else Kind.COMPLETE
    return _KIND_OF_TYPE.get(type(event))


_KIND_OF_TYPE: dict[type, Kind] = {
    RegisterRequested: Kind.REGISTER,
    Rejected: Kind.REJECT,
    Queued: Kind.QUEUE,
    Admitted: Kind.ADMIT,
    SyncRequested: Kind.SYNC,
    DeregisterRequested: Kind.DEREGISTER,
    Failed: Kind.FAIL,
    Retired: Kind.RETIRE,
}


def is_waiting(state: AdapterState) -> bool:
    """Whether the registration waits for a slot."""
    return state.phase in WAITING


def is_live(state: AdapterState) -> bool:
    """Whether the registration waits for or holds a slot (its name is taken while it is live)."""
    return state.phase in WAITING or (state.slot is not None and state.phase is not Phase.RETIRED)


def is_ended(state: AdapterState) -> bool:
    """Whether no event can change the registration any more (see the module docstring)."""
    return not is_live(state)


def tombstone(state: AdapterState) -> AdapterState:
    """An ended registration reduced to what recognising its late events and its id needs: the
    same state without its spec (dataset, rewards, sampling, optimizer: most of its bytes), so
    :attr:`AdapterState.steps_total` becomes None. Only ended states (:func:`is_ended`) may be
    reduced: nothing reads an ended registration's spec (its status hash keeps the budget)."""
    if not is_ended(state):
        raise ValueError(f"registration {state.registration_id!r} is live: not a tombstone")
    return state if state.spec is None else msgspec.structs.replace(state, spec=None)


@overload
def transition(state: AdapterState, event: Any) -> AdapterState: ...
@overload
def transition(state: None, event: Any) -> AdapterState | None: ...
def transition(state: AdapterState | None, event: Any) -> AdapterState | None:
    """The state after ``event``; the same object when the event changes nothing."""
    return decide(state, event).state


def explain(state: AdapterState | None, event: Any) -> str:
    """Why ``event`` does or does not change ``state`` (``""`` when it is applied)."""
    return decide(state, event).reason


def decide(state: AdapterState | None, event: Any) -> Outcome:
    """Apply the table and its guards; see the module docstring for every rule."""
    kind = kind_of(state, event)
    tag = event_type(event)
    if kind is None:
        return Outcome(state, Verdict.IGNORED, f"{tag} does not change the lifecycle")
    if state is None:
        target = TRANSITIONS.get((None, kind))
        if target is None:
            key = registration_key(event)
            return Outcome(None, Verdict.UNKNOWN, f"{tag} for unknown registration {key!r}")
        return Outcome(_start(event, target), Verdict.APPLIED)
    if registration_key(event) != state.registration_id:
        return Outcome(state, Verdict.FOREIGN, f"{tag} is for another registration")
    if event.adapter != state.name:
        reason = (
            f"{tag} names adapter {event.adapter!r} but registration "
            f"{state.registration_id!r} belongs to {state.name!r}"
        )
        return Outcome(state, Verdict.INVALID, reason)
    if kind is Kind.REGISTER:
        return Outcome(state, Verdict.DUPLICATE, "registration already known")
    target = TRANSITIONS.get((state.phase, kind))
    if target is None:
        late = _STAGE[state.phase] > _LATEST_SOURCE[kind] or is_ended(state)
        verdict = Verdict.STALE if late else Verdict.INVALID
        return Outcome(state, verdict, f"{kind} is not valid in phase {state.phase}")
    if kind in _FENCED and event.epoch != state.epoch:
        verdict = Verdict.STALE if event.epoch < state.epoch else Verdict.INVALID
        reason = f"{tag} carries epoch {event.epoch}, the registration is at {state.epoch}"
        return Outcome(state, verdict, reason)
    result = _GUARDS[kind](state, event, target)
    if isinstance(result, Outcome):
        return result
    if result == state:
        return Outcome(state, Verdict.DUPLICATE, f"{kind} changes nothing")
    return Outcome(msgspec.structs.replace(result, updated_at=event.time), Verdict.APPLIED)


def _start(event: Any, phase: Phase) -> AdapterState:
    spec = event.spec if isinstance(event, RegisterRequested) else None
    return AdapterState(
        name=event.adapter,
        registration_id=registration_key(event),
        phase=phase,
        spec=spec,
        priority=spec.priority if spec is not None else 0,
        registered_at=event.time,
        updated_at=event.time,
        reason=event.reason if isinstance(event, Rejected) else "",
    )


_Result = AdapterState | Outcome
_replace = msgspec.structs.replace


def _reject(state: AdapterState, event: Rejected, target: Phase) -> _Result:
    return _replace(state, phase=target, reason=event.reason)


def _queue(state: AdapterState, event: Queued, target: Phase) -> _Result:
    return _replace(state, phase=target)


def _admit(state: AdapterState, event: Admitted, target: Phase) -> _Result:
    if event.epoch <= state.epoch:
        if event.epoch == state.epoch and event.slot == state.slot:
            return Outcome(state, Verdict.DUPLICATE, f"epoch {event.epoch} already admitted")
        verdict = Verdict.INVALID if state.slot is None else Verdict.STALE
        reason = f"an admission must raise the epoch above {state.epoch}, got {event.epoch}"
        return Outcome(state, verdict, reason)
    if event.slot < 0:
        return Outcome(state, Verdict.INVALID, f"admitted to slot {event.slot}; slots are >= 0")
    step = max(state.step, event.start_step)
    return _replace(state, phase=target, epoch=event.epoch, slot=event.slot, step=step)


def _sync(state: AdapterState, event: SyncRequested, target: Phase) -> _Result:
    if event.version < state.version:
        reason = f"version {event.version} is older than the current {state.version}"
        return Outcome(state, Verdict.STALE, reason)
    return _replace(state, phase=target, version=event.version)


def _step(state: AdapterState, event: StepDone, target: Phase) -> _Result:
    if event.step <= state.step:
        return Outcome(state, Verdict.DUPLICATE, f"step {event.step} already done")
    if event.version < state.version:
        reason = (
            f"step {event.step} publishes version {event.version}, below the current "
            f"{state.version}; versions only increase"
        )
        return Outcome(state, Verdict.INVALID, reason)
    reward = event.metrics.get(REWARD_MEAN_METRIC)
    return _replace(
        state,
        phase=target,
        step=event.step,
        version=event.version,
        state_uri=event.state_uri or state.state_uri,
        reward_mean=reward if reward is not None and math.isfinite(reward) else None,
    )


def _complete(state: AdapterState, event: Completed, target: Phase) -> _Result:
    reason = state.reason if event.reason == "cancelled" else event.reason
    return _replace(state, phase=target, final_step=event.step, reason=reason)


def _deregister(state: AdapterState, event: DeregisterRequested, target: Phase) -> _Result:
    return _replace(state, phase=target, reason=event.reason or "cancelled")


def _fail(state: AdapterState, event: Failed, target: Phase) -> _Result:
    return _replace(state, phase=target, reason=event.reason)


def _retire(state: AdapterState, event: Retired, target: Phase) -> _Result:
    if state.slot is None or event.slot != state.slot:
        reason = f"retired slot {event.slot}, but the registration holds slot {state.slot}"
        return Outcome(state, Verdict.INVALID, reason)
    return _replace(state, phase=target, slot=None)


_GUARDS: dict[Kind, Callable[[AdapterState, Any, Phase], _Result]] = {
    Kind.REJECT: _reject,
    Kind.QUEUE: _queue,
    Kind.ADMIT: _admit,
    Kind.SYNC: _sync,
    Kind.STEP: _step,
    Kind.LAST_STEP: _step,
    Kind.COMPLETE: _complete,
    Kind.COMPLETE_CANCELLED: _complete,
    Kind.DEREGISTER: _deregister,
    Kind.FAIL: _fail,
    Kind.RETIRE: _retire,
}


def render_table() -> str:
    """The transition table as printed in the module docstring (a test keeps them equal)."""
    rows = [("phase", "kind", "-> phase"), ("-" * 11, "-" * 20, "-" * 11)]
    rows += [(p.value if p else "-", k.value, t.value) for (p, k), t in TRANSITIONS.items()]
    return "\n".join(f"{a:<11}  {b:<20}  {c}".rstrip() for a, b, c in rows)


def accepts_work(state: AdapterState | None, registration_id: str, epoch: int) -> bool:
    """Fencing of rollout work: whether work of ``registration_id`` under ``epoch`` is wanted now.

    True only when ``state`` is that registration, in a training phase (:data:`TRAINING`), at its
    current epoch: the rule the rollout worker fences tasks with and the trainer's
    :meth:`~orchestrator.fleet.Fleet.accepts_group` fences groups with.
    """
    return (
        state is not None
        and state.registration_id == registration_id
        and state.phase in TRAINING
        and state.epoch == epoch
    )
