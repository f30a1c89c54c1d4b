"""The gateway's own records in Redis: client models and sampling sessions, by tenant.

Gateways are stateless: everything a later request (on any replica, after any restart) needs is
here, under ``<ns>:gateway:``. Keys (all hashes unless said otherwise):

=====================================  ===================================================
``gateway:model:<model_id>``           ``tenant``, ``session``, ``rank``, ``alpha``,
                                       ``created``, ``released`` (``1`` once unloaded or its
                                       session ended; kept, so saved paths stay the tenant's)
``gateway:alias:<alias>``              ``tenant``, ``model``: a model id the SDK made up (see
                                       below) → the model id it names
``gateway:session:<session_id>``       ``tenant``, ``created``, ``seen``, ``state``
                                       (``active`` / ``finished`` / ``expired``)
``gateway:session:<id>:models``        set: the session's model ids
``gateway:sessions``                   sorted set: active session id → last heartbeat time
``gateway:sampler:<sampler_id>``       ``tenant``, ``base_model``, ``model_path`` (``""``: the
                                       base model), ``session``
``gateway:inflight:<tenant>``          set: the tenant's request ids that may still be pending
=====================================  ===================================================

A model id is also the adapter's name and registration id on the bus (``<tenant>-<session>-<n>``,
lowercased, a valid :data:`~events.specs.ADAPTER_NAME_PATTERN`), so ``multilora status`` shows
whose it is. Lookups take the caller's tenant and answer 404 for another tenant's record, exactly
as for a missing one.

**Aliases.** ``ServiceClient.create_training_client_from_state*`` never asks for a model id: the
SDK names the model ``<session_id>:train:<model_seq_id>`` itself (:func:`alias_for`) and sends
every later request with that id. The gateway records the alias when it creates the model (in
the same transaction), and :meth:`Records.model` resolves any id holding a ``:`` (never part of
an adapter name) through it, so the SDK's id works on every route and every replica exactly like
a native one; the bus only ever sees the model id.
"""

from __future__ import annotations

import re

import msgspec
import redis

from events.futures import PathRecord, resolve_path
from events.specs import ADAPTER_NAME_PATTERN
from events.streams import Streams
from orchestrator.gateway.errors import HttpError, bad_request, not_found


class Keys(msgspec.Struct, frozen=True):
    """Key names of the gateway's records in one namespace."""

    streams: Streams

    def model(self, model_id: str) -> str:
        return self.streams.key("gateway", "model", model_id)

    def alias(self, alias: str) -> str:
        return self.streams.key("gateway", "alias", alias)

    def session(self, session_id: str) -> str:
        return self.streams.key("gateway", "session", session_id)

    def session_models(self, session_id: str) -> str:
        return self.streams.key("gateway", "session", session_id, "models")

    @property
    def sessions(self) -> str:
        return self.streams.key("gateway", "sessions")

    def sampler(self, sampler_id: str) -> str:
        return self.streams.key("gateway", "sampler", sampler_id)

    def inflight(self, tenant: str) -> str:
        return self.streams.key("gateway", "inflight", tenant)


class ModelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A client model (a client-driven adapter) and whose it is. ``model_id`` is the adapter
    name (what goes on the bus); ``client_id`` the id the request named it by (the model id or
    its alias: what responses echo)."""

    model_id: str
    client_id: str
    tenant: str
    session: str
    rank: int
    alpha: float
    released: bool = False


class SamplerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A sampling session: which weights its ``asample`` calls use (``model_path`` ``""``: the
    base model)."""

    sampler_id: str
    tenant: str
    base_model: str
    model_path: str
    session: str


def model_id_for(tenant: str, session_id: str, seq: int) -> str:
    """The model id of the session's ``seq``-th model (deterministic: a retried ``create_model``
    names the same model)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", tenant.lower()).strip("-")[:24] or "t"
    name = f"{slug}-{session_id}-{seq}"
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise bad_request("model_seq_id", f"{seq} gives the invalid model id {name!r}")
    return name


def alias_for(session_id: str, seq: int) -> str:
    """The id the SDK gives the session's ``seq``-th model when it creates it from a checkpoint
    (``tinker==0.38.0``, ``ServiceClient._create_training_client_via_load_weights_submit``)."""
    return f"{session_id}:train:{seq}"


def _text(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class Records:
    """Reads of the gateway's records for one tenant at a time (404 for anyone else's)."""

    def __init__(self, client: redis.Redis, streams: Streams) -> None:
        self.client = client
        self.streams = streams
        self.keys = Keys(streams)

    def model(self, tenant: str, model_id: str, *, live: bool = True) -> ModelRecord:
        """The tenant's model ``model_id`` (a model id or an alias); with ``live``, a 400 if it
        was released."""
        client_id = model_id
        if ":" in model_id:
            owner, target = self.client.hmget(self.keys.alias(model_id), "tenant", "model")
            if owner is None or target is None or owner.decode() != tenant:
                raise not_found(f"model {model_id!r}")
            model_id = target.decode()
        fields = _text(self.client.hgetall(self.keys.model(model_id)))
        if fields.get("tenant") != tenant:
            raise not_found(f"model {client_id!r}")
        record = ModelRecord(
            model_id=model_id,
            client_id=client_id,
            tenant=tenant,
            session=fields.get("session", ""),
            rank=int(fields.get("rank", 0)),
            alpha=float(fields.get("alpha", 0.0)),
            released=fields.get("released") == "1",
        )
        if live and record.released:
            raise HttpError(
                400,
                f"model {client_id!r} was unloaded (or its session ended); create a new one "
                "from a saved checkpoint (create_training_client_from_state) to continue",
                field="model_id",
            )
        return record

    def sampler(self, tenant: str, sampler_id: str) -> SamplerRecord:
        fields = _text(self.client.hgetall(self.keys.sampler(sampler_id)))
        if fields.get("tenant") != tenant:
            raise not_found(f"sampling session {sampler_id!r}")
        return SamplerRecord(
            sampler_id=sampler_id,
            tenant=tenant,
            base_model=fields.get("base_model", ""),
            model_path=fields.get("model_path", ""),
            session=fields.get("session", ""),
        )

    def path(self, tenant: str, path: str, *, field: str) -> PathRecord:
        """What the tenant's ``tinker://`` path names; 400 for a non-tinker path, 404 for an
        unknown path or another tenant's."""
        if not path.startswith("tinker://"):
            raise bad_request(field, f"{path!r} is not a tinker:// path")
        record = resolve_path(self.client, self.streams, path)
        if record is None:
            raise not_found(f"path {path!r}")
        self.model(tenant, record.model, live=False)  # 404 unless the tenant's
        return record

    def sampler_fields(self, record: SamplerRecord) -> dict[str, str]:
        """The hash fields of a new sampling session record."""
        return {
            "tenant": record.tenant,
            "base_model": record.base_model,
            "model_path": record.model_path,
            "session": record.session,
        }
