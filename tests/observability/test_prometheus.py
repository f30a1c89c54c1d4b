"""A real Prometheus scrapes a short run; its HTTP API returns per-adapter and bus values.

Also: ``promtool`` accepts the shipped scrape config and alert rules, and the alert rules' unit
tests (``ops/prometheus/alerts_test.yml``) pass.
"""

from __future__ import annotations

import math
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events.connection import connect
from events.streams import Streams
from tests.observability.conftest import OPS, PrometheusServer, dashboard_queries
from tests.observability.workload import GROUPS_WAITING, REWARDS, TRAINER_GROUP, Workload

STEPS = 5
PROMETHEUS_DIR = OPS / "prometheus"
EMPTY_WITHOUT_CUDA = "multilora_trainer_gpu_memory_"


def run_tool(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_accepts_the_shipped_config_and_rules(promtool: str) -> None:
    out = run_tool(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert "SUCCESS" in out and "1 rule files found" in out
    out = run_tool(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert "SUCCESS: 8 rules found" in out
    out = run_tool(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out


@pytest.fixture(scope="module")
def live_run(
    redis_url: str, prometheus_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Workload, PrometheusServer]]:
    """One short run scraped by one Prometheus, shared by this module's tests (Prometheus'
    service discovery applies the scrape config ~5 s after start: pay that once)."""
    client = connect(redis_url)
    workload = Workload(client, redis_url, Streams(namespace=f"t{uuid.uuid4().hex[:10]}"))
    server = PrometheusServer(prometheus_bin, tmp_path_factory.mktemp("prom"), workload.serve())
    try:
        server.wait_for("up", lambda r: len(r) == 3 and all(x["value"][1] == "1" for x in r))
        workload.run_live(steps=STEPS, gap_s=0.6)
        yield workload, server
    finally:
        server.close()
        workload.close()
        client.close()


def is_value(expected: float) -> Any:
    """``wait_for`` predicate: one series whose value is ``expected``."""
    return lambda r: len(r) == 1 and float(r[0]["value"][1]) == expected


def scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def by_label(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"][label]: float(r["value"][1]) for r in result}


@pytest.mark.bus
def test_prometheus_scrapes_per_adapter_rewards_and_bus_lag(
    live_run: tuple[Workload, PrometheusServer], promtool: str
) -> None:
    workload, server = live_run
    run_tool(promtool, "check", "config", str(server.config))
    # wait for a scrape of each endpoint after the run ended (scrapes are 1 s apart)
    tokens = STEPS * len(REWARDS) * 8
    server.wait_for("multilora_rollout_tokens_generated_total", is_value(tokens))
    server.wait_for("multilora_trainer_steps_total", is_value(STEPS))
    server.wait_for("sum(multilora_adapter_steps_total)", is_value(2 * STEPS))
    server.wait_for("sum(multilora_bus_events_dead_lettered_total)", is_value(2))
    final = {name: reward + 0.1 * (STEPS - 1) for name, reward in REWARDS.items()}

    # per-adapter reward: both adapters, their last step's values, through Prometheus
    result = server.wait_for(
        "multilora_adapter_reward_mean",
        lambda r: (
            {k: round(v, 6) for k, v in by_label(r, "adapter").items()}
            == {k: round(v, 6) for k, v in final.items()}
        ),
    )
    assert {r["metric"]["job"] for r in result} == {"multilora-test"}
    # ... and a curve, not one point: Prometheus stored rising values over the run
    end = float(server.api("query", query="time()")["result"][1])
    series = server.api(
        "query_range",
        query='multilora_adapter_reward_mean{adapter="alpha"}',
        start=str(end - 60),
        end=str(end),
        step="0.5",
    )["result"]
    values = [float(v) for _, v in series[0]["values"]]
    assert len(set(values)) >= 2 and values == sorted(values), values
    assert scalar(server.query('multilora_adapter_steps_total{adapter="beta"}')) == STEPS
    assert scalar(server.query('multilora_adapter_kl{adapter="beta"}')) == pytest.approx(0.05)
    assert server.query('multilora_adapter_kl{adapter="alpha"}') == []  # kl_coef == 0

    # bus: the trainer's group has not read the groups waiting for it; one dead letter each
    # for the malformed entry and the poison event; the crashed replica's entry was reclaimed
    lag = server.query(f'multilora_bus_group_lag{{group="{TRAINER_GROUP}"}}')
    assert scalar(lag) == GROUPS_WAITING
    assert lag[0]["metric"]["stream"] == workload.streams.groups
    assert scalar(server.query('multilora_bus_group_lag{group="checkpoint"}')) == 0
    # (every process reports the dead-letter stream's length: take the max)
    dead = server.query(f'max(multilora_bus_stream_length{{stream="{workload.streams.dead}"}})')
    assert scalar(dead) == 2
    letters = by_label(server.query("multilora_bus_events_dead_lettered_total"), "type")
    assert letters == {"invalid": 1, "adapter.step_done": 1}
    failed = by_label(server.query("multilora_bus_events_failed_total"), "type")
    assert failed == {"adapter.step_done": 2}  # poison: delivered twice, then dead-lettered
    reclaimed = server.query("multilora_bus_entries_reclaimed_total")
    # the crashed replica's entry and the poison event's retry
    assert by_label(reclaimed, "group") == {"checkpoint": 2, TRAINER_GROUP: 0}

    # process metrics: a step split into phases, slots, rollout throughput
    phases = by_label(server.query("multilora_trainer_last_step_phase_seconds"), "phase")
    assert phases == {"wait": 0.01, "forward_backward": 0.2, "optimizer": 0.05, "publish": 0.03}
    assert by_label(server.query("multilora_trainer_slots"), "state") == {"used": 2, "free": 2}
    assert scalar(server.query("multilora_rollout_samples_total")) == STEPS * len(REWARDS) * 4
    assert scalar(server.query("multilora_rollout_reward_failures_total")) == STEPS * len(REWARDS)


@pytest.mark.bus
def test_every_dashboard_query_returns_data_from_prometheus(
    live_run: tuple[Workload, PrometheusServer],
) -> None:
    """Each panel's query runs on the real server and (but for GPU memory on CPU) has data."""
    _, server = live_run
    empty = []
    for expr in dashboard_queries():
        result = server.query(expr)  # raises on a PromQL error
        if not result and EMPTY_WITHOUT_CUDA not in expr:
            empty.append(expr)
        for r in result:
            assert not math.isinf(float(r["value"][1])), (expr, r)
    assert not empty, f"dashboard queries without data: {empty}"
