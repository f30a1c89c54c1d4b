"""The trainer process: a state machine over ingress and rollout groups that owns the slots.

(Over 600 lines: admission, the runs, the mixed step and the steps written behind it all move
the same fleet, slots and held groups in one commit per event; the step's parts already live in
their own modules — :mod:`trainer.runs`, :mod:`trainer.behind`, :mod:`trainer.versions`,
:mod:`trainer.clients`.)

Inputs (one consumer, group ``trainer``): registrations and cancels on ``ingress``, scored sample
groups on ``rollout.groups``. Outputs (each committed atomically with the acks of the entries that
caused it): lifecycle events on ``control``, tasks on ``rollout.tasks``, status fields.

The loop, per adapter (all adapters at once):

1. **Admit** — admission checks; a free slot → reset it, publish version 0 and ``admitted``;
   none → ``queued`` (FIFO within priority).
2. **Issue** — tasks for the next steps from the adapter's data cursor, at most
   ``max_staleness`` steps ahead of its newest weights (flow control).
3. **Collect** — groups of the live registration's current epoch are deferred (kept pending, not
   acknowledged) until their step trains; anything else (retired registration, stale epoch,
   unknown task) is acknowledged and dropped, never trained on (fencing).
4. **Train** — when adapters have full batches (waiting up to ``max_batch_wait_s`` for others so
   they share it), one forward/backward over all of them; each adapter's step counts only if it
   trained. The step computes on the compute thread (:mod:`trainer.compute`): the loop launches
   it, goes on holding groups and committing, and lands it when it is done (decides it, launches
   the next step, then reports and commits). Each new version (PEFT adapter + full training
   state) is written to the artifact store
   *behind* the step — the next step may train while it is written — and only once it is durable
   are ``step_done`` / ``sync_requested`` published with the acks of the groups it used (one step
   waits at most: :class:`Behind`). A crash before that loses the step, never applies it: its
   groups are still pending, and the restart redoes it from the previous version.
5. **Complete** — at the step budget or on cancel: ``completed`` (the checkpoint process takes the
   final checkpoint from the last version), ``retired``, the slot is reset for the next tenant.

Restart after a crash: the control log is replayed to rebuild the fleet; every live adapter is
restored from its newest acknowledged version (nothing applied twice, nothing lost), re-admitted
under ``epoch + 1`` so work of the old epoch is discarded, and its tasks are issued again from the
restored cursor (the same sample order).

Where the parts live: this module holds the state machine (handlers, admit, finish, recover) and
the step (:meth:`TrainerProcess.on_idle` → :meth:`TrainerProcess.launch` →
:meth:`TrainerProcess.land`); the per-adapter record and its task issuing are
:mod:`trainer.runs`, the numeric mixed step :mod:`trainer.mixed_step`, writing, announcing and
restoring versions :mod:`trainer.versions`, a step computing and then waiting for its versions
:mod:`trainer.behind`, the compute thread :mod:`trainer.compute`. (Over 600 lines: it is the
trainer's one state machine; its handlers share the fleet, the runs and the commit order, which
splitting would spread out.)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import assert_never

import msgspec
import redis

from events.codec import Decoder, stamp
from events.consumer import DEFER, Consumer, Delivery, HandlerResult, Subscription
from events.effects import Effects
from events.errors import MultiLoraError
from events.schema import (
    Admitted,
    Completed,
    DeregisterRequested,
    ForwardBackward,
    GroupEvent,
    IngressEvent,
    LoadWeights,
    OptimStep,
    Queued,
    RegisterRequested,
    Rejected,
    RolloutGroup,
    SaveWeights,
    TrainRequest,
)
from events.specs import AdapterSpec, LossSpec
from events.streams import Streams
from orchestrator.admission import Admission, Reject
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import load_latest
from orchestrator.compaction import load_fleet
from orchestrator.cursor import DataCursor
from orchestrator.fleet import Fleet
from orchestrator.ingress import dead_letter_effects, ingress_subscription
from orchestrator.lifecycle import AdapterState, Phase
from orchestrator.status import SkipNote, fleet_status_effects
from trainer.batching import AdapterRows, GroupRows, rows_of_group
from trainer.behind import Behind, Job, Landed, Launched, TrainedStep
from trainer.clients import ClientRuns, max_in_flight
from trainer.compute import ComputeThread
from trainer.inject import MultiLoraModel
from trainer.metrics import TrainerMetrics
from trainer.mixed_step import SlotOutcome, StepFn, mixed_step, token_budget
from trainer.optim import SlotAdamW
from trainer.runs import AdapterRun, EndReason, Held
from trainer.skips import failed_after, skip_status_fields
from trainer.versions import VersionPublisher

log = logging.getLogger(__name__)
SOURCE = "trainer"
GROUP_MAX_BYTES = 64 << 20
"""Largest rollout group accepted (tokens and log-probs of every sample of a task, as JSON)."""

UNFINISHED: dict[Phase, EndReason | None] = {
    Phase.COMPLETING: "budget",
    Phase.CANCELLED: "cancelled",
    Phase.FAILED: None,
}
"""Phases decided but not carried out (the slot not yet released); recovery finishes them."""


class TrainerProcess:
    """See the module docstring. Built by :func:`trainer.main.build`; tests build it directly."""

    def __init__(
        self,
        *,
        client: redis.Redis,
        streams: Streams,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        admission: Admission,
        artifacts: ArtifactStore,
        checkpoints: str,
        base_model: str,
        pad_id: int = 0,
        max_batch_wait_s: float = 2.0,
        prompts_per_task: int = 0,
        max_failures: int = 3,
        clock: Callable[[], float] = time.time,
        metrics: TrainerMetrics | None = None,
        step_fn: StepFn = mixed_step,
        max_client_tokens: int = 8192,
        client_adapters: bool = True,
        overlap_steps: bool = True,
    ) -> None:
        self.client = client
        self.streams = streams
        self.model = model
        self.optimizer = optimizer
        self.admission = admission
        self.artifacts = artifacts
        self.checkpoints = checkpoints
        self.pad_id = pad_id
        self.max_batch_wait_s = max_batch_wait_s
        self.prompts_per_task = prompts_per_task
        self.max_failures = max_failures
        self.clock = clock
        self.metrics = metrics
        self.step_fn = step_fn  # mixed_step, or trainer.dist_step.DataParallelStep (ranks)
        self.client_adapters = client_adapters  # False: a data-parallel step cannot take them
        self.versions = VersionPublisher(
            model=model, optimizer=optimizer, artifacts=artifacts, base_model=base_model
        )
        self.clients = ClientRuns(
            streams=streams,
            model=model,
            optimizer=optimizer,
            versions=self.versions,
            artifacts=artifacts,
            publish=self._publish,
            max_tokens=max_client_tokens,
            observe=metrics.client_request if metrics is not None else None,
        )
        self.fleet = Fleet(slots=model.num_slots)
        self.max_tokens = token_budget(model)  # the row budget the train step applies
        self.runs: dict[str, AdapterRun] = {}
        self.dataset_sizes: dict[str, int] = {}
        self.consumer: Consumer | None = None
        self.steps_trained = 0
        self.mixed_steps = 0
        """Mixed steps run (each one forward/backward); its number tags what each step did."""
        self.behind: list[Behind] = []
        """Trained steps not yet committed, oldest first (at most one once a step returns)."""
        self.launched: Launched | None = None
        """The step computing on the compute thread, if any (:mod:`trainer.compute`)."""
        self.compute = ComputeThread(
            threads=overlap_steps, device=model.store.weight_S_R_Q.device, on_done=self._wake
        )

    # --- wiring ------------------------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return [
            ingress_subscription(self.streams, "trainer"),
            Subscription(
                self.streams.groups,
                "trainer",
                Decoder(GroupEvent, max_bytes=GROUP_MAX_BYTES),
                trim=True,
                prepare=self._group_rows,
            ),
            Subscription(
                self.streams.requests,
                "trainer",
                Decoder(TrainRequest, max_bytes=GROUP_MAX_BYTES),
                trim=True,
                max_in_flight=max_in_flight(self.model.num_slots),
            ),
        ]

    def _publish(self, effects: Effects, event: msgspec.Struct, stream: str = "") -> None:
        event = stamp(event, source=SOURCE)
        effects.publish(stream or self.streams.control, event)
        if stream in ("", self.streams.control):
            before, self.fleet = self.fleet, self.fleet.apply(event)
            effects.extend(fleet_status_effects(self.streams, before, self.fleet))

    def _issue(self, effects: Effects, run: AdapterRun, *, again: bool = False) -> None:
        """Issue: the run's next tasks (``again``: its next step's, with new prompts)."""
        tasks = run.reissue(self.prompts_per_task) if again else run.issue(self.prompts_per_task)
        for task in tasks:
            self._publish(effects, task, self.streams.tasks)

    # --- recovery ----------------------------------------------------------------------------

    def recover(self) -> Effects:
        """Rebuild the fleet from the control log (its snapshot, then the entries after it);
        resume live adapters under a new epoch."""
        self.fleet, _ = load_fleet(self.client, self.streams, self.model.num_slots)
        effects = Effects()
        for state in self.fleet.live():
            if state.slot is None:
                continue  # waiting for a slot: admitted below when one is free
            if state.spec is None:
                raise MultiLoraError(
                    f"registration {state.registration_id} holds a slot but has no spec"
                )
            uri = state.state_uri or self.artifacts.version_dir(
                state.name, state.registration_id, state.version
            )
            run = self.versions.restore(state.name, state.registration_id, state.slot, uri)
            self.runs[run.name] = run
            run.epoch = state.epoch
            if state.phase in UNFINISHED:
                # crashed between the decision and the slot's release: finish it now
                self._finish(effects, run, UNFINISHED[state.phase])
                continue
            run.epoch = state.epoch + 1
            self._publish(effects, self._admitted(run, resumed_from=uri))
            if run.spec.driver == "client":
                self.clients.start(run)  # its pending requests are delivered again
                continue
            self._publish(effects, self.versions.sync_requested(run))
            self._issue(effects, run)
        self._admit_waiting(effects)
        return effects

    # --- handlers ----------------------------------------------------------------------------

    def handle(self, d: Delivery[IngressEvent | GroupEvent | TrainRequest]) -> HandlerResult:
        if isinstance(d.event, RegisterRequested | DeregisterRequested):
            self.drain()  # lifecycle changes commit after every step trained before them
        match d.event:
            case ForwardBackward() | OptimStep() | SaveWeights() | LoadWeights() as request:
                run = self.runs.get(request.adapter)
                refused = self.clients.on_request(request, d, run, self.clock())
                return DEFER if refused is None else refused
            case RegisterRequested() as event:
                return self.on_register(event, d)
            case DeregisterRequested() as event:
                return self.on_deregister(event)
            case RolloutGroup() as event:
                return self.on_group(event, d)
            case unreachable:  # the decoders yield only these
                assert_never(unreachable)

    def on_register(self, event: RegisterRequested, d: Delivery) -> Effects:
        effects = Effects()
        registration_id = event.registration_id or event.id
        if self.fleet.get(registration_id) is not None:
            return effects  # a retried registration: already handled
        event = msgspec.structs.replace(event, registration_id=registration_id)
        verdict = self.admission.check(event, self.fleet)
        if not isinstance(verdict, Reject):
            verdict = self._refuse_client(event.spec) or verdict
        if isinstance(verdict, Reject):
            rejected = Rejected(
                adapter=event.adapter,
                registration_id=registration_id,
                reason=verdict.reason,
                field=verdict.field,
                ingress_entry=d.entry_id,
            )
            self._publish(effects, rejected)
            consumer = self.consumer.name if self.consumer is not None else SOURCE
            reason = f"rejected by admission ({verdict.field}): {verdict.reason}"
            log.info("rejected %s (registration %s): %s", event.adapter, registration_id, reason)
            letter = dead_letter_effects(
                self.streams, d, reason, consumer=consumer, now=self.clock()
            )
            return effects.extend(letter)
        self.dataset_sizes[registration_id] = verdict.dataset_size
        self._publish(effects, event)
        self._admit_waiting(effects)
        position = self.fleet.queue_position(registration_id)
        if position is not None:
            queued = Queued(
                adapter=event.adapter,
                registration_id=registration_id,
                position=position,
                spec=event.spec,
            )
            self._publish(effects, queued)
            log.info(
                "queued %s (registration %s) at position %d: no free slot",
                event.adapter,
                registration_id,
                position,
            )
        return effects

    def _refuse_client(self, spec: AdapterSpec) -> Reject | None:
        """What this trainer cannot do for a client-driven registration (else None)."""
        if spec.driver == "client" and not self.client_adapters:
            reason = (
                "this trainer runs data-parallel ranks, which do not take client-driven adapters "
                "yet; send it to a trainer started with --ranks 1"
            )
            return Reject(reason, "spec.driver")
        if spec.init_from:
            problem = self.versions.init_problem(spec, self.checkpoints)
            return Reject(problem, "spec.init_from") if problem else None
        return None

    def on_deregister(self, event: DeregisterRequested) -> Effects:
        """Cancel the live registration of the name (or the one named): resolved to its id
        before it is republished, so a replay never cancels a newer registration."""
        effects = Effects()
        state = self.fleet.current(event.adapter)
        if state is None or not self.fleet.is_active_name(event.adapter):
            return effects
        if event.registration_id not in ("", state.registration_id):
            return effects
        resolved = msgspec.structs.replace(
            event, registration_id=state.registration_id, epoch=state.epoch
        )
        self._publish(effects, resolved)
        run = self.runs.get(event.adapter)
        if run is not None and run.registration_id == state.registration_id:
            self._finish(effects, run, "cancelled")
        else:  # it never got a slot: nothing to checkpoint or retire, but say it ended
            ended = Completed(
                adapter=state.name,
                registration_id=state.registration_id,
                epoch=state.epoch,
                step=state.step,
                reason="cancelled",
            )
            self._publish(effects, ended)
            log.info(
                "cancelled %s while queued (registration %s)", state.name, state.registration_id
            )
        self._admit_waiting(effects)
        return effects

    def on_group(self, event: RolloutGroup, d: Delivery) -> HandlerResult:
        """Collect: hold a group the live run still waits for until its step trains."""
        run = self.runs.get(event.adapter)
        if (
            run is None
            or not self.fleet.accepts_group(
                event.adapter, event.registration_id, event.epoch, event.version
            )
            or not run.wants(event)
        ):
            log.info("dropping group %s of %s (stale or unknown)", event.task_id, event.adapter)
            return Effects()
        # made into rows by the reader thread (while a step computes), else now
        made = d.prepared
        if made is None or made[0] != self._row_key(run):
            made = self._group_rows(event)
        run.hold(d, event, self.clock(), made[1] if made is not None else None)
        return DEFER

    def _row_key(self, run: AdapterRun) -> tuple[int, LossSpec, float]:
        return (run.slot, run.spec.loss, run.spec.sampling.logprob_temperature)

    def _group_rows(
        self, event: object
    ) -> tuple[tuple[int, LossSpec, float], list[GroupRows]] | None:
        """A rollout group made into rows for its run as the run is now (with that run's slot,
        loss and temperature, so the handler can tell they still fit), or None. Also called
        from the groups' reader thread: it only reads."""
        run = self.runs.get(event.adapter) if isinstance(event, RolloutGroup) else None
        if run is None or not isinstance(event, RolloutGroup):
            return None
        key = self._row_key(run)
        slot, loss, temperature = key
        rows = [rows_of_group(g, slot, loss, temperature, self.max_tokens) for g in event.groups]
        return key, rows

    # --- the step ----------------------------------------------------------------------------

    def on_idle(self) -> None:
        """Between reads: land the step that computed, carry out client requests that need no
        step, launch the next step once the batch is worth it (the ready adapters together),
        and commit what that produced. While a step computes, only settle and commit what
        touches neither the model nor the optimizer (:mod:`trainer.compute`)."""
        effects = Effects()
        landed: Landed | None = None
        if self.launched is not None:
            if not self.launched.result.done():
                self.settle(effects, keep=len(self.behind), beside=True)
                self._commit(effects)
                return
            landed = self.land(effects)
            self.settle(effects, keep=1)  # the step before it, waiting for it if need be
        else:
            self.settle(effects, keep=len(self.behind))  # those already written
        for run in self.clients.serve(effects, self.runs, self.clock()):
            self._finish(effects, run, "budget")
        ready, clients, wait_s = self._collect()
        next_at = time.perf_counter()  # the next step's critical path starts here
        if ready or clients:
            self.launch(ready, clients=clients, wait_s=wait_s)
        else:
            self.versions.release()  # nothing to train: the last step's versions are written now
        if landed is not None:  # reported once the next step computes: off its critical path
            if self.metrics is not None:
                self.metrics.step_tail(next_at - landed.finished)
            self._report(landed)
        self._commit(effects)

    def drain(self) -> None:
        """Land the step computing and commit every step still being written (waiting for the
        writes)."""
        effects = Effects()
        if self.launched is not None:
            self.launched.result.exception()  # wait: landing raises its error, if any
            self._report(self.land(effects))
        self.settle(effects, keep=0)
        self._commit(effects)

    def settle(self, effects: Effects, *, keep: int, beside: bool = False) -> None:
        """Settle trained steps, oldest first, whose versions are durable — and, beyond the newest
        ``keep``, those still being written (waiting for them): announce each version, then
        what the step decided (``step_done``, ``sync_requested``, next tasks or completion;
        skipped steps issued again or failed). ``beside`` a computing step: stop at a step
        whose settling would end a run (its slot is released: that waits for the landing)."""
        while self.behind and (len(self.behind) > keep or self.behind[0].durable()):
            batch = self.behind[0]
            if beside and (not batch.durable() or self._ends_a_run(batch)):
                return
            self.behind.pop(0)
            waited = time.perf_counter()
            for version in batch.versions:
                version.announce()  # a failed write raises: the process restarts from the log
            if self.metrics is not None:
                wait_s = time.perf_counter() - waited
                written = batch.written or time.perf_counter()  # no versions: nothing to write
                self.metrics.write_behind(write_s=written - batch.started, wait_s=wait_s)
            effects.extend(batch.effects)
            for run, outcome in batch.not_taken:
                self._not_taken(effects, run, outcome)
            self._publish_step(effects, batch.trained)
            if not beside:
                self._admit_waiting(effects)

    def _ends_a_run(self, batch: Behind) -> bool:
        """Settling ``batch`` would complete a run (its budget) or fail one (skips in a row)."""
        return any(v.step >= v.run.spec.steps for v in batch.versions) or any(
            outcome.failed and run.failures + 1 >= self.max_failures
            for run, outcome in batch.not_taken
        )

    def _commit(self, effects: Effects) -> None:
        if not effects.commands and not effects.extra_acks:
            return
        if self.consumer is None:
            raise MultiLoraError("TrainerProcess.consumer is not set; build it with build()")
        if not self.consumer.commit(effects, []):
            # another consumer took the groups this step trained on: memory is now ahead of the
            # log, so stop; a restart rebuilds from the log and the last acknowledged version
            raise MultiLoraError("a trained step's groups are no longer ours; restart to recover")
        if self.metrics is not None:
            self.metrics.observe_fleet(self.fleet)
            self.metrics.deferred(
                sum(len(g) for r in self.runs.values() for g in r.pending.values())
            )

    def _collect(self) -> tuple[list[AdapterRun], bool, float]:
        """The runs whose next step is ready, whether client forward/backwards are ready too
        (nothing while others still wait for their groups and the oldest ready one has waited
        less than ``max_batch_wait_s``), and that wait in s."""
        ready = [r for r in self.runs.values() if r.ready()]
        client_since = [since for _, since in self.clients.ready()]
        if not ready and not client_since:
            return [], False, 0.0
        now = self.clock()
        others_waiting = any(r.waiting() for r in self.runs.values())
        waited_s = now - min([r.ready_since or now for r in ready] + client_since)
        if others_waiting and waited_s < self.max_batch_wait_s:
            return [], False, 0.0
        return ready, bool(client_since), max(0.0, waited_s)

    def launch(
        self, ready: list[AdapterRun], *, clients: bool = False, wait_s: float = 0.0
    ) -> None:
        """Train: take the next step of every run in ``ready`` (and, with ``clients``, the next
        forward/backward of every ready client-driven run) and launch one mixed
        forward/backward over all of it on the compute thread; :meth:`land` decides what it
        meant once it is done."""
        if self.launched is not None:
            raise MultiLoraError("a step is still computing; land it before launching another")
        t0, started_at = time.perf_counter(), time.time()  # wall clock: compared with entry ids
        ready_at = {run.name: run.ready_since or started_at for run in ready}
        used = {run.name: run.take_next() for run in ready}
        rows = [_rows(run, used[run.name]) for run in ready]
        taken = self.clients.take(self.runs) if clients else []
        accumulators = self.clients.accumulators([run for run, _, _ in taken])
        client_rows = [rows_ for _, _, rows_ in taken]

        def job() -> Job:
            step = self.step_fn(
                self.model,
                self.optimizer,
                rows,
                self.pad_id,
                clients=client_rows,
                accumulators=accumulators,
                while_waiting=self.versions.release,  # the last step's writes run beside it
            )
            t = time.perf_counter()
            captured = self.versions.capture([r for r in ready if step.outcomes[r.slot].trained])
            return step, captured, time.perf_counter() - t

        rows_s = time.perf_counter() - t0
        self.launched = Launched(
            ready, used, ready_at, taken, wait_s, started_at, t0, rows_s, self.compute.submit(job)
        )

    def land(self, effects: Effects) -> Landed:
        """The launched step is done: per run its outcome — trained (next version, written behind
        the step: :class:`Behind`, settled once durable), skipped or empty (the step is redone
        with new prompts; ``max_failures`` skips in a row fail the adapter); per client request
        its answer. Adds to ``effects`` what commits now (the client answers); the acks of the
        groups the step used wait with its versions."""
        launched, self.launched = self.launched, None
        if launched is None:
            raise MultiLoraError("no step is computing")
        computed = launched.result.result()  # the job's error, if any, crashes the process
        step, captured, capture_s = computed.value
        t_land = time.perf_counter()
        step_s = computed.finished - launched.t0
        self.mixed_steps += 1
        shared = {
            "mixed_step": float(self.mixed_steps),
            "mixed_adapters": float(len(launched.ready) + len(launched.taken)),
            "started_at": launched.started_at,
            "compute_s": step.timings.get("forward_backward", 0.0)
            + step.timings.get("optimizer", 0.0),
            "pack_s": step.timings.get("pack", 0.0),
        }
        for run, held, _ in launched.taken:
            timing = {"step_s": step_s}
            self.clients.answer(effects, run, held, step.clients[run.slot], {**shared, **timing})
        batch = Behind(Effects(), [], started=t_land)
        for run in launched.ready:
            used = launched.used[run.name]
            batch.effects.ack(*(d.ack_key for d, _ in used))
            outcome = step.outcomes[run.slot]
            if not outcome.trained:
                batch.not_taken.append((run, outcome))
                continue
            behind = run.version - min(group.version for _, group in used)
            run.advance()
            self.steps_trained += 1
            metrics = outcome.step_metrics(staleness=float(behind), step_s=step_s)
            tasks = tuple(group.task_id for _, group in used)
            metrics = {**metrics, **shared, "ready_at": launched.ready_at[run.name]}
            batch.trained.append((run, metrics, tasks))
        batch.versions = self.versions.write_behind([run for run, _, _ in batch.trained], captured)
        self.behind.append(batch)
        for version in batch.versions:  # settled by the next idle hook once written
            version.write.add_done_callback(functools.partial(self._written, batch))
        return Landed(
            launched,
            step,
            batch.trained,
            step_s,
            capture_s,
            computed.finished,
            time.perf_counter(),
        )

    def _written(self, batch: Behind, _write: object) -> None:
        """A writer thread finished one of ``batch``'s versions."""
        batch.written = time.perf_counter()
        self._wake()

    def _wake(self) -> None:
        """Run the loop's idle hook now (from a writer or the compute thread)."""
        if self.consumer is not None:
            self.consumer.wake()

    def _not_taken(self, effects: Effects, run: AdapterRun, outcome: SlotOutcome) -> None:
        """A step that did not count: issued again, unless the adapter now has failed. A skip
        (a failure, not an empty step) is counted in the status, with its reason."""
        log.warning("%s step %d not taken: %s", run.name, run.next_step, outcome.reason)
        if outcome.failed:
            run.failures += 1
            run.skips += 1
            note = SkipNote(
                step=run.next_step,
                reason=outcome.reason,
                in_a_row=run.failures,
                time=self.clock(),
                registration_id=run.registration_id,
            )
            effects.hset(self.streams.status(run.name), skip_status_fields(note, run.skips))
        if run.failures < self.max_failures:
            self._issue(effects, run, again=True)
            return
        self._publish(effects, run.failed(failed_after(outcome.reason, run.failures)))
        self._finish(effects, run, None)

    def _publish_step(self, effects: Effects, trained: Sequence[TrainedStep]) -> None:
        """Per run whose new version is announced: ``step_done`` and ``sync_requested``, and its
        next tasks or, at its budget, its completion."""
        for run, metrics, tasks in trained:
            self._publish(effects, run.step_done(metrics, tasks))
            self._publish(effects, self.versions.sync_requested(run))
            if run.announced_step >= run.spec.steps:
                self._finish(effects, run, "budget")
            else:
                self._issue(effects, run)

    def _report(self, landed: Landed) -> None:
        """One log line per mixed step, and the step's phases and the loop's parts to the
        metrics. The step's critical path is its launch and job (``step_s``: the rows taken,
        packing, forward/backward, optimizer, the copy of the trained slots) and the loop's
        turn after it until the next launch (``step_tail``); this report, the commit and the
        versions' writes run beside the next step."""
        t_report = time.perf_counter()
        step, trained, step_s = landed.step, landed.trained, landed.step_s
        adapters = ", ".join(
            f"{run.name} {run.step}/{run.spec.steps} "
            f"(reward {m['reward_mean']:.3f}, loss {m['loss']:.4f})"
            for run, m, _ in trained
        )
        summary = f"{step.tokens} tokens, {step_s:.2f} s"
        if step.clients:
            summary += f"; {len(step.clients)} client request(s)"
        log.info("step: %s; %s", adapters or "no adapter trained", summary)
        if self.metrics is None:
            return
        timings = step.timings
        forward_backward_s = timings.get("forward_backward", 0.0)
        optimizer_s = timings.get("optimizer", 0.0)
        self.metrics.step_phases(
            wait_s=landed.launched.wait_s,
            forward_backward_s=forward_backward_s,
            optimizer_s=optimizer_s,
            publish_s=max(0.0, step_s - forward_backward_s - optimizer_s),
            tokens=step.tokens,
            adapters=step.adapters,
        )
        rows_s = landed.launched.rows_s
        timed = sum(timings.get(k, 0.0) for k in ("pack", "forward_backward", "optimizer"))
        self.metrics.control_parts(
            {
                "rows": rows_s,
                "pack": timings.get("pack", 0.0),
                "metrics": step_s - rows_s - timed - landed.capture_s,
                "capture": landed.capture_s,
                "decide": landed.decided - landed.finished,
                "report": time.perf_counter() - t_report,
            }
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def _admit_waiting(self, effects: Effects) -> None:
        for state, slot in self.fleet.next_admissions():
            self._admit(effects, state, slot)

    def _admit(self, effects: Effects, state: AdapterState, slot: int) -> None:
        """Admit a waiting registration into ``slot`` under the next epoch: fresh weights and
        optimizer, or, for ``resume``, the adapter's latest checkpoint; then its version and
        first tasks."""
        name, registration_id, spec = state.name, state.registration_id, state.spec
        if spec is None:
            raise MultiLoraError(f"waiting registration {registration_id} has no spec")
        epoch = state.epoch + 1
        checkpoint = load_latest(self.checkpoints, name) if spec.resume else None
        if spec.driver == "client" and checkpoint is None:
            self._admit_client(effects, name, registration_id, spec, epoch, slot)
            return
        if checkpoint is not None:
            run = self.versions.restore(name, registration_id, slot, checkpoint.uri)
            run.registration_id, run.spec, run.epoch = registration_id, spec, epoch
            self.optimizer.update_settings(slot, spec.optim, spec.steps)  # keeps Adam state
        else:
            self.model.configure_slot(slot, spec.rank, spec.alpha, seed=spec.seed)
            self.optimizer.configure(slot, spec.optim, spec.steps)
            self.optimizer.reset(slot)
            dataset = spec.dataset_spec
            n = self.dataset_sizes.get(registration_id) or self.admission.probe_dataset(dataset)
            cursor = DataCursor(n, dataset.shuffle_seed)
            run = AdapterRun(name, registration_id, epoch, slot, spec, cursor)
        self.runs[name] = run
        resumed_from = checkpoint.uri if checkpoint is not None else ""
        self._publish(effects, self._admitted(run, resumed_from=resumed_from))
        self.versions.publish([run])
        if spec.driver == "client":
            self.clients.start(run)
            return
        self._publish(effects, self.versions.sync_requested(run))
        if run.step >= spec.steps:  # resumed at or past its new budget: nothing left to train
            self._finish(effects, run, "budget")
            return
        self._issue(effects, run)

    def _admit_client(
        self,
        effects: Effects,
        name: str,
        registration_id: str,
        spec: AdapterSpec,
        epoch: int,
        slot: int,
    ) -> None:
        """Admit a client-driven registration: fresh weights and optimizer (or those of
        ``spec.init_from``), version 0, an empty request queue (its client sends the work; there
        is nothing to issue)."""
        self.model.configure_slot(slot, spec.rank, spec.alpha, seed=spec.seed)
        self.optimizer.configure(slot, spec.optim, spec.steps)
        self.optimizer.reset(slot)
        if spec.init_from:  # a client's create_training_client_from_state
            self.versions.start_from(slot, spec.init_from, spec)
        run = AdapterRun(name, registration_id, epoch, slot, spec, client_cursor())
        self.runs[name] = run
        self._publish(effects, self._admitted(run, resumed_from=""))
        self.versions.publish([run])
        self.clients.start(run)

    def _admitted(self, run: AdapterRun, *, resumed_from: str) -> Admitted:
        origin = f"resumed from {resumed_from} at step {run.step}" if resumed_from else "fresh"
        where = f"to slot {run.slot} (registration {run.registration_id}, epoch {run.epoch})"
        what = f"rank {run.spec.rank}, {origin}, {run.spec.steps} steps"
        log.info("admitted %s %s: %s", run.name, where, what)
        return run.admitted(resumed_from=resumed_from)

    def _finish(self, effects: Effects, run: AdapterRun, reason: EndReason | None) -> None:
        """Complete (``budget``/``cancelled``) or, with ``reason=None``, retire a failed run."""
        effects.ack(*(d.ack_key for d in run.release()))
        self.clients.end(
            effects, run, {"budget": "reached its step budget"}.get(reason or "", "ended")
        )
        if reason is not None:
            self._publish(effects, run.completed(reason))
        self._publish(effects, run.retired())
        self.model.release_slot(run.slot)
        self.optimizer.release(run.slot)
        del self.runs[run.name]
        ended = {"budget": "completed", "cancelled": "cancelled", None: "failed"}[reason]
        level = logging.INFO if reason is not None else logging.WARNING
        at = f"step {run.step}/{run.spec.steps} (version {run.version})"
        log.log(level, "%s %s at %s; slot %d retired", ended, run.name, at, run.slot)


def client_cursor() -> DataCursor:
    """The data cursor of a client-driven run: it has no dataset (its client brings the data),
    so a one-prompt cursor that nothing ever advances stands in the training state."""
    return DataCursor(1, 0)


def _rows(run: AdapterRun, used: list[Held]) -> AdapterRows:
    """The run's part of the mixed batch: its slot, loss settings and held sample groups."""
    groups = [g for _, event in used for g in event.groups]
    temperature = run.spec.sampling.logprob_temperature
    revision = run.registration_id  # a slot's state changes outside a step only on admission
    return AdapterRows(
        run.slot,
        run.spec.loss,
        groups,
        temperature=temperature,
        revision=revision,
        prepared=run.take_rows(used),
    )
