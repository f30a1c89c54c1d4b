"""Client-driven adapters inside the trainer: each one's request queue, carried out in order.

A client-driven adapter (``AdapterSpec.driver == "client"``) is admitted, stepped, completed and
retired through the same lifecycle as a dataset-driven one, but its work comes from its client
(a Tinker-SDK loop behind a gateway) as requests on ``train.requests``
(:data:`events.schema.TrainRequest`), not from tasks and groups. Per adapter the requests are
carried out strictly in arrival order (a gateway publishes one model's requests in the client's
order):

- ``forward_backward`` / ``forward``: the datums join the next mixed step of the trainer with
  every other adapter's rows (:mod:`trainer.client_step`); the result (per-datum log-probs,
  losses) answers its future at once. With a backward, the gradient is accumulated in the slot's
  accumulator and the request entry **stays pending** until an ``optim_step`` folds it into a
  durable version: a crash before that redoes the request (same weights, same result — the
  future keeps its first answer) and the gradient is applied once.
- ``optim_step``: AdamW on the accumulated gradient with the request's settings, the next
  version written to the artifact store, then ``step_done`` (its ``state_uri``: the exact resume
  point), the future, and the acks of the request and the forward/backwards it folded in — one
  atomic commit.
- ``save_weights_for_sampler``: the current version is announced (``sync_requested``) so rollout
  workers can serve it, and its ``tinker://`` path recorded (:func:`events.futures.record_path`).
- ``save_state``: ``adapter.save_requested`` asks the checkpoint process to promote the current
  version to a named checkpoint; the checkpoint process answers the future.
- ``load_state``: the checkpoint's weights (and, ``with_optimizer``, its Adam moments and step
  count) are loaded into the slot; the load counts as a step of the run (``step_done`` with
  metric ``loaded = 1``) so its version is the run's resume point like any other.

A request that cannot be carried out (unknown or ended model, a bad datum, bad Adam settings)
fails its future with a ``user`` error naming the value and is acknowledged; nothing else moves.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from torch import Tensor

from events.consumer import Delivery
from events.effects import Effects
from events.futures import (
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    PathRecord,
    SaveWeightsResult,
    complete,
    fail,
    record_path,
    sampler_path,
)
from events.schema import (
    ForwardBackward,
    LoadWeights,
    OptimStep,
    SaveRequested,
    SaveWeights,
    TrainRequest,
)
from events.specs import OptimSpec
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from trainer.client_step import (
    ClientRequestError,
    ClientRows,
    adam_spec,
    check_datums,
    check_loss_config,
    client_optim_step,
    new_accumulator,
)
from trainer.inject import MultiLoraModel
from trainer.mixed_step import ClientOutcome
from trainer.optim import SlotAdamW
from trainer.publish import restore_slot
from trainer.runs import AdapterRun
from trainer.versions import VersionPublisher

log = logging.getLogger(__name__)

MAX_FOLDED = 64
"""Most ``forward_backward`` requests one model may accumulate (held, unacknowledged) before
its next ``optim_step``; a further one is refused. It bounds what the trainer holds in memory and
keeps the request stream's read-ahead (:func:`max_in_flight`) from filling with held entries."""

HeldRequest = tuple[Delivery, TrainRequest]
"""A client request held until it is carried out: its delivery and event."""

Publish = Callable[[Effects, msgspec.Struct], None]
"""The process's publish: stamps the event, writes it to ``control`` and folds it into the fleet."""


@dataclass
class ClientQueue:
    """One client-driven run's pending work: ``requests`` not yet carried out (in order),
    ``folded`` forward/backwards whose gradient sits in ``accumulator_R_Q`` and whose entries
    are acknowledged by the next ``optim_step``, and since when the head waits for a step."""

    accumulator_R_Q: Tensor
    requests: deque[HeldRequest] = field(default_factory=deque)
    folded: list[Delivery] = field(default_factory=list)
    ready_since: float | None = None

    def held_ids(self) -> set[str]:
        """The stream entry ids this queue holds (queued or folded)."""
        return {d.entry_id for d, _ in self.requests} | {d.entry_id for d in self.folded}


