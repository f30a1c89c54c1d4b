"""Prometheus metrics of a rollout worker: tasks, generated tokens, latency, rewards, adapters.

The worker process builds one :class:`RolloutMetrics` over its registry in ``main()`` and calls
the hooks from its handler thread. No series carries an ``adapter`` label (per-adapter series
come from the control log, see :mod:`orchestrator.metrics`); several workers are told apart by
Prometheus' ``instance`` label.

Exported:

=============================================  =======  =======================================
name                                           kind     meaning
=============================================  =======  =======================================
``multilora_rollout_tasks_total``              counter  tasks by ``outcome``: ``done`` (group
                                                        published) or ``dropped`` (fenced)
``multilora_rollout_samples_total``            counter  samples generated and scored
``multilora_rollout_tokens_generated_total``   counter  completion tokens generated
``multilora_rollout_tokens_per_second``        gauge    last task's tokens / its latency
``multilora_rollout_generation_seconds``       histo    per task: generation + scoring time
``multilora_rollout_reward_failures_total``    counter  samples whose reward function failed
``multilora_rollout_sample_errors_total``      counter  samples that failed before a reward
                                                        (bad prompt, task-level failure)
``multilora_rollout_adapters_loaded``          gauge    adapter versions the engine serves
``multilora_rollout_adapter_load_seconds``     histo    fetch + verify + load of one version
                                                        on the handler (not a sync's read-ahead)
``multilora_rollout_adapter_load_failures_total`` counter  loads that raised
=============================================  =======  =======================================
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from events.schema import RolloutGroup

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Seconds per task: a tiny CPU model answers in ~0.1 s, long reasoning samples in minutes."""

LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Seconds per adapter load: a local PEFT copy takes milliseconds, a remote fetch seconds."""

ERROR_FINISH = "error"
"""``Sample.finish_reason`` of a sample that failed before any reward ran."""


class RolloutMetrics:
    """A rollout worker's metrics in ``registry``; see the module docstring."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks = Counter(
            "multilora_rollout_tasks_total",
            "Rollout tasks handled, by outcome (done: group published; dropped: fenced).",
            ["outcome"],
            registry=registry,
        )
        self.samples = Counter(
            "multilora_rollout_samples_total", "Samples generated and scored.", registry=registry
        )
        self.tokens = Counter(
            "multilora_rollout_tokens_generated_total",
            "Completion tokens generated.",
            registry=registry,
        )
        self.tokens_per_second = Gauge(
            "multilora_rollout_tokens_per_second",
            "Completion tokens of the last task per second of its generation time.",
            registry=registry,
        )
        self.generation_seconds = Histogram(
            "multilora_rollout_generation_seconds",
            "Time to generate and score one task, seconds.",
            buckets=GENERATION_BUCKETS,
            registry=registry,
        )
        self.reward_failures = Counter(
            "multilora_rollout_reward_failures_total",
            "Samples whose reward function failed (reward 0, not trained on).",
            registry=registry,
        )
        self.sample_errors = Counter(
            "multilora_rollout_sample_errors_total",
            "Samples that failed before scoring (bad prompt, task-level failure).",
            registry=registry,
        )
        self.adapters = Gauge(
            "multilora_rollout_adapters_loaded",
            "Adapter versions the generation engine serves.",
            registry=registry,
        )
        self.load_seconds = Histogram(
            "multilora_rollout_adapter_load_seconds",
            "Time to fetch, verify and load one adapter version, seconds.",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.load_failures = Counter(
            "multilora_rollout_adapter_load_failures_total",
            "Adapter loads that raised.",
            registry=registry,
        )
        for outcome in ("done", "dropped"):
            self.tasks.labels(outcome)

    # --- hooks -------------------------------------------------------------------------------

    def task_done(self, group: RolloutGroup) -> None:
        """Count one published group: its samples, tokens, failures and ``generate_s``."""
        samples = [s for g in group.groups for s in g.samples]
        tokens = sum(len(s.completion_ids) for s in samples)
        self.tasks.labels("done").inc()
        self.samples.inc(len(samples))
        self.tokens.inc(tokens)
        self.reward_failures.inc(
            sum(1 for s in samples if s.failed and s.finish_reason != ERROR_FINISH)
        )
        self.sample_errors.inc(sum(1 for s in samples if s.finish_reason == ERROR_FINISH))
        self.generation_seconds.observe(max(group.generate_s, 0.0))
        if group.generate_s > 0:
            self.tokens_per_second.set(tokens / group.generate_s)

    def task_dropped(self) -> None:
        """Count one task dropped by fencing (stale epoch, ended registration)."""
        self.tasks.labels("dropped").inc()

    def adapters_loaded(self, count: int) -> None:
        """Set how many adapter versions the engine serves now."""
        self.adapters.set(count)

    @contextmanager
    def load_timer(self) -> Iterator[None]:
        """Time one adapter load: ``with metrics.load_timer(): worker._load(...)``.

        A load that raises is counted in the failures (not the latency histogram) and the
        exception propagates unchanged.
        """
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.load_failures.inc()
            raise
        self.load_seconds.observe(time.perf_counter() - start)
