"""AdapterMetrics: per-adapter series from control events, removed when the adapter ends."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from events.metrics import metrics_registry
from events.schema import (
    Admitted,
    Completed,
    DeregisterRequested,
    Failed,
    Rejected,
    Retired,
    StepDone,
    Synced,
)
from orchestrator.lifecycle import transition
from orchestrator.metrics import AdapterMetrics
from tests.observability.conftest import lifecycle, make_spec, queued, samples, step_metrics, value


def adapter_series(registry: CollectorRegistry) -> set[tuple[str, str]]:
    return {(n, labels["adapter"]) for n, labels, _ in samples(registry) if "adapter" in labels}


@pytest.fixture
def registry() -> CollectorRegistry:
    return metrics_registry(process_metrics=False)


def test_step_done_sets_every_metric(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    for event in lifecycle("alpha", "r1", steps=2)[:-2]:  # everything but completed, retired
        m.observe(event)
    assert value(registry, "multilora_adapter_step", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_step_budget", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_steps_total", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_version", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_reward_mean", adapter="alpha") == pytest.approx(0.7)
    assert value(registry, "multilora_adapter_loss", adapter="alpha") == pytest.approx(0.25)
    assert value(registry, "multilora_adapter_entropy", adapter="alpha") == 2.5
    assert value(registry, "multilora_adapter_clip_fraction", adapter="alpha") == 0.125
    assert value(registry, "multilora_adapter_importance_ratio", adapter="alpha") == 1.0
    assert value(registry, "multilora_adapter_grad_norm", adapter="alpha") == 1.5
    assert value(registry, "multilora_adapter_learning_rate", adapter="alpha") == 1e-4
    assert value(registry, "multilora_adapter_response_length_tokens", adapter="alpha") == 14
    assert value(registry, "multilora_adapter_staleness_versions", adapter="alpha") == 1
    assert value(registry, "multilora_adapter_step_duration_seconds", adapter="alpha") == 0.25
    assert value(registry, "multilora_adapter_samples_total", adapter="alpha") == 16
    assert value(registry, "multilora_adapter_samples_failed_total", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_tokens_total", adapter="alpha") == 192
    assert value(registry, "multilora_adapter_groups_dropped_total", adapter="alpha") == 0
    assert value(registry, "multilora_adapter_slot", adapter="alpha") == 0
    assert value(registry, "multilora_adapter_progress_timestamp_seconds", adapter="alpha") == 100
    assert value(registry, "multilora_adapter_sync_latency_seconds_count", adapter="alpha") == 2
    assert value(registry, "multilora_adapter_sync_latency_seconds_sum", adapter="alpha") == 0.4
    # no kl key in the metrics (kl_coef == 0): no KL series
    assert value(registry, "multilora_adapter_kl", adapter="alpha") is None
    # budget reached: completing; exactly one phase is 1
    phases = {
        labels["phase"]: v
        for n, labels, v in samples(registry)
        if n == "multilora_adapter_state" and labels["adapter"] == "alpha"
    }
    assert phases["completing"] == 1 and sum(phases.values()) == 1


def test_kl_is_exported_when_present(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    spec = make_spec(steps=5)
    m.observe(Admitted(adapter="a", registration_id="r", epoch=1, slot=3, spec=spec))
    m.observe(
        StepDone(
            adapter="a",
            registration_id="r",
            epoch=1,
            step=1,
            version=1,
            metrics=step_metrics(1, 0.1, kl=0.03),
        )
    )
    assert value(registry, "multilora_adapter_kl", adapter="a") == 0.03
    assert value(registry, "multilora_adapter_state", adapter="a", phase="running") == 1
    assert value(registry, "multilora_adapter_slot", adapter="a") == 3


def test_duplicate_step_done_counts_once(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    events = lifecycle("a", "r", steps=3)
    for event in events[:4]:  # register, admitted, step 1, synced 1
        m.observe(event)
    m.observe(events[2])  # redelivered step 1
    m.observe(events[3])  # redelivered synced 1
    assert value(registry, "multilora_adapter_steps_total", adapter="a") == 1
    assert value(registry, "multilora_adapter_samples_total", adapter="a") == 8
    assert value(registry, "multilora_adapter_sync_latency_seconds_count", adapter="a") == 1


def test_retired_removes_every_series_and_late_events_do_not_bring_them_back(
    registry: CollectorRegistry,
) -> None:
    m = AdapterMetrics(registry)
    for event in lifecycle("a", "r1"):
        m.observe(event)
    assert adapter_series(registry) == set()
    # a slow worker's synced and a checkpoint of the retired registration arrive late
    m.observe(
        Synced(adapter="a", registration_id="r1", epoch=1, worker="w9", version=3, latency_s=9.0)
    )
    m.observe(StepDone(adapter="a", registration_id="r1", epoch=1, step=9, version=9))
    assert adapter_series(registry) == set()
    assert m.live() == frozenset()


def test_new_registration_of_a_name_starts_fresh(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    for event in lifecycle("a", "r1", steps=3)[:-1]:  # r1 never seen retiring
        m.observe(event)
    for event in lifecycle("a", "r2", steps=2)[:3]:  # register, admitted, step 1
        m.observe(event)
    assert value(registry, "multilora_adapter_steps_total", adapter="a") == 1
    assert value(registry, "multilora_adapter_step", adapter="a") == 1
    # r1's late retirement does not remove r2's series
    m.observe(Retired(adapter="a", registration_id="r1", epoch=1, slot=0))
    assert value(registry, "multilora_adapter_step", adapter="a") == 1


@pytest.mark.parametrize(
    "ends",
    [
        [DeregisterRequested(adapter="q", registration_id="rq")],
        [Failed(adapter="q", registration_id="rq", reason="dataset vanished")],
        [
            DeregisterRequested(adapter="q", registration_id="rq"),
            Completed(adapter="q", registration_id="rq", step=0, reason="cancelled"),
        ],
    ],
    ids=["cancelled", "failed", "completed"],
)
def test_registration_without_slot_ends_without_retired(
    registry: CollectorRegistry, ends: list[object]
) -> None:
    m = AdapterMetrics(registry)
    m.observe(queued("q", "rq", position=2))
    assert value(registry, "multilora_adapter_queue_position", adapter="q") == 2
    assert value(registry, "multilora_adapter_state", adapter="q", phase="queued") == 1
    for end in ends:
        m.observe(end)
    assert adapter_series(registry) == set()


def test_rejected_registration_ends(registry: CollectorRegistry) -> None:
    """A rejection follows the registration (the lifecycle: registered -> rejected)."""
    m = AdapterMetrics(registry)
    m.observe(lifecycle("q", "rq")[0])
    assert value(registry, "multilora_adapter_state", adapter="q", phase="registered") == 1
    m.observe(Rejected(adapter="q", registration_id="rq", reason="bad"))
    assert adapter_series(registry) == set()


def test_failed_with_slot_waits_for_retired(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    for event in lifecycle("a", "r", steps=4)[:3]:
        m.observe(event)
    m.observe(Failed(adapter="a", registration_id="r", epoch=1, reason="nan loss", step=1))
    assert value(registry, "multilora_adapter_state", adapter="a", phase="failed") == 1
    m.observe(Retired(adapter="a", registration_id="r", epoch=1, slot=0))
    assert adapter_series(registry) == set()


def test_rejected_duplicate_name_keeps_the_live_adapter(registry: CollectorRegistry) -> None:
    m = AdapterMetrics(registry)
    for event in lifecycle("a", "r1", steps=4)[:3]:
        m.observe(event)
    m.observe(Rejected(adapter="a", registration_id="r2", reason="name is taken"))
    assert value(registry, "multilora_adapter_step", adapter="a") == 1


def test_joining_mid_log_picks_adapters_up_at_their_next_step(registry: CollectorRegistry) -> None:
    events = lifecycle("a", "r", steps=3)
    admitted = transition(transition(None, events[0]), events[1])  # what the host's store holds
    m = AdapterMetrics(registry, known={"r": admitted}.get)
    m.observe(events[3])  # a synced first: does not start tracking (could be a late one)
    assert adapter_series(registry) == set()
    m.observe(events[4])  # step 2
    assert value(registry, "multilora_adapter_step", adapter="a") == 2
    assert value(registry, "multilora_adapter_steps_total", adapter="a") == 1


def test_100_adapters_registered_and_retired_leave_no_adapter_series(
    registry: CollectorRegistry,
) -> None:
    """Cardinality: a run through 100 adapters (up to 8 live at once) ends with none exported."""
    m = AdapterMetrics(registry)
    streams = [lifecycle(f"adapter-{i:03d}", f"reg-{i}", steps=3, slot=i % 8) for i in range(100)]
    peak = 0
    for wave in range(0, 100, 8):  # interleave 8 adapters at a time, as a trainer would
        batch = streams[wave : wave + 8]
        for k in range(max(len(s) for s in batch)):
            for s in batch:
                if k < len(s):
                    m.observe(s[k])
            peak = max(peak, len({a for _, a in adapter_series(registry)}))
    assert peak == 8
    assert adapter_series(registry) == set()
    assert m.live() == frozenset()
    # the label is gone from the exposition too, not only from the sample list
    assert b'adapter="' not in generate_latest(registry)


def test_a_readmission_seen_by_another_replica_is_read_from_the_store(
    registry: CollectorRegistry,
) -> None:
    """Replicas of the checkpoint group each see part of the log: a step of an epoch newer than
    the tracked state is applied to the state the store holds for the re-admission."""
    events = lifecycle("a", "r", steps=5)
    readmitted = Admitted(
        adapter="a",
        registration_id="r",
        epoch=2,
        slot=1,
        start_step=1,
        spec=make_spec(steps=5),
        time=100.0,
    )
    stored = transition(transition(transition(None, events[0]), events[1]), readmitted)
    m = AdapterMetrics(registry, known={"r": stored}.get)
    for event in events[:3]:  # register, admitted (epoch 1), step 1
        m.observe(event)
    m.observe(StepDone(adapter="a", registration_id="r", epoch=2, step=2, version=2))
    assert value(registry, "multilora_adapter_steps_total", adapter="a") == 2
    assert value(registry, "multilora_adapter_slot", adapter="a") == 1
    assert m.states["r"].epoch == 2
