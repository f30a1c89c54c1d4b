"""Version retention: which published versions nothing needs any more, and deleting them.

The trainer publishes a version per step (:mod:`orchestrator.artifacts`) and never deletes one;
the checkpoint process runs :class:`VersionGC` on a timer (1..N processes may: every step is
idempotent). The rule is the pure function :func:`doomed_versions`; everything else here
gathers its inputs.

A version ``v`` of a **live** registration (:func:`~orchestrator.lifecycle.is_live`) goes once

- ``v < newest - max_staleness - 1``, where ``newest`` is the version of the registration's
  lifecycle state (the newest version the control log acknowledged) and ``max_staleness`` is
  its spec's: rollout tasks are issued at most ``max_staleness`` versions behind the newest, so
  ``newest - max_staleness - 1`` and above may still be asked for. The newest version and
  anything above it (the trainer writes a version before it publishes it) are never deleted;
- and it is not *pinned* (:class:`Pins`): no checkpoint is still to be taken from it (a
  ``step_done``, ``completed`` or ``save_requested`` naming it that the checkpoint group has
  not acknowledged yet: acknowledged means promoted, fenced or dead-lettered), no live rollout
  worker serves it (the ``sync:<worker>`` fields of the status hash, counted only while the
  worker's lease exists: a worker that is gone pins nothing), and no gateway path names it
  (a client's saved sampler weights, :class:`~events.futures.PathRecord` in
  :attr:`~events.streams.Streams.paths`: a client may sample it at any time).

Every version of an **ended** registration (retired, rejected, or cancelled or failed without
a slot) goes, except the pinned ones: a final checkpoint still to be taken keeps its version
until the checkpoint group acknowledged it, a saved path keeps its version for good. Workers do
not pin an ended registration: its tasks are fenced. Once nothing of it is pinned its directory
is removed, so the store only lists registrations that hold data.

A registration the fold does not know (its admission is later in the log than the fold
reached, or it was forgotten: :mod:`orchestrator.compaction`) is left alone.

A rollout worker that loads a version while it is deleted gets a load error (the version is
renamed away before it is removed: :meth:`~orchestrator.artifacts.ArtifactStore.delete_version`),
its task becomes failed samples, and the trainer issues new tasks at the newest version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import msgspec
import redis

from events.codec import Decoder
from events.errors import SchemaError
from events.futures import PathRecord
from events.schema import Completed, ControlEvent, SaveRequested, StepDone
from events.streams import Streams
from events.trim import next_id, older
from orchestrator.artifacts import ArtifactStore
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import AdapterState, is_ended
from orchestrator.status import SYNC_PREFIX, WorkerSync

log = logging.getLogger(__name__)

_PAGE = 1000


def keep_from(state: AdapterState) -> int:
    """The oldest version of a live registration kept by the staleness rule:
    ``newest - max_staleness - 1`` (negative: keep all)."""
    staleness = state.spec.max_staleness if state.spec is not None else 0
    return state.version - staleness - 1


def doomed_versions(
    state: AdapterState, stored: Iterable[int], pinned: Iterable[int] = ()
) -> list[int]:
    """The versions of ``stored`` to delete for ``state``, ascending (see the module doc).

    ``pinned``: versions something still needs (checkpoints due, workers, saved paths).
    A live registration without a spec (cannot happen for an admitted one) keeps everything.
    """
    keep = set(pinned)
    if is_ended(state):
        return sorted(v for v in stored if v not in keep)
    if state.spec is None:
        return []
    floor = keep_from(state)
    return sorted(v for v in stored if v < floor and v < state.version and v not in keep)


class Pins(msgspec.Struct, frozen=True, kw_only=True):
    """Versions something still needs, by registration id (see the module doc)."""

    checkpointing: dict[str, frozenset[int]] = msgspec.field(default_factory=dict)
    served: dict[str, frozenset[int]] = msgspec.field(default_factory=dict)
    saved: dict[str, frozenset[int]] = msgspec.field(default_factory=dict)

    def of(self, state: AdapterState) -> frozenset[int]:
        """Every pinned version of ``state``'s registration (workers only while it is live)."""
        key = state.registration_id
        pins = self.checkpointing.get(key, frozenset()) | self.saved.get(key, frozenset())
        if not is_ended(state):
            pins |= self.served.get(key, frozenset())
        return pins


