"""Futures: the durable result records of client requests (the Tinker gateway's futures).

A gateway answers every asynchronous client call (``forward_backward``, ``optim_step``,
``sample``, ...) with a request id at once and creates the record ``<ns>:future:<request_id>``
(a hash) in state ``pending`` in the same transaction as the request's event. The process that
carries the request out completes the record *with the acknowledgement of the request entry*
(an :class:`events.effects.Effects` write), so a result exists exactly when its effect is
durable, and it survives any process, gateway included: any gateway answers
``retrieve_future`` from Redis alone.

Fields of the hash (all strings):

==========  =====================================================================================
``state``   ``pending`` → ``done`` or ``failed`` (never back)
``tenant``  the API key's tenant that created it (a tenant only ever reads its own futures)
``kind``    the call (``forward_backward``, ``forward``, ``optim_step``, ``save_weights``, ...)
``model``   the model id (adapter name) it concerns, ``""`` for base-model sampling
``result``  JSON of the result record below (``done``)
``error``   the message (``failed``); ``category``: ``user`` (bad input) or ``server``
``created`` gateway wall-clock at creation (seconds)
==========  =====================================================================================

Completion writes ``result`` with ``HSETNX``: a request redone after a crash (which recomputes
an identical result) never replaces the first answer. A reader derives the state from the fields
(:func:`read`): ``result`` present → ``done``, else ``error`` present → ``failed``, else the
stored ``state``; so a late failure of a redone request never turns a ``done`` record failed.
Records expire ``FUTURE_TTL_S`` after completion.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import redis

from events.effects import Effects
from events.streams import Streams

FUTURE_TTL_S = 7 * 24 * 3600
"""How long a completed future stays readable (a week)."""

FutureState = Literal["pending", "done", "failed"]
Category = Literal["user", "server"]


class ForwardBackwardResult(msgspec.Struct, frozen=True, kw_only=True):
    """Per datum, the target log-probs and per-target loss (``N = len(tokens) - 1`` entries each,
    Tinker's alignment: entry ``i`` is about ``tokens[i + 1]``), and the request's metrics
    (``loss:sum`` is the loss summed over every target of every datum)."""

    logprobs: tuple[tuple[float, ...], ...]
    elementwise_loss: tuple[tuple[float, ...], ...]
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class OptimStepResult(msgspec.Struct, frozen=True, kw_only=True):
    """The update applied: the adapter's optimizer ``step`` count after it, its new weights
    ``version``, and ``metrics`` (``grad_norm`` before clipping, ``learning_rate``)."""

    step: int
    version: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class SaveWeightsResult(msgspec.Struct, frozen=True, kw_only=True):
    """The client's ``tinker://`` path of what was saved, and the weights version it holds."""

    path: str
    version: int


class LoadWeightsResult(msgspec.Struct, frozen=True, kw_only=True):
    """The path that was loaded, and the step the adapter continues from."""

    path: str
    step: int


class SampledSequence(msgspec.Struct, frozen=True, kw_only=True):
    """One completion: its tokens, their log-probs and why it stopped (``stop`` / ``length``)."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    stop_reason: Literal["stop", "length"] = "stop"


class SampleResult(msgspec.Struct, frozen=True, kw_only=True):
    """The completions of a ``sample`` request; ``prompt_logprobs`` (asked for) has one entry
    per prompt token, ``None`` for the first (no context); ``generate_s``: the worker's seconds
    generating and scoring them (what the gateway's overhead is measured against)."""

    sequences: tuple[SampledSequence, ...]
    prompt_logprobs: tuple[float | None, ...] | None = None
    generate_s: float = 0.0


class FutureRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A future as read back (see the module docstring for the fields)."""

    request_id: str
    state: FutureState
    tenant: str = ""
    kind: str = ""
    model: str = ""
    result: bytes = b""
    error: str = ""
    category: Category = "server"
    created: float = 0.0


class PathRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a client's ``tinker://`` path names, in the hash :attr:`Streams.paths`.

    ``kind``: ``sampler`` (a weights version the rollout workers serve) or ``state`` (a
    checkpoint with optimizer state, for ``load_state``). ``model`` is the adapter (model id)
    it belongs to; the gateway lets only that model's tenant use the path. ``uri`` is the
    version directory on the artifact store or the checkpoint directory.
    """

    path: str
    kind: Literal["sampler", "state"]
    model: str
    registration_id: str
    version: int
    step: int
    uri: str


def sampler_path(model: str, name: str) -> str:
    """The ``tinker://`` path of a client's saved sampler weights."""
    return f"tinker://{model}/sampler_weights/{name}"


def state_path(model: str, name: str) -> str:
    """The ``tinker://`` path of a client's saved training state (a checkpoint)."""
    return f"tinker://{model}/weights/{name}"


def record_path(effects: Effects, streams: Streams, record: PathRecord) -> None:
    """Queue the write that makes ``record.path`` resolvable."""
    effects.command("HSET", streams.paths, record.path, msgspec.json.encode(record).decode())


def resolve_path(client: redis.Redis, streams: Streams, path: str) -> PathRecord | None:
    """What ``path`` names, or None if nothing was saved under it."""
    raw = client.hget(streams.paths, path)
    return None if raw is None else msgspec.json.decode(raw, type=PathRecord)


def complete(effects: Effects, streams: Streams, request_id: str, result: msgspec.Struct) -> None:
    """Queue the writes that answer future ``request_id`` with ``result`` (first answer wins)."""
    key = streams.future(request_id)
    effects.command("HSETNX", key, "result", msgspec.json.encode(result).decode())
    effects.command("HSET", key, "state", "done")
    effects.command("EXPIRE", key, FUTURE_TTL_S)


def fail(
    effects: Effects,
    streams: Streams,
    request_id: str,
    message: str,
    *,
    category: Category = "user",
) -> None:
    """Queue the writes that fail future ``request_id`` with ``message`` (unless answered)."""
    key = streams.future(request_id)
    effects.command("HSETNX", key, "error", message)
    effects.command("HSETNX", key, "category", category)
    effects.command("HSETNX", key, "state", "failed")
    effects.command("EXPIRE", key, FUTURE_TTL_S)


def read(client: redis.Redis, streams: Streams, request_id: str) -> FutureRecord | None:
    """The record of future ``request_id``, or None if there is none (unknown or expired)."""
    raw = client.hgetall(streams.future(request_id))
    if not raw:
        return None
    fields = {_text(k): v for k, v in raw.items()}

    def text(name: str, default: str = "") -> str:
        value = fields.get(name)
        return default if value is None else _text(value)

    # the fields decide, not ``state`` alone: a gateway creates the record with state=pending,
    # and a completion only adds fields with HSETNX (first answer wins), so a result means done
    # and otherwise an error means failed
    if fields.get("result"):
        state = "done"
    elif fields.get("error"):
        state = "failed"
    else:
        state = text("state", "pending")
        if state not in ("pending", "done", "failed"):
            state = "failed"
    category = text("category", "server")
    return FutureRecord(
        request_id=request_id,
        state=state,  # type: ignore[arg-type]
        tenant=text("tenant"),
        kind=text("kind"),
        model=text("model"),
        result=bytes(fields.get("result") or b""),
        error=text("error"),
        category="user" if category == "user" else "server",
        created=float(text("created", "0") or 0),
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
