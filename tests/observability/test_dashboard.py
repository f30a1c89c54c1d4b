"""The Grafana dashboard and provisioning files match the metrics the processes export."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import yaml

from events.streams import Streams
from tests.observability.conftest import (
    DASHBOARD,
    OPS,
    dashboard_queries,
    exported_names,
    metric_names,
    variable_queries,
)
from tests.observability.workload import Workload

PROMETHEUS_BUILTIN = {"up"}
"""Series Prometheus makes itself for every target."""

WITHOUT_CUDA = {
    "multilora_trainer_gpu_memory_allocated_bytes",
    "multilora_trainer_gpu_memory_reserved_bytes",
    "multilora_trainer_gpu_memory_max_allocated_bytes",
}
"""Families exported without samples on a machine without CUDA (this one)."""


@pytest.fixture
def workload(rclient: redis.Redis, redis_url: str, streams: Streams) -> Iterator[Workload]:
    w = Workload(rclient, redis_url, streams)
    w.run_burst(steps=3)
    yield w
    w.close()


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (adapter, le) (rate(multilora_adapter_sync_latency_seconds"
        '_bucket{adapter=~".*", le!="1e-3"}[1m]))) / on (adapter) group_left max by (adapter) '
        "(multilora_adapter_step_budget offset 5m) > bool 1e-3 and up"
    )
    assert metric_names(expr) == {
        "multilora_adapter_sync_latency_seconds_bucket",
        "multilora_adapter_step_budget",
        "up",
    }


def unexported(names: set[str], workload: Workload) -> tuple[list[str], list[str]]:
    """(names nobody exports, names exported without samples) among ``names``."""
    families, sample_names = exported_names(list(workload.registries.values()))
    missing = sorted(names - sample_names - families - PROMETHEUS_BUILTIN)
    return missing, sorted(names - sample_names - PROMETHEUS_BUILTIN)


@pytest.mark.bus
def test_every_dashboard_query_names_an_exported_metric(workload: Workload) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
    used = set().union(*(metric_names(q) for q in queries), variable_queries())
    missing, without_samples = unexported(used, workload)
    assert not missing, f"dashboard queries name metrics nobody exports: {missing}"
    assert set(without_samples) <= WITHOUT_CUDA, without_samples
    # the per-adapter curves, throughput, step-time, sync and bus panels are all there
    for name in [
        "multilora_adapter_reward_mean",
        "multilora_adapter_loss",
        "multilora_adapter_kl",
        "multilora_trainer_tokens_total",
        "multilora_rollout_tokens_generated_total",
        "multilora_trainer_step_phase_seconds_sum",
        "multilora_adapter_sync_latency_seconds_bucket",
        "multilora_bus_group_lag",
        "multilora_bus_group_pending",
        "multilora_bus_stream_length",
        "multilora_bus_events_dead_lettered_total",
    ]:
        assert name in used, name
    # and the check can fail: a misspelt metric in a query is reported
    typo = metric_names('rate(multilora_adapter_reward_means{adapter=~".*"}[1m])')
    assert unexported(typo, workload)[0] == ["multilora_adapter_reward_means"]


def test_dashboard_has_the_adapter_variable_and_a_unique_layout() -> None:
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["adapter"]["multi"] and variables["adapter"]["includeAll"]
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    # every per-adapter query filters by the variable
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if "multilora_adapter_" in target["expr"]:
                assert 'adapter=~"$adapter"' in target["expr"], target["expr"]
    assert board["uid"] == "multilora"


def test_provisioning_files_point_at_the_dashboard_and_datasource() -> None:
    dashboards = yaml.safe_load((OPS / "grafana/provisioning/dashboards/multilora.yml").read_text())
    provider = dashboards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    sources = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus" and source["isDefault"] is True
