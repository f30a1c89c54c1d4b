"""The status projection: one Redis hash per adapter name, read by ``multilora status``.

Key ``streams.status(name)`` holds the status of the name's *current* registration (the live one,
else the latest one, where a registration rejected because the name was taken never counts: see
:meth:`Fleet.current`); ``streams.status_index`` is the set of names that have a hash.
Writers never touch each other's fields, so their writes never conflict:

=======================  =============  =====================================================
field                    written by     value
=======================  =============  =====================================================
``registration_id``      trainer        the registration shown
``phase`` ``reason``     trainer        lifecycle phase; why rejected / cancelled / failed
``slot`` ``epoch``       trainer        slot held (absent when none); fencing epoch
``step``                 trainer        last optimizer step
``steps_total``          trainer        step budget
``version``              trainer        last published weights version
``reward_mean``          trainer        reward mean of the last step (absent when unknown)
``queue_position``       trainer        place in the wait queue (absent unless waiting)
``registered_at``        trainer        event time of the registration (s since the epoch)
``updated_at``           trainer        event time of the last change
``last_rejection``       trainer        JSON :class:`RejectionNote` of the latest rejected
                                        registration of this name that is not the one shown
``skips`` ``last_skip``  trainer        skipped steps of the registration named in
                                        ``last_skip``, the JSON :class:`SkipNote` of its
                                        latest skip (step, reason, skips in a row)
``sync:<worker>``        rollout        JSON :class:`WorkerSync`: version the worker serves
``checkpoint``           checkpoint     JSON :class:`ArtifactRef`: last durable checkpoint
``export``               checkpoint     JSON :class:`ArtifactRef`: last PEFT export
=======================  =============  =====================================================

Values written by rollout and checkpoint carry their ``registration_id``: a name can be
registered again, and a late write about the previous registration must not show up as the new
one's. :func:`read_status` keeps only values of the registration the trainer shows. A field
absent from the hash means "none" (the trainer ``HDEL`` s fields that became None).

Every function here returns :class:`~events.effects.Effects` that the caller commits atomically
with the acknowledgement of the event that caused them, so a redelivered event rewrites the same
values. Names that cannot be a status key (empty, or longer than :data:`MAX_STATUS_NAME`
characters: a rejected junk name) get no hash.

An ingress entry that did not decode is reported under the adapter name its JSON gives, when it
gives a usable one, else under :func:`invalid_entry_name` (``<invalid:ENTRY_ID>``): one key per
entry, so one bad entry never hides another, and never a valid adapter name.

Expiry (:func:`expire_status`, run by the checkpoint process on a timer): the hash of a name
whose shown registration ended (:func:`~orchestrator.lifecycle.is_ended`) gets a TTL
(``STATUS_TTL_S``, a week, by default) the first time the sweep sees it so; the expiry is set
by a script only while the hash still shows that registration, so a new registration the
trainer wrote meanwhile is never given it. A name whose shown registration is live has any TTL
removed (``PERSIST``): a name registered again keeps its new status. Names whose hash expired
leave the index set (again by a script, only while the hash is absent). The trainer's own
writes do not touch the TTL, so between a re-registration and the next sweep (its interval, a
minute by default) the hash may still carry the old TTL; it expires only if that TTL ran out
in that window, and the trainer's next write recreates it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
import redis

from events.effects import Effects
from events.errors import SchemaError
from events.schema import CheckpointSaved, Exported, Synced
from events.streams import Streams
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import AdapterState, Phase, is_ended

STATUS_TTL_S = 7 * 24 * 3600
"""How long the status of an ended registration stays readable (a week)."""

MAX_STATUS_NAME = 256
"""Longest adapter name that gets a status hash (valid names have at most 63 characters)."""

SYNC_PREFIX = "sync:"
CHECKPOINT_FIELD = "checkpoint"
EXPORT_FIELD = "export"
REJECTION_FIELD = "last_rejection"
SKIPS_FIELD = "skips"
SKIP_FIELD = "last_skip"

T = TypeVar("T")


class WorkerSync(msgspec.Struct, frozen=True, kw_only=True):
    """A rollout worker serves ``version`` of ``registration_id``, loaded ``latency_s`` after
    the trainer published it; ``time`` is the ``synced`` event's time."""

    registration_id: str
    version: int
    latency_s: float
    time: float


