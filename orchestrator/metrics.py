"""Per-adapter Prometheus metrics, derived from the lifecycle states of the control log.

:class:`AdapterMetrics` keeps the :class:`~orchestrator.lifecycle.AdapterState` of every tracked
registration, folded with :func:`~orchestrator.lifecycle.transition`
(:mod:`orchestrator.registrations`), and exports one set of series per adapter name from it:
feed it every control event in log order (:meth:`AdapterMetrics.observe`, or
:meth:`AdapterMetrics.observer` as the consumer's observer). Whichever process reads the whole
control log hosts it (the checkpoint process); trainers and rollout workers export no
``adapter`` label at all, so the label's cardinality is decided here alone.

Cardinality stays bounded by the live fleet: a name's series belong to its newest live
registration, and are removed when that registration's state is ended
(:func:`~orchestrator.lifecycle.is_ended`: retired, rejected, or cancelled or failed without
ever holding a slot). Late events of an ended registration (a ``synced`` from a slow worker
after ``retired``) are recognised by registration id and never bring a series back. A host that
starts mid-log (a restart resumes after its last ack; replicas of a consumer group each see a
part of the log) picks a registration up at its next lifecycle event:
``register_requested``, ``queued`` or ``admitted`` (:func:`~orchestrator.registrations.adopt`),
or any other one when ``known`` (the host's store, e.g. the checkpoint process's registrations)
gives the state of the registration's latest admission. ``synced`` and ``checkpoint_saved`` are
not lifecycle events: they update the series of a tracked registration and start nothing.

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
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from events.consumer import Delivery, Subscription
from events.schema import Admitted, CheckpointSaved, Queued, StepDone, Synced
from orchestrator.lifecycle import (
    TERMINAL,
    AdapterState,
    Phase,
    is_ended,
    is_waiting,
    kind_of,
    registration_key,
    transition,
)
from orchestrator.registrations import adopt

SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
"""Seconds from ``sync_requested`` to a worker serving the version (a local copy: ~0.1 s)."""

ENDED_MEMORY = 100_000
"""How many ended registration ids are remembered to drop their late events (oldest go first)."""

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


Known = Callable[[str], AdapterState | None]
"""Registration id -> its state as of its latest admission, from the host's store (or None)."""


