"""Encoding events to stream entries and decoding them once, at the edge.

Decoding never raises anything but :class:`~events.errors.SchemaError`: malformed JSON, an unknown
``type``, a wrong field type, an unknown field on an ingress event or an oversize payload all become
a ``SchemaError`` whose message names the problem (msgspec's messages name the JSON path, e.g.
``Expected `int`, got `str` - at `$.spec.rank```).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from events.errors import SchemaError
from events.streams import EVENT_FIELD

T = TypeVar("T")

DEFAULT_MAX_BYTES = 1 << 20
"""Largest event accepted from a stream (1 MiB); larger entries are dead-lettered."""

_encoder = msgspec.json.Encoder()


def new_id() -> str:
    """A fresh event id (uuid4, 32 hex chars)."""
    return uuid.uuid4().hex


def stamp(event: T, *, source: str) -> T:
    """Return ``event`` with ``id``, ``time`` and ``source`` filled where empty."""
    changes: dict[str, Any] = {}
    if not getattr(event, "id", "x"):
        changes["id"] = new_id()
    if not getattr(event, "time", 1.0):
        changes["time"] = time.time()
    if not getattr(event, "source", "x"):
        changes["source"] = source
    return msgspec.structs.replace(event, **changes) if changes else event  # type: ignore[type-var]


def encode(event: msgspec.Struct) -> dict[str, bytes]:
    """The stream entry fields for ``event``."""
    return {EVENT_FIELD: _encoder.encode(event)}


class Decoder:
    """Decodes entries of one stream into that stream's union type.

    ``entry_id`` fills an empty envelope ``id`` so redelivery of a raw producer's entry yields the
    same idempotency key every time.
    """

    def __init__(self, union: Any, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._decoder = msgspec.json.Decoder(union)
        self.max_bytes = max_bytes

    def decode(self, fields: Mapping[Any, Any], entry_id: str = "") -> Any:
        raw = fields.get(EVENT_FIELD.encode())
        if raw is None:
            raw = fields.get(EVENT_FIELD)
        if raw is None:
            names = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in fields)
            raise SchemaError(f"entry has no {EVENT_FIELD!r} field (fields: {names})")
        if isinstance(raw, str):
            raw = raw.encode()
        if len(raw) > self.max_bytes:
            raise SchemaError(f"event is {len(raw)} bytes, over the limit of {self.max_bytes}")
        try:
            event = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise SchemaError(f"invalid event: {exc}") from None
        except msgspec.DecodeError as exc:
            raise SchemaError(f"malformed JSON: {exc}") from None
        if not event.id and entry_id:
            event = msgspec.structs.replace(event, id=entry_id)
        return event
