"""The trainer process: a state machine over ingress and rollout groups that owns the slots.

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
   trained. Each new version (PEFT adapter + full training state) is written to the artifact store
   *before* ``step_done`` / ``sync_requested`` are published with the acks of the groups it used.
5. **Complete** — at the step budget or on cancel: ``completed`` (the checkpoint process takes the
   final checkpoint from the last version), ``retired``, the slot is reset for the next tenant.

Restart after a crash: the control log is replayed to rebuild the fleet; every live adapter is
restored from its newest acknowledged version (nothing applied twice, nothing lost), re-admitted
under ``epoch + 1`` so work of the old epoch is discarded, and its tasks are issued again from the
restored cursor (the same sample order).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import redis

from events.adapter_format import ADAPTER_WEIGHTS, STATE_JSON, STATE_TENSORS
from events.codec import Decoder, new_id, stamp
from events.consumer import DEFER, Consumer, Delivery, HandlerResult, Subscription
from events.effects import Effects
from events.errors import MultiLoraError
from events.schema import (
    Admitted,
    Completed,
    ControlEvent,
    DeregisterRequested,
    Failed,
    GroupEvent,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    RolloutGroup,
    RolloutTask,
    StepDone,
    SyncRequested,
)
from events.specs import AdapterSpec
from events.streams import Streams
from orchestrator.admission import Admission, Reject
from orchestrator.artifacts import ArtifactStore, PublishedVersion
from orchestrator.checkpoint_store import load_latest
from orchestrator.cursor import CursorState, DataCursor
from orchestrator.fleet import Fleet
from orchestrator.ingress import dead_letter_effects, ingress_subscription
from orchestrator.lifecycle import Phase
from orchestrator.status import fleet_status_effects
from trainer.batching import AdapterRows, build_batch
from trainer.inject import MultiLoraModel
from trainer.metrics import TrainerMetrics
from trainer.optim import SlotAdamW
from trainer.publish import VersionInfo, restore_slot, version_files
from trainer.rl_loss import PPOClipLoss
from trainer.step import train_step

log = logging.getLogger(__name__)
SOURCE = "trainer"
GROUP_MAX_BYTES = 64 << 20
"""Largest rollout group accepted (tokens and log-probs of every sample of a task, as JSON)."""


@dataclass
class AdapterRun:
    """The trainer-side runtime of one admitted registration."""

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
    pending: dict[int, list[tuple[Delivery, RolloutGroup]]] = field(default_factory=dict)
    ready_since: float | None = None
    failures: int = 0
    published: tuple[str, int] | None = None

    @property
    def next_step(self) -> int:
        return self.step + 1

    def ready(self) -> bool:
        k = self.next_step
        return bool(self.pending.get(k)) and not self.expected.get(k)


class TrainerProcess:
    """See the module docstring. Built by :func:`main`; tests build it directly."""

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
    ) -> None:
        self.client = client
        self.streams = streams
        self.model = model
        self.optimizer = optimizer
        self.admission = admission
        self.artifacts = artifacts
        self.checkpoints = checkpoints
        self.base_model = base_model
        self.pad_id = pad_id
        self.max_batch_wait_s = max_batch_wait_s
        self.prompts_per_task = prompts_per_task
        self.max_failures = max_failures
        self.clock = clock
        self.metrics = metrics
        self.fleet = Fleet(slots=model.num_slots)
        self.runs: dict[str, AdapterRun] = {}
        self.dataset_sizes: dict[str, int] = {}
        self.consumer: Consumer | None = None
        self.steps_trained = 0
        self._writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="publish")

    # --- wiring ------------------------------------------------------------------------------

    def subscriptions(self) -> list[Subscription]:
        return [
            ingress_subscription(self.streams, "trainer"),
            Subscription(
                self.streams.groups,
                "trainer",
                Decoder(GroupEvent, max_bytes=GROUP_MAX_BYTES),
                trim=True,
            ),
        ]

    def _publish(self, effects: Effects, event: msgspec.Struct, stream: str = "") -> None:
        event = stamp(event, source=SOURCE)
        effects.publish(stream or self.streams.control, event)
        if stream in ("", self.streams.control):
            before, self.fleet = self.fleet, self.fleet.apply(event)
            effects.extend(fleet_status_effects(self.streams, before, self.fleet))

    # --- recovery ----------------------------------------------------------------------------

    def recover(self) -> Effects:
        """Rebuild the fleet from the control log; resume live adapters under a new epoch."""
        decoder = Decoder(ControlEvent)
        for entry_id, fields in self.client.xrange(self.streams.control):
            self.fleet = self.fleet.apply(decoder.decode(fields, entry_id.decode()))
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
            run = self._restore(state.name, state.registration_id, state.slot, uri)
            run.epoch = state.epoch
            unfinished: dict[Phase, Literal["budget", "cancelled"]] = {
                Phase.COMPLETING: "budget",
                Phase.CANCELLED: "cancelled",
            }
            if state.phase in unfinished or state.phase is Phase.FAILED:
                # crashed between the decision and the slot's release: finish it now
                self._finish(effects, run, unfinished.get(state.phase))
                continue
            run.epoch = state.epoch + 1
            log.info("resuming %s at step %d (version %d) under epoch %d",
                     run.name, run.step, run.version, run.epoch)  # fmt: skip
            self._publish(
                effects,
                Admitted(adapter=run.name, registration_id=run.registration_id, epoch=run.epoch,
                         slot=run.slot, spec=run.spec, start_step=run.step, resumed_from=uri),
            )  # fmt: skip
            self._announce_version(effects, run, step=run.step)
            self._issue(effects, run)
        self._admit_waiting(effects)
        return effects

    def _restore(self, name: str, registration_id: str, slot: int, uri: str) -> AdapterRun:
        info = restore_slot(
            self.model,
            self.optimizer,
            slot,
            self.artifacts.read_file(uri, STATE_TENSORS),
            self.artifacts.read_file(uri, STATE_JSON),
            self.artifacts.read_file(uri, ADAPTER_WEIGHTS),
        )
        run = AdapterRun(
            name=name,
            registration_id=registration_id,
            epoch=info.epoch,
            slot=slot,
            spec=info.spec,
            cursor=DataCursor.restore(info.cursor),
            step=info.step,
            version=info.version,
            uri=uri,
            issued_through=info.step,
        )
        self.runs[name] = run
        return run

    # --- handlers ----------------------------------------------------------------------------

    def handle(self, d: Delivery) -> HandlerResult:
        event = d.event
        if isinstance(event, RegisterRequested):
            return self.on_register(event, d)
        if isinstance(event, DeregisterRequested):
            return self.on_deregister(event)
        if isinstance(event, RolloutGroup):
            return self.on_group(event, d)
        return Effects()

    def on_register(self, event: RegisterRequested, d: Delivery) -> Effects:
        effects = Effects()
        registration_id = event.registration_id or event.id
        if self.fleet.get(registration_id) is not None:
            return effects  # a retried registration: already handled
        event = msgspec.structs.replace(event, registration_id=registration_id)
        verdict = self.admission.check(event, self.fleet)
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
            letter = dead_letter_effects(
                self.streams, d, reason, consumer=consumer, now=self.clock()
            )
            return effects.extend(letter)
        self.dataset_sizes[registration_id] = verdict.dataset_size
        self._publish(effects, event)
        self._admit_waiting(effects)
        position = self.fleet.queue_position(registration_id)
        if position is not None:
            self._publish(effects, Queued(adapter=event.adapter, registration_id=registration_id,
                                          position=position, spec=event.spec))  # fmt: skip
        return effects

    def on_deregister(self, event: DeregisterRequested) -> Effects:
        """Cancel the live registration of the name (or the one named): resolved to its id
        before it is republished, so a replay never cancels a newer registration."""
        effects = Effects()
        state = self.fleet.current(event.adapter)
        if state is None or not self.fleet.is_active_name(event.adapter):
            return effects
        if event.registration_id not in ("", state.registration_id):
            return effects
        resolved = msgspec.structs.replace(event, registration_id=state.registration_id,
                                           epoch=state.epoch)  # fmt: skip
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
            self._publish(effects, ended)  # fmt: skip
        self._admit_waiting(effects)
        return effects

    def on_group(self, event: RolloutGroup, d: Delivery) -> HandlerResult:
        run = self.runs.get(event.adapter)
        expected = run.expected.get(event.step, set()) if run else set()
        if (
            run is None
            or not self.fleet.accepts_group(
                event.adapter, event.registration_id, event.epoch, event.version
            )
            or event.epoch != run.epoch
            or event.task_id not in expected
        ):
            log.info("dropping group %s of %s (stale or unknown)", event.task_id, event.adapter)
            return Effects()
        expected.discard(event.task_id)
        run.pending.setdefault(event.step, []).append((d, event))
        if run.ready() and run.ready_since is None:
            run.ready_since = self.clock()
        return DEFER

    # --- training ----------------------------------------------------------------------------

    def on_idle(self) -> None:
        """Train every ready adapter together once the batch is worth it (see module docs)."""
        ready = [r for r in self.runs.values() if r.ready()]
        if not ready:
            return
        waiting = [r for r in self.runs.values() if not r.ready() and r.expected.get(r.next_step)]
        oldest = min(r.ready_since or self.clock() for r in ready)
        if waiting and self.clock() - oldest < self.max_batch_wait_s:
            return
        wait_s = max(0.0, self.clock() - oldest)
        effects = self.train(ready, wait_s=wait_s)
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

    def train(self, ready: list[AdapterRun], *, wait_s: float = 0.0) -> Effects:
        """One mixed step over ``ready``; returns the effects (events, tasks, acks) to commit."""
        t0 = time.perf_counter()
        used = {r.name: r.pending.pop(r.next_step) for r in ready}
        rows = [
            AdapterRows(
                r.slot,
                r.spec.loss,
                [g for _, ev in used[r.name] for g in ev.groups],
                temperature=r.spec.sampling.logprob_temperature,
            )
            for r in ready
        ]
        batch, stats = build_batch(rows, self.pad_id)
        loss_fn = PPOClipLoss.from_specs({r.slot: r.spec.loss for r in ready}, self.model.num_slots)
        timings: dict[str, float] = {}
        metrics = (
            train_step(self.model, self.optimizer, batch, loss_fn, timings=timings) if batch else {}
        )
        step_s = time.perf_counter() - t0
        effects = Effects()
        trained: list[tuple[AdapterRun, dict[str, float]]] = []
        for run in ready:
            run.ready_since = None
            effects.ack(*(d.ack_key for d, _ in used[run.name]))
            m = metrics.get(run.slot)
            if m is None or m.skipped:
                reason = m.reason if m else "no usable sample group"
                run.failures += 1 if m else 0
                log.warning("%s step %d not taken: %s", run.name, run.next_step, reason)
                if run.failures >= self.max_failures:
                    self._publish(
                        effects,
                        Failed(
                            adapter=run.name,
                            registration_id=run.registration_id,
                            epoch=run.epoch,
                            reason=reason or "failed",
                            step=run.step,
                        ),
                    )
                    self._finish(effects, run, None)
                    continue
                run.expected.pop(run.next_step, None)
                self._issue_step(effects, run, run.next_step)  # again, with the next prompts
                continue
            run.failures = 0
            versions_used = [ev.version for _, ev in used[run.name]]
            run.step += 1
            run.version += 1
            self.steps_trained += 1
            step_metrics = {
                **stats[run.slot].metrics(),
                "loss": m.loss,
                "grad_norm": m.grad_norm,
                "lr": m.lr,
                "tokens": float(m.tokens),
                "staleness": float(run.version - 1 - min(versions_used)),
                "step_s": step_s,
                **m.extras,
            }
            trained.append((run, step_metrics))
        uris = self._publish_versions([run for run, _ in trained])
        for (run, step_metrics), uri in zip(trained, uris, strict=True):
            self._publish(effects, StepDone(adapter=run.name, registration_id=run.registration_id,
                                           epoch=run.epoch, step=run.step, version=run.version,
                                           metrics=step_metrics, state_uri=uri))  # fmt: skip
            self._announce_version(effects, run, step=run.step)
            if run.step >= run.spec.steps:
                self._finish(effects, run, "budget")
            else:
                self._issue(effects, run)
        self._admit_waiting(effects)
        if self.metrics is not None:
            self.metrics.step_phases(
                wait_s=wait_s,
                forward_backward_s=timings.get("forward_backward", 0.0),
                optimizer_s=timings.get("optimizer", 0.0),
                publish_s=max(0.0, time.perf_counter() - t0 - sum(timings.values())),
                tokens=sum(m.tokens for m in metrics.values() if not m.skipped),
                adapters=sum(1 for m in metrics.values() if not m.skipped),
            )
        return effects

    # --- lifecycle helpers -------------------------------------------------------------------

    def _admit_waiting(self, effects: Effects) -> None:
        for state, slot in self.fleet.next_admissions():
            if state.spec is None:
                raise MultiLoraError(f"waiting registration {state.registration_id} has no spec")
            self._admit(effects, state.name, state.registration_id, state.spec, slot,
                        state.epoch + 1)  # fmt: skip

    def _admit(
        self, effects: Effects, name: str, registration_id: str, spec: AdapterSpec, slot: int,
        epoch: int,
    ) -> None:  # fmt: skip
        resumed = ""
        checkpoint = load_latest(self.checkpoints, name) if spec.resume else None
        if checkpoint is not None:
            run = self._restore(name, registration_id, slot, checkpoint.uri)
            run.registration_id, run.spec, run.epoch = registration_id, spec, epoch
            run.issued_through = run.step
            self.optimizer.update_settings(slot, spec.optim, spec.steps)  # keeps Adam state
            resumed = checkpoint.uri
        else:
            self.model.configure_slot(slot, spec.rank, spec.alpha, seed=spec.seed)
            self.optimizer.configure(slot, spec.optim, spec.steps)
            self.optimizer.reset(slot)
            n = self.dataset_sizes.get(registration_id) or self.admission.probe_dataset(
                spec.dataset
            )
            cursor = DataCursor(n, spec.dataset.shuffle_seed)
            run = AdapterRun(name=name, registration_id=registration_id, epoch=epoch, slot=slot,
                             spec=spec, cursor=cursor)  # fmt: skip
            self.runs[name] = run
        self._publish(effects, Admitted(adapter=name, registration_id=registration_id, epoch=epoch,
                                        slot=slot, spec=spec, start_step=run.step,
                                        resumed_from=resumed))  # fmt: skip
        run.uri = self._publish_version(run)
        self._announce_version(effects, run, step=run.step)
        if run.step >= spec.steps:  # resumed at or past its new budget: nothing left to train
            self._finish(effects, run, "budget")
            return
        self._issue(effects, run)

    def _finish(
        self, effects: Effects, run: AdapterRun, reason: Literal["budget", "cancelled"] | None
    ) -> None:
        """Complete (``budget``/``cancelled``) or, with ``reason=None``, retire a failed run."""
        for step in list(run.pending):
            effects.ack(*(d.ack_key for d, _ in run.pending.pop(step)))
        if reason is not None:
            self._publish(
                effects,
                Completed(
                    adapter=run.name,
                    registration_id=run.registration_id,
                    epoch=run.epoch,
                    step=run.step,
                    reason=reason,
                    version=run.version,
                ),
            )  # type: ignore[arg-type]
        self._publish(effects, Retired(adapter=run.name, registration_id=run.registration_id,
                                       epoch=run.epoch, slot=run.slot))  # fmt: skip
        self.model.release_slot(run.slot)
        self.optimizer.release(run.slot)
        del self.runs[run.name]

    def _publish_version(self, run: AdapterRun) -> str:
        return self._publish_versions([run])[0]

    def _publish_versions(self, runs: list[AdapterRun]) -> list[str]:
        """Write the current version of each run; returns their URIs (in order).

        The files are built one after another (each a few device-to-host copies), then written
        concurrently: each write ends in fsyncs, which wait on the disk, not on Python.
        """
        files = [self._version_files(run) for run in runs]

        def write(i: int) -> PublishedVersion:
            r = runs[i]
            return self.artifacts.write_version(r.name, r.registration_id, r.version, files[i])

        if len(runs) > 1:
            published = list(self._writers.map(write, range(len(runs))))
        else:
            published = [write(i) for i in range(len(runs))]
        for run, version in zip(runs, published, strict=True):
            run.uri = version.uri
            run.published = (version.sha256, version.bytes)
        return [version.uri for version in published]

    def _version_files(self, run: AdapterRun) -> dict[str, bytes | bytearray]:
        cursor = run.cursor_before.get(run.next_step, run.cursor.state())
        info = VersionInfo(
            adapter=run.name,
            registration_id=run.registration_id,
            step=run.step,
            version=run.version,
            epoch=run.epoch,
            cursor=cursor,
            spec=run.spec,
        )
        return version_files(self.model, self.optimizer, run.slot, info, self.base_model)

    def _announce_version(self, effects: Effects, run: AdapterRun, *, step: int) -> None:
        if run.published is None:  # restored: hash what is on the store
            data = self.artifacts.read_file(run.uri, ADAPTER_WEIGHTS)
            run.published = (hashlib.sha256(data).hexdigest(), len(data))
        sha256, size = run.published
        self._publish(effects, SyncRequested(adapter=run.name, registration_id=run.registration_id,
                                             epoch=run.epoch, version=run.version, step=step,
                                             uri=run.uri, sha256=sha256, bytes=size))  # fmt: skip

    def _issue(self, effects: Effects, run: AdapterRun) -> None:
        """Issue tasks up to ``max_staleness`` steps ahead of the newest weights."""
        horizon = min(run.step + 1 + run.spec.max_staleness, run.spec.steps)
        while run.issued_through < horizon:
            k = run.issued_through + 1
            run.cursor_before[k] = run.cursor.state()
            self._issue_step(effects, run, k)
            run.issued_through = k
        for old in [s for s in run.cursor_before if s < run.step]:
            del run.cursor_before[old]

    def _issue_step(self, effects: Effects, run: AdapterRun, k: int) -> None:
        """The tasks of step ``k``: the cursor's next ``prompts_per_step`` prompts."""
        spec = run.spec
        indices = run.cursor.take(spec.prompts_per_step)
        size = self.prompts_per_task or len(indices)
        expected = run.expected.setdefault(k, set())
        for chunk, start in enumerate(range(0, len(indices), size)):
            seed = _task_seed(spec.seed, run.registration_id, run.epoch, k, chunk)
            task = RolloutTask(
                id=new_id(), adapter=run.name, registration_id=run.registration_id,
                epoch=run.epoch, step=k, version=run.version, weights_uri=run.uri,
                prompt_indices=tuple(indices[start:start + size]), group_size=spec.group_size,
                dataset=spec.dataset, rewards=spec.rewards, sampling=spec.sampling, seed=seed,
            )  # fmt: skip
            expected.add(task.id)
            self._publish(effects, task, self.streams.tasks)


def _task_seed(seed: int, registration_id: str, epoch: int, step: int, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{registration_id}:{epoch}:{step}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
