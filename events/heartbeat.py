"""Heartbeats: every process on the bus says every few seconds that it lives and when it last
made progress; ``multilora status`` reads them back (:func:`read_processes`).

Keys of namespace ``ns`` (built with :meth:`events.streams.Streams.key`):

``<ns>:heartbeat:<role>:<name>``
    A hash with a TTL of ``ttl_s`` (the consumer's lease TTL): ``role``, ``name``, ``host``,
    ``pid``, ``started_at``, ``beat_at``, ``progress_at``, ``ttl_s``, ``in_flight`` (entries
    read and not yet committed), ``handled`` (entries handled since start), plus role-specific
    fields set with :meth:`Heartbeat.note` (their own names). Times are wall-clock seconds since
    the epoch (``time.time()`` of the writer's host).
``<ns>:processes``
    A hash that never expires: field ``<role>:<name>`` holds the JSON :class:`ProcessBeat` of
    that process's latest beat (written in the same transaction as the beat key). It keeps a
    process visible after its beat key expired: that is how ``status`` shows a dead process.
    A warm stop writes ``stopped_at`` there and deletes the beat key. A process gone (dead or
    stopped) for longer than a retention window (:data:`PROCESS_RETENTION_S`, a day) is removed
    from it by the storage sweep (:func:`prune_processes`), so replicas that come and go under
    new names (a new host each restart) do not make it grow for the life of the service.

Who writes: the consumer runtime (:class:`events.consumer.Consumer`), for every process built
with :meth:`events.bootstrap.Bus.consumer`: one beat when the lease is taken, then one from the
keeper thread each time it renews the lease (every ``min(lease_ttl, claim_idle) / 3``: three
beats per TTL), and the stop mark when :meth:`~events.consumer.Consumer.run` returns. A process
that is frozen (SIGSTOP), killed, or cut off from Redis stops beating and its key expires after
``ttl_s``.

``progress_at`` is the last time the process's handler thread moved work forward: a delivery's
handler returned (its effects committed with the ack, or the entry was deferred into the
process's state: the trainer's held groups), an entry was dead-lettered, or a
:meth:`~events.consumer.Consumer.commit` applied effects or acks (``on_start`` recovery, the
trainer's steps committed from ``on_idle``). An ``on_idle`` call that committed nothing, a
handler failure that leaves the entry for a retry, and a refused commit are not progress. A
fresh process counts its start as progress (``progress_at = started_at``), so it is not stalled
before it was given anything to do.

Liveness as read by :func:`read_processes` (the reader's clock is the Redis server's ``TIME``):

- ``alive``: the beat key exists and its ``beat_at`` is at most ``ttl_s`` old;
- ``dead``: the beat key expired, or its beat is older than ``ttl_s`` (a key whose writer's
  clock runs behind);
- ``stopped``: the process stopped warm (``stopped_at`` set, no beat key);
- ``stalled``: alive, it has work (``has_work``; by default: it holds entries in flight), and
  no progress for more than ``stall_after_s``.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec
import redis

from events.streams import Streams

DEFAULT_STALL_AFTER_S = 120.0
"""No progress for this long while having work is ``stalled``. A healthy process with work
makes progress at least once per delivery or step: a trainer step of a large model takes
seconds to tens of seconds, a rollout group about as long; two minutes leaves room for the
slowest step we run while a wedged process still shows within minutes."""

PROCESS_RETENTION_S = 24 * 3600.0
"""How long a process that stopped beating stays in the registry (``status`` shows it dead or
stopped meanwhile); the same window after which its consumer groups are destroyed
(:data:`orchestrator.compaction.GROUP_RETENTION_S`)."""

_PRUNE = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
"""Remove one registry field if its process still does not beat and its record is the one read
(KEYS: registry, beat key; ARGV: field, record): a process that beat meanwhile stays."""

_FIXED_FIELDS = frozenset(
    ("role", "name", "host", "pid", "started_at", "beat_at", "progress_at", "ttl_s", "in_flight")
) | {"handled", "stopped_at"}


def heartbeat_key(streams: Streams, role: str, name: str) -> str:
    """The beat key of process ``name`` of ``role`` (expires ``ttl_s`` after its last beat)."""
    return streams.key("heartbeat", role, name)


def registry_key(streams: Streams) -> str:
    """The hash of every process that ever beat (``<role>:<name>`` -> JSON :class:`ProcessBeat`)."""
    return streams.key("processes")


class ProcessBeat(msgspec.Struct, frozen=True, kw_only=True):
    """One process's latest beat (times in s since the epoch; ``stopped_at`` 0 while it runs)."""

    role: str
    name: str
    host: str
    pid: int
    started_at: float
    beat_at: float
    progress_at: float
    ttl_s: float
    in_flight: int = 0
    handled: int = 0
    stopped_at: float = 0.0
    extra: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def process(self) -> str:
        """``<role>:<name>``: the field of :func:`registry_key`."""
        return f"{self.role}:{self.name}"


