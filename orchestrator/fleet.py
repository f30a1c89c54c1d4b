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

Wait queue order (fair admission): higher ``priority`` first; within a priority, fewest slots
first, round-robin across producers; first come first served within one producer. Each waiting
registration gets the key ``(-priority, share, arrival)`` where ``share`` is the number of slots
its producer (``spec.producer``, ``""`` for every anonymous one) holds now plus the number of
that producer's registrations of the same priority ahead of it in the queue, and ``arrival``
counts registrations in the order the fleet first saw them. So the ``k``-th waiting
registration of a producer holding ``h`` slots is served in round ``h + k``: a producer that
floods the queue with 100 registrations delays another producer's one by at most one
admission per round, and a producer that holds many slots yields to those that hold few
(max-min fairness of the slot pool). With a single producer (or none named) this is exactly
``(-priority, arrival)``. The key is a pure function of the fleet, so replay gives the same
queue. Priority is not capped here: a producer trusted to set it can still jump the queue, and
how many registrations one producer may keep waiting is admission's limit
(:mod:`orchestrator.admission`).

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

Memory: every registration ever seen stays, so late events of a retired registration are recognised
as stale and a retried registration id is never registered twice; the compactor reduces ended ones
to tombstones (:func:`tombstone_ended`, their specs dropped) and forgets them after a retention
window (:func:`forget_ended`, :mod:`orchestrator.compaction`). The wait queue and the slot map are
indexed; the queries a train step makes cost O(live registrations), an :meth:`apply` copies O(all
registrations) references.
"""

from __future__ import annotations

from collections import Counter
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
    tombstone,
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
        """The wait queue, head first: fair across producers (see the module docstring)."""
        live = [self._states[k] for k in self._active.values()]
        held = Counter(producer_of(s) for s in live if s.slot is not None)
        ahead: Counter[tuple[str, int]] = Counter()
        keyed: list[tuple[tuple[int, int, int], AdapterState]] = []
        for state in sorted((s for s in live if is_waiting(s)), key=_arrival_order):
            producer = producer_of(state)
            share = held[producer] + ahead[producer, state.priority]
            ahead[producer, state.priority] += 1
            keyed.append((_queue_order(state, share), state))
        keyed.sort(key=lambda pair: pair[0])
        return tuple(state for _, state in keyed)

    def waiting_of(self, producer: str) -> int:
        """How many registrations of ``producer`` (``""``: the anonymous ones) wait for a slot."""
        live = (self._states[k] for k in self._active.values())
        return sum(1 for s in live if is_waiting(s) and producer_of(s) == producer)

    def queue_position(self, registration_id: str) -> int | None:
        """Position of a waiting registration (0 = admitted next); None if it does not wait."""
        for position, state in enumerate(self.waiting()):
            if state.registration_id == registration_id:
                return position
        return None

    def next_admissions(self) -> list[tuple[AdapterState, int]]:
        """Who to admit now, and to which slot: the queue head onto the lowest free slots.

        Several free slots go to the queue's first entries in order; their fair keys already
        count the admissions before them (a producer's second entry is a round later).

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


def producer_of(state: AdapterState) -> str:
    """The producer a registration counts against (``""``: anonymous, or no spec)."""
    return state.spec.producer if state.spec is not None else ""


def _arrival_order(state: AdapterState) -> tuple[int, int]:
    return (-state.priority, state.arrival)


def _queue_order(state: AdapterState, share: int) -> tuple[int, int, int]:
    """The fair queue key: priority, then the producer's round, then arrival."""
    return (-state.priority, share, state.arrival)


# --- snapshots (written and read by orchestrator.compaction) ------------------------------------


class FleetSnapshot(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A :class:`Fleet` as data: everything :meth:`Fleet.__eq__` compares, nothing derived.

    ``states`` are in arrival order (the order :meth:`Fleet.states` returns); ``active``,
    ``latest`` and ``owners`` are the fleet's indexes, stored rather than rebuilt so a restored
    fleet is equal to the one that was saved, field for field.
    """

    slots: int
    arrivals: int
    states: tuple[AdapterState, ...] = ()
    active: dict[str, str] = msgspec.field(default_factory=dict)
    latest: dict[str, str] = msgspec.field(default_factory=dict)
    owners: dict[int, str] = msgspec.field(default_factory=dict)


def fleet_snapshot(fleet: Fleet) -> FleetSnapshot:
    """The snapshot of ``fleet`` (:func:`restore_fleet` gives an equal fleet back)."""
    return FleetSnapshot(
        slots=fleet._slots,
        arrivals=fleet._arrivals,
        states=tuple(fleet._states.values()),
        active=dict(fleet._active),
        latest=dict(fleet._latest),
        owners=dict(fleet._owners),
    )


def restore_fleet(snapshot: FleetSnapshot, slots: int | None = None) -> Fleet:
    """The fleet ``snapshot`` was taken of, with ``slots`` adapter slots (None: the snapshot's).

    A snapshot folded with a wider slot pool (the compactor folds with
    :data:`orchestrator.compaction.READER_SLOTS`, wider than any trainer) restores onto a
    trainer's ``S`` slots as long as no live registration holds a slot ``>= S``; otherwise
    :class:`ConfigError` names the registration and the slot count it needs.
    """
    size = snapshot.slots if slots is None else slots
    if size < 1:
        raise ConfigError(f"a fleet needs at least one slot, got slots={size}")
    high = [(slot, key) for slot, key in snapshot.owners.items() if slot >= size]
    if high:
        slot, key = max(high)
        raise ConfigError(
            f"registration {key!r} holds slot {slot} but this fleet has slots 0..{size - 1}; "
            f"start the trainer with at least {slot + 1} slots (or retire that registration)"
        )
    fleet = Fleet.__new__(Fleet)
    fleet._slots = size
    fleet._arrivals = snapshot.arrivals
    fleet._states = {s.registration_id: s for s in snapshot.states}
    fleet._active = dict(snapshot.active)
    fleet._latest = dict(snapshot.latest)
    fleet._owners = dict(snapshot.owners)
    return fleet


def forget_ended(fleet: Fleet, registration_ids: Iterable[str]) -> Fleet:
    """``fleet`` without the ended registrations ``registration_ids`` (a bounded snapshot).

    Only ended registrations (:func:`~orchestrator.lifecycle.is_live` false) may go; the
    arrival counter is kept, so registrations seen later get the arrival numbers a full replay
    gives them. What a forgotten registration changes: its late events are ``UNKNOWN`` instead
    of ``STALE`` (both no-ops), and a ``register_requested`` replayed with its id would start it
    again, which is why the compactor forgets only registrations ended long before the log's
    tail (:mod:`orchestrator.compaction`). Raises :class:`ConfigError` for a live one.
    """
    doomed = _ended_only(fleet, registration_ids, "can be forgotten")
    states = {k: s for k, s in fleet._states.items() if k not in doomed}
    latest = {name: k for name, k in fleet._latest.items() if k not in doomed}
    return _with(fleet, states, latest)


def tombstone_ended(fleet: Fleet, registration_ids: Iterable[str]) -> Fleet:
    """``fleet`` with the ended registrations ``registration_ids`` reduced to tombstones
    (:func:`~orchestrator.lifecycle.tombstone`: their specs dropped); everything else, the
    indexes included, is unchanged, so every event applies to it as to ``fleet``. Raises
    :class:`ConfigError` for a live one."""
    chosen = _ended_only(fleet, registration_ids, "become tombstones")
    states = {k: tombstone(s) if k in chosen else s for k, s in fleet._states.items()}
    return _with(fleet, states, dict(fleet._latest))


def _ended_only(fleet: Fleet, registration_ids: Iterable[str], what: str) -> set[str]:
    """``registration_ids`` as a set; :class:`ConfigError` if any is live."""
    chosen = set(registration_ids)
    live = sorted(k for k in chosen if (s := fleet._states.get(k)) is not None and is_live(s))
    if live:
        raise ConfigError(f"registrations {live} are live; only ended ones {what}")
    return chosen


def _with(fleet: Fleet, states: dict[str, AdapterState], latest: dict[str, str]) -> Fleet:
    """``fleet`` with other ``states`` and ``latest`` (slots, arrivals and indexes kept)."""
    new = Fleet.__new__(Fleet)
    new._slots = fleet._slots
    new._arrivals = fleet._arrivals
    new._states = states
    new._active = dict(fleet._active)
    new._latest = latest
    new._owners = dict(fleet._owners)
    return new
