"""Leases on consumer names: one live process per name.

Consumer names are stable (``trainer``, ``rollout.w1``) so a restarted process finds the entries it
had pending. Two live processes with the same name would steal each other's work, so a process
takes a lease on its name at start: ``SET key value NX PX ttl``, renewed every ``ttl/3`` by the
runtime. A second process asking for a held lease is refused at once with the holder's host, pid
and remaining TTL. A lease whose holder is on this host but no longer alive (killed with -9) is
taken over at once, so a crash restart need not wait for the TTL.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import redis

from events.errors import LeaseError

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_TAKEOVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease on one consumer name (``key``) for ``ttl_ms``."""

    def __init__(self, client: redis.Redis, key: str, *, ttl_ms: int = 15_000) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.value = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        )
        self.held = False

    def acquire(self, *, wait_s: float = 0.0) -> None:
        """Take the lease or raise :class:`LeaseError` (after waiting up to ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.client.set(self.key, self.value, nx=True, px=self.ttl_ms):
                self.held = True
                return
            raw = self.client.get(self.key)
            if raw is not None and self._holder_dead(raw):
                taken = self.client.eval(_TAKEOVER, 1, self.key, raw, self.value, self.ttl_ms)
                if taken:
                    self.held = True
                    return
            if time.monotonic() >= deadline:
                ttl = self.client.pttl(self.key)
                holder = raw.decode() if raw else "?"
                raise LeaseError(
                    f"consumer name lease {self.key!r} is held by {holder} "
                    f"(expires in {max(ttl, 0) / 1000:.1f} s): another process runs with this "
                    "consumer name; stop it or start this one with a different name"
                )
            time.sleep(0.1)

    def _holder_dead(self, raw: bytes) -> bool:
        try:
            holder = json.loads(raw)
        except ValueError:
            return False
        return bool(holder.get("host") == socket.gethostname() and not pid_alive(holder["pid"]))

    def renew(self) -> bool:
        """Extend the lease; False means it was lost (expired and taken by another process)."""
        ok = bool(self.client.eval(_RENEW, 1, self.key, self.value, self.ttl_ms))
        self.held = ok
        return ok

    def retake(self) -> bool:
        """Take the lease again if it expired and nobody took it (e.g. Redis was down too long)."""
        self.held = bool(self.client.set(self.key, self.value, nx=True, px=self.ttl_ms))
        return self.held

    def release(self) -> None:
        if self.held:
            self.client.eval(_RELEASE, 1, self.key, self.value)
            self.held = False
