"""The checker of a chaos run: pure functions over the history the run left behind.

A :class:`History` is what an observer can read after the run — the control log, the
``rollout.groups`` and ``rollout.tasks`` streams (kept whole by an observer consumer group that
never reads, so nothing is trimmed past it), the dead-letter stream, what verifying and
restoring every checkpoint gave (:class:`CheckpointFacts`, gathered by the harness) and the
artifact store's size sampled while the run went on. :func:`check` turns it into a
:class:`Verdict`: counts plus every :class:`Violation`, each naming its registration.

The guarantees checked (DESIGN.md, "Invariants"):

- **complete** — a registration that was admitted and not cancelled completes its budget
  (``completed(reason="budget")`` at ``spec.steps``); ``lost`` counts the budget steps that
  have no ``step_done``. A failed, rejected or never-finished registration is a violation.
- **once** — per registration, in log order, ``step_done`` steps run ``start+1, start+2, …``
  with no gap and no repeat, and versions strictly increase; ``applied_twice`` counts the
  ``step_done`` events of a step already done.
- **fenced** — no step trained on work of an old epoch or of another (e.g. retired)
  registration: its epoch is the registration's current one (the last ``admitted`` before
  it) and the registration has not ended before it; its ``staleness`` metric is at most
  ``spec.max_staleness``; and the prompt groups it consumed (metrics ``groups`` +
  ``groups_dropped``) are no more than the groups of *its own* registration, epoch and step
  that existed when it committed — one per task id, the task issued on ``rollout.tasks`` with
  those same fields, the group's entry no later than the ``step_done``'s. A step that consumed
  more than that must have trained on groups of another epoch or registration:
  ``stale_trained`` counts such steps. Exactly, too: ``step_done`` names the tasks whose groups
  it trained on (``tasks``), and each must be a task of the registration, epoch and step.
- **checkpoints** — every ``checkpoint_saved`` directory that still exists verifies against its
  manifest and restores through the trainer's restore path at the event's step; a final one
  never disappears; every registration that trained and completed has a final checkpoint.
- **nothing dead-lettered**, and the artifact store's sampled size stays within the bound
  (``max_artifact_bytes`` of :func:`check`, when given).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    DeadLetter,
    Failed,
    RegisterRequested,
    Rejected,
    Retired,
    RolloutGroup,
    RolloutTask,
    StepDone,
)
from events.specs import AdapterSpec

Kind = Literal[
    "incomplete",
    "failed",
    "gap",
    "applied_twice",
    "version_order",
    "stale_trained",
    "unverifiable",
    "checkpoint",
    "dead_letter",
    "storage",
]


@dataclass(frozen=True)
class CheckpointFacts:
    """What checking one checkpoint directory gave: ``error`` is ``""`` when it verified
    against its manifest and restored; ``step``/``version`` are the restored run's."""

    uri: str
    error: str = ""
    step: int = -1
    version: int = -1


@dataclass(frozen=True)
class History:
    """Everything a chaos run left behind (entries are ``(stream entry id, event)``).

    ``checkpoints`` holds the facts of every ``checkpoint_saved`` directory that still exists
    (a uri missing from it is gone, e.g. removed by retention); ``artifact_bytes`` the sampled
    sizes of the artifact store; ``cancelled`` the registrations the run meant to cancel.
    """

    control: Sequence[tuple[str, Any]]
    groups: Sequence[tuple[str, RolloutGroup]]
    tasks: Sequence[tuple[str, RolloutTask]]
    dead_letters: Sequence[DeadLetter] = ()
    checkpoints: Mapping[str, CheckpointFacts] = field(default_factory=dict)
    artifact_bytes: Sequence[int] = ()
    cancelled: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Violation:
    kind: Kind
    registration_id: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.registration_id or '-'}: {self.detail}"


@dataclass(frozen=True)
class Verdict:
    """Counts over the run and every violation found (``ok`` when there is none)."""

    registrations: int
    steps_applied: int
    lost: int
    applied_twice: int
    stale_trained: int
    checkpoints_checked: int
    max_artifact_bytes: int
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def of(self, kind: Kind) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]

    def report(self, limit: int = 20) -> str:
        head = (
            f"{self.registrations} registrations, {self.steps_applied} steps applied, "
            f"lost {self.lost}, applied twice {self.applied_twice}, stale trained "
            f"{self.stale_trained}, {self.checkpoints_checked} checkpoints checked, max "
            f"artifact bytes {self.max_artifact_bytes}; {len(self.violations)} violation(s)"
        )
        lines = [str(v) for v in self.violations[:limit]]
        more = len(self.violations) - limit
        return "\n".join([head, *lines, *([f"... and {more} more"] if more > 0 else [])])


