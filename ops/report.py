"""``multilora status``: one typed row per adapter name, from the control log and the status
hashes, and the table that shows the rows.

The rows are :class:`~orchestrator.status.AdapterStatus` records, the type the status projection
hashes decode into. Source of truth is the ``control`` log: :func:`fold_control` folds it into
one lifecycle state per registration with :func:`orchestrator.registrations.fold` (the
lifecycle's :func:`~orchestrator.lifecycle.transition`, so phases, fencing and duplicates are
the trainer's own, and phase names are :class:`~orchestrator.lifecycle.Phase` values). What is
not lifecycle is kept beside each registration's state: the workers' ``synced`` versions and
latencies, the last ``checkpoint_saved`` and ``exported``, the field a ``rejected`` names, the
metrics of every step the lifecycle applied. (Queue positions are the trainer's: a ``queued``
event gives a registration's first one, the status hash the current one.)

A name's row shows its newest live registration, else its latest one; a registration that
arrived while another one of the name was live and never became live itself (rejected because
the name was taken) does not replace it (as :meth:`orchestrator.fleet.Fleet.current`). The
status hashes (:func:`orchestrator.status.read_status`) complement the log: they fill fields the
log no longer holds once it has been trimmed, and they give the rows of adapters whose
lifecycle events were trimmed away entirely. A control entry that does not decode is never
skipped silently: it is counted and the table says how many there were.

Everything here only reads the bus; nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis

from events.codec import Decoder
from events.errors import SchemaError
from events.schema import (
    CheckpointSaved,
    ControlEvent,
    Exported,
    Rejected,
    StepDone,
    Synced,
)
from events.streams import Streams
from ops.tail import stream_entries
from orchestrator.lifecycle import AdapterState, is_live, registration_key
from orchestrator.registrations import fold
from orchestrator.status import AdapterStatus, ArtifactRef, WorkerSync, read_status, state_status

StepMetrics = tuple[int, dict[str, float]]
"""One point of a step history: the step and its ``StepDone.metrics``."""


@dataclass
class _Beside:
    """What the control log says about one registration besides its lifecycle state."""

    synced: dict[str, WorkerSync] = field(default_factory=dict)  # worker -> newest version
    checkpoint: ArtifactRef | None = None
    export: ArtifactRef | None = None
    rejected_field: str = ""
    steps: dict[int, dict[str, float]] = field(default_factory=dict)

    def note(self, event: Any, applied: bool) -> None:
        """Keep what ``event`` says (``applied``: the lifecycle applied it to the state)."""
        match event:
            case StepDone(step=step, metrics=metrics) if applied:
                self.steps[step] = dict(metrics)
            case Rejected(field=name):
                self.rejected_field = name
            case Synced(worker=worker, version=version):
                old = self.synced.get(worker)
                if old is None or version >= old.version:
                    self.synced[worker] = WorkerSync(
                        registration_id=event.registration_id,
                        version=version,
                        latency_s=event.latency_s,
                        time=event.time,
                    )
            case CheckpointSaved(step=step) if (
                self.checkpoint is None or step >= self.checkpoint.step
            ):
                self.checkpoint = _ref(event, final=event.final)
            case Exported(step=step) if self.export is None or step >= self.export.step:
                self.export = _ref(event, final=False)


def _ref(event: CheckpointSaved | Exported, *, final: bool) -> ArtifactRef:
    return ArtifactRef(
        registration_id=event.registration_id, step=event.step, uri=event.uri, final=final
    )


@dataclass(frozen=True)
class ControlView:
    """The control log folded: lifecycle states by registration id, the registration each
    adapter name shows, what the log says besides, and how many entries did not decode."""

    states: dict[str, AdapterState]
    shown: dict[str, str]
    beside: dict[str, _Beside]
    bad_entries: int = 0

    def rows(self) -> dict[str, AdapterStatus]:
        """The row of every adapter name, by name."""
        return {name: self._row(self.states[key]) for name, key in sorted(self.shown.items())}

    def step_history(self) -> dict[str, list[StepMetrics]]:
        """``{adapter: [(step, metrics), ...]}`` of the registration each name shows, by step."""
        return {name: sorted(self.beside[key].steps.items()) for name, key in self.shown.items()}

    def _row(self, state: AdapterState) -> AdapterStatus:
        beside = self.beside[state.registration_id]
        reason = state.reason
        if beside.rejected_field:
            reason = f"{reason} (field {beside.rejected_field})"
        latest = max(beside.synced.values(), key=lambda s: s.time, default=None)
        return msgspec.structs.replace(
            state_status(state),
            reason=reason,
            synced=tuple(sorted((w, s.version) for w, s in beside.synced.items())),
            last_sync_latency_s=latest.latency_s if latest is not None else None,
            last_checkpoint_step=beside.checkpoint.step if beside.checkpoint else None,
            last_checkpoint_uri=beside.checkpoint.uri if beside.checkpoint else "",
            export_uri=beside.export.uri if beside.export else "",
        )


def fold_control(events: Iterable[Any], *, bad_entries: int = 0) -> ControlView:
    """Fold decoded control events, in log order, into a :class:`ControlView` (pure)."""
    states: dict[str, AdapterState] = {}
    shown: dict[str, str] = {}
    beside: dict[str, _Beside] = {}
    for event in events:
        key = registration_key(event)
        before = states.get(key)
        state = fold(before, event)
        if state is None:
            continue  # not picked up: e.g. late work of a registration this log no longer holds
        if before is None:
            current = shown.get(state.name)
            if current is None or is_live(state) or not is_live(states[current]):
                shown[state.name] = key
        states[key] = state
        beside.setdefault(key, _Beside()).note(event, applied=state is not before)
    return ControlView(states=states, shown=shown, beside=beside, bad_entries=bad_entries)


def read_control(client: redis.Redis, streams: Streams) -> ControlView:
    """Read the whole control log and fold it; undecodable entries are counted, not folded."""
    decoder = Decoder(ControlEvent)
    events = []
    bad = 0
    for entry_id, fields in stream_entries(client.xrange(streams.control)):
        try:
            events.append(decoder.decode(fields, entry_id=entry_id))
        except SchemaError:
            bad += 1
    return fold_control(events, bad_entries=bad)


# --- rows -----------------------------------------------------------------------------------


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """Every adapter's row, by name, and how many control entries did not decode."""

    rows: tuple[AdapterStatus, ...]
    bad_entries: int = 0


