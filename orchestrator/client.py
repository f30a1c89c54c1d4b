"""The producer client: publish registrations and cancels to the ingress stream.

Any language can do the same with a plain ``XADD <ns>:ingress * event '<json>'`` whose JSON
matches ``events/schema/ingress.schema.json``; this is the Python convenience. A producer that
retries a registration should reuse its ``registration_id`` so admission registers it once.
"""

from __future__ import annotations

import redis

from events.codec import encode, new_id, stamp
from events.schema import DeregisterRequested, IngressEvent, RegisterRequested
from events.specs import AdapterSpec
from events.streams import Streams


class Producer:
    """Publishes ingress events for one namespace."""

    def __init__(self, client: redis.Redis, streams: Streams, *, source: str = "client") -> None:
        self.client = client
        self.streams = streams
        self.source = source

    def publish(self, event: IngressEvent) -> str:
        """XADD ``event`` (stamped with id/time/source) to ingress; returns the stream entry id."""
        entry = self.client.xadd(self.streams.ingress, encode(stamp(event, source=self.source)))
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def register(self, name: str, spec: AdapterSpec, *, registration_id: str = "") -> str:
        """Ask to train adapter ``name``; returns the registration id (new unless given)."""
        registration_id = registration_id or new_id()
        self.publish(RegisterRequested(adapter=name, registration_id=registration_id, spec=spec))
        return registration_id

    def deregister(self, name: str, *, registration_id: str = "", reason: str = "") -> str:
        """Cancel adapter ``name`` (optionally one registration of it); returns the entry id."""
        event = DeregisterRequested(
            adapter=name, registration_id=registration_id, reason=reason or "cancelled by user"
        )
        return self.publish(event)
