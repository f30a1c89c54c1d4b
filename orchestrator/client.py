"""The producer client: publish registrations and cancels to the ingress stream.

Any language can do the same with a plain ``XADD <ns>:ingress * event '<json>'`` whose JSON
matches ``events/schema/ingress.schema.json``; this is the Python convenience. A producer that
retries a registration should reuse its ``registration_id`` so admission registers it once.

Producer identity: ``Producer(..., producer="team-a")`` writes ``spec.producer`` into every
registration that does not name one; the trainer's wait queue is fair across producer names and
caps how many registrations each may keep waiting. The name is a claim, trusted as far as the
producer is (with Redis ACLs each producer has its own credentials; see docs/SECURITY-paths.md).
"""

from __future__ import annotations

import re

import msgspec
import redis

from events.codec import encode, new_id, stamp
from events.errors import ConfigError
from events.schema import DeregisterRequested, IngressEvent, RegisterRequested
from events.specs import PRODUCER_PATTERN, PRODUCER_RULE, AdapterSpec
from events.streams import Streams


class Producer:
    """Publishes ingress events for one namespace, as one producer.

    ``source`` stamps the envelope; ``producer`` (``""``: anonymous) is the name the fair queue
    and the per-producer limit count registrations under.
    """

    def __init__(
        self, client: redis.Redis, streams: Streams, *, source: str = "client", producer: str = ""
    ) -> None:
        if re.search(PRODUCER_PATTERN, producer) is None:
            raise ConfigError(f"producer {producer!r} is not a valid name; {PRODUCER_RULE}")
        self.client = client
        self.streams = streams
        self.source = source
        self.producer = producer

    def publish(self, event: IngressEvent) -> str:
        """XADD ``event`` (stamped with id/time/source) to ingress; returns the stream entry id."""
        entry = self.client.xadd(self.streams.ingress, encode(stamp(event, source=self.source)))
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def register(self, name: str, spec: AdapterSpec, *, registration_id: str = "") -> str:
        """Ask to train adapter ``name``; returns the registration id (new unless given).

        ``spec.producer`` is set to this producer's name unless the spec names one.
        """
        registration_id = registration_id or new_id()
        if self.producer and not spec.producer:
            spec = msgspec.structs.replace(spec, producer=self.producer)
        self.publish(RegisterRequested(adapter=name, registration_id=registration_id, spec=spec))
        return registration_id

    def deregister(self, name: str, *, registration_id: str = "", reason: str = "") -> str:
        """Cancel adapter ``name`` (optionally one registration of it); returns the entry id."""
        event = DeregisterRequested(
            adapter=name, registration_id=registration_id, reason=reason or "cancelled by user"
        )
        return self.publish(event)
