"""Control-log snapshots and trimming: restarts replay a tail, not the whole log.

Every process that rebuilds its view from the control log folds the same events through the
same reducer (:class:`~orchestrator.fleet.Fleet`, over :mod:`orchestrator.lifecycle`). A
*snapshot* is that fold written down: the fleet (:class:`~orchestrator.fleet.FleetSnapshot`,
msgpack) and the id of the last control entry folded into it, in the hash
:func:`snapshot_key` (fields ``id``, ``fleet``, ``time``: the newest event time folded,
``entries``: how many entries the snapshot covers since the log began).

- :func:`load_fleet` reads the snapshot (if any) and folds only the entries after its id: the
  result equals :meth:`Fleet.replay` of the whole log, with or without a snapshot, as long as
  the log was trimmed only by :func:`compact`. Readers that do not care about the trainer's
  slot count pass :data:`READER_SLOTS`.
- :func:`compact` folds from the previous snapshot to the end of the log, writes the new
  snapshot (a Lua script writes it only if its id is newer than the stored one, so 1..N
  compactors never move it backwards), then ``XTRIM MINID`` s the log below the lowest of: the
  entry after the snapshot's id and every consumer group's floor on the control log
  (:func:`events.trim.group_floors`: nothing a group has not acknowledged is trimmed). Groups of
  processes gone for longer than ``group_retention_s`` (default a day) are destroyed first
  (:class:`events.trim.GroupJanitor`), so a removed rollout replica cannot pin the log forever;
  a replica that comes back creates its group again and rebuilds from the snapshot.

Race with a reader: a compactor trims only entries at or below the id of a snapshot it wrote
(or found newer). :func:`load_fleet` reads the snapshot id again after its tail: unchanged
means every trim so far stayed at or below the snapshot it started from, so its tail was
complete; changed means it starts over from the newer snapshot.

Bounding the snapshot: an ended registration whose last change is older than ``tombstone_after_s``
(default an hour) before the newest event folded is kept as a tombstone
(:func:`~orchestrator.fleet.tombstone_ended`: its state without its spec, about a sixth of its
bytes; a retried registration id and late events are still recognised by it); it is forgotten once
its last change is older than ``ended_retention_s`` (default 30 days) and ``holds_data`` (the
caller's check, e.g. "versions of it are still stored") says nothing of theirs is left to clean up.
So the snapshot holds the live registrations plus one tombstone per registration ended within the
retention window. Past that window a ``register_requested`` with the same id would start a new
registration; the status hash of such a registration expired long before (7 days,
:mod:`orchestrator.status`). Event times, not the local clock, decide, so every compactor forgets
the same registrations.

An entry of the control log that does not decode is skipped with a warning (consumers
dead-letter it; the fleet would not change on it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import msgspec
import redis

from events.codec import Decoder
from events.errors import SchemaError
from events.schema import ControlEvent
from events.streams import Streams
from events.trim import GroupJanitor, group_floors, lowest, next_id
from orchestrator.fleet import (
    Fleet,
    FleetSnapshot,
    fleet_snapshot,
    forget_ended,
    restore_fleet,
    tombstone_ended,
)
from orchestrator.lifecycle import AdapterState, is_ended

log = logging.getLogger(__name__)

READER_SLOTS = 1024
"""The slot pool of folds that are not the trainer's (compactor, rollout workers, status
readers): wider than any trainer's, so every admission the trainer made applies. The trainer
restores a snapshot onto its own slot count (:func:`orchestrator.fleet.restore_fleet`)."""

ENDED_RETENTION_S = 30 * 24 * 3600.0
"""How long an ended registration stays in the snapshot after its last change (event time)."""

TOMBSTONE_AFTER_S = 3600.0
"""How long after its last change (event time) an ended registration keeps its spec in the
snapshot; after that it is a tombstone."""

GROUP_RETENTION_S = 24 * 3600.0
"""How long a consumer group of the control log may have no live consumer before it is
destroyed (see :class:`events.trim.GroupJanitor`)."""

PAGE = 1000
"""Entries per ``XRANGE`` page."""

_WRITE_IF_NEWER = """
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local current = redis.call('HGET', KEYS[1], 'id')
if current and not older(current, ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'fleet', ARGV[2], 'time', ARGV[3], 'entries', ARGV[4])
return 1
"""


def snapshot_key(streams: Streams) -> str:
    """The hash holding the control-log snapshot of ``streams``' namespace."""
    return streams.key("control", "snapshot")


