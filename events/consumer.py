"""The consumer runtime: the one event-processing lifecycle every process uses.

(Over 600 lines: the reader, keeper and handler threads share one in-flight table and one lock,
and the lease, heartbeat, reclaim and commit steps are the lifecycle itself; split, each part
would reach into the others' state.)

A :class:`Consumer` reads one or more :class:`Subscription` s (a stream and a consumer group) and
hands each entry, decoded once, to a single-threaded handler. Per subscription a reader thread does
the blocking ``XREADGROUP`` (socket timeout above the block time, see
:func:`events.connection.connect`) and the periodic ``XAUTOCLAIM``; the handler runs in the thread
that called :meth:`Consumer.run`, so process state needs no locks.

Delivery contract (at-least-once delivery, effectively-once effects):

- A handler returns :class:`Effects`; the runtime applies them and ``XACK`` s the entry in one Lua
  script that first checks the entry is still pending for this consumer (see
  :mod:`events.effects`). A handler may instead return :data:`DEFER`: the entry stays pending and
  owned (its idle time is refreshed so nobody reclaims it) until the process calls
  :meth:`Consumer.commit` with the entries whose durable effect is done (the trainer acks rollout
  groups only with the step that trained on them).
- On start the consumer first re-reads its own pending entries (a restart under the same name
  resumes exactly where the crash left it), then new ones.
- Entries idle longer than ``claim_idle_ms`` in any consumer of the group are reclaimed.
- An entry that cannot be decoded (bad JSON, unknown type, oversize, schema violation) goes to the
  dead-letter stream at once with the reason; ``on_invalid`` may add effects (e.g. an
  ``adapter.rejected`` event). A handler raising :class:`HandlerError` leaves the entry pending for
  a retry; after ``max_deliveries`` failed deliveries it is dead-lettered. Any other exception is a
  bug: it propagates and crashes the process, and at-least-once delivery makes that safe.
- The consumer name is protected by a :class:`~events.lease.Lease`.
- Shutdown: :meth:`request_stop` (first SIGTERM/SIGINT) is warm — the current handler finishes
  and commits, no new entries are read; a second signal is cold (:class:`ColdShutdown`).
- Tests use ``burst=True`` (return once every stream is drained) or ``max_events``.
- ``on_start`` runs once the lease is held and the groups exist, before anything is read; its
  effects are committed (the trainer's recovery from the control log).
- ``on_idle`` runs in the handler thread whenever no delivery is waiting (at least every
  ``idle_s``, or at once after :meth:`Consumer.wake`; the entries one read returned are all
  handled first, so what arrived together is seen together): the trainer trains there, once the
  groups it deferred make full batches, and commits steps whose versions were written behind.
- ``on_stop`` runs in the handler thread after a warm stop (or a drained burst), before the
  lease is released: the trainer commits the steps whose versions are still being written.
- A :class:`~events.heartbeat.Heartbeat`, when given, beats once the lease is held, then
  wherever the lease is renewed (the keeper thread); progress is marked where work moves forward
  (a handler returned, a commit applied something); a run that returns (not one that raises)
  marks it stopped. :mod:`events.heartbeat` gives the keys and what counts as progress.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import redis

from events.codec import Decoder
from events.effects import COMMIT_LUA, Effects
from events.errors import BusError, HandlerError, LeaseError, SchemaError
from events.heartbeat import Heartbeat
from events.lease import Lease
from events.schema import DeadLetter
from events.streams import Streams
from events.trim import trim_acknowledged

log = logging.getLogger(__name__)

_TOUCH_LUA = """
local me = ARGV[1]
local n = 0
for i = 2, #ARGV, 3 do
  local p = redis.call('XPENDING', ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+2], 1, me)
  if #p > 0 then
    redis.call('XCLAIM', ARGV[i], ARGV[i+1], me, 0, ARGV[i+2], 'JUSTID')
    n = n + 1
  end