class Heartbeat:
    """The writer of one process's beats (see the module doc).

    The consumer's handler thread calls :meth:`progress`; its keeper thread calls :meth:`beat`
    (a float attribute shared between them: no lock needed). ``clock`` is wall-clock seconds.
    """

    def __init__(
        self,
        streams: Streams,
        role: str,
        name: str,
        *,
        ttl_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not role or not name:
            raise ValueError(f"a heartbeat needs a role and a name (got {role!r}, {name!r})")
        self.streams = streams
        self.role = role
        self.name = name
        self.ttl_ms = ttl_ms
        self.clock = clock
        self.key = heartbeat_key(streams, role, name)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = clock()
        self.progress_at = self.started_at
        self.extra: dict[str, str] = {}

    def progress(self) -> None:
        """The process moved work forward just now (see the module doc for what counts)."""
        self.progress_at = self.clock()

    def note(self, **fields: str) -> None:
        """Role-specific fields carried by every later beat (``note(model="qwen3-8b")``)."""
        clash = _FIXED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"heartbeat fields {sorted(clash)} are reserved; use other names")
        self.extra.update(fields)

    def record(self, *, in_flight: int = 0, handled: int = 0, stopped: bool = False) -> ProcessBeat:
        """The beat as of now."""
        now = self.clock()
        return ProcessBeat(
            role=self.role,
            name=self.name,
            host=self.host,
            pid=self.pid,
            started_at=self.started_at,
            beat_at=now,
            progress_at=self.progress_at,
            ttl_s=self.ttl_ms / 1000,
            in_flight=in_flight,
            handled=handled,
            stopped_at=now if stopped else 0.0,
            extra=dict(self.extra),
        )

    def beat(self, client: redis.Redis, *, in_flight: int = 0, handled: int = 0) -> ProcessBeat:
        """Write the beat key (TTL ``ttl_ms``) and the registry entry in one transaction."""
        beat = self.record(in_flight=in_flight, handled=handled)
        fields = {k: str(v) for k, v in msgspec.structs.asdict(beat).items() if k != "extra"}
        fields.pop("stopped_at")
        pipe = client.pipeline(transaction=True)
        pipe.hset(self.key, mapping={**fields, **beat.extra})
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.hset(registry_key(self.streams), beat.process, msgspec.json.encode(beat))
        pipe.execute()
        return beat

    def stopped(self, client: redis.Redis, *, handled: int = 0) -> None:
        """A warm stop: mark the registry entry stopped and delete the beat key."""
        beat = self.record(handled=handled, stopped=True)
        pipe = client.pipeline(transaction=True)
        pipe.delete(self.key)
        pipe.hset(registry_key(self.streams), beat.process, msgspec.json.encode(beat))
        pipe.execute()


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    STALLED = "stalled"
    DEAD = "dead"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ProcessStatus:
    """A process as ``status`` shows it: its latest beat, its liveness, and ages in s."""

    beat: ProcessBeat
    liveness: Liveness
    beat_age_s: float
    progress_age_s: float


def holds_entries(beat: ProcessBeat) -> bool:
    """The default ``has_work``: the process holds entries it read and has not committed."""
    return beat.in_flight > 0


def liveness(
    beat: ProcessBeat,
    *,
    key_exists: bool,
    now: float,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    has_work: Callable[[ProcessBeat], bool] = holds_entries,
) -> Liveness:
    """The liveness of ``beat`` at ``now`` (module doc), ``key_exists``: its beat key exists."""
    if not key_exists:
        return Liveness.STOPPED if beat.stopped_at > 0 else Liveness.DEAD
    if now - beat.beat_at > beat.ttl_s:
        return Liveness.DEAD
    if has_work(beat) and now - beat.progress_at > stall_after_s:
        return Liveness.STALLED
    return Liveness.ALIVE


def server_time(client: redis.Redis) -> float:
    """The Redis server's clock, s since the epoch (one clock for every reader)."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def read_processes(
    client: redis.Redis,
    streams: Streams,
    *,
    stall_after_s: float = DEFAULT_STALL_AFTER_S,
    has_work: Callable[[ProcessBeat], bool] = holds_entries,
    now: float | None = None,
) -> list[ProcessStatus]:
    """Every process that ever beat in this namespace, sorted by role and name, with its
    liveness. Records come from the registry (written with each beat, so as fresh as the beat
    key); the beat key's existence tells alive from expired. A registry entry that does not
    decode raises (a bug, not data)."""
    registry: Mapping[bytes, bytes] = client.hgetall(registry_key(streams))
    beats = sorted(
        (msgspec.json.decode(raw, type=ProcessBeat) for raw in registry.values()),
        key=lambda b: (b.role, b.name),
    )
    pipe = client.pipeline(transaction=False)
    for b in beats:
        pipe.exists(heartbeat_key(streams, b.role, b.name))
    exists = pipe.execute()
    at = server_time(client) if now is None else now
    out = []
    for beat, key_exists in zip(beats, exists, strict=True):
        state = liveness(
            beat,
            key_exists=bool(key_exists),
            now=at,
            stall_after_s=stall_after_s,
            has_work=has_work,
        )
        out.append(ProcessStatus(beat, state, at - beat.beat_at, at - beat.progress_at))
    return out


def prune_processes(
    client: redis.Redis,
    streams: Streams,
    *,
    retention_s: float = PROCESS_RETENTION_S,
    now: float | None = None,
) -> list[str]:
    """Forget the processes whose last beat (or warm stop) is older than ``retention_s`` and
    whose beat key is gone; returns their ``<role>:<name>``. Safe beside running processes and
    other sweepers: each removal is one script that re-checks the beat key and the record."""
    registry: Mapping[bytes, bytes] = client.hgetall(registry_key(streams))
    at = server_time(client) if now is None else now
    script = client.register_script(_PRUNE)
    forgotten = []
    for field, raw in registry.items():
        beat = msgspec.json.decode(raw, type=ProcessBeat)
        if at - max(beat.beat_at, beat.stopped_at) <= retention_s:
            continue
        keys = [registry_key(streams), heartbeat_key(streams, beat.role, beat.name)]
        if script(keys=keys, args=[field, raw]):
            forgotten.append(field.decode())
    return sorted(forgotten)
