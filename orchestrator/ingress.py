"""Reading the ingress stream: every bad entry becomes a dead letter *and* an ``adapter.rejected``.

Tenants write to ingress from any language, so malformed input is expected there. The ingress
decoder is where a registration is validated: JSON syntax, the 64 KiB payload limit
(``max_bytes``), the event and spec structs with every constraint on them (:mod:`events.specs`).
The consumer runtime dead-letters an entry it cannot decode; for ingress we also tell the tenant
why, with an ``adapter.rejected`` on the control log (:func:`invalid_rejection`). A registration
that decodes but that admission refuses gets the same pair: the trainer publishes the rejection
and commits :func:`events.consumer.dead_letter_effects` (the runtime's own record) with it. So
every bad registration leaves a dead letter an operator can fix and re-publish, and a rejection
the tenant can read in ``multilora status``.

The dead-letter stream is capped: :func:`dead_letter_effects` (re-exported here: the one
writer, :func:`events.consumer.dead_letter_effects`) adds ``MAXLEN ~ DEAD_MAXLEN``
(10,000 by default) to its ``XADD``, so the oldest letters go first; the checkpoint process
trims it to the same cap on a timer, which also covers the runtime's own dead letters.
"""

from __future__ import annotations

import json
import re
from typing import Any

from events.codec import Decoder, stamp
from events.consumer import DEAD_MAXLEN, Subscription, dead_letter_effects
from events.effects import Effects
from events.schema import IngressEvent, Rejected
from events.specs import ADAPTER_NAME_RULE, REGISTRATION_ID_RULE
from events.streams import EVENT_FIELD, Streams
from orchestrator.status import has_status, invalid_entry_name

MAX_BYTES = 1 << 16
"""Largest ingress entry (64 KiB); the decoder refuses bigger ones (the only size check)."""

_AT_PATH = re.compile(r"^(?P<message>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
"""msgspec's validation message: ``<message> - at `$.spec.rewards[1].name```."""
_NAMED_FIELD = re.compile(r"^(?:invalid event: )?(?P<field>[a-z_][a-z0-9_.]*) = ")
"""A ``__post_init__`` message names its field first (see :mod:`events.specs`)."""
_FIXES = {"adapter": ADAPTER_NAME_RULE, "registration_id": REGISTRATION_ID_RULE}
"""How to fix a value whose pattern msgspec names only as a regex."""
__all__ = [
    "DEAD_MAXLEN",
    "MAX_BYTES",
    "dead_letter_effects",
    "ingress_subscription",
    "invalid_rejection",
]
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_MAX_SHOWN = 80


def ingress_subscription(
    streams: Streams, group: str, *, max_bytes: int = MAX_BYTES
) -> Subscription:
    """The ingress subscription of admission (64 KiB payload limit by default)."""

    def on_invalid(entry_id: str, fields: dict[str, str], reason: str) -> Effects:
        rejected = invalid_rejection(entry_id, fields, reason)
        return Effects().publish(streams.control, stamp(rejected, source="admission"))

    return Subscription(
        stream=streams.ingress,
        group=group,
        decoder=Decoder(IngressEvent, max_bytes=max_bytes),
        start_id="0",
        trim=True,
        on_invalid=on_invalid,
    )


def invalid_rejection(entry_id: str, fields: dict[str, str], reason: str) -> Rejected:
    """The ``adapter.rejected`` of ingress entry ``entry_id`` that did not decode for ``reason``.

    ``adapter`` is the name the raw JSON gives (when it is a string that can be a status key),
    else ``<invalid:ENTRY_ID>`` (:func:`~orchestrator.status.invalid_entry_name`), so each bad
    entry shows on its own. ``field`` is the JSON path msgspec named (``spec.sampling.top_k``),
    and the reason ends with the value found there when it is a scalar (and, for the name and the
    registration id, how to fix it).
    """
    data = _raw_json(fields)
    name = data.get("adapter") if isinstance(data, dict) else None
    adapter = name if isinstance(name, str) and has_status(name) else invalid_entry_name(entry_id)
    field, value = _located(reason, data)
    if value is not None:
        reason = f"{reason}; got {value}"
    if field in _FIXES:
        reason = f"{reason}; {_FIXES[field]}"
    return Rejected(
        adapter=adapter, reason=reason, field=field, ingress_entry=entry_id, id=entry_id
    )


def _raw_json(fields: dict[str, str]) -> Any:
    try:
        return json.loads(fields.get(EVENT_FIELD, ""))
    except ValueError:
        return None


def _located(reason: str, data: Any) -> tuple[str, str | None]:
    """The field path ``reason`` names (``""`` if none) and the scalar found there, shown."""
    match = _AT_PATH.match(reason)
    if match is None:
        return "", None
    path = match["path"]
    field = path.removeprefix(".")
    named = _NAMED_FIELD.match(match["message"])
    if named is not None:  # a __post_init__ rule: its message already shows the value
        return ".".join(p for p in (field, named["field"]) if p), None
    value: Any = data
    for key, index in _PATH_PART.findall(path):
        try:
            value = value[key] if key else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return field, None
    if isinstance(value, dict | list):
        return field, None
    shown = repr(value) if len(repr(value)) <= _MAX_SHOWN else repr(value)[:_MAX_SHOWN] + "..."
    return field, shown
