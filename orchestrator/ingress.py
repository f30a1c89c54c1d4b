"""Reading the ingress stream: a bad entry becomes a dead letter *and* an ``adapter.rejected``.

Tenants write to ingress from any language, so malformed input is expected there. The consumer
runtime dead-letters any entry it cannot decode; for ingress we also tell the tenant why, with an
``adapter.rejected`` event on the control log naming the adapter when the JSON still reveals it.
"""

from __future__ import annotations

import json

from events.codec import Decoder, stamp
from events.consumer import Subscription
from events.effects import Effects
from events.schema import IngressEvent, Rejected
from events.streams import EVENT_FIELD, Streams


def _adapter_name(fields: dict[str, str]) -> str:
    try:
        data = json.loads(fields.get(EVENT_FIELD, ""))
    except ValueError:
        return ""
    name = data.get("adapter") if isinstance(data, dict) else None
    return name if isinstance(name, str) else ""


def ingress_subscription(streams: Streams, group: str, *, max_bytes: int = 1 << 16) -> Subscription:
    """The ingress subscription of admission (64 KiB payload limit by default)."""

    def on_invalid(entry_id: str, fields: dict[str, str], reason: str) -> Effects:
        rejected = Rejected(
            adapter=_adapter_name(fields), reason=reason, ingress_entry=entry_id, id=entry_id
        )
        return Effects().publish(streams.control, stamp(rejected, source="admission"))

    return Subscription(
        stream=streams.ingress,
        group=group,
        decoder=Decoder(IngressEvent, max_bytes=max_bytes),
        start_id="0",
        trim=True,
        on_invalid=on_invalid,
    )
