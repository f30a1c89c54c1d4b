"""Redis connections for the bus, and the durability check every process runs at start.

redis-py 8 defaults to a 5 s socket timeout with retries; a blocking ``XREADGROUP ... BLOCK 8000``
would then time out and be retried. :func:`connect` sets the socket timeout above the longest
blocking read the caller will issue.

URLs: ``redis://[user:password@]host:port/db`` or, for TLS, ``rediss://...``. TLS options ride
in the query as redis-py reads them, e.g.
``rediss://trainer:pw@redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required``
(also ``ssl_certfile``/``ssl_keyfile`` for a client certificate, ``ssl_check_hostname``).
:func:`connect` refuses ``ssl_*`` options on a plain ``redis://`` URL (they would be ignored
silently or fail deep inside redis-py) and a ``socket_timeout`` in the query shorter than the
blocking reads need.

Durability: an acknowledged event must survive a crash of Redis itself. That needs the append-only
file on and no eviction. :func:`check_durability` refuses any other server with a message saying
which setting to change; ``allow_unsafe=True`` (the CLI's ``--unsafe-redis``) turns the refusal into
a warning for throwaway use. The check reads ``INFO persistence`` and ``INFO memory``, not
``CONFIG GET``: the service's ACL roles (:mod:`events.acl`) get ``INFO`` only, since ``CONFIG GET``
would also reveal the server's secrets, and managed servers that forbid ``CONFIG`` allow ``INFO``.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import redis

from events.errors import ConfigError, UnsafeRedisError

log = logging.getLogger(__name__)


SCHEMES = ("redis", "rediss", "unix")


def connect(url: str, *, max_block_ms: int = 10_000, name: str = "") -> redis.Redis:
    """A client for ``url`` whose socket timeout exceeds ``max_block_ms`` by 5 s.

    ``rediss://`` gives a TLS connection (query options as in the module docstring). Raises
    :class:`ConfigError` for an unknown scheme, ``ssl_*`` options without TLS, or a query
    ``socket_timeout`` that a blocking read of ``max_block_ms`` would outlast.
    """
    socket_timeout = max_block_ms / 1000 + 5.0
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigError(
            f"Redis URL scheme {parts.scheme!r} in {_redacted(url)!r} is not supported; use "
            "redis://host:port/db, rediss://host:port/db (TLS) or unix:///path/to/socket"
        )
    query = parse_qs(parts.query)
    tls_options = sorted(k for k in query if k.startswith("ssl"))
    if tls_options and parts.scheme != "rediss":
        raise ConfigError(
            f"TLS options {tls_options} given in the {parts.scheme}:// URL {_redacted(url)!r}; "
            "use a rediss:// URL for TLS, or drop the options"
        )
    if "socket_timeout" in query and float(query["socket_timeout"][0]) <= max_block_ms / 1000:
        raise ConfigError(
            f"socket_timeout={query['socket_timeout'][0]} in the URL {_redacted(url)!r} is not "
            f"above the longest blocking read ({max_block_ms / 1000:g} s); drop it from the URL"
        )
    client = redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
        client_name=name or None,
    )
    return client


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def durability_problems(client: redis.Redis) -> list[str]:
    """Settings of the server behind ``client`` that can lose acknowledged events (empty = safe).

    Reads ``INFO persistence`` (``aof_enabled``) and ``INFO memory`` (``maxmemory``,
    ``maxmemory_policy``); a server that refuses ``INFO`` yields one problem saying so.
    """
    try:
        persistence = client.info("persistence")
        memory = client.info("memory")
    except redis.ResponseError as exc:  # NOPERM: the role lacks +info
        return [
            f"cannot read the server's INFO ({exc}); durability is unknown: grant the role "
            "`+info` (see events.acl)"
        ]
    conf = {
        "appendonly": "yes" if str(persistence.get("aof_enabled")) == "1" else "no",
        "maxmemory-policy": str(memory.get("maxmemory_policy", "")),
        "maxmemory": str(memory.get("maxmemory", "0")),
    }
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
