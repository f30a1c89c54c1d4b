"""Client sessions: created by ``create_session``, kept alive by heartbeats, released once.

The SDK opens one session per ``ServiceClient`` and heartbeats it every 10 s. Every model
created in a session is released — ``adapter.deregister_requested`` on ingress, the model record
marked ``released`` — when the session ends, which happens once, whichever comes first:

- the client finishes it (``POST /api/v1/sessions/<id>/finish``, sent by
  ``ServiceClient.close`` and by leaving its ``with`` block): state ``finished``;
- no heartbeat for ``lease_s`` seconds (the client died or lost its network): state
  ``expired``, found by :meth:`Sessions.sweep`, which any gateway replica may run.

Release is a ``WATCH``/``MULTI`` transaction over the session's hash and model set: a heartbeat
or a second sweeper racing it aborts it, so the deregistrations are published exactly once per
session (and a duplicate would be harmless: cancelling an ended registration is a no-op). After a
session ended, its heartbeats get 410, which the SDK takes as "the session has finished".
"""

from __future__ import annotations

import logging
import time
import uuid

import redis

from events.codec import encode, stamp
from events.futures import FUTURE_TTL_S
from events.schema import DeregisterRequested
from events.streams import Streams
from orchestrator.gateway.errors import HttpError, not_found
from orchestrator.gateway.records import Keys

log = logging.getLogger(__name__)


class Sessions:
    """Session records of one namespace; ``source`` stamps the deregistrations it publishes."""

    def __init__(
        self, client: redis.Redis, streams: Streams, *, lease_s: float, source: str
    ) -> None:
        self.client = client
        self.streams = streams
        self.keys = Keys(streams)
        self.lease_s = lease_s
        self.source = source

    def create(self, tenant: str) -> str:
        """A new active session of ``tenant``; returns its id."""
        session_id = "s" + uuid.uuid4().hex[:12]
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self.keys.session(session_id),
            mapping={"tenant": tenant, "created": repr(now), "seen": repr(now), "state": "active"},
        )
        pipe.zadd(self.keys.sessions, {session_id: now})
        pipe.execute()
        return session_id

    def state(self, tenant: str, session_id: str) -> str:
        """The tenant's session's state; 404 for an unknown one or another tenant's."""
        tenant_raw, state = self.client.hmget(self.keys.session(session_id), "tenant", "state")
        if tenant_raw is None or tenant_raw.decode() != tenant:
            raise not_found(f"session {session_id!r}")
        return state.decode() if state else "active"

    def require_active(self, tenant: str, session_id: str) -> None:
        """410 unless the tenant's session is still active."""
        state = self.state(tenant, session_id)
        if state != "active":
            message = f"session {session_id!r} has {state}; start a new ServiceClient"
            raise HttpError(410, message, field="session_id")

    def heartbeat(self, tenant: str, session_id: str) -> None:
        """Keep the session alive (410 once it ended)."""
        self.require_active(tenant, session_id)
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.session(session_id), "seen", repr(now))
        pipe.zadd(self.keys.sessions, {session_id: now}, xx=True)
        pipe.execute()

    def finish(self, tenant: str, session_id: str) -> None:
        """The client ended its session: release its models (idempotent)."""
        self.state(tenant, session_id)
        self.release(session_id, state="finished", reason="the client finished its session")

    def sweep(self, now: float | None = None) -> list[str]:
        """Release every session not heard from for ``lease_s``; returns the ids released here."""
        cutoff = (time.time() if now is None else now) - self.lease_s
        stale = self.client.zrangebyscore(self.keys.sessions, "-inf", cutoff)
        released = []
        for raw in stale:
            session_id = raw.decode()
            reason = f"no heartbeat for {self.lease_s:g} s: the session expired"
            if self.release(session_id, state="expired", reason=reason, seen_before=cutoff):
                released.append(session_id)
        return released

    def release(
        self, session_id: str, *, state: str, reason: str, seen_before: float | None = None
    ) -> bool:
        """End an active session and deregister its live models, atomically; False when it had
        already ended or (``seen_before``) heartbeated since."""
        key, models_key = self.keys.session(session_id), self.keys.session_models(session_id)
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, models_key)
                current, seen = pipe.hmget(key, "state", "seen")
                if current is None or current.decode() != "active":
                    pipe.multi()
                    pipe.zrem(self.keys.sessions, session_id)  # a stray index entry
                    pipe.execute()
                    return False
                if seen_before is not None and seen is not None and float(seen) > seen_before:
                    return False
                models = sorted(m.decode() for m in pipe.smembers(models_key))
                released = [
                    self.client.hget(self.keys.model(m), "released") == b"1" for m in models
                ]
                pipe.multi()
                pipe.hset(key, mapping={"state": state, "ended": repr(time.time())})
                pipe.zrem(self.keys.sessions, session_id)
                pipe.expire(key, FUTURE_TTL_S)
                pipe.expire(models_key, FUTURE_TTL_S)
                for model, done in zip(models, released, strict=True):
                    if done:
                        continue
                    event = DeregisterRequested(adapter=model, registration_id=model, reason=reason)
                    pipe.xadd(self.streams.ingress, encode(stamp(event, source=self.source)))
                    pipe.hset(self.keys.model(model), "released", "1")
                pipe.execute()
            except redis.WatchError:
                return False
        log.info("session %s %s: released models %s", session_id, state, models)
        return True