@dataclass
class _Registration:
    """One registration as the control log tells it (log order throughout)."""

    registration_id: str
    name: str = ""
    spec: AdapterSpec | None = None
    epochs: list[int] = field(default_factory=list)
    start_step: int = 0
    steps: list[tuple[str, StepDone, int, bool]] = field(default_factory=list)
    """``(entry id, event, current epoch then, ended before it)`` per ``step_done``."""
    completed: Completed | None = None
    failed: Failed | None = None
    rejected: Rejected | None = None
    ended: bool = False
    finals: int = 0


def _ms(entry_id: str) -> int:
    """The server time (ms) in a stream entry id."""
    return int(entry_id.split("-", 1)[0])


def _fold(control: Sequence[tuple[str, Any]]) -> dict[str, _Registration]:
    regs: dict[str, _Registration] = {}

    def reg(event: Any) -> _Registration:
        key = event.registration_id or event.id
        r = regs.setdefault(key, _Registration(key))
        r.name = r.name or event.adapter
        return r

    for entry_id, event in control:
        match event:
            case RegisterRequested():
                reg(event).spec = event.spec
            case Admitted():
                r = reg(event)
                r.spec = event.spec
                if not r.epochs:
                    r.start_step = event.start_step
                r.epochs.append(event.epoch)
            case StepDone():
                r = reg(event)
                current = r.epochs[-1] if r.epochs else 0
                r.steps.append((entry_id, event, current, r.ended))
            case Completed():
                r = reg(event)
                r.completed = r.completed or event
                r.ended = True
            case Failed():
                r = reg(event)
                r.failed = r.failed or event
                r.ended = True
            case Rejected():
                reg(event).rejected = event
            case Retired():
                reg(event).ended = True
            case CheckpointSaved(final=True):
                reg(event).finals += 1
            case _:
                pass
    return regs


def _check_steps(r: _Registration, out: list[Violation]) -> tuple[int, int]:
    """Order, gaps, repeats and versions of one registration's steps; returns
    ``(distinct steps applied, step_done events of an already-done step)``."""
    seen: set[int] = set()
    twice = 0
    last_step, last_version = r.start_step, -1
    for _, done, _, _ in r.steps:
        if done.step in seen:
            twice += 1
            out.append(
                Violation(
                    "applied_twice",
                    r.registration_id,
                    f"step {done.step} done again (epoch {done.epoch}, version {done.version})",
                )
            )
        elif done.step != last_step + 1:
            out.append(
                Violation("gap", r.registration_id, f"step {done.step} follows step {last_step}")
            )
        if done.version <= last_version:
            out.append(
                Violation(
                    "version_order",
                    r.registration_id,
                    f"step {done.step} has version {done.version} after version {last_version}",
                )
            )
        seen.add(done.step)
        last_step = max(last_step, done.step)
        last_version = max(last_version, done.version)
    return len(seen), twice


def _check_complete(r: _Registration, applied: int, cancelled: bool, out: list[Violation]) -> int:
    """Whether the registration reached its end as meant; returns its lost steps."""
    rid = r.registration_id
    if r.rejected is not None:
        out.append(Violation("incomplete", rid, f"rejected: {r.rejected.reason}"))
        return 0
    budget = r.spec.steps if r.spec is not None else 0
    expected = budget - r.start_step
    if r.failed is not None:
        out.append(Violation("failed", rid, f"failed at step {r.failed.step}: {r.failed.reason}"))
        return max(0, expected - applied)
    if r.completed is None:
        out.append(Violation("incomplete", rid, f"never completed ({applied}/{expected} steps)"))
        return max(0, expected - applied)
    if r.completed.reason == "cancelled":
        if not cancelled:
            out.append(Violation("incomplete", rid, "cancelled, but nobody cancelled it"))
        return max(0, r.completed.step - r.start_step - applied)
    lost = max(0, expected - applied)
    if r.completed.step != budget or lost:
        detail = f"completed at step {r.completed.step} with {applied}/{expected} steps applied"
        out.append(Violation("incomplete", rid, detail))
    return lost


def _group_index(
    groups: Sequence[tuple[str, RolloutGroup]], tasks: Sequence[tuple[str, RolloutTask]]
) -> dict[tuple[str, int, int], list[tuple[int, str, int]]]:
    """``(registration, epoch, step) -> [(entry ms, task id, prompt groups)]``: the first group
    of each task, for groups whose task was issued with the same registration, epoch and step."""
    issued = {t.id: (t.registration_id, t.epoch, t.step) for _, t in tasks}
    index: dict[tuple[str, int, int], list[tuple[int, str, int]]] = defaultdict(list)
    first: set[str] = set()
    for entry_id, g in groups:
        key = (g.registration_id, g.epoch, g.step)
        if g.task_id in first or issued.get(g.task_id) != key:
            continue
        first.add(g.task_id)
        index[key].append((_ms(entry_id), g.task_id, len(g.groups)))
    return index