class ArtifactRef(msgspec.Struct, frozen=True, kw_only=True):
    """A durable artifact (checkpoint or export) of step ``step`` of a registration."""

    registration_id: str
    step: int
    uri: str
    final: bool = False


class SkipNote(msgspec.Struct, frozen=True, kw_only=True):
    """The latest skipped step of a registration, as the status hash's ``last_skip`` shows it.

    ``step``: the step that was skipped (issued again, unless the adapter failed); ``reason``:
    why (:attr:`trainer.mixed_step.SlotOutcome.reason`); ``in_a_row``: skips in a row so far,
    this one included; ``time``: when (s since the epoch); ``registration_id``: whose skip it
    is (a note of an earlier registration of the name is not shown; ``""`` in notes written
    before it was recorded).
    """

    step: int
    reason: str
    in_a_row: int
    time: float
    registration_id: str = ""


class RejectionNote(msgspec.Struct, frozen=True, kw_only=True):
    """A registration of this name was rejected for ``reason`` at event time ``time``."""

    registration_id: str
    reason: str
    time: float


class AdapterStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter's status as ``multilora status`` shows it: one status hash, decoded by
    :func:`read_status`, or a state of the control log (:func:`state_status`).

    ``phase`` is None only in a hash no trainer wrote yet (a sync or checkpoint came first).
    ``synced`` maps rollout worker -> weights version it serves (this registration only), as
    sorted ``(worker, version)`` pairs; ``last_sync_latency_s`` is the latency of the most
    recent of those syncs. Checkpoint and export fields are None/empty until one exists.
    """

    name: str
    registration_id: str = ""
    phase: Phase | None = None
    reason: str = ""
    slot: int | None = None
    epoch: int = 0
    step: int = 0
    steps_total: int | None = None
    version: int = 0
    reward_mean: float | None = None
    queue_position: int | None = None
    registered_at: float = 0.0
    updated_at: float = 0.0
    synced: tuple[tuple[str, int], ...] = ()
    last_sync_latency_s: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_uri: str = ""
    export_uri: str = ""
    last_rejection: RejectionNote | None = None
    skips: int | None = None
    last_skip: SkipNote | None = None


def has_status(name: str) -> bool:
    """Whether ``name`` gets a status hash (see the module docstring)."""
    return 0 < len(name) <= MAX_STATUS_NAME


def invalid_entry_name(entry_id: str) -> str:
    """The name an undecodable ingress entry naming no usable adapter is reported under.

    ``<`` and ``:`` are not allowed in adapter names, so it never collides with a real one.
    """
    return f"<invalid:{entry_id}>"


def status_effects(
    streams: Streams, state: AdapterState, *, queue_position: int | None = None
) -> Effects:
    """Write the trainer's fields for ``state`` (the registration the name's status shows)."""
    effects = Effects()
    if not has_status(state.name):
        return effects
    fields: dict[str, Any] = {
        "registration_id": state.registration_id,
        "phase": state.phase.value,
        "reason": state.reason,
        "slot": state.slot,
        "epoch": state.epoch,
        "step": state.step,
        "steps_total": state.steps_total,
        "version": state.version,
        "reward_mean": state.reward_mean,
        "queue_position": queue_position,
        "registered_at": state.registered_at,
        "updated_at": state.updated_at,
    }
    key = streams.status(state.name)
    effects.hset(key, {k: _text(v) for k, v in fields.items() if v is not None})
    absent = [k for k, v in fields.items() if v is None]
    if absent:
        effects.command("HDEL", key, *absent)
    if not is_ended(state):  # a name registered again keeps its status (no expiry pending)
        effects.command("PERSIST", key)
    return effects.command("SADD", streams.status_index, state.name)


def fleet_status_effects(streams: Streams, before: Fleet, after: Fleet) -> Effects:
    """The status writes that take the projection from ``before`` to ``after``.

    The trainer calls this with its fleet before and after applying an event. It rewrites the
    name of every registration that changed and of every waiting one (queue positions shift),
    and notes rejections of a name whose shown registration is another one. Writes nothing when
    nothing changed, so replayed events cost nothing.
    """
    effects = Effects()
    changed = after.changed(before)
    names = {s.name for s in changed}
    names.update(s.name for s in before.waiting())
    names.update(s.name for s in after.waiting())
    old_positions = {s.registration_id: i for i, s in enumerate(before.waiting())}
    new_positions = {s.registration_id: i for i, s in enumerate(after.waiting())}
    for name in sorted(names):
        state = after.current(name)
        if state is None:
            continue
        old = before.current(name)
        position = new_positions.get(state.registration_id)
        old_position = old_positions.get(old.registration_id) if old is not None else None
        if state != old or position != old_position:
            effects.extend(status_effects(streams, state, queue_position=position))
    for state in changed:
        shown = after.current(state.name)
        if state.phase is Phase.REJECTED and shown is not state and has_status(state.name):
            note = RejectionNote(
                registration_id=state.registration_id, reason=state.reason, time=state.updated_at
            )
            effects.hset(streams.status(state.name), {REJECTION_FIELD: _json(note)})
    return effects


def sync_effects(streams: Streams, event: Synced) -> Effects:
    """A rollout worker's write after it loaded a version (``sync:<worker>``)."""
    effects = Effects()
    if not has_status(event.adapter):
        return effects
    sync = WorkerSync(
        registration_id=event.registration_id,
        version=event.version,
        latency_s=event.latency_s,
        time=event.time,
    )
    effects.hset(streams.status(event.adapter), {SYNC_PREFIX + event.worker: _json(sync)})
    return effects.command("SADD", streams.status_index, event.adapter)


