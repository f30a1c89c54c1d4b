"""The trainer's whole view of its adapters: every registration, the slot pool and the wait queue.

A :class:`Fleet` is an immutable value. :meth:`Fleet.apply` returns a new fleet after one
control-log event (via :func:`orchestrator.lifecycle.decide`), so the view is a left fold over the
log: :meth:`Fleet.replay` of the log from the start gives a fleet equal to the live one (the
trainer restarts that way). Duplicated and replayed events are no-ops, so the trainer may apply
its own events when it publishes them and again when it reads them back.

On top of the per-registration rules the fleet enforces what needs the whole view:

- a ``register_requested`` for a name that has a live registration starts a ``rejected`` state
  (admission refuses such a registration before it reaches the log; this covers raw writes to
  the log, and remembering the decision keeps a later redelivery of it a no-op);
- an ``admitted`` must name a slot in ``[0, slots)`` that no other live registration holds
  (``INVALID`` otherwise);
- a ``deregister_requested`` must name its registration; the trainer resolves a by-name cancel
  from ingress with :meth:`Fleet.current` (when :meth:`Fleet.is_active_name`) before it
  republishes it, so a replayed cancel never hits a newer registration of the same name.

An ``INVALID`` event is a protocol violation by its producer. It changes nothing, but unlike a
duplicate it is not remembered, so it could apply if delivered again once it became valid: the
trainer checks :meth:`Fleet.explain` before it publishes an event, and publishes only ``APPLIED``
ones.

Wait queue order: ``(-priority, arrival)``: higher priority first, first come first served within
a priority, where ``arrival`` counts registrations in the order the fleet first saw them.

How the trainer drives it (every publish: ``new = fleet.apply(event)``, then commit the event and
:func:`orchestrator.status.fleet_status_effects` ``(streams, fleet, new)`` with the ack)::

    ingress register_requested e, key = registration_key(e):
        fleet.get(key) is not None      -> a retried registration: drop it
        Admission.check(e, fleet)       -> Reject: publish Rejected(registration_id=key, ...)
                                           Admit:  publish e with registration_id=key
    after any change:
        for state, slot in fleet.next_admissions():
            publish Admitted(epoch=state.epoch + 1, slot=slot, ...), SyncRequested(version 0)
        for position, state in enumerate(fleet.waiting()): publish Queued(position) if new
    ingress deregister_requested by name -> resolve to fleet.current(name) first (see above)
    rollout group g                     -> train on it only if fleet.accepts_group(g.adapter,
                                           g.registration_id, g.epoch, g.version)
    restart                             -> Fleet.replay(S, control log), then re-admit every
                                           fleet.running() under epoch + 1 (start_step=step,
                                           weights from state.state_uri) and finish the ones
                                           that hold a slot in completing/cancelled/failed

Memory: every registration ever seen stays (ended ones as small tombstones), so late events of a
retired registration are recognised as stale and a retried registration id is never registered
twice. The wait queue and the slot map are indexed; the queries a train step makes cost
O(live registrations), an :meth:`apply` copies O(all registrations) references.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from events.errors import ConfigError
from events.schema import Admitted
from orchestrator.lifecycle import (
    TRAINING,
    AdapterState,
    Outcome,
    Phase,
    Verdict,
    accepts_work,
    decide,
    is_live,
    is_waiting,
    registration_key,
)


class Fleet:
    """All registrations of one trainer (``slots`` adapter slots); see the module docstring.

    Never mutated after construction: every method is a query or returns a new fleet.
    """

    __slots__ = ("_active", "_arrivals", "_latest", "_owners", "_slots", "_states")

    def __init__(self, slots: int) -> None:
        """An empty fleet with ``slots`` adapter slots (the trainer's ``S``, >= 1)."""
        if slots < 1:
            raise ConfigError(f"a fleet needs at least one slot, got slots={slots}")
        self._slots = slots
        self._states: dict[str, AdapterState] = {}  # registration key -> state, by arrival
        self._active: dict[str, str] = {}  # name -> key of its live registration
        self._latest: dict[str, str] = {}  # name -> key shown when none is live
        self._owners: dict[int, str] = {}  # slot -> key of the registration holding it
        self._arrivals = 0

    @classmethod
    def replay(cls, slots: int, events: Iterable[Any]) -> Fleet:
        """The fleet after applying ``events`` in order to an empty one."""
        fleet = cls(slots)
        for event in events:
            fleet = fleet.apply(event)
        return fleet

    # --- reducing -----------------------------------------------------------------------------

    def explain(self, event: Any) -> Outcome:
        """What :meth:`apply` would do with ``event``: the new state of its registration, the
        verdict and a reason (the state is None when the event names no known registration)."""
        key = registration_key(event)
        before = self._states.get(key)
        outcome = decide(before, event)
        after = outcome.state
        if outcome.verdict is not Verdict.APPLIED or after is None:
            return outcome
        if before is None:
            holder = self._active.get(after.name)
            reason = ""
            if holder is not None and is_live(after):
                reason = (
                    f"adapter {after.name!r} already has the live registration {holder!r}; "
                    "deregister it or wait until it retires"
                )
                after = msgspec.structs.replace(after, phase=Phase.REJECTED, reason=reason)
            after = msgspec.structs.replace(after, arrival=self._arrivals)
            return Outcome(after, Verdict.APPLIED, reason)
        if isinstance(event, Admitted):
            problem = self._slot_problem(key, event.slot)
            if problem:
                return Outcome(before, Verdict.INVALID, problem)
        return Outcome(after, Verdict.APPLIED)

    def apply(self, event: Any) -> Fleet:
        """The fleet after ``event`` (``self`` when the event changes nothing)."""
        outcome = self.explain(event)
        if outcome.verdict is not Verdict.APPLIED or outcome.state is None:
            return self
        return self._with(outcome.state)

    def _slot_problem(self, key: str, slot: int) -> str:
        if not 0 <= slot < self._slots:
            return f"slot {slot} does not exist; this trainer has slots 0..{self._slots - 1}"
        owner = self._owners.get(slot)
        if owner is not None and owner != key:
            return f"slot {slot} is held by registration {owner!r}"
        return ""

    def _with(self, state: AdapterState) -> Fleet:
        key = state.registration_id
        before = self._states.get(key)
        new = Fleet.__new__(Fleet)
        new._slots = self._slots
        new._states = {**self._states, key: state}
        new._active = dict(self._active)
        new._latest = self._latest
        new._owners = dict(self._owners)
        new._arrivals = self._arrivals
        if before is None:
            new._arrivals += 1
            if state.name not in self._active:  # rejected while another is live: not shown
                new._latest = {**self._latest, state.name: key}
        if before is not None and before.slot is not None and new._owners.get(before.slot) == key:
            del new._owners[before.slot]
        if state.slot is not None:
            new._owners[state.slot] = key
        if is_live(state):
            new._active[state.name] = key
        elif new._active.get(state.name) == key:
            del new._active[state.name]
        return new

    # --- queries ------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Number of adapter slots ``S``."""
        return self._slots

    def get(self, registration_id: str) -> AdapterState | None:
        """The state of one registration (None if unknown)."""
        return self._states.get(registration_id)

    def states(self) -> tuple[AdapterState, ...]:
        """Every registration ever seen, in arrival order."""
        return tuple(self._states.values())

    def live(self) -> tuple[AdapterState, ...]:
        """Registrations that wait for or hold a slot, in arrival order."""
        keys = set(self._active.values())
        return tuple(s for k, s in self._states.items() if k in keys)

    def current(self, name: str) -> AdapterState | None:
        """The registration the status of ``name`` shows: the live one, else the latest one that
        arrived while the name had no live registration (a registration rejected because the
        name was taken never replaces the one it collided with)."""
        key = self._active.get(name) or self._latest.get(name)
        return self._states[key] if key is not None else None

    def is_active_name(self, name: str) -> bool:
        """Whether ``name`` has a live registration (a new registration of it is refused)."""
        return name in self._active

    def slot_owner(self, slot: int) -> AdapterState | None:
        """The registration holding ``slot`` (None if free)."""
        key = self._owners.get(slot)
        return self._states[key] if key is not None else None

    def free_slots(self) -> tuple[int, ...]:
        """Slots nobody holds, ascending."""
        return tuple(s for s in range(self._slots) if s not in self._owners)

    def waiting(self) -> tuple[AdapterState, ...]:
        """The wait queue, head first: ordered by ``(-priority, arrival)``."""
        queue = [self._states[k] for k in self._active.values()]
        return tuple(sorted((s for s in queue if is_waiting(s)), key=_queue_order))

    def queue_position(self, registration_id: str) -> int | None:
        """Position of a waiting registration (0 = admitted next); None if it does not wait."""
        for position, state in enumerate(self.waiting()):
            if state.registration_id == registration_id:
                return position
        return None

    def next_admissions(self) -> list[tuple[AdapterState, int]]:
        """Who to admit now, and to which slot: the queue head onto the lowest free slots.

        The trainer publishes one ``Admitted(adapter=state.name,
        registration_id=state.registration_id, epoch=state.epoch + 1, slot=slot,
        spec=state.spec)`` per pair, then ``Queued`` for those still waiting.
        """
        return list(zip(self.waiting(), self.free_slots(), strict=False))

    def running(self) -> tuple[AdapterState, ...]:
        """Registrations the trainer trains now (admitted or running), by slot."""
        held = (self._states[self._owners[slot]] for slot in sorted(self._owners))
        return tuple(s for s in held if s.phase in TRAINING)

    def accepts_group(self, adapter: str, registration_id: str, epoch: int, version: int) -> bool:
        """Fencing: whether rollout work tagged with these fields may be trained on.

        True only for the live registration of ``adapter``, at its current ``epoch``, while it
        is admitted or running (not completing, cancelled, failed or retired), for a weights
        ``version`` between 0 and the newest published one. Staleness limits
        (``spec.max_staleness``) are the trainer's flow control, not checked here.
        """
        state = self._states.get(registration_id)
        return (
            accepts_work(state, registration_id, epoch)
            and state is not None
            and state.name == adapter
            and self._active.get(adapter) == registration_id
            and 0 <= version <= state.version
        )

    def changed(self, before: Fleet) -> tuple[AdapterState, ...]:
        """States of this fleet that are new or different from ``before`` (arrival order)."""
        old = before._states
        return tuple(s for k, s in self._states.items() if (o := old.get(k)) is not s and o != s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fleet):
            return NotImplemented
        return (
            self._slots == other._slots
            and self._arrivals == other._arrivals
            and self._states == other._states
            and self._active == other._active
            and self._latest == other._latest
            and self._owners == other._owners
        )

    __hash__ = None  # type: ignore[assignment]  # a value, but not hashable (holds dicts)

    def __repr__(self) -> str:
        live = ", ".join(f"{s.name}:{s.phase}" for s in self.live())
        return f"Fleet(slots={self._slots}, registrations={len(self._states)}, live=[{live}])"


def _queue_order(state: AdapterState) -> tuple[int, int]:
    return (-state.priority, state.arrival)
