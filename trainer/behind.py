"""A step after the loop took its groups: computing (:class:`Launched`), then waiting for its
versions (:class:`Behind`), then committed.

A launched step computes on the compute thread (:mod:`trainer.compute`) while the loop goes on;
:class:`Launched` is what the loop keeps meanwhile to decide, once it lands, what the step meant
(which runs trained, what each client request gets back).

The trainer writes versions *behind* the step (:meth:`trainer.versions.VersionPublisher.
write_behind`): the step's slots are copied off the device at once, the files are encoded and
written on writer threads, and the next step may train meanwhile. What the step decided that
refers to its new versions — ``step_done``, ``sync_requested``, the next tasks (at the announced
version), a completion at the budget, the skipped steps' retries or failures — waits in a
:class:`Behind` until every version is durable; the process then settles it
(:meth:`trainer.process.TrainerProcess.settle`), oldest first, and commits it with the acks of the
groups the step used.

Rules that keep "effectively once" and the log's order:

- at most one step waits once a step returns: the loop settles the one before it first (and
  waits for its writes if they are slower than a step), so a version is at most one step behind;
- a registration or a cancel is handled only after every waiting step is settled (``drain``), so
  lifecycle events never overtake a step that was trained before them;
- a warm stop drains too (the consumer's ``on_stop``); a crash loses the waiting steps, never
  applies them: their groups are still pending and the restart redoes them from the newest
  version the log announced, with the same prompts (the cursor stored in that version).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from events.effects import Effects
from trainer.client_step import ClientRows
from trainer.clients import HeldRequest
from trainer.compute import Computed
from trainer.mixed_step import MixedStep, SlotOutcome
from trainer.publish import CapturedSlot
from trainer.runs import AdapterRun, Held
from trainer.versions import PendingVersion

TrainedStep = tuple[AdapterRun, dict[str, float], tuple[str, ...]]
"""A run whose step trained, with its ``step_done`` metrics and the task ids of its groups."""


Job = tuple[MixedStep, dict[int, CapturedSlot], float]
"""What a step's job returns: the step, the trained slots copied off the device (by slot) and
the seconds that copy took."""


@dataclass(frozen=True)
class Launched:
    """A step computing: the runs it trains (``ready``) with the groups it took from each
    (``used``, by run name) and when each run became ready (``ready_at``), the client requests it
    carries (``taken``), how long the oldest ready run had waited for others (``wait_s``), when it
    was launched (``started_at``, wall clock, compared with entry ids; ``t0``, ``perf_counter``),
    how long taking its rows took (``rows_s``), and the job's future."""

    ready: list[AdapterRun]
    used: dict[str, list[Held]]
    ready_at: dict[str, float]
    taken: list[tuple[AdapterRun, HeldRequest, ClientRows]]
    wait_s: float
    started_at: float
    t0: float
    rows_s: float
    result: Future[Computed[Job]]


@dataclass(frozen=True)
class Landed:
    """A step that computed and was decided: the launch, its result, the runs that trained (as
    :class:`Behind` holds them), its seconds from launch to the job's end (``step_s``) and of the
    job's copy of the trained slots (``capture_s``), and ``perf_counter`` times: the job's end
    and the loop having decided it."""

    launched: Launched
    step: MixedStep
    trained: list[TrainedStep]
    step_s: float
    capture_s: float
    finished: float
    decided: float


@dataclass
class Behind:
    """A trained mixed step whose versions are being written: what it commits once they are.

    ``effects`` were decided at the step (the acks of the groups it used, client answers);
    ``trained`` and ``not_taken`` are settled when the versions are durable
    (:meth:`TrainerProcess.settle`), in step order, so the control log reads as if every step
    had been written before the next one started.
    """

    effects: Effects
    versions: list[PendingVersion]
    trained: list[TrainedStep] = field(default_factory=list)
    not_taken: list[tuple[AdapterRun, SlotOutcome]] = field(default_factory=list)
    started: float = 0.0
    written: float = 0.0
    """``perf_counter`` times: the step's end, and when the last of its writes finished."""

    def durable(self) -> bool:
        return all(v.durable() for v in self.versions)
