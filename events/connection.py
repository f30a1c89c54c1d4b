"""Redis connections for the bus, and the durability check every process runs at start.

redis-py 8 defaults to a 5 s socket timeout with retries; a blocking ``XREADGROUP ... BLOCK 8000``
would then time out and be retried. :func:`connect` sets the socket timeout above the longest
blocking read the caller will issue.

Durability: an acknowledged event must survive a crash of Redis itself. That needs the append-only
file on and no eviction. :func:`check_durability` refuses any other server with a message saying
which setting to change; ``allow_unsafe=True`` (the CLI's ``--unsafe-redis``) turns the refusal into
a warning for throwaway use.
"""

from __future__ import annotations

import logging

import redis

from events.errors import UnsafeRedisError

log = logging.getLogger(__name__)


def connect(url: str, *, max_block_ms: int = 10_000, name: str = "") -> redis.Redis:
    """A client for ``url`` whose socket timeout exceeds ``max_block_ms`` by 5 s."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=max_block_ms / 1000 + 5.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        client_name=name or None,
    )
    return client


def durability_problems(client: redis.Redis) -> list[str]:
    """Settings of the server behind ``client`` that can lose acknowledged events (empty = safe)."""
    try:
        conf = client.config_get("appendonly")
        conf.update(client.config_get("maxmemory-policy"))
        conf.update(client.config_get("maxmemory"))
    except redis.ResponseError as exc:  # managed servers may forbid CONFIG
        return [f"cannot read the server's configuration ({exc}); durability is unknown"]
    problems = []
    if conf.get("appendonly") != "yes":
        problems.append(
            "appendonly is "
            f"{conf.get('appendonly')!r}: events acknowledged since the last snapshot are lost on "
            "a crash; set `appendonly yes`"
        )
    policy = conf.get("maxmemory-policy")
    if policy != "noeviction" and conf.get("maxmemory", "0") != "0":
        problems.append(
            f"maxmemory-policy is {policy!r} with maxmemory set: streams can be evicted; "
            "set `maxmemory-policy noeviction`"
        )
    elif policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy!r}: setting maxmemory later would evict streams; "
            "set `maxmemory-policy noeviction`"
        )
    return problems


def check_durability(client: redis.Redis, *, allow_unsafe: bool = False) -> None:
    """Raise :class:`UnsafeRedisError` unless the server keeps acknowledged events on a crash."""
    problems = durability_problems(client)
    if not problems:
        return
    text = "; ".join(problems)
    if allow_unsafe:
        log.warning("running against an unsafe Redis (--unsafe-redis): %s", text)
        return
    raise UnsafeRedisError(
        f"refusing to run: the Redis server can lose acknowledged events: {text}. "
        "Fix the server's configuration, or pass --unsafe-redis for throwaway use."
    )
