"""Redis ACL roles: which keys and commands each process of one namespace may use.

Every process authenticates as the ACL user of its role, ``<namespace>.<role>``
(:func:`user_name`), whose rules (:func:`role_rules`) are the exact ``ACL SETUSER`` arguments,
built from the key names in :class:`events.streams.Streams`. Rules are valid on Redis 7.0 and
later (and Valkey): key patterns ``~``, read-only ``%R~`` and write-only ``%W~`` patterns,
channel patterns ``&`` and ``+command|subcommand``; no selectors.

===============  =========================================================================
role             may
===============  =========================================================================
``producer``     ``XADD`` to ingress; ``HGET``/``HGETALL`` of status hashes (``status:*``)
``trainer``      read ingress, ``rollout.groups`` and ``train.requests`` through its groups,
                 read the control log and its snapshot (recovery), write the control log,
                 ``rollout.tasks``, status hashes and index, futures, the ``paths`` hash
``rollout``      read the control log and ``rollout.tasks`` through its groups (and the log's
                 last id, its snapshot), write ``rollout.groups`` (write-only),
                 ``adapter.synced`` to the control log, its sync fields of status hashes,
                 futures of sampling requests; RQ keys when rewards are scored remotely
``checkpoint``   read the control log through its group, write the control log, status
                 hashes, futures, ``paths``, its ``checkpoint:*`` keys; storage housekeeping:
                 compact the control log (its snapshot), expire status hashes, cap the
                 dead-letter stream, destroy vanished groups
``rewards``      RQ keys and channels only (``rq:*``), nothing of the namespace
``gateway``      its ``gateway:*`` keys and futures; write-only ingress, ``train.requests``
                 and ``rollout.tasks``; read-only status hashes and ``paths``
``admin``        everything (``~* &* +@all``): provisioning and operators
===============  =========================================================================

Every role that runs the consumer runtime (:mod:`events.consumer`) also owns the runtime's keys:
its consumer-name leases (``lease:*``), heartbeats (``heartbeat:*``, ``processes``) and the
dead-letter stream, and may run the runtime's Lua
scripts (``EVALSHA``/``EVAL``/``SCRIPT LOAD``; Redis checks every command a script calls against
the same rules, so a script reaches no more than its caller). Every service role may run
``INFO``: the durability check reads ``INFO persistence`` and ``INFO memory`` (no role gets
``CONFIG``, which would reveal server secrets such as ``masterauth``).

Limits, stated plainly:

- Status hashes are keyed by adapter name, so "its own registration's status" is enforced only as
  "status hashes, read-only": a producer that knows another adapter's name can read its status
  (never the status index, so it cannot list them). Likewise a role that writes status fields
  (``rollout``, ``checkpoint``) can write any field of any status hash of its namespace.
- RQ names its keys ``rq:*`` for every queue, so the ``rewards`` role (and ``rollout``'s RQ
  grant) reach the RQ keys of every namespace on the server; run one namespace per server where
  that matters. Nothing else of another namespace is reachable by any service role.
- ``CLIENT UNBLOCK`` (the consumer's fast shutdown) can wake any blocked client of the server; it
  cannot read or write data.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

import redis

from events.errors import ConfigError
from events.streams import Streams

Role = Literal["producer", "trainer", "rollout", "checkpoint", "rewards", "gateway", "admin"]
ROLES: tuple[Role, ...] = (
    "producer", "trainer", "rollout", "checkpoint", "rewards", "gateway", "admin",
)  # fmt: skip
SERVICE_ROLES: tuple[Role, ...] = tuple(r for r in ROLES if r != "admin")
"""The roles of the processes (and producers); ``admin`` is the operator's."""

CONNECTION = ("+ping", "+hello", "+select", "+client|setname")
"""What opening a connection needs (``AUTH`` is always allowed; redis-py's ``CLIENT SETINFO``
is refused and ignored — it does not exist on Redis 7.0, so it cannot be named)."""

BOOT = ("+info",)
"""The durability check at start (:func:`events.connection.durability_problems`)."""

