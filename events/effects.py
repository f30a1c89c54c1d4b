"""Effects: the Redis writes a handler wants, applied atomically with the acknowledgement.

A handler never writes to Redis itself. It returns an :class:`Effects` list; the consumer runtime
runs the list and the ``XACK`` of the entry inside one Lua script, after checking that the entry is
still pending *for this consumer*. So an effect is applied exactly once even when the process dies
between "apply" and "ack" (nothing was applied) or when another consumer reclaimed the entry while
this one was slow (the slow one's commit is refused and its result dropped).

Only a small allow-list of write commands can be queued; everything is sent as strings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec

from events.codec import encode

_ALLOWED = frozenset(
    {
        "XADD",
        "HSET",
        "HSETNX",
        "HDEL",
        "SET",
        "DEL",
        "SADD",
        "SREM",
        "INCRBY",
        "HINCRBY",
        "EXPIRE",
        "PERSIST",
        "ZADD",
    }
)

# KEYS: none used by name (standalone server). ARGV[1] = consumer name, ARGV[2] = JSON plan:
# {"acks": [[stream, group, entry_id], ...], "cmds": [[CMD, arg, ...], ...]}.
# Returns {1, ""} when applied, {0, entry_id} when an entry is no longer pending for this consumer.
COMMIT_LUA = """
local me = ARGV[1]
local plan = cjson.decode(ARGV[2])
for _, a in ipairs(plan.acks) do
  local p = redis.call('XPENDING', a[1], a[2], a[3], a[3], 1, me)
  if #p == 0 then return {0, a[3]} end
end
for _, c in ipairs(plan.cmds) do redis.call(unpack(c)) end
for _, a in ipairs(plan.acks) do redis.call('XACK', a[1], a[2], a[3]) end
return {1, ''}
"""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class Effects:
    """An ordered list of Redis writes, built by a handler and committed by the runtime."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.extra_acks: list[tuple[str, str, str]] = []

    def __len__(self) -> int:
        return len(self.commands)

    def __bool__(self) -> bool:
        return True  # an empty Effects still means "acknowledge"

    def command(self, *args: Any) -> Effects:
        name = _text(args[0]).upper()
        if name not in _ALLOWED:
            raise ValueError(
                f"effect command {name!r} is not allowed; use one of {sorted(_ALLOWED)}"
            )
        self.commands.append([name, *(_text(a) for a in args[1:])])
        return self

    def publish(self, stream: str, event: msgspec.Struct, *, maxlen: int | None = None) -> Effects:
        """``XADD`` the event (already stamped) to ``stream``; optional approximate MAXLEN."""
        fields = encode(event)
        trim = ["MAXLEN", "~", str(maxlen)] if maxlen else []
        flat = [x for k, v in fields.items() for x in (k, v)]
        return self.command("XADD", stream, *trim, "*", *flat)

    def hset(self, key: str, mapping: Mapping[str, Any]) -> Effects:
        flat = [x for k, v in mapping.items() for x in (k, v)]
        return self.command("HSET", key, *flat) if flat else self

    def set(self, key: str, value: Any) -> Effects:
        return self.command("SET", key, value)

    def extend(self, other: Effects) -> Effects:
        self.commands.extend(other.commands)
        self.extra_acks.extend(other.extra_acks)
        return self

    def ack(self, *keys: tuple[str, str, str]) -> Effects:
        """Also acknowledge these (stream, group, entry id) keys — entries a handler deferred
        earlier and whose durable effect is this commit (e.g. groups dropped by a cancel)."""
        self.extra_acks.extend(keys)
        return self

    def plan(self, acks: list[tuple[str, str, str]]) -> str:
        """The JSON plan :data:`COMMIT_LUA` executes."""
        return json.dumps({"acks": [list(a) for a in acks], "cmds": self.commands})