def read_pins(
    client: redis.Redis, streams: Streams, fleet: Fleet, *, checkpoint_group: str
) -> Pins:
    """The pins of every registration, read from Redis (three scans, see the module doc):
    the control log from ``checkpoint_group``'s floor (the whole retained log when the group
    does not exist yet), the status hashes of the live registrations' names, the paths hash."""
    return Pins(
        checkpointing=_freeze(_checkpointing(client, streams, checkpoint_group)),
        served=_freeze(_served(client, streams, fleet)),
        saved=_freeze(_saved(client, streams)),
    )


def _checkpointing(client: redis.Redis, streams: Streams, group: str) -> dict[str, set[int]]:
    """Versions named by control events ``group`` has not acknowledged: those pending in it
    and those after its last-delivered id (every retained one when the group does not exist)."""
    try:
        groups = {_s(g["name"]): g for g in client.xinfo_groups(streams.control)}
    except redis.ResponseError:  # no stream yet
        return {}
    info = groups.get(group)
    delivered = _s(info["last-delivered-id"]) if info is not None else "0-0"
    pending = _pending_ids(client, streams.control, group) if info is not None else set()
    start = min(pending, key=_order) if pending else next_id(delivered)
    decoder = Decoder(ControlEvent)
    pins: dict[str, set[int]] = {}
    low = start
    while True:
        entries = client.xrange(streams.control, min=low, count=_PAGE)
        if not entries:
            return pins
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            low = next_id(entry_id)
            if entry_id not in pending and not older(delivered, entry_id):
                continue  # acknowledged: its checkpoint was taken (or fenced, dead-lettered)
            try:
                event = decoder.decode(fields, entry_id)
            except SchemaError:
                continue  # dead-lettered by the consumers; names nothing
            if isinstance(event, StepDone | Completed | SaveRequested):
                pins.setdefault(event.registration_id, set()).add(event.version)


def _pending_ids(client: redis.Redis, stream: str, group: str) -> set[str]:
    """Every entry id pending in ``group`` (its consumers' in-flight entries: few)."""
    ids: set[str] = set()
    low = "-"
    while True:
        page = client.xpending_range(stream, group, low, "+", _PAGE)
        if not page:
            return ids
        ids.update(_s(p["message_id"]) for p in page)
        low = next_id(_s(page[-1]["message_id"]))


def _order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _served(client: redis.Redis, streams: Streams, fleet: Fleet) -> dict[str, set[int]]:
    """Versions live workers serve, from the ``sync:<worker>`` fields of live names."""
    pins: dict[str, set[int]] = {}
    names = sorted({s.name for s in fleet.live()})
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(streams.status(name))
    syncs: list[tuple[str, WorkerSync]] = []
    for raw in pipe.execute():
        for field, value in raw.items():
            name = _s(field)
            if not name.startswith(SYNC_PREFIX):
                continue
            try:
                sync = msgspec.json.decode(value, type=WorkerSync)
            except msgspec.DecodeError:
                log.warning("status field %s holds %r, not a WorkerSync; ignored", name, value)
                continue
            syncs.append((name.removeprefix(SYNC_PREFIX), sync))
    workers = sorted({w for w, _ in syncs})
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(streams.lease(worker))
    alive = {w for w, up in zip(workers, pipe.execute(), strict=True) if up}
    for worker, sync in syncs:
        if worker in alive:
            pins.setdefault(sync.registration_id, set()).add(sync.version)
    return pins