CONSUMER = (
    # groups: read, ack, reclaim, inspect (the runtime and the bus metrics), trim
    "+xgroup|create", "+xreadgroup", "+xack", "+xautoclaim", "+xclaim", "+xpending",
    "+xinfo|groups", "+xrange", "+xrevrange", "+xlen", "+xtrim", "+exists",
    # the runtime's Lua scripts (commit, touch, lease renew/release/takeover)
    "+evalsha", "+eval", "+script|load",
    # leases on consumer names; heartbeats (events.heartbeat: a MULTI of HSET, PEXPIRE, DEL)
    "+set", "+get", "+pttl", "+pexpire", "+del", "+multi", "+exec", "+discard",
    # vanished groups of replicas gone for good (events.trim.GroupJanitor)
    "+xinfo|consumers", "+xgroup|destroy",
    # fast shutdown: a reader blocked in XREADGROUP is woken by its id
    "+client|id", "+client|unblock",
    # the effects handlers commit (events.effects), as used by the processes
    "+xadd", "+hset", "+hsetnx", "+hdel", "+hget", "+hgetall", "+sadd", "+smembers", "+expire",
    "+persist", "+srem", "+incrby", "+hincrby", "+zadd",
)  # fmt: skip
"""What a process running :class:`events.consumer.Consumer` needs, on its own keys: every
command an :class:`~events.effects.Effects` may queue is here (a commit runs them in one Lua
script, which Redis checks command by command)."""

HOUSEKEEPING = ("+hscan", "+ttl", "+persist", "+srem", "+time")
"""The checkpoint process's storage sweep (:mod:`orchestrator.housekeeping`): saved paths are
scanned, status hashes of ended registrations expire (live ones' TTL is taken back), status index
entries of expired hashes are removed, processes gone for a day leave the heartbeat registry (by
the server's clock); plus the compaction of the control log (its snapshot)."""

RQ = (
    "+@list", "+@hash", "+@set", "+@sortedset", "+@string", "+@stream", "+@transaction",
    "+@pubsub", "+@scripting", "+exists", "+del", "+unlink", "+expire", "+pexpire", "+persist",
    "+ttl", "+pttl", "+type", "+time", "-@dangerous", "-@admin",
)  # fmt: skip
"""What an RQ worker and an RQ enqueuer use, on ``rq:*`` keys and channels only. Categories,
because RQ's command use changes between releases; ``-@dangerous -@admin`` last takes back what
must not be given (``KEYS`` and ``SCAN``, which list other namespaces' key names, ``FLUSHDB``,
``SORT``, ``SCRIPT FLUSH`` ...)."""

RQ_KEYS = ("~rq:*", "&rq:*")

GATEWAY = (
    "+hget", "+hmget", "+hgetall", "+hset", "+hsetnx", "+expire", "+sadd", "+srem", "+smembers",
    "+zadd", "+zrem", "+zrangebyscore", "+xadd",
    "+watch", "+unwatch", "+multi", "+exec", "+discard", "+pexpire", "+del",
)  # fmt: skip
"""The gateway's reads and its WATCH/MULTI/EXEC transactions (futures, sessions, models), and
its heartbeat (a MULTI of HSET, PEXPIRE, DEL on its own beat key and the process registry)."""


def user_name(streams: Streams, role: Role) -> str:
    """The ACL user of ``role`` in ``streams``' namespace, e.g. ``multilora.producer``."""
    return f"{streams.namespace}.{role}"


def _keys(streams: Streams, role: Role) -> list[str]:
    """The key patterns of ``role``: ``~`` read-write, ``%R~`` read-only, ``%W~`` write-only."""
    s = streams
    snapshot = s.key("control", "snapshot")  # orchestrator.compaction.snapshot_key
    runtime = [
        f"~{s.dead}", f"~{s.lease('*')}", f"~{s.key('heartbeat', '*')}", f"~{s.key('processes')}",
    ]  # fmt: skip
    match role:
        case "producer":
            return [f"%W~{s.ingress}", f"%R~{s.status('*')}"]
        case "trainer":
            return [
                f"~{s.ingress}", f"~{s.control}", f"%R~{snapshot}", f"~{s.tasks}",
                f"~{s.groups}", f"~{s.requests}", f"~{s.status_index}", f"~{s.status('*')}",
                f"~{s.future('*')}", f"~{s.paths}", *runtime,
            ]  # fmt: skip
        case "rollout":
            return [
                f"~{s.control}", f"%R~{snapshot}", f"~{s.tasks}", f"%W~{s.groups}",
                f"~{s.status_index}", f"~{s.status('*')}", f"~{s.future('*')}", *runtime,
            ]  # fmt: skip
        case "checkpoint":
            return [
                f"~{s.control}", f"~{snapshot}", f"~{s.status_index}", f"~{s.status('*')}",
                f"~{s.future('*')}", f"~{s.paths}", f"~{s.key('checkpoint', '*')}", *runtime,
            ]  # fmt: skip
        case "rewards":
            return list(RQ_KEYS)
        case "gateway":
            return [
                f"~{s.key('gateway', '*')}", f"~{s.future('*')}", f"%R~{s.status('*')}",
                f"~{s.key('heartbeat', 'gateway', '*')}", f"~{s.key('processes')}",
                f"%R~{s.paths}", f"%W~{s.ingress}", f"%W~{s.requests}", f"%W~{s.tasks}",
            ]  # fmt: skip
        case "admin":
            return ["~*", "&*"]
    raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")


