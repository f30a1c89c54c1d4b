"""Operator views of a deployment: the status table, a live watch, an event tail, reward curves.

Source of truth is the ``control`` log: :func:`fold_control` replays its lifecycle events into one
:class:`AdapterRow` per adapter name (the latest registration of that name wins). The status
projection hashes (``<ns>:status:<adapter>``, indexed by the set ``<ns>:status``) are read as a
complement: they fill fields the log no longer holds once it has been trimmed, and they list
adapters whose lifecycle events were trimmed away entirely. A control entry that does not decode is
never skipped silently: it is counted and the table says how many there were.

Everything here only reads the bus; nothing is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
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

StepMetrics = tuple[int, dict[str, float]]
Entry = tuple[str, dict[Any, Any]]


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[Entry]:
    """Stream entries as redis-py returns them (``[(id, fields), ...]``), ids as ``str``."""
    return [(_s(entry_id), dict(fields or {})) for entry_id, fields in raw or []]


def _read_new(client: redis.Redis, key: str, last_id: str, block_ms: int) -> list[Entry]:
    """Entries of ``key`` after ``last_id`` (``XREAD BLOCK``); empty when the wait timed out."""
    got: Any = client.xread({key: last_id}, block=block_ms, count=100)
    return [entry for _, raw in got or [] for entry in _entries(raw)]


@dataclass(frozen=True)
class AdapterRow:
    """What an operator sees about the latest registration of one adapter name.

    ``phase`` is one of ``requested``, ``queued``, ``training``, ``cancelling``, ``completed``,
    ``cancelled``, ``retired``, ``rejected``, ``failed`` (or whatever the status hash says for
    adapters the log no longer holds). ``slot`` is ``None`` when the adapter holds no slot.
    ``reward`` is the ``reward_mean`` metric of the latest step; ``sync_latency_s`` is the latest
    ``adapter.synced`` latency of any worker for ``sync_version``.
    """

    name: str
    registration_id: str = ""
    phase: str = "requested"
    slot: int | None = None
    step: int = 0
    total_steps: int = 0
    reward: float | None = None
    loss: float | None = None
    version: int = 0
    sync_version: int | None = None
    sync_latency_s: float | None = None
    reason: str = ""
    checkpoint_step: int | None = None


@dataclass(frozen=True)
class ControlView:
    """The fold of the control log: rows by adapter name, step histories, undecodable entries."""

    rows: dict[str, AdapterRow]
    history: dict[str, list[StepMetrics]]
    bad_entries: int


_ENDED = ("completed", "cancelled", "rejected", "failed")
_STARTS = (RegisterRequested, Admitted, Queued, Rejected)
"""Events that may open a new registration of a name; other events of an unknown one are late."""


def _apply(row: AdapterRow, event: Any) -> AdapterRow:
    """The row after one control event of its registration (pure)."""
    if isinstance(event, Queued):
        return replace(row, phase="queued", total_steps=event.spec.steps)
    if isinstance(event, Admitted):
        return replace(
            row,
            phase="training",
            slot=event.slot,
            total_steps=event.spec.steps,
            step=max(row.step, event.start_step),
        )
    if isinstance(event, StepDone):
        reward = event.metrics.get("reward_mean", row.reward)
        loss = event.metrics.get("loss", row.loss)
        return replace(row, step=event.step, version=event.version, reward=reward, loss=loss)
    if isinstance(event, SyncRequested):
        return replace(row, version=max(row.version, event.version))
    if isinstance(event, Synced):
        if row.sync_version is not None and event.version < row.sync_version:
            return row
        return replace(row, sync_version=event.version, sync_latency_s=event.latency_s)
    if isinstance(event, CheckpointSaved):
        return replace(row, checkpoint_step=event.step)
    if isinstance(event, DeregisterRequested):
        if row.phase in _ENDED:
            return row
        return replace(row, phase="cancelling", reason=event.reason)
    if isinstance(event, Completed):
        phase = "completed" if event.reason == "budget" else "cancelled"
        return replace(row, phase=phase, step=event.step)
    if isinstance(event, Retired):
        return replace(row, slot=None, phase=row.phase if row.phase in _ENDED else "retired")
    if isinstance(event, Rejected):
        where = f" (field {event.field})" if event.field else ""
        return replace(row, phase="rejected", slot=None, reason=event.reason + where)
    if isinstance(event, Failed):
        return replace(row, phase="failed", reason=event.reason, step=max(row.step, event.step))
    return row


def fold_control(events: Iterable[Any]) -> ControlView:
    """Replay decoded control events (in log order) into rows and per-adapter step histories.

    A ``RegisterRequested`` (or any event) carrying a registration id other than the row's starts
    a fresh row for that name: a name registered again after it retired shows its new run only.
    Events with an empty ``registration_id`` (a rejection of an unregistered request) apply to the
    current row. The history keeps one ``(step, metrics)`` per step of the latest registration;
    a redelivered ``StepDone`` replaces the earlier entry of the same step.
    """
    rows: dict[str, AdapterRow] = {}
    steps: dict[str, dict[int, dict[str, float]]] = {}
    for event in events:
        name = event.adapter
        row = rows.get(name)
        rid = event.registration_id
        if row is not None and rid and not row.registration_id:
            row = replace(row, registration_id=rid)
        if row is None or (rid and rid != row.registration_id):
            if row is not None and not isinstance(event, _STARTS):
                continue  # late work of an older registration
            row = AdapterRow(name=name, registration_id=rid)
            steps[name] = {}
        if isinstance(event, RegisterRequested):
            row = replace(row, total_steps=event.spec.steps)
        row = _apply(row, event)
        rows[name] = row
        if isinstance(event, StepDone):
            steps[name][event.step] = dict(event.metrics)
    history = {name: sorted(by_step.items()) for name, by_step in steps.items()}
    return ControlView(rows=rows, history=history, bad_entries=0)


def read_control(client: redis.Redis, streams: Streams) -> ControlView:
    """Read the whole control log and fold it; undecodable entries are counted, not folded."""
    decoder = Decoder(ControlEvent)
    events = []
    bad = 0
    for entry_id, fields in _entries(client.xrange(streams.control)):
        try:
            events.append(decoder.decode(fields, entry_id=entry_id))
        except SchemaError:
            bad += 1
    view = fold_control(events)
    return replace(view, bad_entries=bad)


def step_history(client: redis.Redis, streams: Streams) -> dict[str, list[StepMetrics]]:
    """``{adapter: [(step, metrics), ...]}`` from the ``adapter.step_done`` events, by step."""
    return read_control(client, streams).history


# --- status projection hashes ---------------------------------------------------------------


def _first(fields: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if fields.get(name, "") != "":
            return fields[name]
    return None


def _number(text: str | None, kind: type) -> Any:
    if text is None:
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        return None


def read_status_hashes(client: redis.Redis, streams: Streams) -> dict[str, dict[str, str]]:
    """The status projection as ``{adapter: {field: value}}``.

    Uses :func:`orchestrator.status.read_status` (which drops values of older registrations) when
    that module is installed, else reads the raw hashes of every name in the index set.
    """
    try:
        from orchestrator.status import read_status
    except ImportError:
        names = sorted(_s(n) for n in client.smembers(streams.status_index))  # type: ignore[union-attr]
        raw = {name: client.hgetall(streams.status(name)) for name in names}
        return {n: {_s(k): _s(v) for k, v in h.items()} for n, h in raw.items() if h}  # type: ignore[union-attr]
    out = {}
    for status in read_status(client, streams):
        fields = msgspec.structs.asdict(status)
        if status.synced:
            fields["sync_version"] = max(version for _, version in status.synced)
        out[status.name] = {k: str(v) for k, v in fields.items() if v is not None and v != ""}
    return out


def _merge_status(row: AdapterRow | None, name: str, fields: Mapping[str, str]) -> AdapterRow:
    """Fill what the control fold lacks from one status hash (the log wins where it knows)."""
    registration = _first(fields, "registration_id")
    if row is not None and registration and row.registration_id not in ("", registration):
        return row  # the hash shows another registration than the log's latest
    if row is None:
        slot = _number(_first(fields, "slot"), int)
        row = AdapterRow(
            name=name,
            registration_id=_first(fields, "registration_id") or "",
            phase=_first(fields, "phase", "state") or "unknown",
            slot=slot if slot is not None and slot >= 0 else None,
            step=_number(_first(fields, "step"), int) or 0,
            version=_number(_first(fields, "version"), int) or 0,
            reason=_first(fields, "reason") or "",
        )
    if not row.total_steps:
        total = _number(_first(fields, "steps_total", "total_steps", "steps"), int)
        row = replace(row, total_steps=total or 0)
    if row.reward is None:
        row = replace(row, reward=_number(_first(fields, "reward_mean", "reward"), float))
    if row.loss is None:
        row = replace(row, loss=_number(_first(fields, "loss"), float))
    if row.sync_latency_s is None:
        latency = _number(_first(fields, "last_sync_latency_s", "sync_latency_s"), float)
        sync_version = _number(_first(fields, "sync_version"), int)
        row = replace(row, sync_latency_s=latency, sync_version=sync_version)
    return row


def adapter_rows(client: redis.Redis, streams: Streams) -> tuple[list[AdapterRow], int]:
    """All adapters (control fold merged with status hashes) by name, and the bad-entry count."""
    view = read_control(client, streams)
    rows = dict(view.rows)
    for name, fields in read_status_hashes(client, streams).items():
        rows[name] = _merge_status(rows.get(name), name, fields)
    return [rows[n] for n in sorted(rows)], view.bad_entries


# --- rendering ----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: AdapterRow) -> list[str]:
    total = str(row.total_steps) if row.total_steps else "?"
    if row.sync_version is None:
        sync = "-"
    else:
        sync = f"v{row.sync_version}/{_fmt(row.sync_latency_s, '.2f')}s"
    return [
        row.name,
        row.phase,
        "-" if row.slot is None else str(row.slot),
        f"{row.step}/{total}",
        _fmt(row.reward),
        sync,
        row.reason,
    ]


HEADER = ("ADAPTER", "STATE", "SLOT", "STEP", "REWARD", "LAST SYNC", "REASON")


def render_table(rows: Iterable[AdapterRow], bad_entries: int = 0) -> str:
    """A fixed-width text table, one line per adapter (the reason column is not padded)."""
    lines = [list(HEADER)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    text = []
    for line in lines:
        padded = [cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)]
        text.append("  ".join([*padded, line[-1]]).rstrip())
    if len(lines) == 1:
        text.append("(no adapters)")
    if bad_entries:
        text.append(f"warning: {bad_entries} control entries did not decode (see `events tail`)")
    return "\n".join(text)


def status_table(client: redis.Redis, streams: Streams) -> str:
    """The ``multilora status`` table of every adapter the deployment knows."""
    rows, bad = adapter_rows(client, streams)
    return render_table(rows, bad)


def progress_bar(step: int, total: int, width: int = 30) -> str:
    """``[#####.....]`` filled ``step/total`` of ``width`` (empty when ``total`` is unknown)."""
    filled = min(width, width * step // total) if total > 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render_progress(rows: Iterable[AdapterRow]) -> str:
    """One progress line per adapter: name, bar, step/total, state, reward."""
    rows = list(rows)
    if not rows:
        return "(no adapters)"
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        total = str(r.total_steps) if r.total_steps else "?"
        lines.append(
            f"{r.name.ljust(width)}  {progress_bar(r.step, r.total_steps)} "
            f"{r.step:>5}/{total:<5} {r.phase:<10} reward {_fmt(r.reward)}"
        )
    return "\n".join(lines)


CLEAR_SCREEN = "\x1b[2J\x1b[H"


def watch(
    client: redis.Redis,
    streams: Streams,
    interval_s: float = 1.0,
    *,
    out: TextIO | None = None,
    iterations: int | None = None,
) -> None:
    """Redraw progress bars until Ctrl-C (or ``iterations`` redraws, for tests).

    Waits on the control log with ``XREAD BLOCK`` (at most ``interval_s``) between redraws, so a
    new event redraws at once and an idle deployment costs one blocking read per interval.
    """
    if interval_s <= 0:
        raise ConfigError(f"watch interval must be positive, got {interval_s!r}")
    out = out or sys.stdout
    last = _entries(client.xrevrange(streams.control, count=1))
    last_id = last[0][0] if last else "0-0"
    drawn = 0
    try:
        while iterations is None or drawn < iterations:
            rows, _ = adapter_rows(client, streams)
            stamp = time.strftime("%H:%M:%S")
            out.write(f"{CLEAR_SCREEN}multilora {streams.namespace}  {stamp}\n\n")
            out.write(render_progress(rows) + "\n")
            out.flush()
            drawn += 1
            if iterations is not None and drawn >= iterations:
                break
            new = _read_new(client, streams.control, last_id, int(interval_s * 1000))
            if new:
                last_id = new[-1][0]
    except KeyboardInterrupt:
        out.write("\n")


# --- event tail ---------------------------------------------------------------------------


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
    if isinstance(event, RegisterRequested | Queued):
        extra = f" position={event.position}" if isinstance(event, Queued) else ""
        return f"rank={event.spec.rank} steps={event.spec.steps}{extra}"
    if isinstance(event, Admitted):
        return f"slot={event.slot} start_step={event.start_step}"
    if isinstance(event, StepDone):
        shown = ("reward_mean", "loss")
        metrics = " ".join(f"{k}={event.metrics[k]:.4g}" for k in shown if k in event.metrics)
        return f"step={event.step} v{event.version} {metrics}".rstrip()
    if isinstance(event, SyncRequested):
        return f"v{event.version} step={event.step} {event.bytes}B"
    if isinstance(event, Synced):
        return f"worker={event.worker} v{event.version} {event.latency_s:.2f}s"
    if isinstance(event, CheckpointSaved):
        return f"step={event.step} final={event.final} {event.uri}"
    if isinstance(event, Completed):
        return f"step={event.step} reason={event.reason}"
    if isinstance(event, Retired):
        return f"slot={event.slot}"
    if isinstance(event, Rejected | Failed | DeregisterRequested):
        return event.reason
    if isinstance(event, RolloutTask):
        return f"step={event.step} v{event.version} prompts={len(event.prompt_indices)}"
    if isinstance(event, RolloutGroup):
        samples = sum(len(g.samples) for g in event.groups)
        return f"task={event.task_id[:8]} step={event.step} samples={samples} {event.worker}"
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
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError) as exc:
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
    entries = list(reversed(_entries(client.xrevrange(key, count=count)))) if count else []
    for entry_id, fields in entries:
        out.write(format_entry(stream_name, entry_id, fields) + "\n")
    out.flush()
    if not follow:
        return
    last = _entries(client.xrevrange(key, count=1))
    last_id = last[0][0] if last else "0-0"
    shown = 0
    try:
        while max_follow is None or shown < max_follow:
            for entry_id, fields in _read_new(client, key, last_id, block_ms):
                last_id = entry_id
                out.write(format_entry(stream_name, entry_id, fields) + "\n")
                shown += 1
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")


# --- curves -------------------------------------------------------------------------------


def plot_curves(client: redis.Redis, streams: Streams, out_path: str | Path) -> str:
    """Write a PNG of ``reward_mean`` and ``loss`` against step, one line per adapter.

    Two stacked subplots share the step axis. Adapters without any ``adapter.step_done`` are left
    out; an empty history still writes a (labelled, empty) figure so scripts can rely on the file.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = step_history(client, streams)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_reward, ax_loss) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    try:
        for name, points in sorted(history.items()):
            for ax, key in ((ax_reward, "reward_mean"), (ax_loss, "loss")):
                xy = [(step, m[key]) for step, m in points if key in m]
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=name)
        ax_reward.set_ylabel("reward_mean")
        ax_loss.set_ylabel("loss")
        ax_loss.set_xlabel("step")
        ax_reward.set_title(f"reward and loss per adapter (namespace {streams.namespace})")
        if any(history.values()):
            ax_reward.legend(loc="best", fontsize="small")
        else:
            ax_reward.text(0.5, 0.5, "no steps yet", ha="center", transform=ax_reward.transAxes)
        for ax in (ax_reward, ax_loss):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return str(path)
