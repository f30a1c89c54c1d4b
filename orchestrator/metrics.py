"""Per-adapter Prometheus metrics, derived from control-log events.

:class:`AdapterMetrics` is a fold over the control log like the status projection: feed it every
control event in log order (:meth:`AdapterMetrics.observe`, or :meth:`AdapterMetrics.observer`
as the consumer's observer) and it keeps one set of series per *live* adapter, labelled
``adapter`` (the adapter's name). Whichever process reads the whole control log hosts it (the
checkpoint process); trainers and rollout workers export no ``adapter`` label at all, so the
label's cardinality is decided here alone.

Cardinality stays bounded by the live fleet: when a registration ends (``retired``;
``rejected``; ``failed``, ``completed`` or ``deregister_requested`` of a registration that
never held a slot) every series of its adapter is removed. Late events of an ended registration
(a ``synced`` from a slow worker after ``retired``) are recognised by registration id and never
bring a series back. A host that starts mid-log (a restart resumes after its last ack) picks
adapters up at their next trainer event; only ``register_requested``, ``queued``,
``admitted``, ``step_done`` and ``sync_requested`` start tracking an adapter, because the
trainer publishes none of them after ``retired``.

Exported (gauges hold the value of the last ``step_done``; ``StepDone.metrics`` key in
brackets):

==============================================  =======  =====================================
name                                            kind     meaning
==============================================  =======  =====================================
``multilora_adapter_state``                     gauge    1 for the lifecycle phase (label
                                                         ``phase``), 0 for the others
``multilora_adapter_slot``                      gauge    trainer slot while admitted
``multilora_adapter_queue_position``            gauge    place in the wait queue (0 = next)
``multilora_adapter_step``                      gauge    optimizer steps taken
``multilora_adapter_step_budget``               gauge    steps the spec asks for
``multilora_adapter_steps_total``               counter  steps observed by this process
``multilora_adapter_version``                   gauge    newest published weights version
``multilora_adapter_reward_mean``               gauge    mean raw reward of the step's samples
                                                         [reward_mean]
``multilora_adapter_loss``                      gauge    normalized RL loss [loss]
``multilora_adapter_kl``                        gauge    KL to the base model [kl], only when
                                                         the loss has ``kl_coef > 0``
``multilora_adapter_entropy``                   gauge    mean -log p of sampled tokens, a one-
                                                         sample entropy estimate [neg_logprob]
``multilora_adapter_clip_fraction``             gauge    tokens whose ratio was clipped
                                                         [clip_frac]
``multilora_adapter_importance_ratio``          gauge    mean policy/behaviour ratio [ratio]
``multilora_adapter_grad_norm``                 gauge    gradient norm before clipping
``multilora_adapter_learning_rate``             gauge    rate used by the step [lr]
``multilora_adapter_response_length_tokens``    gauge    mean completion length
``multilora_adapter_staleness_versions``        gauge    versions between the samples' weights
                                                         and the trained weights [staleness]
``multilora_adapter_step_duration_seconds``     gauge    the mixed step's wall time [step_s]
``multilora_adapter_samples_total``             counter  samples trained on [samples]
``multilora_adapter_samples_failed_total``      counter  samples whose generation or reward
                                                         failed [samples_failed]
``multilora_adapter_groups_dropped_total``      counter  groups dropped (e.g. zero variance)
``multilora_adapter_tokens_total``              counter  target tokens trained on [tokens]
``multilora_adapter_sync_latency_seconds``      histo    publish → rollout worker serves it
``multilora_adapter_checkpoint_step``           gauge    step of the newest durable checkpoint
``multilora_adapter_progress_timestamp_seconds`` gauge   event time of the last admission or
                                                         step (the stalled-adapter alert)
==============================================  =======  =====================================

Counters count what this process observed (they restart at zero with it); ``rate()`` and
``increase()`` handle that. A ``step_done`` whose step is not above the adapter's last one is a
duplicate (at-least-once delivery, replay) and changes nothing, so no step is counted twice.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from events.consumer import Delivery, Subscription
from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    DeregisterRequested,
    Failed,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    StepDone,
    Synced,
    SyncRequested,
)
from orchestrator.lifecycle import Phase

SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
"""Seconds from ``sync_requested`` to a worker serving the version (a local copy: ~0.1 s)."""

ENDED_MEMORY = 100_000
"""How many ended registration ids are remembered to drop their late events (oldest go first)."""

STARTS = (RegisterRequested, Queued, Admitted, StepDone, SyncRequested)
"""Trainer events that start tracking an unknown adapter (none is published after retired)."""

_GAUGES: dict[str, tuple[str, str]] = {
    # StepDone.metrics key -> (metric name, help)
    "reward_mean": ("multilora_adapter_reward_mean", "Mean raw reward of the last step's samples."),
    "loss": ("multilora_adapter_loss", "Normalized RL loss of the last step."),
    "kl": ("multilora_adapter_kl", "KL to the base model of the last step (kl_coef > 0 only)."),
    "neg_logprob": (
        "multilora_adapter_entropy",
        "Mean -log p of sampled tokens in the last step (a one-sample entropy estimate), nats.",
    ),
    "clip_frac": ("multilora_adapter_clip_fraction", "Fraction of tokens whose ratio was clipped."),
    "ratio": ("multilora_adapter_importance_ratio", "Mean policy/behaviour probability ratio."),
    "grad_norm": ("multilora_adapter_grad_norm", "Gradient norm before clipping."),
    "lr": ("multilora_adapter_learning_rate", "Learning rate used by the last step."),
    "response_length": (
        "multilora_adapter_response_length_tokens",
        "Mean completion length of the last step's samples, tokens.",
    ),
    "staleness": (
        "multilora_adapter_staleness_versions",
        "Weights versions between the samples' policy and the trained policy (off-policyness).",
    ),
    "step_s": (
        "multilora_adapter_step_duration_seconds",
        "Wall time of the mixed train step the adapter's last step ran in, seconds.",
    ),
}

_COUNTERS: dict[str, tuple[str, str]] = {
    "samples": ("multilora_adapter_samples_total", "Samples trained on."),
    "samples_failed": (
        "multilora_adapter_samples_failed_total",
        "Samples whose generation or reward failed.",
    ),
    "groups_dropped": (
        "multilora_adapter_groups_dropped_total",
        "Sample groups dropped before training (no usable signal).",
    ),
    "tokens": ("multilora_adapter_tokens_total", "Target tokens trained on."),
}

PHASES = tuple(p.value for p in Phase if p not in (Phase.RETIRED, Phase.REJECTED))
"""``phase`` label values of ``multilora_adapter_state`` (ended phases have no series)."""


@dataclass
class _Tracked:
    registration_id: str
    has_slot: bool = False
    step: int = -1
    budget: int = 0
    synced: dict[str, int] = field(default_factory=dict)  # worker -> newest version observed


class AdapterMetrics:
    """Per-adapter series in ``registry``, kept for live adapters only (see the module doc).

    Not thread-safe on its own: call :meth:`observe` from one thread (the consumer's handler
    thread); scrapes read the prometheus_client metrics, which are.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, ["adapter", *extra], registry=registry)

        self.state = gauge(
            "multilora_adapter_state", "1 for the adapter's lifecycle phase, else 0.", "phase"
        )
        self.slot = gauge("multilora_adapter_slot", "Trainer slot the adapter holds.")
        self.queue_position = gauge(
            "multilora_adapter_queue_position", "Place in the wait queue (0 = next)."
        )
        self.step = gauge("multilora_adapter_step", "Optimizer steps the adapter has taken.")
        self.step_budget = gauge("multilora_adapter_step_budget", "Steps the adapter's spec asks.")
        self.version = gauge("multilora_adapter_version", "Newest published weights version.")
        self.checkpoint_step = gauge(
            "multilora_adapter_checkpoint_step", "Step of the newest durable checkpoint."
        )
        self.progress_time = gauge(
            "multilora_adapter_progress_timestamp_seconds",
            "Unix time (event time) of the adapter's last admission or optimizer step.",
        )
        self.steps_total = Counter(
            "multilora_adapter_steps_total",
            "Optimizer steps observed.",
            ["adapter"],
            registry=registry,
        )
        self.gauges = {k: gauge(name, doc) for k, (name, doc) in _GAUGES.items()}
        self.counters = {
            k: Counter(name, doc, ["adapter"], registry=registry)
            for k, (name, doc) in _COUNTERS.items()
        }
        self.sync_latency = Histogram(
            "multilora_adapter_sync_latency_seconds",
            "Seconds from the trainer publishing a version to a rollout worker serving it.",
            ["adapter"],
            buckets=SYNC_BUCKETS,
            registry=registry,
        )
        self._single = [
            self.slot, self.queue_position, self.step, self.step_budget, self.version,
            self.checkpoint_step, self.progress_time, self.steps_total, *self.gauges.values(),
            *self.counters.values(), self.sync_latency,
        ]  # fmt: skip
        self.tracked: dict[str, _Tracked] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    # --- hooks -------------------------------------------------------------------------------

    def observe(self, event: Any) -> None:
        """Update the series from one control-log event (any other event is ignored)."""
        name = getattr(event, "adapter", None)
        rid = getattr(event, "registration_id", None)
        if not isinstance(name, str) or not isinstance(rid, str) or rid in self._ended:
            return
        tracked = self.tracked.get(name)
        if tracked is not None and tracked.registration_id != rid:
            if not isinstance(event, STARTS):
                return  # an event of another registration of the name (late or foreign)
            self._end(name)  # a new registration: the old one ended unseen
            tracked = None
        if tracked is None:
            if not isinstance(event, STARTS):
                if isinstance(event, Rejected):
                    self._remember_ended(rid)
                return
            tracked = self.tracked[name] = _Tracked(rid)
        self._apply(name, tracked, event)

    def observer(self, stream: str) -> _ControlObserver:
        """A consumer Observer that feeds every handled delivery of ``stream`` to :meth:`observe`.

        Use it with :class:`events.metrics.FanOut` next to the bus metrics observer; deliveries
        are seen after their effects are committed.
        """
        return _ControlObserver(self, stream)

    def live(self) -> frozenset[str]:
        """Names of the adapters that currently have series."""
        return frozenset(self.tracked)

    # --- transitions -------------------------------------------------------------------------

    def _apply(self, name: str, tracked: _Tracked, event: Any) -> None:
        if isinstance(event, RegisterRequested):
            tracked.budget = event.spec.steps
            self._phase(name, Phase.REGISTERED)
        elif isinstance(event, Queued):
            tracked.budget = event.spec.steps
            self.queue_position.labels(name).set(event.position)
            self._phase(name, Phase.QUEUED)
        elif isinstance(event, Admitted):
            self._admitted(name, tracked, event)
        elif isinstance(event, SyncRequested):
            tracked.has_slot = True
            self.version.labels(name).set(event.version)
        elif isinstance(event, StepDone):
            self._step_done(name, tracked, event)
        elif isinstance(event, Synced):
            if event.version > tracked.synced.get(event.worker, -1):
                tracked.synced[event.worker] = event.version
                self.sync_latency.labels(name).observe(max(event.latency_s, 0.0))
        elif isinstance(event, CheckpointSaved):
            self.checkpoint_step.labels(name).set(event.step)
        elif isinstance(event, Retired | Rejected):
            self._end(name)
        elif isinstance(event, Completed | Failed | DeregisterRequested):
            if not tracked.has_slot:
                self._end(name)  # never held a slot: nothing will be retired
            elif isinstance(event, Failed):
                self._phase(name, Phase.FAILED)
            elif isinstance(event, DeregisterRequested) or event.reason == "cancelled":
                self._phase(name, Phase.CANCELLED)
            else:
                self._phase(name, Phase.COMPLETED)

    def _admitted(self, name: str, tracked: _Tracked, event: Admitted) -> None:
        tracked.has_slot = True
        tracked.budget = event.spec.steps
        tracked.step = max(tracked.step, event.start_step)
        self.queue_position.remove(name)
        self.slot.labels(name).set(event.slot)
        self.step.labels(name).set(tracked.step)
        self.step_budget.labels(name).set(tracked.budget)
        self.steps_total.labels(name)  # exported as 0 from admission on
        self.progress_time.labels(name).set(_event_time(event))
        self._phase(name, Phase.ADMITTED)

    def _step_done(self, name: str, tracked: _Tracked, event: StepDone) -> None:
        if event.step <= tracked.step:
            return  # duplicate delivery or replay
        tracked.has_slot = True
        tracked.step = event.step
        self.step.labels(name).set(event.step)
        self.steps_total.labels(name).inc()
        self.version.labels(name).set(event.version)
        self.progress_time.labels(name).set(_event_time(event))
        for key, value in event.metrics.items():
            if key in self.gauges and math.isfinite(value):
                self.gauges[key].labels(name).set(value)
            elif key in self.counters and math.isfinite(value) and value >= 0:
                self.counters[key].labels(name).inc(value)
        done = tracked.budget > 0 and event.step >= tracked.budget
        self._phase(name, Phase.COMPLETING if done else Phase.RUNNING)

    def _phase(self, name: str, phase: Phase) -> None:
        for p in PHASES:
            self.state.labels(name, p).set(1.0 if p == phase.value else 0.0)

    def _end(self, name: str) -> None:
        tracked = self.tracked.pop(name, None)
        if tracked is not None:
            self._remember_ended(tracked.registration_id)
        for metric in self._single:
            metric.remove(name)
        for p in PHASES:
            self.state.remove(name, p)

    def _remember_ended(self, registration_id: str) -> None:
        self._ended[registration_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)


def _event_time(event: Any) -> float:
    """The producer's wall-clock time of ``event``; now for a producer that left it unset."""
    return float(event.time) if event.time > 0 else time.time()


class _ControlObserver:
    """Observer adapter: handled deliveries of one stream → :meth:`AdapterMetrics.observe`."""

    def __init__(self, metrics: AdapterMetrics, stream: str) -> None:
        self.metrics = metrics
        self.stream = stream

    def handled(self, delivery: Delivery, seconds: float) -> None:
        if delivery.subscription.stream == self.stream and delivery.event is not None:
            self.metrics.observe(delivery.event)

    def failed(self, delivery: Delivery, reason: str) -> None: ...

    def dead_lettered(self, delivery: Delivery, reason: str) -> None: ...

    def reclaimed(self, subscription: Subscription, count: int) -> None: ...