class Folded(msgspec.Struct, frozen=True, kw_only=True):
    """A fleet folded up to entry ``last_id`` (``"0-0"``: an empty log and no snapshot).

    ``snapshot_id`` is the id of the snapshot it started from (``""``: none), ``time`` the
    newest event time folded, ``entries`` how many entries it covers since the log began,
    ``tail`` how many of them came after the snapshot.
    """

    fleet: Fleet
    last_id: str
    snapshot_id: str
    time: float
    entries: int
    tail: int


class Compaction(msgspec.Struct, frozen=True, kw_only=True):
    """What one :func:`compact` did: the snapshot now stored (``written``: by this call),
    entries folded since the previous snapshot, entries trimmed, ended registrations
    forgotten, ended registrations reduced to tombstones, vanished groups destroyed."""

    snapshot_id: str
    written: bool
    folded: int
    trimmed: int
    forgotten: tuple[str, ...] = ()
    tombstoned: tuple[str, ...] = ()
    destroyed: tuple[str, ...] = ()


def load_fleet(client: redis.Redis, streams: Streams, slots: int) -> tuple[Fleet, str]:
    """The fleet of the whole control log and the id of the last entry folded (``"0-0"`` for
    an empty log): the snapshot plus the entries after it (see the module doc).

    ``slots`` is the fleet's slot count (the trainer's ``S``; :data:`READER_SLOTS` for any other
    reader). Raises :class:`~events.errors.ConfigError` when a live registration of the
    snapshot holds a slot ``>= slots``.
    """
    folded = fold(client, streams, slots)
    return folded.fleet, folded.last_id


def fold(client: redis.Redis, streams: Streams, slots: int) -> Folded:
    """:func:`load_fleet` with what the compactor needs besides (:class:`Folded`)."""
    while True:
        stored = _read_snapshot(client, streams)
        if stored is None:
            fleet, last, snap_id, when, entries = Fleet(slots), "0-0", "", 0.0, 0
        else:
            snap_id, snapshot, when, entries = stored
            fleet, last = restore_fleet(snapshot, slots), snap_id
        fleet, last, when, count = _fold_tail(client, streams, fleet, last, when)
        if _stored_id(client, streams) == snap_id:
            return Folded(
                fleet=fleet,
                last_id=last,
                snapshot_id=snap_id,
                time=when,
                entries=entries + count,
                tail=count,
            )
        log.info("control-log snapshot moved while reading its tail; reading again")


