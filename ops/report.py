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

Below the adapters, a table of processes: every process that ever sent a heartbeat
(:func:`events.heartbeat.read_processes`) with its liveness, and every process ``multilora up``
supervises (:func:`ops.supervise.read_supervisor`) with its restarts and last exit. The trainer
has work while any adapter is in a training phase (``admitted``, ``running``, ``completing``);
it is ``stalled`` when it then made no progress for ``stall_after_s`` (default
:data:`events.heartbeat.DEFAULT_STALL_AFTER_S`, 120 s); other processes have work while they
hold entries in flight. When no trainer is alive (dead, stalled or stopped; none that ever beat
counts as unknown, not dead), the rows in a training phase say so: ``running (trainer dead)``,
so frozen steps never read as a healthy run.

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
from events.heartbeat import (
    DEFAULT_STALL_AFTER_S,
    Liveness,
    ProcessBeat,
    ProcessStatus,
    holds_entries,
    read_processes,
)
from events.schema import (
    CheckpointSaved,
    ControlEvent,
    Exported,
    Rejected,
    StepDone,
    Synced,
)
from events.streams import Streams
from ops.supervise import UnitRecord, read_supervisor
from ops.tail import stream_entries
from orchestrator.lifecycle import AdapterState, Phase, is_live, registration_key
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


def _cells(row: AdapterStatus, trainer: str = "") -> list[str]:
    total = str(row.steps_total) if row.steps_total else "?"
    sync = "-"
    if row.synced:
        version = max(v for _, v in row.synced)
        sync = f"v{version}/{_fmt(row.last_sync_latency_s, '.2f')}s"
    phase = row.phase.value if row.phase is not None else "-"
    if trainer and row.phase in TRAINING_PHASES:
        phase = f"{phase} (trainer {trainer})"
    return [
        row.name,
        phase,
        "-" if row.slot is None else str(row.slot),
        f"{row.step}/{total}",
        _fmt(row.reward_mean),
        sync,
        _reason(row),
    ]


def _reason(row: AdapterStatus) -> str:
    """The row's reason, then its skipped steps (count, and the latest skip's step and why)."""
    if not row.skips or row.last_skip is None:
        return row.reason
    skipped = "step" if row.skips == 1 else "steps"
    note = f"{row.skips} {skipped} skipped, last {row.last_skip.step}: {row.last_skip.reason}"
    return f"{row.reason}; {note}" if row.reason else note


def _aligned(lines: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the last one not padded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return [
        "  ".join(
            [*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]]
        ).rstrip()
        for line in lines
    ]


def render_table(rows: Iterable[AdapterStatus], bad_entries: int = 0, trainer: str = "") -> str:
    """A fixed-width text table, one line per adapter (the reason column is not padded).
    ``trainer`` (``dead``, ``stalled``, ``stopped``; empty: fine or unknown) flags every row in a
    training phase."""
    lines = [list(HEADER)] + [_cells(r, trainer) for r in rows]
    text = _aligned(lines)
    if len(lines) == 1:
        text.append("(no adapters)")
    if bad_entries:
        text.append(f"warning: {bad_entries} control entries did not decode (see `events tail`)")
    return "\n".join(text)


# --- processes ------------------------------------------------------------------------------

TRAINING_PHASES = frozenset({Phase.ADMITTED, Phase.RUNNING, Phase.COMPLETING})
"""Phases in which an adapter needs a live trainer to move."""

PROCESS_HEADER = ("PROCESS", "ROLE", "HOST/PID", "BEAT", "PROGRESS", "STATE", "RESTARTS", "EXIT")
"""BEAT and PROGRESS are ages: the time since the last beat, since the last progress."""


def trainer_problem(processes: Iterable[ProcessStatus]) -> str:
    """``""`` while some trainer is alive (or none ever beat: unknown), else the best state of
    the trainers that beat: ``stalled``, ``stopped`` or ``dead``."""
    states = {p.liveness for p in processes if p.beat.role == "trainer"}
    if not states or Liveness.ALIVE in states:
        return ""
    for state in (Liveness.STALLED, Liveness.STOPPED, Liveness.DEAD):
        if state in states:
            return state.value
    return ""


def _age(seconds: float) -> str:
    return f"{max(0.0, seconds):.1f}s" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def render_processes(processes: Iterable[ProcessStatus], supervised: dict[str, UnitRecord]) -> str:
    """One line per process that beat, then per supervised process that does not beat
    (the embedded Redis, the gateway); restarts and last exit come from ``up``'s supervisor."""
    lines = [list(PROCESS_HEADER)]
    beating = set()
    for p in processes:
        b, unit = p.beat, supervised.get(p.beat.name)
        beating.add(b.name)
        lines.append(
            [
                b.name,
                b.role,
                f"{b.host}/{b.pid}",
                _age(p.beat_age_s),
                _age(p.progress_age_s),
                p.liveness.value,
                str(unit.restarts) if unit else "-",
                unit.last_exit if unit and unit.last_exit else "-",
            ]
        )
    for name, unit in sorted(supervised.items()):
        if name not in beating:
            pid = f"-/{unit.pid}" if unit.pid else "-"
            exit_ = unit.last_exit or "-"
            lines.append([name, "-", pid, "-", "-", unit.state, str(unit.restarts), exit_])
    text = _aligned(lines)
    if len(lines) == 1:
        text.append("(no process heartbeats)")
    return "\n".join(text)


def status_table(
    client: redis.Redis, streams: Streams, *, stall_after_s: float = DEFAULT_STALL_AFTER_S
) -> str:
    """The ``multilora status`` tables: every adapter the deployment knows, then its processes
    (module doc: liveness, and the flag on adapter rows when no trainer is alive)."""
    report = read_rows(client, streams)
    training = any(r.phase in TRAINING_PHASES for r in report.rows)

    def has_work(beat: ProcessBeat) -> bool:
        return training if beat.role == "trainer" else holds_entries(beat)

    processes = read_processes(client, streams, stall_after_s=stall_after_s, has_work=has_work)
    adapters = render_table(report.rows, report.bad_entries, trainer_problem(processes))
    return adapters + "\n\n" + render_processes(processes, read_supervisor(client, streams))