class AdapterMetrics:
    """Per-adapter series in ``registry``, kept for live adapters only (see the module doc).

    ``states`` holds the state of every tracked registration (one per adapter name, by
    registration id); ``known`` is where a registration first met mid-log is looked up (see the
    module doc). Not thread-safe on its own: call :meth:`observe` from one thread (the
    consumer's handler thread); scrapes read the prometheus_client metrics, which are.
    """

    def __init__(self, registry: CollectorRegistry, *, known: Known | None = None) -> None:
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
            self.slot,
            self.queue_position,
            self.step,
            self.step_budget,
            self.version,
            self.checkpoint_step,
            self.progress_time,
            self.steps_total,
            *self.gauges.values(),
            *self.counters.values(),
            self.sync_latency,
        ]
        self.states: dict[str, AdapterState] = {}
        self._known = known
        self._names: dict[str, str] = {}  # adapter name -> registration id of its series
        self._synced: dict[str, dict[str, int]] = {}  # registration -> worker -> newest version
        self._ended: OrderedDict[str, None] = OrderedDict()

    # --- hooks -------------------------------------------------------------------------------

    def observe(self, event: Any) -> None:
        """Update the series from one control-log event (any other event is ignored)."""
        key = registration_key(event)
        if key in self._ended:
            return
        before = self.states.get(key)
        if before is None:
            before, state = self._pick_up(key, event)
            if state is None:
                return
        else:
            before, state = self._fold(before, event)
        self.states[key] = state
        self._export(before, state, event)
        if is_ended(state):
            self._end(key)

    def observer(self, stream: str) -> _ControlObserver:
        """A consumer Observer that feeds every handled delivery of ``stream`` to :meth:`observe`.

        Use it with :class:`events.metrics.FanOut` next to the bus metrics observer; deliveries
        are seen after their effects are committed.
        """
        return _ControlObserver(self, stream)

    def live(self) -> frozenset[str]:
        """Names of the adapters that currently have series."""
        return frozenset(self._names)

    # --- states ------------------------------------------------------------------------------

    def _pick_up(self, key: str, event: Any) -> tuple[AdapterState | None, AdapterState | None]:
        """(state before, state after) ``event`` of a registration not tracked yet; the state
        after is None when the event does not start tracking it (see the module doc)."""
        if kind_of(None, event) is None:
            return None, None  # synced, checkpoint_saved ...: could be late, start nothing
        before = None
        state = adopt(event)
        if state is None and self._known is not None:
            before = self._known(key)
            state = transition(before, event) if before is not None else None
        if state is None or is_ended(state):
            if state is not None and state.phase in TERMINAL:
                self._remember_ended(key)
            return None, None
        shown = self._names.get(state.name)
        if shown is not None:
            self._end(shown)  # a new registration of the name: the shown one ended unseen
        self._names[state.name] = key
        return before, state

    def _fold(self, before: AdapterState, event: Any) -> tuple[AdapterState, AdapterState]:
        """(state before, state after) ``event`` of a tracked registration; the state before is
        the stored one when the event's epoch is newer (a re-admission this host did not see)."""
        state = transition(before, event)
        if state is before and self._known is not None and event.epoch > before.epoch:
            newer = self._known(before.registration_id)
            if newer is not None and newer.epoch > before.epoch:
                return newer, transition(newer, event)
        return before, state

    # --- series ------------------------------------------------------------------------------

    def _export(self, before: AdapterState | None, state: AdapterState, event: Any) -> None:
        """Set the series of ``state``'s name; ``before`` is None or the state before
        ``event`` (the same object when the event changed nothing)."""
        name, applied = state.name, state is not before
        for p in PHASES:
            self.state.labels(name, p).set(1.0 if p == state.phase else 0.0)
        _set_or_remove(self.slot, name, state.slot)
        _set_or_remove(self.step_budget, name, state.steps_total)
        self.step.labels(name).set(state.step)
        self.version.labels(name).set(state.version)
        if not is_waiting(state):
            self.queue_position.remove(name)
        match event:
            case Queued(position=position) if is_waiting(state):
                self.queue_position.labels(name).set(position)
            case Admitted() if applied:
                self.steps_total.labels(name)  # exported as 0 from admission on
                self.progress_time.labels(name).set(_event_time(event))
            case StepDone() if applied:
                self._step_done(name, event)
            case Synced(worker=worker, version=version, latency_s=latency):
                synced = self._synced.setdefault(state.registration_id, {})
                if version > synced.get(worker, -1):
                    synced[worker] = version
                    self.sync_latency.labels(name).observe(max(latency, 0.0))
            case CheckpointSaved(step=step):
                self.checkpoint_step.labels(name).set(step)

    def _step_done(self, name: str, event: StepDone) -> None:
        self.steps_total.labels(name).inc()
        self.progress_time.labels(name).set(_event_time(event))
        for key, value in event.metrics.items():
            if key in self.gauges and math.isfinite(value):
                self.gauges[key].labels(name).set(value)
            elif key in self.counters and math.isfinite(value) and value >= 0:
                self.counters[key].labels(name).inc(value)

    def _end(self, key: str) -> None:
        state = self.states.pop(key)
        self._synced.pop(key, None)
        self._remember_ended(key)
        if self._names.get(state.name) == key:
            del self._names[state.name]
        for metric in self._single:
            metric.remove(state.name)
        for p in PHASES:
            self.state.remove(state.name, p)

    def _remember_ended(self, registration_id: str) -> None:
        self._ended[registration_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)


def _set_or_remove(gauge: Gauge, name: str, value: float | None) -> None:
    if value is None:
        gauge.remove(name)
    else:
        gauge.labels(name).set(value)


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


class StorageMetrics:
    """Series of the checkpoint process's storage housekeeping (:mod:`orchestrator.housekeeping`):

    ==============================================  =======  =================================
    ``multilora_gc_versions_deleted_total``         counter  adapter versions deleted
    ``multilora_gc_bytes_deleted_total``            counter  bytes those versions held
    ``multilora_control_log_trimmed_total``         counter  control-log entries trimmed
    ``multilora_control_snapshot_entries``          gauge    control entries the newest
                                                             snapshot covers
    ``multilora_control_groups_destroyed_total``    counter  vanished consumer groups destroyed
    ``multilora_status_expiring_total``             counter  status hashes given a TTL
    ==============================================  =======  =================================

    No ``adapter`` label: the per-adapter series are :class:`AdapterMetrics`'.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=registry)

        self.versions_deleted = counter(
            "multilora_gc_versions_deleted_total", "Adapter versions deleted by retention."
        )
        self.bytes_deleted = counter(
            "multilora_gc_bytes_deleted_total", "Bytes of the adapter versions deleted."
        )
        self.trimmed = counter(
            "multilora_control_log_trimmed_total", "Control-log entries trimmed after a snapshot."
        )
        self.groups_destroyed = counter(
            "multilora_control_groups_destroyed_total",
            "Consumer groups of the control log destroyed (no live consumer for the window).",
        )
        self.expiring = counter(
            "multilora_status_expiring_total", "Status hashes of ended registrations given a TTL."
        )
        self.snapshot_entries = Gauge(
            "multilora_control_snapshot_entries",
            "Control-log entries the newest snapshot covers.",
            registry=registry,
        )
