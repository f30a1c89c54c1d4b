"""Trimming streams without dropping anything a consumer group still needs.

An entry may go once every group on the stream has both delivered and acknowledged it: a
group's floor (:func:`group_floors`) is its oldest pending entry, or the first entry after its
last-delivered id when nothing is pending. ``XTRIM MINID`` to the lowest floor removes only
entries below it. A stream with no groups is left alone (nobody has read it yet).

Groups of processes that are gone for good (a rollout replica scaled away keeps its group
``rollout.<name>`` on the control log forever) would pin a stream for ever. :class:`GroupJanitor`
finds them: a group is *vanished* when none of its consumers holds a lease
(:mod:`events.lease`: a live process renews its lease every few seconds) and every consumer has
been idle for ``retention_s`` or more; a group with no consumer at all is vanished once this
janitor has seen it without one for ``retention_s``. The caller destroys vanished groups
(``XGROUP DESTROY``); a process that comes back later creates its group again and rebuilds its
view the way a new one does (for the control log: from its snapshot,
:mod:`orchestrator.compaction`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis

from events.streams import Streams


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def next_id(entry_id: str) -> str:
    """The smallest entry id above ``entry_id`` (``MINID`` of a trim that keeps what follows)."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def older(a: str, b: str) -> bool:
    """Whether entry id ``a`` sorts before ``b``."""
    am, asq = (int(x) for x in a.split("-"))
    bm, bsq = (int(x) for x in b.split("-"))
    return (am, asq) < (bm, bsq)


def group_floors(client: redis.Redis, stream: str) -> dict[str, str]:
    """Each group's floor on ``stream``: the lowest entry id it still needs (see the module
    doc); entries below every floor have been delivered to and acknowledged by every group."""
    floors = {}
    for group in client.xinfo_groups(stream):
        name = _s(group["name"])
        pending = client.xpending(stream, name)
        floors[name] = (
            _s(pending["min"]) if pending["pending"] else next_id(_s(group["last-delivered-id"]))
        )
    return floors


def lowest(ids: Iterable[str]) -> str | None:
    """The oldest of ``ids`` (None for none)."""
    floor: str | None = None
    for candidate in ids:
        if floor is None or older(candidate, floor):
            floor = candidate
    return floor


def trim_acknowledged(client: redis.Redis, stream: str) -> int:
    """Remove entries every group has acknowledged; returns how many were removed."""
    floor = lowest(group_floors(client, stream).values())
    if floor is None:
        return 0
    return int(client.xtrim(stream, minid=floor, approximate=False))


class GroupJanitor:
    """Finds the vanished consumer groups of streams (see the module doc).

    ``retention_s`` (default a day) is how long a group may sit with no live consumer before it
    stops pinning its stream: long enough for any restart, outage or redeploy, short enough
    that a removed replica's group does not hold a day's log. ``clock`` is ``time.monotonic``
    unless a test drives it. Keeps, in memory, when it first saw each consumer-less group.
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        *,
        retention_s: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retention_s <= 0:
            raise ValueError(f"retention_s must be > 0, got {retention_s}")
        self.client = client
        self.streams = streams
        self.retention_s = retention_s
        self.clock = clock
        self._empty_since: dict[tuple[str, str], float] = {}

    def vanished(self, stream: str) -> list[str]:
        """Names of the groups of ``stream`` that no live process reads any more."""
        now = self.clock()
        gone = []
        seen_empty = set()
        for group in self.client.xinfo_groups(stream):
            name = _s(group["name"])
            consumers = self.client.xinfo_consumers(stream, name)
            if not consumers:
                seen_empty.add((stream, name))
                since = self._empty_since.setdefault((stream, name), now)
                if now - since >= self.retention_s:
                    gone.append(name)
                continue
            self._empty_since.pop((stream, name), None)
            idle_s = min(int(c["idle"]) for c in consumers) / 1000
            leased = any(self.client.exists(self.streams.lease(_s(c["name"]))) for c in consumers)
            if not leased and idle_s >= self.retention_s:
                gone.append(name)
        for key in [k for k in self._empty_since if k[0] == stream and k not in seen_empty]:
            del self._empty_since[key]
        return gone

    def destroy_vanished(self, stream: str) -> list[str]:
        """Destroy the vanished groups of ``stream``; returns their names."""
        gone = self.vanished(stream)
        for name in gone:
            self.client.xgroup_destroy(stream, name)
        return gone
