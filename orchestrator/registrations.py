"""Registrations as a reader of the control log sees them: :class:`AdapterState` s, one per
registration id, folded with :func:`orchestrator.lifecycle.transition`.

Every process that reads the control log but is not the trainer (the checkpoint process, the
per-adapter metrics it hosts, ``multilora status``) keeps its view this way, so it uses the
lifecycle's phases, fencing and duplicate rules and never a fold of its own. :class:`Fleet` is
the trainer's whole-fleet view on top of the same states (slots, the wait queue, name
collisions); a reader needs none of that.

The one addition is :func:`adopt`: a reader may meet a registration after its
``register_requested`` (a trimmed log; a consumer group shared by several processes, each of
which sees a part of the log; an entry reclaimed late). An event that carries the spec
(``queued``, ``admitted``) is then applied to the state the registration had when it was
registered, so the reader picks it up there. Other events of an unknown registration start
nothing: without a spec there is no budget and no policy, and a ``synced`` or ``step_done`` may
be a late one of a registration that already ended. A reader with a durable store of states
(the checkpoint process) looks there first.
"""

from __future__ import annotations

from typing import Any

from events.schema import Admitted, Queued
from orchestrator.lifecycle import (
    AdapterState,
    Phase,
    Verdict,
    decide,
    registration_key,
    transition,
)


def adopt(event: Any) -> AdapterState | None:
    """The state of a registration first met at ``event`` (None: it cannot be picked up here).

    ``transition(None, event)`` when the event starts a state (``register_requested``,
    ``rejected``); for ``queued`` and ``admitted``, the event applied to the registered state
    their spec describes, when it applies there; else None.
    """
    state = transition(None, event)
    if state is not None:
        return state
    match event:
        case Queued(spec=spec) | Admitted(spec=spec):
            registered = AdapterState(
                name=event.adapter,
                registration_id=registration_key(event),
                phase=Phase.REGISTERED,
                spec=spec,
                priority=spec.priority,
                registered_at=event.time,
                updated_at=event.time,
            )
            outcome = decide(registered, event)
            return outcome.state if outcome.verdict is Verdict.APPLIED else None
        case _:
            return None


def fold(state: AdapterState | None, event: Any) -> AdapterState | None:
    """``transition(state, event)``, or :func:`adopt` when the reader has no state yet."""
    return adopt(event) if state is None else transition(state, event)