def merge_status(logged: AdapterStatus | None, stored: AdapterStatus) -> AdapterStatus:
    """The log's row, with what it lacks taken from the status hash's row of the same
    registration (the log wins where it knows; a hash of another registration is ignored)."""
    if logged is None:
        return stored
    if stored.registration_id not in ("", logged.registration_id):
        return logged
    fill = {
        name: getattr(stored, name)
        for name in AdapterStatus.__struct_fields__
        if _absent(getattr(logged, name)) and not _absent(getattr(stored, name))
    }
    return msgspec.structs.replace(logged, **fill) if fill else logged


def _absent(value: object) -> bool:
    return value is None or value == "" or value == ()


def read_rows(client: redis.Redis, streams: Streams) -> StatusReport:
    """Every adapter the deployment knows: the control log's rows merged with the status
    hashes' (:func:`merge_status`), sorted by name."""
    view = read_control(client, streams)
    rows = view.rows()
    for stored in read_status(client, streams):
        rows[stored.name] = merge_status(rows.get(stored.name), stored)
    return StatusReport(rows=tuple(rows[n] for n in sorted(rows)), bad_entries=view.bad_entries)


# --- table ----------------------------------------------------------------------------------

HEADER = ("ADAPTER", "STATE", "SLOT", "STEP", "REWARD", "LAST SYNC", "REASON")


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: AdapterStatus) -> list[str]:
    total = str(row.steps_total) if row.steps_total else "?"
    sync = "-"
    if row.synced:
        version = max(v for _, v in row.synced)
        sync = f"v{version}/{_fmt(row.last_sync_latency_s, '.2f')}s"
    return [
        row.name,
        row.phase.value if row.phase is not None else "-",
        "-" if row.slot is None else str(row.slot),
        f"{row.step}/{total}",
        _fmt(row.reward_mean),
        sync,
        row.reason,
    ]


def render_table(rows: Iterable[AdapterStatus], bad_entries: int = 0) -> str:
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
    report = read_rows(client, streams)
    return render_table(report.rows, report.bad_entries)