def _commands(role: Role) -> list[str]:
    match role:
        case "producer":
            return [*CONNECTION, "+xadd", "+hget", "+hgetall"]
        case "trainer" | "rollout":
            return [*CONNECTION, *BOOT, *CONSUMER]
        case "checkpoint":
            return [*CONNECTION, *BOOT, *CONSUMER, *HOUSEKEEPING]
        case "rewards":  # categories first: the ``-@dangerous`` in RQ would take back INFO
            return [*RQ, *CONNECTION, *BOOT]
        case "gateway":
            return [*CONNECTION, *BOOT, *GATEWAY]
        case "admin":
            return ["+@all"]
    raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")


def _selectors(role: Role) -> list[str]:
    """Extra permission sets (Redis 7.0 selectors): a command is allowed when the root rules or
    one selector allow it whole. The rollout worker's RQ client gets RQ's commands on RQ's keys
    only, so RQ's command categories never reach the namespace's keys."""
    if role == "rollout":
        return ["(" + " ".join([*RQ_KEYS, *RQ]) + ")"]
    return []


def role_rules(streams: Streams, role: Role) -> list[str]:
    """The ACL rules of ``role`` in ``streams``' namespace, in ``ACL SETUSER`` order: no channels
    (``resetchannels``), key patterns, ``-@all`` and the commands granted, then selectors (one
    argument each, in parentheses)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return ["resetchannels", *_keys(streams, role), "-@all", *_commands(role), *_selectors(role)]


def setuser_args(streams: Streams, role: Role, password: str) -> list[str]:
    """The arguments after ``ACL SETUSER``: the user, ``reset on >password``, its rules.

    ``reset`` first makes the command idempotent: running it again leaves exactly these rules
    and this one password, whatever the user had before.
    """
    if not password or any(c.isspace() for c in password):
        raise ConfigError(
            f"the password of role {role!r} must be non-empty with no whitespace; generate one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return [user_name(streams, role), "reset", "on", f">{password}", *role_rules(streams, role)]


def provision(
    admin: redis.Redis, streams: Streams, passwords: Mapping[str, str], *, persist: bool = False
) -> None:
    """Create or update the user of every role in ``passwords`` (role → password), idempotently.

    ``admin`` must be allowed ``ACL SETUSER`` (the admin role). ``persist``: also ``ACL SAVE``, so
    a server started with an ``aclfile`` (the embedded one) keeps the users across restarts.
    Roles absent from ``passwords`` are left as they are.
    """
    unknown = sorted(set(passwords) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown roles {unknown}; use some of {', '.join(ROLES)}")
    for role in ROLES:
        if role in passwords:
            admin.execute_command("ACL", "SETUSER", *setuser_args(streams, role, passwords[role]))
    if persist:
        admin.execute_command("ACL", "SAVE")


def operator_lines(streams: Streams, roles: Sequence[Role] = SERVICE_ROLES) -> list[str]:
    """``ACL SETUSER`` lines for an operator's own Redis, one per role, with a placeholder
    ``><ROLE>_PASSWORD`` to replace by that role's password; quoted as ``redis-cli`` reads them
    (a selector is one argument)."""
    return [
        shlex.join(["ACL", "SETUSER", *setuser_args(streams, r, f"<{r.upper()}_PASSWORD>")])
        for r in roles
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m events.acl --namespace NS``: print the ACL lines of every role of NS."""
    p = argparse.ArgumentParser(
        prog="python -m events.acl",
        description="Print the ACL SETUSER lines of every service role of one namespace.",
    )
    p.add_argument("--namespace", default=Streams().namespace, help="key namespace")
    p.add_argument("--role", action="append", choices=ROLES, help="only these roles (repeat)")
    args = p.parse_args(argv)
    roles = tuple(args.role) if args.role else SERVICE_ROLES
    sys.stdout.write("\n".join(operator_lines(Streams(args.namespace), roles)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
