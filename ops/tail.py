"""``multilora events tail``: the last entries of a stream, one line each, then new ones as they
arrive.

Each line is the entry id, the event type, the adapter and a short summary of the payload, or why
the entry does not decode (it is shown, never skipped). :func:`stream_entries` and
:func:`read_new` are the two stream reads every operator view shares. Only reads the bus.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec
import redis

from events.codec import Decoder
from events.errors import ConfigError, SchemaError
from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    ControlEvent,
    DeadLetter,
    DeregisterRequested,
    Exported,
    Failed,
    GroupEvent,
    IngressEvent,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    RolloutGroup,
    RolloutTask,
    StepDone,
    Synced,
    SyncRequested,
    TaskEvent,
    event_type,
)
from events.streams import Streams

Entry = tuple[str, dict[Any, Any]]
"""A stream entry: its id and its fields as redis-py returns them."""


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_entries(raw: Any) -> list[Entry]:
    """Stream entries as redis-py returns them (``[(id, fields), ...]``), ids as ``str``."""
    return [(_s(entry_id), dict(fields or {})) for entry_id, fields in raw or []]


def last_entry_id(client: redis.Redis, key: str) -> str:
    """The id of the newest entry of ``key`` (``"0-0"`` for an empty or missing stream)."""
    last = stream_entries(client.xrevrange(key, count=1))
    return last[0][0] if last else "0-0"


def read_new(client: redis.Redis, key: str, last_id: str, block_ms: int) -> list[Entry]:
    """Entries of ``key`` after ``last_id`` (``XREAD BLOCK``); empty when the wait timed out."""
    got: Any = client.xread({key: last_id}, block=block_ms, count=100)
    return [entry for _, raw in got or [] for entry in stream_entries(raw)]


def stream_key(streams: Streams, stream_name: str) -> str:
    """The key of a stream by its short name (``control``, ``ingress``, ``tasks``, ...)."""
    keys = {
        "control": streams.control,
        "ingress": streams.ingress,
        "tasks": streams.tasks,
        "groups": streams.groups,
        "dead": streams.dead,
    }
    if stream_name not in keys:
        raise ConfigError(f"unknown stream {stream_name!r}; choose one of {sorted(keys)}")
    return keys[stream_name]


def _summary(event: Any) -> str:
    """A short, one-line description of a decoded event's payload."""
    match event:
        case RegisterRequested(spec=spec):
            return f"rank={spec.rank} steps={spec.steps}"
        case Queued(spec=spec, position=position):
            return f"rank={spec.rank} steps={spec.steps} position={position}"
        case Admitted(slot=slot, start_step=start_step):
            return f"slot={slot} start_step={start_step}"
        case StepDone(step=step, version=version, metrics=metrics):
            shown = " ".join(
                f"{k}={metrics[k]:.4g}" for k in ("reward_mean", "loss") if k in metrics
            )
            return f"step={step} v{version} {shown}".rstrip()
        case SyncRequested(version=version, step=step, bytes=size):
            return f"v{version} step={step} {size}B"
        case Synced(worker=worker, version=version, latency_s=latency_s):
            return f"worker={worker} v{version} {latency_s:.2f}s"
        case CheckpointSaved(step=step, final=final, uri=uri):
            return f"step={step} final={final} {uri}"
        case Exported(step=step, uri=uri):
            return f"step={step} {uri}"
        case Completed(step=step, reason=reason):
            return f"step={step} reason={reason}"
        case Retired(slot=slot):
            return f"slot={slot}"
        case Rejected(reason=reason) | Failed(reason=reason) | DeregisterRequested(reason=reason):
            return reason
        case RolloutTask(step=step, version=version, prompt_indices=prompts):
            return f"step={step} v{version} prompts={len(prompts)}"
        case RolloutGroup(task_id=task_id, step=step, worker=worker, groups=groups):
            samples = sum(len(g.samples) for g in groups)
            return f"task={task_id[:8]} step={step} samples={samples} {worker}"
        case _:
            return ""


_UNIONS: dict[str, Any] = {
    "control": ControlEvent,
    "ingress": IngressEvent,
    "tasks": TaskEvent,
    "groups": GroupEvent,
}


def format_entry(stream_name: str, entry_id: str, fields: Mapping[Any, Any]) -> str:
    """One line for one stream entry: id, type, adapter, summary (or why it does not decode)."""
    if stream_name == "dead":
        raw = fields.get(b"dead", fields.get("dead"))
        try:
            letter = msgspec.json.decode(raw or b"", type=DeadLetter)
        except (msgspec.DecodeError, TypeError) as exc:
            return f"{entry_id}  <undecodable dead letter: {exc}>"
        return (
            f"{entry_id}  dead  {letter.stream}/{letter.entry_id}  "
            f"deliveries={letter.deliveries}  {letter.reason}"
        )
    try:
        event = Decoder(_UNIONS[stream_name]).decode(dict(fields), entry_id=entry_id)
    except SchemaError as exc:
        return f"{entry_id}  <undecodable: {exc}>"
    return f"{entry_id}  {event_type(event)}  {event.adapter}  {_summary(event)}".rstrip()


def tail_events(
    client: redis.Redis,
    streams: Streams,
    stream_name: str,
    count: int = 20,
    follow: bool = False,
    *,
    out: TextIO | None = None,
    block_ms: int = 5_000,
    max_follow: int | None = None,
) -> None:
    """Print the last ``count`` entries of a stream, oldest first; with ``follow``, keep printing
    new entries (``XREAD BLOCK``) until Ctrl-C or ``max_follow`` more entries (for tests)."""
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    out = out or sys.stdout
    key = stream_key(streams, stream_name)
    entries = list(reversed(stream_entries(client.xrevrange(key, count=count)))) if count else []
    for entry_id, fields in entries:
        out.write(format_entry(stream_name, entry_id, fields) + "\n")
    out.flush()
    if not follow:
        return
    last_id = last_entry_id(client, key)
    shown = 0
    try:
        while max_follow is None or shown < max_follow:
            for entry_id, fields in read_new(client, key, last_id, block_ms):
                last_id = entry_id
                out.write(format_entry(stream_name, entry_id, fields) + "\n")
                shown += 1
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
