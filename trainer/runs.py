"""The trainer's runtime record of one admitted registration, and the rollout tasks it issues.

An :class:`AdapterRun` lives from ``admitted`` to ``retired`` (a restart rebuilds it from the
newest version, :meth:`trainer.versions.VersionPublisher.restore`). It holds what the control
log does not: the data cursor, the tasks in flight per step (``expected``), the groups deferred
per step (``pending``: read, not yet acknowledged) and the newest published version.

Issuing (step 2 of the loop in :mod:`trainer.process`): the tasks of step ``k`` are the cursor's
next ``prompts_per_step`` prompts, split into tasks of ``prompts_per_task`` prompts (0: one task
per step). Tasks are issued at most ``max_staleness`` steps ahead of the newest weights (flow
control), never past the step budget. The cursor from before step ``k``'s tasks is kept
(``cursor_before``) until step ``k`` trains: the version written before step ``k`` stores it, so
a run resumed from that version draws the same prompts for step ``k`` again (exact resume).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from events.codec import new_id
from events.consumer import Delivery
from events.schema import (
    Admitted,
    Completed,
    Failed,
    Retired,
    RolloutGroup,
    RolloutTask,
    StepDone,
)
from events.specs import AdapterSpec
from orchestrator.cursor import CursorState, DataCursor
from trainer.batching import GroupRows

Held = tuple[Delivery, RolloutGroup]
"""A deferred group: its delivery (acknowledged when its step trains or the run ends) and event."""

EndReason = Literal["budget", "cancelled"]
"""Why a run completes (a failed run does not complete, it is retired)."""


@dataclass
class AdapterRun:
    """The trainer-side runtime of one admitted registration.

    ``step`` is the number of steps trained and ``version`` the weights they made; each trained
    step makes the next version. Versions are written behind the step, so the run may be a step
    ahead of what is durable: ``announced_step`` / ``announced_version`` are the newest version
    that is written and announced (``step_done`` / ``sync_requested``), at ``uri``, whose PEFT
    weights have the ``(sha256, bytes)`` of ``published`` (``None`` until known). Tasks are issued
    at the announced version only, so no worker is sent to weights that are not written yet.
    ``failures`` counts consecutive steps the train step skipped (non-finite loss or gradient,
    no target tokens, every sample failed), ``skips`` all of them.
    """

    name: str
    registration_id: str
    epoch: int
    slot: int
    spec: AdapterSpec
    cursor: DataCursor
    step: int = 0
    version: int = 0
    uri: str = ""
    issued_through: int = 0
    cursor_before: dict[int, CursorState] = field(default_factory=dict)
    expected: dict[int, set[str]] = field(default_factory=dict)
    pending: dict[int, list[Held]] = field(default_factory=dict)
    ready_since: float | None = None
    failures: int = 0
    published: tuple[str, int] | None = None
    skips: int = 0
    announced_step: int = 0
    announced_version: int = 0
    rows: dict[str, list[GroupRows]] = field(default_factory=dict)
    """Task id -> its held group already made into rows (see :meth:`hold`)."""

    @property
    def next_step(self) -> int:
        return self.step + 1

    def ready(self) -> bool:
        """Every task of the next step has answered and at least one group is held."""
        k = self.next_step
        return bool(self.pending.get(k)) and not self.expected.get(k)

    def waiting(self) -> bool:
        """The next step still waits for tasks in flight."""
        return not self.ready() and bool(self.expected.get(self.next_step))

    def wants(self, group: RolloutGroup) -> bool:
        """``group`` answers a task of this run's current epoch that is still in flight."""
        return group.epoch == self.epoch and group.task_id in self.expected.get(group.step, ())

    def hold(
        self, d: Delivery, group: RolloutGroup, now: float, rows: list[GroupRows] | None = None
    ) -> None:
        """Defer a wanted group until its step trains (with its ``rows``, when made already:
        :meth:`take_rows`); note when the next step became ready."""
        self.expected[group.step].discard(group.task_id)
        self.pending.setdefault(group.step, []).append((d, group))
        if rows is not None:
            self.rows[group.task_id] = rows
        if self.ready() and self.ready_since is None:
            self.ready_since = now

    def take_next(self) -> list[Held]:
        """The held groups of the next step, handed to the train step."""
        self.ready_since = None
        return self.pending.pop(self.next_step)

    def take_rows(self, held: list[Held]) -> list[GroupRows] | None:
        """The rows made of ``held`` groups as they arrived, in order (None if any was not)."""
        parts = [self.rows.pop(group.task_id, None) for _, group in held]
        if any(p is None for p in parts):
            return None
        return [row for p in parts if p is not None for row in p]

    def release(self) -> list[Delivery]:
        """Every held delivery (to acknowledge without training: the run ends)."""
        self.rows.clear()
        return [d for step in list(self.pending) for d, _ in self.pending.pop(step)]

    def advance(self) -> None:
        """The next step trained: count it; its weights become the next version."""
        self.failures = 0
        self.step += 1
        self.version += 1

    # --- the run's lifecycle events (its envelope: name, registration, epoch) -----------------

    def admitted(self, *, resumed_from: str) -> Admitted:
        return Admitted(
            adapter=self.name,
            registration_id=self.registration_id,
            epoch=self.epoch,
            slot=self.slot,
            spec=self.spec,
            start_step=self.step,
            resumed_from=resumed_from,
        )

    def announce(self, step: int, version: int, uri: str, published: tuple[str, int]) -> None:
        """The version of ``step`` is durable at ``uri``: the newest a task may use."""
        self.announced_step, self.announced_version = step, version
        self.uri, self.published = uri, published

    def step_done(self, metrics: dict[str, float], tasks: tuple[str, ...] = ()) -> StepDone:
        """The announced step, whose version is at ``uri``, trained on the groups of ``tasks``."""
        return StepDone(
            adapter=self.name,
            registration_id=self.registration_id,
            epoch=self.epoch,
            step=self.announced_step,
            version=self.announced_version,
            metrics=metrics,
            state_uri=self.uri,
            tasks=tasks,
        )

    def failed(self, reason: str) -> Failed:
        return Failed(
            adapter=self.name,
            registration_id=self.registration_id,
            epoch=self.epoch,
            reason=reason,
            step=self.step,
        )

    def completed(self, reason: EndReason) -> Completed:
        return Completed(
            adapter=self.name,
            registration_id=self.registration_id,
            epoch=self.epoch,
            step=self.step,
            reason=reason,
            version=self.version,
        )

    def retired(self) -> Retired:
        return Retired(
            adapter=self.name,
            registration_id=self.registration_id,
            epoch=self.epoch,
            slot=self.slot,
        )

    def issue(self, prompts_per_task: int) -> list[RolloutTask]:
        """The tasks of every step not yet issued up to ``max_staleness`` ahead of the announced
        weights."""
        tasks: list[RolloutTask] = []
        horizon = min(self.announced_step + 1 + self.spec.max_staleness, self.spec.steps)
        while self.issued_through < horizon:
            k = self.issued_through + 1
            self.cursor_before[k] = self.cursor.state()
            tasks += self._step_tasks(k, prompts_per_task)
            self.issued_through = k
        for old in [s for s in self.cursor_before if s < self.announced_step]:
            del self.cursor_before[old]
        return tasks

    def reissue(self, prompts_per_task: int) -> list[RolloutTask]:
        """The next step's tasks again, with the next prompts (its groups gave no update)."""
        self.expected.pop(self.next_step, None)
        return self._step_tasks(self.next_step, prompts_per_task)

    def _step_tasks(self, k: int, prompts_per_task: int) -> list[RolloutTask]:
        spec = self.spec
        indices = self.cursor.take(spec.prompts_per_step)
        size = prompts_per_task or len(indices)
        expected = self.expected.setdefault(k, set())
        tasks = []
        for chunk, start in enumerate(range(0, len(indices), size)):
            task = RolloutTask(
                id=new_id(),
                adapter=self.name,
                registration_id=self.registration_id,
                epoch=self.epoch,
                step=k,
                version=self.announced_version,
                weights_uri=self.uri,
                prompt_indices=tuple(indices[start : start + size]),
                group_size=spec.group_size,
                dataset=spec.dataset_spec,
                rewards=spec.rewards,
                sampling=spec.sampling,
                seed=task_seed(spec.seed, self.registration_id, self.epoch, k, chunk),
            )
            expected.add(task.id)
            tasks.append(task)
        return tasks


def task_seed(seed: int, registration_id: str, epoch: int, step: int, chunk: int) -> int:
    """A task's sampling seed: a hash of the spec's seed and where the task sits in the run."""
    digest = hashlib.sha256(f"{seed}:{registration_id}:{epoch}:{step}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