def _saved(client: redis.Redis, streams: Streams) -> dict[str, set[int]]:
    """Versions a client's saved sampler path names (checkpoint paths name checkpoints)."""
    pins: dict[str, set[int]] = {}
    for path, raw in client.hscan_iter(streams.paths, count=_PAGE):
        try:
            record = msgspec.json.decode(raw, type=PathRecord)
        except msgspec.DecodeError:
            log.warning("path %s holds an unreadable record; ignored", _s(path))
            continue
        if record.kind == "sampler":
            pins.setdefault(record.registration_id, set()).add(record.version)
    return pins


class Swept(msgspec.Struct, frozen=True, kw_only=True):
    """What one :meth:`VersionGC.sweep` deleted: ``(adapter, registration, version)`` triples,
    bytes freed, and the registrations whose directory went with their last version."""

    versions: tuple[tuple[str, str, int], ...] = ()
    bytes: int = 0
    registrations: tuple[tuple[str, str], ...] = ()


class VersionGC:
    """Deletes the versions :func:`doomed_versions` names, over the whole artifact store."""

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        artifacts: ArtifactStore,
        *,
        checkpoint_group: str,
    ) -> None:
        self.client = client
        self.streams = streams
        self.artifacts = artifacts
        self.checkpoint_group = checkpoint_group

    def sweep(self, fleet: Fleet) -> Swept:
        """One pass: pins from Redis, then every registration directory of the store against
        ``fleet`` (the fold of the control log, e.g. :func:`orchestrator.compaction.load_fleet`).
        """
        pins = read_pins(self.client, self.streams, fleet, checkpoint_group=self.checkpoint_group)
        return self.apply(plan(fleet, self.artifacts.registrations(), self._versions, pins))

    def _versions(self, adapter: str, registration_id: str) -> list[int]:
        return self.artifacts.list_versions(adapter, registration_id)

    def apply(self, doomed: Mapping[tuple[str, str], tuple[list[int], bool]]) -> Swept:
        """Delete what :func:`plan` chose; a directory goes when its registration ended and
        nothing of it is left pinned."""
        versions: list[tuple[str, str, int]] = []
        removed: list[tuple[str, str]] = []
        freed = 0
        for (adapter, registration), (gone, whole) in sorted(doomed.items()):
            if whole:
                freed += self.artifacts.delete_registration(adapter, registration)
                removed.append((adapter, registration))
            else:
                for v in gone:
                    freed += self.artifacts.delete_version(adapter, registration, v)
            versions.extend((adapter, registration, v) for v in gone)
        if versions:
            log.info("deleted %d versions (%d bytes): %s", len(versions), freed, versions)
        return Swept(versions=tuple(versions), bytes=freed, registrations=tuple(removed))


class VersionLister(Protocol):
    """``(adapter, registration_id) -> its stored versions``, ascending."""

    def __call__(self, adapter: str, registration_id: str, /) -> list[int]: ...


def plan(
    fleet: Fleet,
    directories: Sequence[tuple[str, str]],
    versions_of: VersionLister,
    pins: Pins,
) -> dict[tuple[str, str], tuple[list[int], bool]]:
    """For each ``(adapter, registration)`` directory with something to delete: the doomed
    versions, and whether the whole directory goes (ended, nothing pinned left)."""
    out: dict[tuple[str, str], tuple[list[int], bool]] = {}
    for adapter, registration in directories:
        state = fleet.get(registration)
        if state is None or state.name != adapter:
            continue  # not folded yet (or forgotten): leave it alone
        stored = versions_of(adapter, registration)
        pinned = pins.of(state)
        gone = doomed_versions(state, stored, pinned)
        whole = is_ended(state) and not (set(stored) & pinned)
        if gone or whole:
            out[(adapter, registration)] = (gone, whole)
    return out


def _freeze(pins: dict[str, set[int]]) -> dict[str, frozenset[int]]:
    return {k: frozenset(v) for k, v in pins.items()}


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