def compact(
    client: redis.Redis,
    streams: Streams,
    slots: int = READER_SLOTS,
    *,
    janitor: GroupJanitor | None = None,
    ended_retention_s: float = ENDED_RETENTION_S,
    tombstone_after_s: float = TOMBSTONE_AFTER_S,
    holds_data: Callable[[AdapterState], bool] | None = None,
) -> Compaction:
    """Write a new snapshot of the control log and trim it (see the module doc).

    ``janitor`` destroys vanished groups first (None: a janitor with ``GROUP_RETENTION_S``,
    which, being new, treats no consumer-less group as vanished yet: keep one across calls).
    ``holds_data(state)`` True keeps an ended registration in the snapshot past
    ``ended_retention_s``.
    """
    folded = fold(client, streams, slots)
    fleet, forgotten = _bounded(folded, ended_retention_s, holds_data)
    fleet, tombstoned = _tombstoned(fleet, folded.time - tombstone_after_s)
    written = False
    if folded.tail:
        data = msgspec.msgpack.encode(fleet_snapshot(fleet))
        args = [folded.last_id, data, repr(folded.time), folded.entries]
        written = bool(client.eval(_WRITE_IF_NEWER, 1, snapshot_key(streams), *args))
    snapshot_id = _stored_id(client, streams)
    destroyed: list[str] = []
    trimmed = 0
    if snapshot_id:
        janitor = janitor or GroupJanitor(client, streams, retention_s=GROUP_RETENTION_S)
        destroyed = janitor.destroy_vanished(streams.control)
        for group in destroyed:
            log.warning(
                "destroyed consumer group %s of %s: no live consumer", group, streams.control
            )
        floor = lowest([next_id(snapshot_id), *group_floors(client, streams.control).values()])
        if floor is not None:
            trimmed = int(client.xtrim(streams.control, minid=floor, approximate=False))
    return Compaction(
        snapshot_id=snapshot_id,
        written=written,
        folded=folded.tail,
        trimmed=trimmed,
        forgotten=forgotten if written else (),
        tombstoned=tombstoned if written else (),
        destroyed=tuple(destroyed),
    )


def _bounded(
    folded: Folded, retention_s: float, holds_data: Callable[[AdapterState], bool] | None
) -> tuple[Fleet, tuple[str, ...]]:
    """The fleet without ended registrations past the retention window (see the module doc)."""
    if not math.isfinite(retention_s):
        return folded.fleet, ()
    cutoff = folded.time - retention_s
    doomed = tuple(
        s.registration_id
        for s in folded.fleet.states()
        if is_ended(s) and s.updated_at < cutoff and (holds_data is None or not holds_data(s))
    )
    return (forget_ended(folded.fleet, doomed), doomed) if doomed else (folded.fleet, ())


def _tombstoned(fleet: Fleet, cutoff: float) -> tuple[Fleet, tuple[str, ...]]:
    """``fleet`` with the ended registrations last changed before ``cutoff`` as tombstones."""
    chosen = tuple(
        s.registration_id
        for s in fleet.states()
        if is_ended(s) and s.spec is not None and s.updated_at < cutoff
    )
    return (tombstone_ended(fleet, chosen), chosen) if chosen else (fleet, ())


def _read_snapshot(
    client: redis.Redis, streams: Streams
) -> tuple[str, FleetSnapshot, float, int] | None:
    raw = client.hgetall(snapshot_key(streams))
    if not raw:
        return None
    fields = {_s(k): v for k, v in raw.items()}
    try:
        snapshot = msgspec.msgpack.decode(fields["fleet"], type=FleetSnapshot)
        return _s(fields["id"]), snapshot, float(fields["time"]), int(fields["entries"])
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        raise SchemaError(
            f"control-log snapshot {snapshot_key(streams)!r} is unreadable ({exc}); it was "
            "written by an incompatible version: delete the key only if the control log was "
            "never trimmed, else restore it from a backup"
        ) from None


def _stored_id(client: redis.Redis, streams: Streams) -> str:
    raw = client.hget(snapshot_key(streams), "id")
    return "" if raw is None else _s(raw)


def _fold_tail(
    client: redis.Redis, streams: Streams, fleet: Fleet, after: str, when: float
) -> tuple[Fleet, str, float, int]:
    """Fold the entries after id ``after``; returns (fleet, last id, newest time, count)."""
    decoder = Decoder(ControlEvent)
    last, count = after, 0
    while True:
        entries = client.xrange(streams.control, min=f"({last}", count=PAGE)
        if not entries:
            return fleet, last, when, count
        for raw_id, fields in entries:
            last = _s(raw_id)
            count += 1
            try:
                event = decoder.decode(fields, last)
            except SchemaError as exc:
                log.warning("control entry %s skipped: %s", last, exc)
                continue
            when = max(when, float(event.time))
            fleet = fleet.apply(event)


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