end
return n
"""


class ColdShutdown(BaseException):
    """Raised by the second termination signal: stop now, leave entries pending."""


@dataclass(frozen=True)
class Subscription:
    """One stream read through one consumer group.

    ``start_id`` is where a newly created group starts (``"0"``: the whole retained stream, e.g.
    a broadcast reader rebuilding its view; ``"$"``: only new entries). A broadcast stream is read
    with one group per replica (``group=f"rollout.{name}"``); a work queue with one shared group.
    ``trim`` lets the runtime trim entries every group has acknowledged.
    """

    stream: str
    group: str
    decoder: Decoder
    start_id: str = "0"
    trim: bool = False
    on_invalid: Callable[[str, dict[str, str], str], Effects] | None = None
    priority: int = 0
    """Deliveries of lower ``priority`` are handled first (a worker's control events before its
    queued tasks, so a weight sync never waits behind read-ahead work)."""
    max_in_flight: int | None = None
    """This subscription's cap on entries read but not yet committed (None: the consumer's)."""
    count: int | None = None
    """Entries per read (None: the consumer's ``count``)."""
    prepare: Callable[[Any], Any] | None = None
    """Work on each decoded event done in the reader thread, while the handler is busy (or
    waits on a device): its result rides in :attr:`Delivery.prepared`. It must only read the
    process's state (it runs beside the handler), and the handler must check the result still
    fits; an exception leaves ``prepared`` None (the handler does the work itself)."""


E = TypeVar("E")


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """One entry handed to the handler, ``event`` decoded into its stream's union type ``E``.

    Handlers dispatch with ``match delivery.event:`` over the union's members. An entry that
    could not be decoded carries ``error`` (and ``event=None``); it is dead-lettered by the
    runtime and never reaches a handler.
    """

    subscription: Subscription
    entry_id: str
    event: E
    deliveries: int
    fields: dict[str, str] = field(default_factory=dict)
    error: str = ""
    prepared: Any = None
    """What the subscription's ``prepare`` made of ``event`` in the reader thread (or None)."""

    @property
    def ack_key(self) -> tuple[str, str, str]:
        return (self.subscription.stream, self.subscription.group, self.entry_id)


@dataclass(order=True, frozen=True)
class _Item:
    priority: int
    seq: int
    item: Any = field(compare=False)


class _Defer:
    def __repr__(self) -> str:
        return "DEFER"


DEFER = _Defer()
"""Handler result: keep the entry pending and owned until :meth:`Consumer.commit`."""

HandlerResult = Effects | _Defer


Handler = Callable[[Delivery[Any]], HandlerResult]
"""Turns one delivery into effects to commit with its ack, or :data:`DEFER`."""


class Observer(Protocol):
    """Hooks for metrics (all optional to act on; called from the handler thread)."""

    def handled(self, delivery: Delivery, seconds: float) -> None: ...

    def failed(self, delivery: Delivery, reason: str) -> None: ...

    def dead_lettered(self, delivery: Delivery, reason: str) -> None: ...

    def reclaimed(self, subscription: Subscription, count: int) -> None: ...


class NullObserver:
    def handled(self, delivery: Delivery, seconds: float) -> None: ...

    def failed(self, delivery: Delivery, reason: str) -> None: ...

    def dead_lettered(self, delivery: Delivery, reason: str) -> None: ...

    def reclaimed(self, subscription: Subscription, count: int) -> None: ...


@dataclass
class RunStats:
    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0
    commits_refused: int = 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Consumer:
    """Runs ``handler`` over ``subscriptions`` as consumer ``name``. See the module docstring."""

    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        streams: Streams,
        name: str,
        subscriptions: list[Subscription],
        handler: Handler,
        *,
        block_ms: int = 2_000,
        count: int = 16,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        lease_ttl_ms: int = 15_000,
        lease_wait_s: float = 0.0,
        max_in_flight: int = 256,
        observer: Observer | None = None,
        on_start: Callable[[], Effects] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        idle_s: float = 0.5,
        trim_interval_s: float = 30.0,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        if not subscriptions:
            raise ValueError("a consumer needs at least one subscription")
        self.client_factory = client_factory
        self.client = client_factory()
        self.streams = streams
        self.name = name
        self.subscriptions = subscriptions
        self.handler = handler
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.lease = Lease(self.client, streams.lease(name), ttl_ms=lease_ttl_ms)
        self.lease_wait_s = lease_wait_s
        self.max_in_flight = max_in_flight
        self.observer: Observer = observer or NullObserver()
        self.on_start = on_start
        self.on_idle = on_idle
        self.on_stop = on_stop
        self.idle_s = idle_s
        self.trim_interval_s = trim_interval_s
        self.heartbeat = heartbeat
        self.stats = RunStats()
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._in_flight: dict[tuple[str, str, str], Delivery] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._drained: set[int] = set()
        self._reader_ids: list[int] = []
        self._commit = self.client.register_script(COMMIT_LUA)
        self._touch = self.client.register_script(_TOUCH_LUA)
        self._signals = 0
        self._max_events: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def ensure_groups(self) -> None:
        """Create every subscription's group if missing (only BUSYGROUP is swallowed)."""
        for sub in self.subscriptions:
            try:
                self.client.xgroup_create(sub.stream, sub.group, id=sub.start_id, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def request_stop(self) -> None:
        """Warm stop: finish the current handler, commit, read nothing new, return from run()."""
        self._stop.set()
        self._put(None)

    def wake(self) -> None:
        """Make the handler loop run its idle hook now rather than after ``idle_s`` (safe from
        any thread: e.g. a writer thread whose result the idle hook commits)."""
        self._put(None)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: first is a warm stop, second raises :class:`ColdShutdown`."""

        def on_signal(signum: int, _frame: Any) -> None:
            self._signals += 1
            if self._signals > 1:
                raise ColdShutdown(f"second signal {signum}: cold shutdown")
            log.info("signal %s: warm shutdown (again for cold)", signum)
            # only the flag: the handler runs on the main thread, which may be inside the
            # queue's lock right now (queue.put here could deadlock); run() sees the flag within
            # ``idle_s``
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self, *, max_events: int | None = None, burst: bool = False) -> RunStats:
        """Process entries until stopped, ``max_events`` handled, or (``burst``) all drained."""
        self._max_events = max_events
        self.lease.acquire(wait_s=self.lease_wait_s)
        self.ensure_groups()
        self._beat(self.client)
        if self.on_start is not None:
            try:
                self.commit(self.on_start(), [])
            except BaseException:
                self.lease.release()
                raise
            self.on_start = None  # once per consumer, not once per run() call
        if not self._signals:  # a SIGTERM that came before run() still stops it
            self._stop.clear()
        self._drained.clear()
        threads = [
            threading.Thread(
                target=self._read_loop, args=(i, burst), daemon=True, name=f"reader-{sub.stream}"
            )
            for i, sub in enumerate(self.subscriptions)
        ]
        threads.append(threading.Thread(target=self._keeper_loop, daemon=True, name="keeper"))
        for t in threads:
            t.start()
        handled_here = 0
        clean = False  # a crash or a cold stop leaves the beat key to expire: the process is dead
        try:
            while not self._stop.is_set():
                if max_events is not None and handled_here >= max_events:
                    break
                if burst and self._all_drained():
                    break
                if self.on_idle is not None and self._queue.empty():
                    self.on_idle()
                try:
                    item = self._queue.get(timeout=self.idle_s).item
                except queue.Empty:
                    continue
                if item is None:
                    continue
                if isinstance(item, BaseException):
                    raise item
                for d in item if isinstance(item, tuple) else (item,):
                    self._dispatch(d)
                    handled_here += 1
            if self.on_stop is not None:
                self.on_stop()  # a warm stop: the process commits what it still holds
            clean = True
        finally:
            self._stop.set()
            with self._lock:
                self._lock.notify_all()
            self._unblock_readers()
            for t in threads:
                t.join(timeout=self.block_ms / 1000 + 2)
            if clean:
                self._mark_stopped()
            try:
                self.lease.release()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                # Redis is gone: the lease expires by itself; never hide the error that got here
                log.warning("could not release the lease of %s (%s)", self.name, exc)
        return self.stats

    def _in_flight_for(self, sub: Subscription) -> int:
        """Entries of ``sub`` read but not yet committed (each subscription has its own cap, so a
        busy work queue never stops the control log from being read)."""
        return sum(1 for k in self._in_flight if k[0] == sub.stream and k[1] == sub.group)

    def _cap(self, sub: Subscription) -> int:
        return self.max_in_flight if sub.max_in_flight is None else sub.max_in_flight

    def _count(self, sub: Subscription) -> int:
        return self.count if sub.count is None else sub.count

    def _unblock_readers(self) -> None:
        """Wake readers parked in a blocking XREADGROUP so shutdown need not wait ``block_ms``."""
        for client_id in list(self._reader_ids):
            # a reader whose connection is gone already is covered by its join timeout
            with contextlib.suppress(redis.RedisError):
                self.client.client_unblock(client_id)

    def _put(self, item: Delivery | BaseException | None) -> None:
        priority = item.subscription.priority if isinstance(item, Delivery) else -(1 << 30)
        self._queue.put(_Item(priority, next(self._seq), item))

    def _all_drained(self) -> bool:
        with self._lock:
            return (
                len(self._drained) == len(self.subscriptions)
                and self._queue.empty()
                and not any(d for d in self._in_flight.values())
            )

    # --- handling ----------------------------------------------------------------------------

    def _dispatch(self, d: Delivery) -> None:
        if d.error:
            self._dead_letter(d, d.error)
            return
        if d.deliveries > self.max_deliveries:
            self._dead_letter(d, f"delivered {d.deliveries - 1} times without success")
            return
        t0 = time.perf_counter()
        try:
            result = self.handler(d)
        except HandlerError as exc:
            self.retry_later([d], f"{type(exc).__name__}: {exc}")
            return
        if isinstance(result, _Defer):
            if self.heartbeat is not None:
                self.heartbeat.progress()
            return
        self.commit(result, [d])
        self.observer.handled(d, time.perf_counter() - t0)
        self.stats.handled += 1

    def complete(self, effects: Effects, delivery: Delivery, seconds: float) -> bool:
        """Commit a deferred entry's effects with its ack and count it handled (it took
        ``seconds``), as if its handler had returned them; False if it is no longer ours."""
        if not self.commit(effects, [delivery]):
            return False
        self.observer.handled(delivery, seconds)
        self.stats.handled += 1
        return True

    def complete_all(self, done: list[tuple[Effects, Delivery]], seconds: float) -> int:
        """:meth:`complete` for several deferred entries in ONE atomic commit (their effects
        land together, e.g. one batch's groups); if any entry is no longer ours, each is
        committed alone instead, so only that one is refused. Returns how many were applied."""
        if not done:
            return 0
        effects = Effects()
        for part, _ in done:
            effects.extend(part)
        if self.commit(effects, [d for _, d in done]):
            for _, d in done:
                self.observer.handled(d, seconds)
                self.stats.handled += 1
            return len(done)
        return sum(self.complete(part, d, seconds) for part, d in done)

    def retry_later(self, deliveries: list[Delivery], reason: str) -> None:
        """What a :class:`HandlerError` does to an entry, for entries a handler deferred: each
        stays pending and is reclaimed after ``claim_idle_ms`` (by any consumer of its group),
        or is dead-lettered once it failed ``max_deliveries`` deliveries."""
        for d in deliveries:
            self.observer.failed(d, reason)
            if d.deliveries >= self.max_deliveries:
                self._dead_letter(d, f"{reason} (after {d.deliveries} deliveries)")
            else:
                log.warning("entry %s on %s failed (%s); will retry", d.entry_id, d.ack_key, reason)
                self.stats.retried += 1
                self._forget([d])  # stays pending; reclaimed after claim_idle_ms

    def commit(self, effects: Effects, deliveries: list[Delivery]) -> bool:
        """Apply ``effects`` and ack ``deliveries`` atomically; False if any is no longer ours."""
        keys = [d.ack_key for d in deliveries] + effects.extra_acks
        plan = effects.plan(keys)
        applied, entry = _retrying(lambda: self._commit(args=[self.name, plan]), self._stop)
        self._forget_keys(keys)
        if not applied:
            self.stats.commits_refused += 1
            log.warning(
                "commit refused: entry %s is no longer pending for %s", _s(entry), self.name
            )
            return False
        if self.heartbeat is not None and (keys or effects.commands):
            self.heartbeat.progress()
        return True

    def _forget(self, deliveries: list[Delivery]) -> None:
        self._forget_keys([d.ack_key for d in deliveries])

    def _forget_keys(self, keys: list[tuple[str, str, str]]) -> None:
        with self._lock:
            for key in keys:
                self._in_flight.pop(key, None)
            self._lock.notify_all()

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        effects = dead_letter_effects(self.streams, d, reason, consumer=self.name, now=time.time())
        if d.subscription.on_invalid is not None:
            effects.extend(d.subscription.on_invalid(d.entry_id, d.fields, reason))
        self.commit(effects, [d])
        self.stats.dead_lettered += 1
        self.observer.dead_lettered(d, reason)
        log.warning("dead-lettered %s from %s: %s", d.entry_id, d.subscription.stream, reason)

    # --- reader and keeper threads -----------------------------------------------------------

    def _read_loop(self, index: int, burst: bool) -> None:
        sub = self.subscriptions[index]
        client = self.client_factory()
        try:
            self._reader_ids.append(int(client.client_id()))
            self._read_own_pending(sub, client)
            last_claim = 0.0
            last_trim = time.monotonic()
            while not self._stop.is_set():
                with self._lock:
                    while self._in_flight_for(sub) >= self._cap(sub) and not self._stop.is_set():
                        self._lock.wait()
                    room = max(1, self._cap(sub) - self._in_flight_for(sub))
                if self._stop.is_set():
                    return
                got = 0
                try:
                    if time.monotonic() - last_claim > self.claim_idle_ms / 2000:
                        got += self._reclaim(sub, client)
                        last_claim = time.monotonic()
                    if sub.trim and time.monotonic() - last_trim > self.trim_interval_s:
                        trim_acknowledged(client, sub.stream)
                        last_trim = time.monotonic()
                    resp = client.xreadgroup(
                        sub.group,
                        self.name,
                        {sub.stream: ">"},
                        count=min(self._count(sub), room),
                        block=None if burst else self.block_ms,
                    )
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                    log.warning("reader for %s lost Redis (%s); reconnecting", sub.stream, exc)
                    self._stop.wait(0.5)
                    continue
                for _stream, entries in resp or []:
                    read = [self._delivery(sub, _s(eid), fields, 1) for eid, fields in entries]
                    self._put_read(read)
                    got += len(read)
                if burst and got == 0:
                    with self._lock:
                        while any(k[0] == sub.stream for k in self._in_flight):
                            if self._stop.is_set():
                                return
                            self._lock.wait(0.1)
                    if self._reclaim(sub, client) == 0 and not self._has_new(client, sub):
                        with self._lock:
                            self._drained.add(index)
                        self._put(None)  # wake the handler thread to notice
                        return
        except Exception as exc:  # surfaced in the handler thread, which re-raises it
            self._put(exc)
        finally:
            client.close()

    def _read_own_pending(self, sub: Subscription, client: redis.Redis) -> None:
        last = "0"
        while not self._stop.is_set():
            resp = client.xreadgroup(
                sub.group, self.name, {sub.stream: last}, count=self._count(sub)
            )
            entries = resp[0][1] if resp else []
            if not entries:
                return
            for entry_id, fields in entries:
                last = _s(entry_id)
                self._push(sub, last, fields, self._delivery_count(client, sub, last))

    def _reclaim(self, sub: Subscription, client: redis.Redis) -> int:
        got = 0
        start = "0-0"
        while True:
            resp = client.xautoclaim(
                sub.stream, sub.group, self.name, self.claim_idle_ms, start, count=self._count(sub)
            )
            start, entries = _s(resp[0]), resp[1]
            for entry_id, fields in entries:
                eid = _s(entry_id)
                if fields is None:  # trimmed while pending: nothing left to process
                    client.xack(sub.stream, sub.group, eid)
                    continue
                self._push(sub, eid, fields, self._delivery_count(client, sub, eid))
                got += 1
            if start == "0-0" or not entries:
                break
        if got:
            self.observer.reclaimed(sub, got)
        return got

    @staticmethod
    def _has_new(client: redis.Redis, sub: Subscription) -> bool:
        """Whether the group has undelivered entries (burst mode's end test)."""
        for group in client.xinfo_groups(sub.stream):
            if _s(group["name"]) == sub.group:
                last = _s(group["last-delivered-id"])
                return bool(client.xrange(sub.stream, min=f"({last}", count=1))
        return False

    @staticmethod
    def _delivery_count(client: redis.Redis, sub: Subscription, entry_id: str) -> int:
        info = client.xpending_range(sub.stream, sub.group, entry_id, entry_id, 1)
        return int(info[0]["times_delivered"]) if info else 1

    def _push(self, sub: Subscription, entry_id: str, raw: Any, deliveries: int) -> None:
        self._put(self._delivery(sub, entry_id, raw, deliveries))

    def _delivery(self, sub: Subscription, entry_id: str, raw: Any, deliveries: int) -> Delivery:
        """Decode one entry and record it in flight."""
        fields = {_s(k): _s(v) for k, v in (raw or {}).items()}
        try:
            event, error = sub.decoder.decode(raw or {}, entry_id), ""
        except SchemaError as exc:
            event, error = None, str(exc)
        prepared = None
        if sub.prepare is not None and not error:
            try:
                prepared = sub.prepare(event)
            except Exception:  # the handler does the work itself; never lose the entry
                log.debug("prepare failed on %s of %s", entry_id, sub.stream, exc_info=True)
        d = Delivery(sub, entry_id, event, deliveries, fields, error, prepared)
        with self._lock:
            self._in_flight[d.ack_key] = d
        return d

    def _put_read(self, read: list[Delivery]) -> None:
        """Hand the entries of one read to the handler as one item: it handles them all before
        its idle hook runs again, so a burst that arrived together (several adapters' groups,
        a batch of tasks) is seen together. (Under ``max_events`` each goes alone, so a run
        never handles more than asked.)"""
        if len(read) == 1 or self._max_events is not None:
            for d in read:
                self._put(d)
        elif read:
            self._queue.put(_Item(read[0].subscription.priority, next(self._seq), tuple(read)))

    def _keeper_loop(self) -> None:
        """Renew the lease and keep in-flight entries owned (refresh their idle time)."""
        client = self.client_factory()
        touch = client.register_script(_TOUCH_LUA)
        period = min(self.lease.ttl_ms, self.claim_idle_ms) / 3000
        lease = Lease(client, self.lease.key, ttl_ms=self.lease.ttl_ms)
        lease.value = self.lease.value
        try:
            while not self._stop.wait(period):
                try:
                    if not lease.renew() and not lease.retake():
                        self._put(LeaseError(f"lost the lease on consumer name {self.name!r}"))
                        return
                    self._beat(client)
                    with self._lock:
                        keys = list(self._in_flight)
                    for i in range(0, len(keys), 100):
                        args = [x for k in keys[i : i + 100] for x in k]
                        touch(args=[self.name, *args])
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                    log.warning("keeper lost Redis (%s); retrying", exc)
        finally:
            client.close()

    def _beat(self, client: redis.Redis) -> None:
        if self.heartbeat is not None:
            with self._lock:
                in_flight = len(self._in_flight)
            self.heartbeat.beat(client, in_flight=in_flight, handled=self.stats.handled)

    def _mark_stopped(self) -> None:
        """Mark the heartbeat stopped after a warm stop; a Redis that is gone right now leaves
        the beat key to expire (the process reads as dead, which it is soon enough)."""
        if self.heartbeat is None:
            return
        try:
            self.heartbeat.stopped(self.client, handled=self.stats.handled)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.warning("could not mark the heartbeat of %s stopped (%s)", self.name, exc)


DEAD_MAXLEN = 10_000
"""About how many dead letters the stream keeps (``XADD ... MAXLEN ~``): the newest ones."""


def dead_letter_effects(
    streams: Streams,
    d: Delivery[Any],
    reason: str,
    *,
    consumer: str,
    now: float,
    maxlen: int = DEAD_MAXLEN,
) -> Effects:
    """The write that moves delivery ``d`` to the dead-letter stream with ``reason``.

    One :class:`~events.schema.DeadLetter` record (original fields verbatim under ``payload``,
    so an operator can fix the cause and re-publish) for every dead letter: the runtime's own
    (undecodable, or failed ``max_deliveries`` times) and a handler's that refuses an entry it
    decoded (admission's rejections), committed with the entry's ack. The stream is capped at
    about ``maxlen`` letters.
    """
    if maxlen < 1:
        raise ValueError(f"maxlen must be >= 1, got {maxlen}")
    letter = DeadLetter(
        stream=d.subscription.stream,
        group=d.subscription.group,
        entry_id=d.entry_id,
        reason=reason,
        deliveries=d.deliveries,
        consumer=consumer,
        time=now,
        payload=d.fields,
    )
    return Effects().command(
        "XADD", streams.dead, "MAXLEN", "~", maxlen, "*", "dead", msgspec.json.encode(letter)
    )


def _retrying(call: Callable[[], Any], stop: threading.Event, timeout_s: float = 120.0) -> Any:
    """Run ``call``, retrying while Redis is unreachable (restarting after a crash)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            if time.monotonic() > deadline:
                raise BusError(f"Redis unreachable for {timeout_s:.0f} s: {exc}") from exc
            log.warning("Redis unreachable (%s); retrying", exc)
            time.sleep(0.2)