def checkpoint_effects(streams: Streams, event: CheckpointSaved | Exported) -> Effects:
    """The checkpoint process's write after a checkpoint or an export became durable."""
    effects = Effects()
    if not has_status(event.adapter):
        return effects
    ref = ArtifactRef(
        registration_id=event.registration_id,
        step=event.step,
        uri=event.uri,
        final=event.final if isinstance(event, CheckpointSaved) else False,
    )
    field = CHECKPOINT_FIELD if isinstance(event, CheckpointSaved) else EXPORT_FIELD
    effects.hset(streams.status(event.adapter), {field: _json(ref)})
    return effects.command("SADD", streams.status_index, event.adapter)


def state_status(state: AdapterState, *, queue_position: int | None = None) -> AdapterStatus:
    """The trainer's fields of ``state``, as :func:`read_status` reads them back once
    :func:`status_effects` wrote them (no sync, checkpoint or rejection fields)."""
    return AdapterStatus(
        name=state.name,
        registration_id=state.registration_id,
        phase=state.phase,
        reason=state.reason,
        slot=state.slot,
        epoch=state.epoch,
        step=state.step,
        steps_total=state.steps_total,
        version=state.version,
        reward_mean=state.reward_mean,
        queue_position=queue_position,
        registered_at=state.registered_at,
        updated_at=state.updated_at,
    )


def read_status(client: redis.Redis, streams: Streams) -> list[AdapterStatus]:
    """Every adapter's status, sorted by name (one round trip for the index, one for hashes).

    Raises :class:`SchemaError` naming the key and field when a value is malformed.
    """
    names = sorted(_str(n) for n in client.smembers(streams.status_index))  # type: ignore[union-attr]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(streams.status(name))
    hashes = pipe.execute()
    return [
        _row(name, streams.status(name), {_str(k): _str(v) for k, v in raw.items()})
        for name, raw in zip(names, hashes, strict=True)
        if raw
    ]


def read_one(client: redis.Redis, streams: Streams, name: str) -> AdapterStatus | None:
    """The status of adapter ``name`` (None when it has no hash); raises like
    :func:`read_status` on a malformed value."""
    raw = client.hgetall(streams.status(name))
    if not raw:
        return None
    return _row(name, streams.status(name), {_str(k): _str(v) for k, v in raw.items()})


def _row(name: str, key: str, fields: dict[str, str]) -> AdapterStatus:
    try:
        return _parse_row(name, fields)
    except (ValueError, msgspec.ValidationError) as exc:
        raise SchemaError(f"status hash {key!r} holds a malformed value: {exc}") from None


