"""Bus metrics against a real Redis: the consumer Observer and the consumer-group collector."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from events.codec import Decoder, encode
from events.connection import connect
from events.consumer import Consumer, Delivery, HandlerResult, Subscription
from events.effects import Effects
from events.errors import ConfigError, HandlerError
from events.metrics import (
    BusMetrics,
    FanOut,
    GroupLagCollector,
    instrument_consumer,
    metrics_registry,
    start_metrics_server,
)
from events.schema import ControlEvent, StepDone
from events.streams import Streams
from orchestrator.metrics import AdapterMetrics
from tests.observability.conftest import free_port, lifecycle, value

pytestmark = pytest.mark.bus
GROUP = "metrics-test"


def poison(delivery: Delivery) -> HandlerResult:
    """Handler: fails (HandlerError) on step 2, accepts everything else."""
    if isinstance(delivery.event, StepDone) and delivery.event.step == 2:
        raise HandlerError("step 2 is poison")
    return Effects()


def make_consumer(redis_url: str, streams: Streams, observer: Any, **kw: Any) -> Consumer:
    sub = Subscription(streams.control, GROUP, Decoder(ControlEvent))
    return Consumer(
        lambda: connect(redis_url, max_block_ms=500),
        streams,
        "c1",
        [sub],
        poison,
        block_ms=200,
        observer=observer,
        idle_s=0.05,
        **kw,
    )


def test_observer_and_collector_report_real_values(
    redis_url: str, streams: Streams, rclient: redis.Redis
) -> None:
    registry = metrics_registry(process_metrics=False)
    sub = Subscription(streams.control, GROUP, Decoder(ControlEvent))
    bus = instrument_consumer(registry, rclient, [sub], dead_stream=streams.dead)
    adapters = AdapterMetrics(registry)
    events = lifecycle("a", "r1", steps=3)[:-1]  # register, admitted, 3 × (step, synced)
    for event in events:
        rclient.xadd(streams.control, encode(event))
    rclient.xadd(streams.control, {"event": b"{not json"})
    consumer = make_consumer(
        redis_url, streams, FanOut([bus, adapters.observer(streams.control)]), max_deliveries=1
    )
    consumer.run(burst=True)

    s, c = streams.control, "adapter.step_done"
    assert value(registry, "multilora_bus_events_handled_total", stream=s, type=c) == 2
    assert value(registry, "multilora_bus_events_failed_total", stream=s, type=c) == 1
    assert value(registry, "multilora_bus_events_dead_lettered_total", stream=s, type=c) == 1
    assert (
        value(registry, "multilora_bus_events_dead_lettered_total", stream=s, type="invalid") == 1
    )
    synced = {"stream": s, "type": "adapter.synced"}
    assert value(registry, "multilora_bus_events_handled_total", **synced) == 3
    assert value(registry, "multilora_bus_handler_seconds_count", stream=s, type=c) == 2
    # the poison step never reached AdapterMetrics; the others did
    assert value(registry, "multilora_adapter_steps_total", adapter="a") == 2
    assert value(registry, "multilora_adapter_step", adapter="a") == 3

    # everything read and acknowledged: no lag, nothing pending; then 4 new entries lag
    assert value(registry, "multilora_bus_group_lag", stream=s, group=GROUP) == 0
    assert value(registry, "multilora_bus_group_pending", stream=s, group=GROUP) == 0
    for event in lifecycle("b", "r2", steps=1)[:4]:
        rclient.xadd(streams.control, encode(event))
    assert value(registry, "multilora_bus_group_lag", stream=s, group=GROUP) == 4
    assert value(registry, "multilora_bus_stream_length", stream=s) == len(events) + 1 + 4
    assert value(registry, "multilora_bus_stream_length", stream=streams.dead) == 2
    assert value(registry, "multilora_bus_redis_up") == 1
    # another consumer reads 3 of them without acknowledging: pending
    rclient.xreadgroup(GROUP, "ghost", {s: ">"}, count=3)
    assert value(registry, "multilora_bus_group_pending", stream=s, group=GROUP) == 3
    assert value(registry, "multilora_bus_group_lag", stream=s, group=GROUP) == 1


def test_reclaims_are_counted(redis_url: str, streams: Streams, rclient: redis.Redis) -> None:
    registry = metrics_registry(process_metrics=False)
    for event in lifecycle("a", "r", steps=1)[:3]:
        rclient.xadd(streams.control, encode(event))
    rclient.xgroup_create(streams.control, GROUP, id="0", mkstream=True)
    rclient.xreadgroup(GROUP, "crashed", {streams.control: ">"})  # read, never acknowledged
    time.sleep(0.1)
    consumer = make_consumer(redis_url, streams, BusMetrics(registry), claim_idle_ms=50)
    consumer.run(burst=True)
    control = {"stream": streams.control, "group": GROUP}
    assert value(registry, "multilora_bus_entries_reclaimed_total", **control) == 3
    assert rclient.xpending(streams.control, GROUP)["pending"] == 0


def test_lag_is_counted_when_redis_cannot_tell(rclient: redis.Redis, streams: Streams) -> None:
    ids = [rclient.xadd(streams.control, {"event": b"{}"}) for _ in range(5)]
    rclient.xgroup_create(streams.control, GROUP, id="0")
    rclient.xreadgroup(GROUP, "x", {streams.control: ">"}, count=2)
    rclient.xdel(streams.control, ids[3])  # a deletion Redis' lag cannot account for
    info = rclient.xinfo_groups(streams.control)[0]
    assert info["lag"] is None
    registry = metrics_registry(process_metrics=False)
    registry.register(GroupLagCollector(rclient, [(streams.control, GROUP)]))
    assert value(registry, "multilora_bus_group_lag", stream=streams.control, group=GROUP) == 2


def test_unreachable_redis_keeps_the_endpoint_answering(streams: Streams) -> None:
    client = redis.Redis(
        port=free_port(),
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    registry = metrics_registry(process_metrics=False)
    registry.register(GroupLagCollector(client, [(streams.control, GROUP)]))
    server = start_metrics_server(0, registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.close()
    assert "multilora_bus_redis_up 0.0" in body
    assert "multilora_bus_group_lag{" not in body


def test_metrics_server_refuses_a_taken_port() -> None:
    registry = metrics_registry(process_metrics=False)
    first = start_metrics_server(0, registry, addr="127.0.0.1")
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{first.port}.*--metrics-port"):
            start_metrics_server(first.port, registry, addr="127.0.0.1")
    finally:
        first.close()
    with pytest.raises(ConfigError, match="out of range"):
        start_metrics_server(70000, registry)
