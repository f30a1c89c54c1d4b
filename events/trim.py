"""Trimming streams without dropping anything a consumer group still needs.

An entry may go once every group on the stream has both delivered and acknowledged it: the floor
is, over all groups, the oldest pending entry, or the first entry after the group's last-delivered
id when nothing is pending. ``XTRIM MINID`` to that floor removes only entries below it. A stream
with no groups is left alone (nobody has read it yet).
"""

from __future__ import annotations

import redis


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _next_id(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def _older(a: str, b: str) -> bool:
    am, asq = (int(x) for x in a.split("-"))
    bm, bsq = (int(x) for x in b.split("-"))
    return (am, asq) < (bm, bsq)


def trim_acknowledged(client: redis.Redis, stream: str) -> int:
    """Remove entries every group has acknowledged; returns how many were removed."""
    groups = client.xinfo_groups(stream)
    if not groups:
        return 0
    floor = ""
    for group in groups:
        name = _s(group["name"])
        pending = client.xpending(stream, name)
        candidate = (
            _s(pending["min"]) if pending["pending"] else _next_id(_s(group["last-delivered-id"]))
        )
        if not floor or _older(candidate, floor):
            floor = candidate
    return int(client.xtrim(stream, minid=floor, approximate=False))
