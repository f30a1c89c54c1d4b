"""TrainerMetrics and RolloutMetrics hooks: what each call exports."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from events.metrics import metrics_registry
from events.schema import Admitted, Queued, RegisterRequested
from orchestrator.fleet import Fleet
from rollout.metrics import RolloutMetrics
from tests.observability.conftest import make_spec, value
from tests.observability.workload import rollout_group
from trainer.metrics import PHASES, TrainerMetrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return metrics_registry(process_metrics=False)


def test_step_phases(registry: CollectorRegistry) -> None:
    m = TrainerMetrics(registry)
    for phase in PHASES:  # every phase is exported before the first step
        assert value(registry, "multilora_trainer_step_phase_seconds_count", phase=phase) == 0
    m.step_phases(
        wait_s=0.5, forward_backward_s=1.5, optimizer_s=0.5, publish_s=0.25, tokens=1000, adapters=3
    )
    m.step_phases(
        wait_s=0.0, forward_backward_s=1.0, optimizer_s=0.25, publish_s=0.25, tokens=500, adapters=1
    )
    assert (
        value(registry, "multilora_trainer_step_phase_seconds_sum", phase="forward_backward") == 2.5
    )
    assert value(registry, "multilora_trainer_step_phase_seconds_count", phase="wait") == 2
    assert value(registry, "multilora_trainer_last_step_phase_seconds", phase="wait") == 0.0
    assert value(registry, "multilora_trainer_step_seconds_sum") == 2.75 + 1.5
    assert value(registry, "multilora_trainer_steps_total") == 2
    assert value(registry, "multilora_trainer_adapter_steps_total") == 4
    assert value(registry, "multilora_trainer_tokens_total") == 1500
    assert value(registry, "multilora_trainer_tokens_per_second") == 500 / 1.25
    assert value(registry, "multilora_trainer_step_adapters") == 1
    with pytest.raises(ValueError, match=r"'publish' lasted -0\.1 s"):
        m.step_phases(
            wait_s=0, forward_backward_s=1, optimizer_s=0, publish_s=-0.1, tokens=1, adapters=1
        )


def test_slots_and_queue_from_a_fleet(registry: CollectorRegistry) -> None:
    m = TrainerMetrics(registry)
    spec = make_spec()
    fleet = Fleet(slots=2)
    for i, name in enumerate(["a", "b", "c"]):
        fleet = fleet.apply(RegisterRequested(adapter=name, registration_id=f"r{i}", spec=spec))
    fleet = fleet.apply(Admitted(adapter="a", registration_id="r0", epoch=1, slot=0, spec=spec))
    fleet = fleet.apply(Queued(adapter="c", registration_id="r2", position=0, spec=spec))
    m.observe_fleet(fleet)
    assert value(registry, "multilora_trainer_slots", state="used") == 1
    assert value(registry, "multilora_trainer_slots", state="free") == 1
    assert value(registry, "multilora_trainer_queue_length") == 2  # b (registered) and c
    m.deferred(7)
    assert value(registry, "multilora_trainer_deferred_groups") == 7


def test_gpu_memory_families_exist_without_cuda(registry: CollectorRegistry) -> None:
    import torch

    TrainerMetrics(registry)
    text = generate_latest(registry).decode()
    for kind in ("allocated", "reserved", "max_allocated"):
        assert f"# TYPE multilora_trainer_gpu_memory_{kind}_bytes gauge" in text
    if not torch.cuda.is_available():
        assert "multilora_trainer_gpu_memory_allocated_bytes{" not in text


def test_rollout_hooks(registry: CollectorRegistry) -> None:
    m = RolloutMetrics(registry)
    m.task_done(rollout_group("a", 1))
    m.task_done(rollout_group("b", 2))
    m.task_dropped()
    assert value(registry, "multilora_rollout_tasks_total", outcome="done") == 2
    assert value(registry, "multilora_rollout_tasks_total", outcome="dropped") == 1
    assert value(registry, "multilora_rollout_samples_total") == 8
    assert value(registry, "multilora_rollout_tokens_generated_total") == 16  # 3+3+2 per task
    assert value(registry, "multilora_rollout_reward_failures_total") == 2
    assert value(registry, "multilora_rollout_sample_errors_total") == 2
    assert value(registry, "multilora_rollout_generation_seconds_count") == 2
    assert value(registry, "multilora_rollout_tokens_per_second") == 8 / 0.5
    m.adapters_loaded(5)
    assert value(registry, "multilora_rollout_adapters_loaded") == 5


def test_load_timer_times_loads_and_counts_failures(registry: CollectorRegistry) -> None:
    m = RolloutMetrics(registry)
    with m.load_timer():
        time.sleep(0.02)
    with pytest.raises(OSError, match="gone"), m.load_timer():
        raise OSError("artifact gone")
    assert value(registry, "multilora_rollout_adapter_load_seconds_count") == 1
    assert (value(registry, "multilora_rollout_adapter_load_seconds_sum") or 0) >= 0.02
    assert value(registry, "multilora_rollout_adapter_load_failures_total") == 1