def _parse_row(name: str, fields: dict[str, str]) -> AdapterStatus:
    registration = fields.get("registration_id", "")
    syncs = [
        (f.removeprefix(SYNC_PREFIX), _decode(f, v, WorkerSync))
        for f, v in fields.items()
        if f.startswith(SYNC_PREFIX)
    ]
    mine = [(w, s) for w, s in syncs if s.registration_id == registration]
    latest = max((s for _, s in mine), key=lambda s: s.time, default=None)
    checkpoint = _artifact(fields, CHECKPOINT_FIELD, registration)
    export = _artifact(fields, EXPORT_FIELD, registration)
    rejection = fields.get(REJECTION_FIELD)
    raw_skip = fields.get(SKIP_FIELD)
    skip = _decode(SKIP_FIELD, raw_skip, SkipNote) if raw_skip is not None else None
    if skip is not None and skip.registration_id != registration:
        skip = None  # an earlier registration's skips
    return AdapterStatus(
        name=name,
        registration_id=registration,
        phase=_opt(fields, "phase", Phase),
        reason=fields.get("reason", ""),
        slot=_opt(fields, "slot", int),
        epoch=int(fields.get("epoch", 0)),
        step=int(fields.get("step", 0)),
        steps_total=_opt(fields, "steps_total", int),
        version=int(fields.get("version", 0)),
        reward_mean=_opt(fields, "reward_mean", float),
        queue_position=_opt(fields, "queue_position", int),
        registered_at=float(fields.get("registered_at", 0.0)),
        updated_at=float(fields.get("updated_at", 0.0)),
        synced=tuple(sorted((w, s.version) for w, s in mine)),
        last_sync_latency_s=latest.latency_s if latest is not None else None,
        last_checkpoint_step=checkpoint.step if checkpoint is not None else None,
        last_checkpoint_uri=checkpoint.uri if checkpoint is not None else "",
        export_uri=export.uri if export is not None else "",
        last_rejection=(
            _decode(REJECTION_FIELD, rejection, RejectionNote) if rejection is not None else None
        ),
        skips=int(fields.get(SKIPS_FIELD, 0)) if skip is not None else None,
        last_skip=skip,
    )


def _artifact(fields: dict[str, str], field: str, registration: str) -> ArtifactRef | None:
    raw = fields.get(field)
    ref = _decode(field, raw, ArtifactRef) if raw is not None else None
    return ref if ref is not None and ref.registration_id == registration else None


def _decode(field: str, raw: str, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"field {field!r}: {exc}") from None


def _opt(fields: dict[str, str], field: str, kind: type[T]) -> T | None:
    raw = fields.get(field)
    if raw is None:
        return None
    try:
        return kind(raw)  # type: ignore[call-arg]
    except ValueError:
        raise ValueError(f"field {field!r} = {raw!r} is not a {kind.__name__}") from None


def _json(record: msgspec.Struct) -> str:
    return msgspec.json.encode(record).decode()


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- expiry ------------------------------------------------------------------------------------

_EXPIRE_IF_SHOWN = """
if redis.call('HGET', KEYS[1], 'registration_id') ~= ARGV[1] then return 0 end
if redis.call('TTL', KEYS[1]) ~= -1 then return 0 end
return redis.call('EXPIRE', KEYS[1], ARGV[2])
"""
_UNINDEX_IF_GONE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('SREM', KEYS[2], ARGV[1])
"""


class Expiry(msgspec.Struct, frozen=True, kw_only=True):
    """What one :func:`expire_status` did, by adapter name."""

    expiring: tuple[str, ...] = ()
    persisted: tuple[str, ...] = ()
    unindexed: tuple[str, ...] = ()


def expire_status(
    client: redis.Redis, streams: Streams, fleet: Fleet, *, ttl_s: int = STATUS_TTL_S
) -> Expiry:
    """Give ended registrations' status hashes a TTL, remove it from live ones, and drop
    expired names from the index (see the module docstring). ``fleet`` is the fold of the
    control log; a name it does not know is left alone."""
    if ttl_s < 1:
        raise ValueError(f"ttl_s must be >= 1 second, got {ttl_s}")
    names = sorted(_str(n) for n in client.smembers(streams.status_index))  # type: ignore[union-attr]
    expiring, persisted, unindexed = [], [], []
    for name in names:
        key = streams.status(name)
        state = fleet.current(name)
        if not client.exists(key):
            if client.eval(_UNINDEX_IF_GONE, 2, key, streams.status_index, name):
                unindexed.append(name)
        elif state is None:
            continue
        elif is_ended(state):
            if client.eval(_EXPIRE_IF_SHOWN, 1, key, state.registration_id, ttl_s):
                expiring.append(name)
        elif client.persist(key):
            persisted.append(name)
    return Expiry(expiring=tuple(expiring), persisted=tuple(persisted), unindexed=tuple(unindexed))