def _check_fenced(
    r: _Registration,
    index: Mapping[tuple[str, int, int], list[tuple[int, str, int]]],
    out: list[Violation],
) -> int:
    """Steps of the registration that trained on work not provably its own current epoch's."""
    rid = r.registration_id
    max_staleness = r.spec.max_staleness if r.spec is not None else 0
    stale = 0
    for entry_id, done, current, ended in r.steps:
        problems = []
        if ended:
            problems.append("after the registration ended")
        if done.epoch != current:
            problems.append(f"under epoch {done.epoch}, the current one being {current}")
        staleness = done.metrics.get("staleness")
        if staleness is not None and staleness > max_staleness:
            problems.append(f"staleness {staleness:g} > max_staleness {max_staleness}")
        own_tasks = {t for _, t, _ in index.get((rid, done.epoch, done.step), ())}
        foreign = [t for t in done.tasks if t not in own_tasks]
        if foreign:  # exact: the step names the tasks whose groups it trained on
            problems.append(
                f"trained on the groups of task(s) {foreign[:3]} that are not of its own "
                f"registration, epoch {done.epoch} and step {done.step}"
            )
        consumed = done.metrics.get("groups"), done.metrics.get("groups_dropped")
        if consumed[0] is None or consumed[1] is None:
            detail = f"step {done.step}: step_done metrics lack 'groups'/'groups_dropped'"
            out.append(Violation("unverifiable", rid, detail))
        else:
            own = sum(
                n for ms, _, n in index.get((rid, done.epoch, done.step), ()) if ms <= _ms(entry_id)
            )
            used = int(consumed[0] + consumed[1])
            if used > own:
                problems.append(
                    f"consumed {used} prompt groups; only {own} of its own epoch and step existed"
                )
        if problems:
            stale += 1
            detail = f"step {done.step} (version {done.version}) trained " + "; ".join(problems)
            out.append(Violation("stale_trained", rid, detail))
    return stale


def _check_checkpoints(
    history: History, regs: Mapping[str, _Registration], out: list[Violation]
) -> int:
    checked: set[str] = set()
    for _, event in history.control:
        if not isinstance(event, CheckpointSaved) or event.uri in checked:
            continue
        rid = event.registration_id
        facts = history.checkpoints.get(event.uri)
        if facts is None:
            if event.final:
                out.append(Violation("checkpoint", rid, f"final checkpoint {event.uri} is gone"))
            continue
        checked.add(event.uri)
        if facts.error:
            out.append(Violation("checkpoint", rid, f"{event.uri}: {facts.error}"))
        elif facts.step != event.step:
            detail = f"{event.uri} restores at step {facts.step}; the event says {event.step}"
            out.append(Violation("checkpoint", rid, detail))
    for r in regs.values():
        if r.completed is not None and r.epochs and not r.finals:
            out.append(Violation("checkpoint", r.registration_id, "no final checkpoint"))
    return len(checked)


def check(history: History, *, max_artifact_bytes: int | None = None) -> Verdict:
    """Every guarantee of the module doc, over ``history``; ``max_artifact_bytes``: the storage
    bound (None: sizes are reported, not checked)."""
    regs = _fold(history.control)
    index = _group_index(history.groups, history.tasks)
    out: list[Violation] = []
    applied = lost = twice = stale = 0
    for r in regs.values():
        if r.rejected is None and not r.epochs and r.completed is not None:
            continue  # cancelled while it waited for a slot: it never trained
        n, t = _check_steps(r, out)
        lost += _check_complete(r, n, r.registration_id in history.cancelled, out)
        stale += _check_fenced(r, index, out)
        applied, twice = applied + n, twice + t
    checked = _check_checkpoints(history, regs, out)
    for letter in history.dead_letters:
        detail = f"{letter.stream} entry {letter.entry_id} ({letter.group}): {letter.reason}"
        out.append(Violation("dead_letter", "", detail))
    biggest = max(history.artifact_bytes, default=0)
    if max_artifact_bytes is not None and biggest > max_artifact_bytes:
        detail = f"the artifact store reached {biggest} bytes > bound {max_artifact_bytes}"
        out.append(Violation("storage", "", detail))
    return Verdict(
        registrations=len(regs),
        steps_applied=applied,
        lost=lost,
        applied_twice=twice,
        stale_trained=stale,
        checkpoints_checked=checked,
        max_artifact_bytes=biggest,
        violations=tuple(out),
    )


def counts(verdict: Verdict) -> dict[str, int]:
    """Violations per kind (for tables)."""
    return dict(Counter(v.kind for v in verdict.violations))