class ClientRuns:
    """The client-driven runs' queues; the process owns the runs themselves (``AdapterRun``)."""

    def __init__(
        self,
        *,
        streams: Streams,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        versions: VersionPublisher,
        artifacts: ArtifactStore,
        publish: Publish,
        max_tokens: int,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self.streams = streams
        self.model = model
        self.optimizer = optimizer
        self.versions = versions
        self.artifacts = artifacts
        self.publish = publish
        self.max_tokens = max_tokens
        self.observe = observe or (lambda kind, outcome: None)
        self.vocab_size = _vocab_size(model)
        self.queues: dict[str, ClientQueue] = {}

    # --- membership --------------------------------------------------------------------------

    def start(self, run: AdapterRun) -> None:
        """A client-driven run was admitted (or restored): give it an empty queue."""
        self.queues[run.name] = ClientQueue(accumulator_R_Q=new_accumulator(self.optimizer))

    def end(self, effects: Effects, run: AdapterRun, why: str) -> None:
        """The run ended: fail what it had not carried out, acknowledge everything it held."""
        queue = self.queues.pop(run.name, None)
        if queue is None:
            return
        for d, request in queue.requests:
            fail(effects, self.streams, request.request_id, f"model {run.name} {why}")
            effects.ack(d.ack_key)
        effects.ack(*(d.ack_key for d in queue.folded))

    # --- requests ----------------------------------------------------------------------------

    def on_request(
        self, request: TrainRequest, d: Delivery, run: AdapterRun | None, now: float
    ) -> Effects | None:
        """Queue ``request`` for its run (returns None: the entry stays pending), or fail it at
        once (returns the effects: the failed future and the ack)."""
        problem = self._refusal(request, run)
        if problem is not None or run is None:
            effects = Effects()
            fail(effects, self.streams, request.request_id, problem or "no such model")
            self.observe(request_kind(request), "refused")
            log.info("refused %s of %s: %s", type(request).__name__, request.adapter, problem)
            return effects
        queue = self.queues[run.name]
        if d.entry_id in queue.held_ids():
            return None  # delivered again (reclaimed) while held: it is queued once already
        queue.requests.append((d, request))
        if len(queue.requests) == 1 and isinstance(request, ForwardBackward):
            queue.ready_since = now
        return None

    def _refusal(self, request: TrainRequest, run: AdapterRun | None) -> str | None:
        if run is None or run.name not in self.queues:
            return (
                f"model {request.adapter!r} is not training here (unknown, still queued, or "
                "ended); create it first and wait for it to be admitted"
            )
        if request.registration_id not in ("", run.registration_id):
            return f"model {request.adapter!r} was registered again; this request is for an old one"
        queue = self.queues[run.name]
        held = len(queue.folded) + sum(
            1 for _, r in queue.requests if isinstance(r, ForwardBackward) and r.backward
        )
        if isinstance(request, ForwardBackward) and request.backward and held >= MAX_FOLDED:
            return (
                f"model {request.adapter!r} holds {held} forward_backward requests since its last "
                f"optim_step (at most {MAX_FOLDED}); call optim_step, or send larger requests"
            )
        try:
            if isinstance(request, ForwardBackward):
                check_datums(request.datums, self.vocab_size, self.max_tokens)
                check_loss_config(request.loss_fn, request.loss_config)
            elif isinstance(request, OptimStep):
                _adam(request)
        except ClientRequestError as err:
            return str(err)
        return None

    # --- carrying them out -------------------------------------------------------------------

    def serve(self, effects: Effects, runs: dict[str, AdapterRun], now: float) -> list[AdapterRun]:
        """Carry out every request at the head of a queue that needs no train step (optim_step,
        saves, loads); stop at each queue's first forward/backward. Returns the runs that reached
        their step budget (the process completes them)."""
        done: list[AdapterRun] = []
        for name, queue in self.queues.items():
            run = runs[name]
            while queue.requests and not isinstance(queue.requests[0][1], ForwardBackward):
                d, request = queue.requests.popleft()
                effects.ack(d.ack_key)
                self._carry_out(effects, run, queue, request)
            if queue.requests and queue.ready_since is None:
                queue.ready_since = now
            if run.step >= run.spec.steps and run not in done:
                done.append(run)
        return done

    def ready(self) -> list[tuple[str, float]]:
        """The runs whose next request is a forward/backward, and since when it waits."""
        return [
            (name, q.ready_since or 0.0)
            for name, q in self.queues.items()
            if q.requests and isinstance(q.requests[0][1], ForwardBackward)
        ]

    def take(self, runs: dict[str, AdapterRun]) -> list[tuple[AdapterRun, HeldRequest, ClientRows]]:
        """Pop the forward/backward at the head of every ready queue, as step rows."""
        taken: list[tuple[AdapterRun, HeldRequest, ClientRows]] = []
        for name, _ in self.ready():
            queue = self.queues[name]
            d, request = queue.requests.popleft()
            if not isinstance(request, ForwardBackward):  # ready() said it is one
                raise TypeError(f"the head of {name}'s queue is {type(request).__name__}")
            queue.ready_since = None
            run = runs[name]
            rows = ClientRows(
                slot=run.slot,
                datums=request.datums,
                loss_fn=request.loss_fn,
                loss_config=request.loss_config,
                backward=request.backward,
            )
            taken.append((run, (d, request), rows))
        return taken

    def accumulators(self, runs: list[AdapterRun]) -> dict[int, Tensor]:
        return {run.slot: self.queues[run.name].accumulator_R_Q for run in runs}

    def answer(
        self,
        effects: Effects,
        run: AdapterRun,
        held: HeldRequest,
        outcome: ClientOutcome,
        step_metrics: dict[str, float],
    ) -> None:
        """Answer a forward/backward the step computed (``step_metrics``: which mixed step, with
        how many adapters); keep its entry pending if its gradient now waits in the accumulator
        for an ``optim_step``."""
        d, request = held
        if outcome.skipped:
            message = f"forward_backward of {run.name} was not applied: {outcome.skipped}"
            fail(effects, self.streams, request.request_id, message)
            effects.ack(d.ack_key)
            self.observe(request_kind(request), "failed")
            return
        self.observe(request_kind(request), "done")
        result = ForwardBackwardResult(
            logprobs=outcome.logprobs,
            elementwise_loss=outcome.elementwise_loss,
            metrics={
                "loss:sum": outcome.loss_sum,
                "tokens:sum": float(outcome.tokens),
                **step_metrics,
            },
        )
        complete(effects, self.streams, request.request_id, result)
        if isinstance(request, ForwardBackward) and request.backward:
            self.queues[run.name].folded.append(d)
        else:
            effects.ack(d.ack_key)

    def _carry_out(
        self, effects: Effects, run: AdapterRun, queue: ClientQueue, request: TrainRequest
    ) -> None:
        match request:
            case OptimStep():
                self._optim_step(effects, run, queue, request)
            case SaveWeights(kind="sampler"):
                self._save_sampler(effects, run, request)
            case SaveWeights():
                save = SaveRequested(
                    adapter=run.name,
                    registration_id=run.registration_id,
                    epoch=run.epoch,
                    request_id=request.request_id,
                    name=request.name,
                    step=run.step,
                    version=run.version,
                    state_uri=run.uri,
                )
                self.publish(effects, save)
                self.observe("save_state", "done")  # handed to the checkpoint process
            case LoadWeights():
                self._load(effects, run, queue, request)
            case ForwardBackward():  # never at a queue's head here: see serve()
                raise AssertionError("forward_backward reached _carry_out")

    def _optim_step(
        self, effects: Effects, run: AdapterRun, queue: ClientQueue, request: OptimStep
    ) -> None:
        spec = _adam(request)
        result = client_optim_step(
            self.optimizer,
            run.slot,
            queue.accumulator_R_Q,
            self.model.table.rank(run.slot),
            spec,
            run.spec.steps,
        )
        effects.ack(*(d.ack_key for d in queue.folded))
        folded, queue.folded = len(queue.folded), []
        if result.skipped:
            message = f"optim_step of {run.name} was skipped: {result.reason}; gradient dropped"
            fail(effects, self.streams, request.request_id, message)
            self.observe("optim_step", "failed")
            return
        self.observe("optim_step", "done")
        run.spec = msgspec.structs.replace(run.spec, optim=spec)
        run.advance()
        self.versions.publish([run])
        metrics = {"grad_norm": result.grad_norm, "lr": result.lr, "requests": float(folded)}
        self.publish(effects, run.step_done(metrics))
        answer = OptimStepResult(step=run.step, version=run.version, metrics=metrics)
        complete(effects, self.streams, request.request_id, answer)

    def _save_sampler(self, effects: Effects, run: AdapterRun, request: SaveWeights) -> None:
        self.observe("save_weights_for_sampler", "done")
        self.publish(effects, self.versions.sync_requested(run))
        path = sampler_path(run.name, request.name)
        record = PathRecord(
            path=path,
            kind="sampler",
            model=run.name,
            registration_id=run.registration_id,
            version=run.version,
            step=run.step,
            uri=run.uri,
        )
        record_path(effects, self.streams, record)
        result = SaveWeightsResult(path=path, version=run.version)
        complete(effects, self.streams, request.request_id, result)

    def _load(
        self, effects: Effects, run: AdapterRun, queue: ClientQueue, request: LoadWeights
    ) -> None:
        from events.adapter_format import ADAPTER_WEIGHTS, STATE_JSON, STATE_TENSORS

        try:
            files = [self.artifacts.read_file(request.uri, f) for f in (STATE_TENSORS, STATE_JSON)]
            weights = self.artifacts.read_file(request.uri, ADAPTER_WEIGHTS)
        except (OSError, ValueError) as err:
            fail(effects, self.streams, request.request_id, f"cannot read {request.uri}: {err}")
            self.observe("load_state", "failed")
            return
        self.observe("load_state", "done")
        step_count = self.optimizer.step_count(run.slot)
        info = restore_slot(self.model, self.optimizer, run.slot, files[0], files[1], weights)
        if not request.with_optimizer:  # weights only: fresh moments, the run's schedule position
            self.optimizer.reset(run.slot)
            self.optimizer.set_step_count(run.slot, step_count)
        run.spec = msgspec.structs.replace(run.spec, optim=info.spec.optim)
        self.optimizer.update_settings(run.slot, run.spec.optim, run.spec.steps)
        queue.accumulator_R_Q.zero_()
        effects.ack(*(d.ack_key for d in queue.folded))
        queue.folded = []
        run.advance()
        self.versions.publish([run])
        self.publish(effects, run.step_done({"loaded": 1.0}))
        result = LoadWeightsResult(path=request.uri, step=run.step)
        complete(effects, self.streams, request.request_id, result)


def max_in_flight(num_slots: int) -> int:
    """The request stream's read-ahead cap for a trainer of ``num_slots``: every model's held
    forward/backwards plus room for the requests that release them."""
    return num_slots * (MAX_FOLDED + 16) + 256


def request_kind(request: TrainRequest) -> str:
    """The metric label of a request (the SDK call it came from)."""
    match request:
        case ForwardBackward(backward=True):
            return "forward_backward"
        case ForwardBackward():
            return "forward"
        case OptimStep():
            return "optim_step"
        case SaveWeights(kind="sampler"):
            return "save_weights_for_sampler"
        case SaveWeights():
            return "save_state"
        case LoadWeights():
            return "load_state"


def _adam(request: OptimStep) -> OptimSpec:
    return adam_spec(
        learning_rate=request.learning_rate,
        beta1=request.beta1,
        beta2=request.beta2,
        eps=request.eps,
        weight_decay=request.weight_decay,
        grad_clip_norm=request.grad_clip_norm,
    )


def _vocab_size(model: MultiLoraModel) -> int:
    """The number of token ids the base model embeds (ids at or above it are refused)."""
    hf: Any = model.hf_model
    return int(hf.get_input_embeddings().num_embeddings)
