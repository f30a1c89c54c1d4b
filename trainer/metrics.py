"""Prometheus metrics of the trainer process: step time split, throughput, slots, queue, memory.

The trainer process builds one :class:`TrainerMetrics` over its registry in ``main()`` and calls
the hooks below; nothing here carries an ``adapter`` label (per-adapter series come from the
control log, see :mod:`orchestrator.metrics`).

A mixed train step is timed in four phases (label ``phase``):

- ``wait``: from the first adapter having a full batch to the step starting (the trainer waits
  up to ``max_batch_wait_s`` so more adapters share the step);
- ``forward_backward``: the forward and backward pass over the mixed batch (incl. the reference
  forward when a KL term is on);
- ``optimizer``: gradient clipping and the per-slot AdamW update;
- ``publish``: the rest of the step's critical path up to the end of its job
  (:mod:`trainer.compute`): taking the held rows, packing the batch, the per-slot results, and
  copying each new version off the device. Deciding the step's events, reporting and
  committing run on the loop while the next step computes; what of that still comes before the
  next step can start is the step's *tail* (``step_tail_seconds``). The version's files are
  encoded and written behind the step, on writer threads (``version_write_seconds``); the loop
  waits for a write only when the next step is done first (``version_wait_seconds``).

Exported:

===========================================  =======  ============================================
name                                         kind     meaning
===========================================  =======  ============================================
``multilora_trainer_step_phase_seconds``     histo    phase duration per step (label ``phase``)
``multilora_trainer_step_seconds``           histo    whole step: the four phases together
``multilora_trainer_last_step_phase_seconds`` gauge   the last step's phase durations
``multilora_trainer_steps_total``            counter  mixed train steps
``multilora_trainer_adapter_steps_total``    counter  adapter steps (one per adapter in a step)
``multilora_trainer_tokens_total``           counter  target tokens trained on
``multilora_trainer_tokens_per_second``      gauge    last step's tokens / its compute time
                                                      (forward_backward + optimizer)
``multilora_trainer_step_adapters``          gauge    adapters in the last step
``multilora_trainer_slots``                  gauge    slots by ``state``: used, free
``multilora_trainer_queue_length``           gauge    registrations waiting for a slot
``multilora_trainer_deferred_groups``        gauge    rollout groups held for steps not yet run
``multilora_trainer_version_write_seconds``  histo    a step's versions: from the step's end to
                                                      durable on the artifact store
``multilora_trainer_version_wait_seconds``   histo    the loop blocked on those writes (on the
                                                      critical path; 0 when they kept up)
``multilora_trainer_step_tail_seconds``      histo    after a step's job, before the next can
                                                      start: the loop noticing it, deciding it,
                                                      settling the step before it (that wait
                                                      included), serving client requests
``multilora_trainer_step_control_seconds``   histo    the loop's own work in a step, by ``part``
                                                      (:data:`CONTROL_PARTS`): where ``publish``
                                                      and the packing go
``multilora_trainer_gpu_memory_*_bytes``     gauge    CUDA allocator: allocated, reserved,
                                                      max_allocated (label ``device``); exported
                                                      without samples when CUDA is absent
===========================================  =======  ============================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.fleet import Fleet

PHASES = ("wait", "forward_backward", "optimizer", "publish")
"""``phase`` label values of the step-time metrics, in step order."""

CONTROL_PARTS = ("rows", "pack", "metrics", "capture", "decide", "report")
"""``part`` label values of ``multilora_trainer_step_control_seconds``, in step order: taking
the held groups of each adapter (``rows``), turning them into the batch (``pack``: usable
samples, advantages, padding), the per-slot results after the optimizer (``metrics``), copying
the new versions off the device (``capture``; these four on the step's critical path), the
loop noticing the step is done, its outcomes and what waits for the versions, handed to the
writer threads (``decide``: part of the tail), the step's log line and phase metrics
(``report``: beside the next step)."""

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Seconds: a tiny CPU model steps in ~10 ms, a 7B model with many adapters in tens of seconds."""


class TrainerMetrics:
    """The trainer's metrics in ``registry``; call the hooks from the trainer's handler thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.phase_seconds = Histogram(
            "multilora_trainer_step_phase_seconds",
            "Duration of one phase of a mixed train step, seconds.",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            "multilora_trainer_step_seconds",
            "Duration of a mixed train step (wait + forward_backward + optimizer + publish).",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.last_phase = Gauge(
            "multilora_trainer_last_step_phase_seconds",
            "Phase durations of the last mixed train step, seconds.",
            ["phase"],
            registry=registry,
        )
        self.steps = Counter(
            "multilora_trainer_steps_total", "Mixed train steps taken.", registry=registry
        )
        self.adapter_steps = Counter(
            "multilora_trainer_adapter_steps_total",
            "Adapter steps taken (an adapter in a mixed step counts once).",
            registry=registry,
        )
        self.tokens = Counter(
            "multilora_trainer_tokens_total", "Target tokens trained on.", registry=registry
        )
        self.tokens_per_second = Gauge(
            "multilora_trainer_tokens_per_second",
            "Target tokens of the last step per second of forward_backward + optimizer time.",
            registry=registry,
        )
        self.step_adapters = Gauge(
            "multilora_trainer_step_adapters", "Adapters in the last step.", registry=registry
        )
        self.slots = Gauge(
            "multilora_trainer_slots", "Adapter slots by state.", ["state"], registry=registry
        )
        self.queue_length = Gauge(
            "multilora_trainer_queue_length",
            "Registrations waiting for a slot.",
            registry=registry,
        )
        self.deferred_groups = Gauge(
            "multilora_trainer_deferred_groups",
            "Rollout groups received and held (unacknowledged) until their step trains.",
            registry=registry,
        )
        self.client_requests = Counter(
            "multilora_trainer_client_requests_total",
            "Client-driven adapters' requests carried out or refused, by kind and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.version_write_seconds = Histogram(
            "multilora_trainer_version_write_seconds",
            "From a step's end until its new versions are durable (written behind the step), s.",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.version_wait_seconds = Histogram(
            "multilora_trainer_version_wait_seconds",
            "Time the trainer's loop waited for a step's version writes, seconds.",
            buckets=(0.0005, 0.001, 0.0025, *STEP_BUCKETS),
            registry=registry,
        )
        self.step_tail_seconds = Histogram(
            "multilora_trainer_step_tail_seconds",
            "After a step's job, before the next can start: deciding it and settling the one "
            "before it, seconds.",
            buckets=(0.0005, 0.001, 0.0025, *STEP_BUCKETS),
            registry=registry,
        )
        self.control_seconds = Histogram(
            "multilora_trainer_step_control_seconds",
            "The trainer loop's own work in a mixed train step, by part, seconds.",
            ["part"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, *STEP_BUCKETS),
            registry=registry,
        )
        for part in CONTROL_PARTS:
            self.control_seconds.labels(part)
        for phase in PHASES:  # export every phase from the start, so dashboards have the series
            self.phase_seconds.labels(phase)
            self.last_phase.labels(phase)
        registry.register(CudaMemoryCollector())

    # --- hooks -------------------------------------------------------------------------------

    def step_phases(
        self,
        *,
        wait_s: float,
        forward_backward_s: float,
        optimizer_s: float,
        publish_s: float,
        tokens: int,
        adapters: int,
    ) -> None:
        """Record one mixed train step: its phase durations (seconds), tokens and adapters.

        Raises ``ValueError`` for a negative or non-finite duration (a clock mix-up in the
        caller: a bug, not something to export).
        """
        durations = dict(
            zip(PHASES, (wait_s, forward_backward_s, optimizer_s, publish_s), strict=True)
        )
        for phase, seconds in durations.items():
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(
                    f"step phase {phase!r} lasted {seconds!r} s; pass time.perf_counter() "
                    "differences (finite, >= 0)"
                )
            self.phase_seconds.labels(phase).observe(seconds)
            self.last_phase.labels(phase).set(seconds)
        self.step_seconds.observe(sum(durations.values()))
        self.steps.inc()
        self.adapter_steps.inc(adapters)
        self.tokens.inc(tokens)
        self.step_adapters.set(adapters)
        compute_s = forward_backward_s + optimizer_s
        if compute_s > 0:
            self.tokens_per_second.set(tokens / compute_s)

    def write_behind(self, *, write_s: float, wait_s: float) -> None:
        """A step's versions are durable after ``write_s``; the loop waited ``wait_s`` of it."""
        self.version_write_seconds.observe(max(0.0, write_s))
        self.version_wait_seconds.observe(max(0.0, wait_s))

    def control_parts(self, parts: dict[str, float]) -> None:
        """The loop's own work in one step, seconds per part (:data:`CONTROL_PARTS`)."""
        for part, seconds in parts.items():
            self.control_seconds.labels(part).observe(max(0.0, seconds))

    def step_tail(self, seconds: float) -> None:
        """The loop settled the step before the last one and committed, in ``seconds``."""
        self.step_tail_seconds.observe(max(0.0, seconds))

    def client_request(self, kind: str, outcome: str) -> None:
        """One client request ended: ``outcome`` ``done``, ``failed`` or ``refused``."""
        self.client_requests.labels(kind, outcome).inc()

    def slot_usage(self, *, used: int, free: int) -> None:
        """Set the slot gauges (``used + free`` is the trainer's slot count)."""
        self.slots.labels("used").set(used)
        self.slots.labels("free").set(free)

    def queue(self, length: int) -> None:
        """Set the number of registrations waiting for a slot."""
        self.queue_length.set(length)

    def observe_fleet(self, fleet: Fleet) -> None:
        """Slots and queue from the trainer's fleet view (call after each change)."""
        free = len(fleet.free_slots())
        self.slot_usage(used=fleet.slots - free, free=free)
        self.queue(len(fleet.waiting()))

    def deferred(self, groups: int) -> None:
        """Set the number of rollout groups held for steps not yet trained."""
        self.deferred_groups.set(groups)


class CudaMemoryCollector(Collector):
    """CUDA caching-allocator memory per device, read at scrape time.

    Reads ``torch.cuda.memory_allocated``, ``memory_reserved`` and ``max_memory_allocated``
    (bytes) for every visible device. Without torch or CUDA the families are exported without
    samples, so queries and dashboards name metrics that exist either way.
    """

    def describe(self) -> Iterable[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        families = self._families()
        for device, values in _cuda_memory():
            for family, value in zip(families, values, strict=True):
                family.add_metric([device], float(value))
        yield from families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return tuple(
            GaugeMetricFamily(
                f"multilora_trainer_gpu_memory_{kind}_bytes",
                f"CUDA caching allocator: {kind.replace('_', ' ')} memory, bytes.",
                labels=["device"],
            )
            for kind in ("allocated", "reserved", "max_allocated")
        )


def _cuda_memory() -> list[tuple[str, tuple[int, int, int]]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []  # never initialize CUDA from the scrape thread
    return [
        (
            f"cuda:{i}",
            (
                torch.cuda.memory_allocated(i),
                torch.cuda.memory_reserved(i),
                torch.cuda.max_memory_allocated(i),
            ),
        )
        for i in range(torch.cuda.device_count())
    ]
