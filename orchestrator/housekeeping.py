"""Bounded storage: the checkpoint process's periodic sweep of versions, log and keys.

:class:`Housekeeper` runs from the checkpoint process's idle hook (the consumer's ``on_idle``,
so it never races the handler) every ``interval_s`` (a minute by default; the first pass
:data:`FIRST_PASS_S` after start: soon enough that a checkpointer restarted often still collects,
late enough that a crash loop never turns into a storage storm). One pass
(:meth:`Housekeeper.run_once`):

1. folds the control log (:func:`orchestrator.compaction.fold`: snapshot plus tail);
2. deletes the versions nothing needs (:class:`orchestrator.retention.VersionGC`);
3. expires the status of ended registrations and keeps live ones' (:func:`expire_status`);
4. trims the dead-letter stream to ``dead_maxlen`` (``MAXLEN ~``: the runtime's own dead
   letters are written uncapped);
5. forgets processes gone for longer than ``process_retention_s`` from the heartbeat registry
   (:func:`events.heartbeat.prune_processes`; ``status`` shows them dead until then);
6. compacts the control log (:func:`orchestrator.compaction.compact`) when ``compact_entries``
   entries came after the snapshot, or ``compact_interval_s`` passed since the last compaction
   and any did.

Every step is idempotent and safe with several checkpoint processes doing the same: deleting
a version twice frees nothing the second time, a snapshot never moves backwards, a TTL is set
once. Redis being unreachable, or the store failing (:class:`OSError`,
:class:`~orchestrator.storage.ArtifactError`), skips the rest of the pass with a warning: the
next pass retries, and checkpointing goes on meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import redis

from events.heartbeat import PROCESS_RETENTION_S, prune_processes
from events.streams import Streams
from events.trim import GroupJanitor
from orchestrator.artifacts import ArtifactStore
from orchestrator.compaction import (
    ENDED_RETENTION_S,
    GROUP_RETENTION_S,
    READER_SLOTS,
    TOMBSTONE_AFTER_S,
    Compaction,
    compact,
    fold,
)
from orchestrator.ingress import DEAD_MAXLEN
from orchestrator.metrics import StorageMetrics
from orchestrator.retention import Swept, VersionGC
from orchestrator.status import STATUS_TTL_S, Expiry, expire_status
from orchestrator.storage import ArtifactError

log = logging.getLogger(__name__)


class Pass(msgspec.Struct, frozen=True, kw_only=True):
    """What one :meth:`Housekeeper.run_once` did (``compaction`` None: not due)."""

    swept: Swept
    expiry: Expiry
    dead_trimmed: int
    processes_forgotten: tuple[str, ...] = ()
    compaction: Compaction | None = None


FIRST_PASS_S = 10.0
"""Seconds from a checkpointer's start to its first housekeeping pass."""


class Housekeeper:
    """Periodic storage work of one checkpoint process (see the module doc).

    ``checkpoint_group`` is the checkpoint process's consumer group on the control log: the
    entries it has not acknowledged pin the versions they name.
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        artifacts: ArtifactStore,
        *,
        checkpoint_group: str,
        interval_s: float = 60.0,
        compact_interval_s: float = 600.0,
        compact_entries: int = 10_000,
        status_ttl_s: int = STATUS_TTL_S,
        dead_maxlen: int = DEAD_MAXLEN,
        group_retention_s: float = GROUP_RETENTION_S,
        ended_retention_s: float = ENDED_RETENTION_S,
        tombstone_after_s: float = TOMBSTONE_AFTER_S,
        process_retention_s: float = PROCESS_RETENTION_S,
        metrics: StorageMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.streams = streams
        self.artifacts = artifacts
        self.interval_s = interval_s
        self.compact_interval_s = compact_interval_s
        self.compact_entries = compact_entries
        self.status_ttl_s = status_ttl_s
        self.dead_maxlen = dead_maxlen
        self.ended_retention_s = ended_retention_s
        self.tombstone_after_s = tombstone_after_s
        self.process_retention_s = process_retention_s
        self.metrics = metrics
        self.clock = clock
        self.gc = VersionGC(client, streams, artifacts, checkpoint_group=checkpoint_group)
        self.janitor = GroupJanitor(client, streams, retention_s=group_retention_s, clock=clock)
        # the first pass FIRST_PASS_S after start (or one interval, if shorter)
        self._last_run = clock() - interval_s + min(interval_s, FIRST_PASS_S)
        self._last_compaction = clock()

    def on_idle(self) -> None:
        """The consumer's idle hook: a pass when ``interval_s`` has passed since the last."""
        now = self.clock()
        if now - self._last_run < self.interval_s:
            return
        self._last_run = now
        try:
            self.run_once()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.warning("storage housekeeping skipped: Redis unreachable (%s)", exc)
        except (OSError, ArtifactError) as exc:
            log.warning("storage housekeeping skipped: the artifact store failed (%s)", exc)

    def run_once(self, *, force_compaction: bool = False) -> Pass:
        """One pass (see the module doc); ``force_compaction`` compacts even if not due."""
        folded = fold(self.client, self.streams, READER_SLOTS)
        swept = self.gc.sweep(folded.fleet)
        expiry = expire_status(self.client, self.streams, folded.fleet, ttl_s=self.status_ttl_s)
        dead_trimmed = int(self.client.xtrim(self.streams.dead, maxlen=self.dead_maxlen))
        forgotten = prune_processes(self.client, self.streams, retention_s=self.process_retention_s)
        if forgotten:
            log.info(
                "forgot %d processes gone for over %.0f s: %s",
                len(forgotten),
                self.process_retention_s,
                ", ".join(forgotten),
            )
        due = folded.tail >= self.compact_entries or (
            folded.tail > 0 and self.clock() - self._last_compaction >= self.compact_interval_s
        )
        compaction = None
        if due or force_compaction:
            stored = set(self.artifacts.registrations())
            compaction = compact(
                self.client,
                self.streams,
                READER_SLOTS,
                janitor=self.janitor,
                ended_retention_s=self.ended_retention_s,
                tombstone_after_s=self.tombstone_after_s,
                holds_data=lambda s: (s.name, s.registration_id) in stored,
            )
            self._last_compaction = self.clock()
            log.info("control log compacted: %s", compaction)
        self._observe(swept, expiry, folded.entries, compaction)
        return Pass(
            swept=swept,
            expiry=expiry,
            dead_trimmed=dead_trimmed,
            processes_forgotten=tuple(forgotten),
            compaction=compaction,
        )

    def _observe(
        self, swept: Swept, expiry: Expiry, entries: int, compaction: Compaction | None
    ) -> None:
        if self.metrics is None:
            return
        self.metrics.versions_deleted.inc(len(swept.versions))
        self.metrics.bytes_deleted.inc(swept.bytes)
        self.metrics.expiring.inc(len(expiry.expiring))
        if compaction is not None:
            self.metrics.trimmed.inc(compaction.trimmed)
            self.metrics.groups_destroyed.inc(len(compaction.destroyed))
            self.metrics.snapshot_entries.set(entries)
