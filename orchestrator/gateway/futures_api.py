"""Submitting a request (its event plus its pending future, atomically) and answering
``retrieve_future`` from Redis alone.

**Submit.** One ``WATCH``/``MULTI`` transaction creates the future record ``<ns>:future:<id>``
(:mod:`events.futures`: ``state=pending``, ``tenant``, ``kind``, ``model``, ``created``), adds the
id to the tenant's in-flight set, ``XADD`` s the request's event(s) and applies the route's own
record writes and its :class:`~orchestrator.gateway.render.Echo` (what the response repeats of
the request, extra fields of the future's hash) — all or nothing, so there is never an event
without a future or the reverse.
Request ids are deterministic where the SDK numbers its requests (``<model>.<seq_id>``,
``<sampler>.<seq_id>``): a submission the SDK retries after a lost answer finds its future and
gets the same answer, without a second event (a gradient is never accumulated twice). The
in-flight limit counts the tenant's futures still pending (finished ones are pruned from the set
in the same transaction); at the limit the answer is 429, which the SDK retries with backoff.

**Retrieve.** The record decides, whichever gateway created it: ``pending`` → the SDK's
``try_again`` (after holding the request up to ``long_poll_s``, re-reading with a backoff from
5 ms to 50 ms, since completers write the record without a notification: one ``HGETALL`` per
poll, cheap next to the latency a coarser poll adds to every call); ``failed`` → the SDK's
``RequestFailedResponse`` (``error``, ``category`` ``user``/``server``), which the SDK raises as
``RequestFailedError``; ``done`` → the stored result rendered as the response type of its kind
(:mod:`orchestrator.gateway.render`). ``create_model``, ``create_from_state`` (a model created
from a checkpoint) and ``unload_model`` futures have no completer: they resolve from the
adapter's status hash (admitted/running → the model;
rejected/failed → failed with the reason; queued → try again, reporting the queue position),
and the first gateway that sees the resolution writes it into the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import msgspec
import redis

from events.codec import encode, stamp
from events.effects import Effects
from events.futures import FUTURE_TTL_S, Category, FutureRecord, complete, fail, read
from events.streams import Streams
from orchestrator.gateway.errors import HttpError, not_found
from orchestrator.gateway.records import Keys
from orchestrator.gateway.render import Echo, Reply, render_done, render_failed, try_again
from orchestrator.lifecycle import Phase
from orchestrator.status import read_one

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
"""Transaction retries when a watched key changed under a submission (then 503: retried)."""

CREATES = ("create_model", "create_from_state")
"""The future kinds that resolve when the trainer admits their model."""

ECHOING = {*CREATES, "unload_model", "load_weights", "save_weights_for_sampler"}
"""The future kinds whose response repeats something of the request (an :class:`Echo`)."""

STARTED = {Phase.ADMITTED, Phase.RUNNING, Phase.COMPLETING, Phase.COMPLETED, Phase.CANCELLED}
ENDED = {Phase.COMPLETED, Phase.CANCELLED, Phase.RETIRED, Phase.FAILED, Phase.REJECTED}


POLL_FIRST_S = 0.005
POLL_MAX_S = 0.05
"""A pending ``retrieve_future`` re-reads the record after 5 ms, then 1.5× longer each time, up
to every 50 ms, until ``long_poll_s`` (see ``docs/PERFORMANCE.md``, gateway overhead)."""


class ModelReady(msgspec.Struct, frozen=True, kw_only=True):
    """The result of a resolved ``create_model`` / ``unload_model`` future."""

    model_id: str


Precheck = Callable[[redis.client.Pipeline], None]
"""Runs on the watching connection before the transaction; raises HttpError to refuse."""


class Futures:
    """Submission and retrieval of futures in one namespace."""

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        *,
        max_inflight: int,
        long_poll_s: float,
        source: str,
    ) -> None:
        self.client = client
        self.streams = streams
        self.keys = Keys(streams)
        self.max_inflight = max_inflight
        self.long_poll_s = long_poll_s
        self.source = source

    # ---- submit -----------------------------------------------------------------------------

    def submit(
        self,
        tenant: str,
        request_id: str,
        *,
        kind: str,
        model: str,
        events: Sequence[tuple[str, msgspec.Struct]] = (),
        effects: Effects | None = None,
        watch: Sequence[str] = (),
        precheck: Precheck | None = None,
        echo: Echo | None = None,
    ) -> bool:
        """Create future ``request_id`` with its events and effects (see the module doc);
        False when it already existed (a retried submission: nothing is written)."""
        key, inflight = self.streams.future(request_id), self.keys.inflight(tenant)
        for _ in range(MAX_ATTEMPTS):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key, inflight, *watch)
                    owner = pipe.hget(key, "tenant")
                    if owner is not None:
                        if owner.decode() != tenant:
                            raise not_found(f"request {request_id!r}")
                        return False
                    if precheck is not None:
                        precheck(pipe)
                    finished = self._prune(tenant, [m.decode() for m in pipe.smembers(inflight)])
                    pipe.multi()
                    pipe.hset(
                        key,
                        mapping={
                            "state": "pending",
                            "tenant": tenant,
                            "kind": kind,
                            "model": model,
                            "created": repr(time.time()),
                        },
                    )
                    echoed = msgspec.structs.asdict(echo) if echo is not None else {}
                    if any(echoed.values()):
                        pipe.hset(key, mapping={k: v for k, v in echoed.items() if v})
                    pipe.expire(key, FUTURE_TTL_S)
                    if finished:
                        pipe.srem(inflight, *finished)
                    pipe.sadd(inflight, request_id)
                    for stream, event in events:
                        pipe.xadd(stream, encode(stamp(event, source=self.source)))
                    for command in effects.commands if effects is not None else ():
                        pipe.execute_command(*command)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
        raise HttpError(503, "the gateway is busy with this tenant's other requests; retry")

    def _prune(self, tenant: str, members: list[str]) -> list[str]:
        """The members whose futures are no longer pending; 429 if the rest reach the limit."""
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            pipe.hget(self.streams.future(member), "state")
        states = pipe.execute()
        finished = [m for m, s in zip(members, states, strict=True) if s != b"pending"]
        pending = len(members) - len(finished)
        if pending >= self.max_inflight:
            raise HttpError(
                429,
                f"tenant {tenant!r} has {pending} requests in flight, the limit is "
                f"{self.max_inflight}; wait for some to finish (retrieve their futures)",
            )
        return finished

    # ---- retrieve ---------------------------------------------------------------------------

    def retrieve(self, tenant: str, request_id: str, *, proto: bool) -> Reply:
        """The SDK's answer to ``retrieve_future`` (see the module doc); 404 for another
        tenant's future or an unknown (or expired) one."""
        deadline = time.monotonic() + self.long_poll_s
        delay = POLL_FIRST_S
        while True:
            record = read(self.client, self.streams, request_id)
            if record is None or record.tenant != tenant:
                raise not_found(f"future {request_id!r}")
            reason = ""
            if record.state == "pending" and record.kind in (*CREATES, "unload_model"):
                record, reason = self._resolve_from_status(record)
            if record.state == "failed":
                return render_failed(record)
            if record.state == "done":
                return self._render(record, proto=proto)
            left = deadline - time.monotonic()
            if left <= 0:
                return try_again(request_id, reason)
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX_S)

    def _render(self, record: FutureRecord, *, proto: bool) -> Reply:
        echo = Echo()
        if record.kind in ECHOING:
            names = [f.name for f in msgspec.structs.fields(Echo)]
            values = self.client.hmget(self.streams.future(record.request_id), names)
            echo = Echo(**{n: v.decode() for n, v in zip(names, values, strict=True) if v})
        try:
            return render_done(record, proto=proto, echo=echo)
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            log.error("future %s holds an unreadable result: %s", record.request_id, err)
            failed = msgspec.structs.replace(
                record, state="failed", error=f"the result is unreadable: {err}", category="server"
            )
            return render_failed(failed)

    def _resolve_from_status(self, record: FutureRecord) -> tuple[FutureRecord, str]:
        """A create/unload future's state as the adapter's status hash says, written through
        once resolved; the reason to show while it waits."""
        status = read_one(self.client, self.streams, record.model)
        ours = status is not None and status.registration_id == record.model
        phase = status.phase if ours and status is not None else None
        effects, ready = Effects(), ModelReady(model_id=record.model)
        if record.kind in CREATES:
            if phase in STARTED or phase is Phase.RETIRED:
                complete(effects, self.streams, record.request_id, ready)
            elif phase in (Phase.REJECTED, Phase.FAILED) and status is not None:
                category: Category = "user" if phase is Phase.REJECTED else "server"
                message = f"model {record.model!r} was {phase.value}: {status.reason}"
                fail(effects, self.streams, record.request_id, message, category=category)
            elif phase is Phase.QUEUED and status is not None:
                position = status.queue_position
                where = f" (position {position})" if position is not None else ""
                return record, f"queued for a trainer slot{where}"
            else:
                return record, "waiting for the trainer to admit the model"
        elif status is None or not ours or phase in ENDED:
            complete(effects, self.streams, record.request_id, ready)
        else:
            return record, "waiting for the trainer to release the model"
        pipe = self.client.pipeline(transaction=True)
        for command in effects.commands:
            pipe.execute_command(*command)
        pipe.execute()
        resolved = read(self.client, self.streams, record.request_id)
        return (resolved or record), ""
