"""Prometheus metrics of the bus: the consumer :class:`~events.consumer.Observer`, consumer-group
lag and pending counts, and the per-process ``/metrics`` endpoint.

Every process builds one :class:`~prometheus_client.CollectorRegistry` in ``main()`` (see
:func:`metrics_registry`), hands it to the metric classes of its layers (this module,
``orchestrator.metrics``, ``trainer.metrics``, ``rollout.metrics``) and serves it with
:func:`start_metrics_server`. There is no module-level registry: two consumers in one process
(tests do it) each get their own, and prometheus_client's multiprocess mode is not used — each
process has its own endpoint and Prometheus scrapes them all.

Exported here (label values are bounded: ``stream`` and ``group`` are the deployment's stream
keys and consumer groups, ``type`` an event tag from :data:`events.schema.ALL_EVENT_TYPES` or
``"invalid"`` for an entry that could not be decoded):

=============================================  =======  ==================================
name                                           kind     labels
=============================================  =======  ==================================
``multilora_bus_events_handled_total``         counter  stream, type
``multilora_bus_events_failed_total``          counter  stream, type (handler raised; retried)
``multilora_bus_events_dead_lettered_total``   counter  stream, type
``multilora_bus_entries_reclaimed_total``      counter  stream, group
``multilora_bus_handler_seconds``              histo    stream, type
``multilora_bus_group_lag``                    gauge    stream, group (entries not yet read)
``multilora_bus_group_pending``                gauge    stream, group (read, not acknowledged)
``multilora_bus_stream_length``                gauge    stream (XLEN, dead-letter stream too)
``multilora_bus_redis_up``                     gauge    — (1 when the last scrape reached Redis)
=============================================  =======  ==================================
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from events.consumer import Delivery, Observer, Subscription
from events.errors import ConfigError
from events.schema import event_type

log = logging.getLogger(__name__)

INVALID_TYPE = "invalid"
"""``type`` label of an entry that could not be decoded (no event to name)."""

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds. Control events take well under a millisecond; a trainer step handled inline, seconds."""

LAG_SCAN_CAP = 1000
"""Most entries :class:`GroupLagCollector` counts itself when Redis cannot tell the lag."""


def metrics_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry for one process, with the standard ``process_*``/``python_*`` metrics.

    ``process_metrics=False`` leaves them out (tests that build several registries in one
    process and compare exported names).
    """
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class BusMetrics:
    """The consumer runtime's :class:`~events.consumer.Observer`, counting into ``registry``.

    Pass it as ``Consumer(..., observer=BusMetrics(registry))``. Called from the consumer's
    handler thread (``reclaimed`` from its reader threads); prometheus_client metrics are
    thread-safe.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled_total = Counter(
            "multilora_bus_events_handled_total",
            "Entries handled and acknowledged (effects committed), by stream and event type.",
            ["stream", "type"],
            registry=registry,
        )
        self.failed_total = Counter(
            "multilora_bus_events_failed_total",
            "Handler failures (HandlerError): the entry stays pending and is retried.",
            ["stream", "type"],
            registry=registry,
        )
        self.dead_lettered_total = Counter(
            "multilora_bus_events_dead_lettered_total",
            "Entries moved to the dead-letter stream (undecodable, or failed too often).",
            ["stream", "type"],
            registry=registry,
        )
        self.reclaimed_total = Counter(
            "multilora_bus_entries_reclaimed_total",
            "Entries reclaimed (XAUTOCLAIM) from consumers idle longer than claim_idle_ms.",
            ["stream", "group"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "multilora_bus_handler_seconds",
            "Time from handing an entry to the handler to its commit, seconds.",
            ["stream", "type"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )

    def handled(self, delivery: Delivery, seconds: float) -> None:
        labels = (delivery.subscription.stream, _type_of(delivery))
        self.handled_total.labels(*labels).inc()
        self.handler_seconds.labels(*labels).observe(seconds)

    def failed(self, delivery: Delivery, reason: str) -> None:
        self.failed_total.labels(delivery.subscription.stream, _type_of(delivery)).inc()

    def dead_lettered(self, delivery: Delivery, reason: str) -> None:
        self.dead_lettered_total.labels(delivery.subscription.stream, _type_of(delivery)).inc()

    def reclaimed(self, subscription: Subscription, count: int) -> None:
        self.reclaimed_total.labels(subscription.stream, subscription.group).inc(count)


def _type_of(delivery: Delivery) -> str:
    return INVALID_TYPE if delivery.event is None else event_type(delivery.event)


class FanOut:
    """An Observer that forwards every hook to several observers, in order.

    The consumer takes one observer; a process that wants bus metrics and, say, per-adapter
    metrics fed from the deliveries it handles passes ``FanOut([bus, adapters])``.
    """

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def handled(self, delivery: Delivery, seconds: float) -> None:
        for o in self.observers:
            o.handled(delivery, seconds)

    def failed(self, delivery: Delivery, reason: str) -> None:
        for o in self.observers:
            o.failed(delivery, reason)

    def dead_lettered(self, delivery: Delivery, reason: str) -> None:
        for o in self.observers:
            o.dead_lettered(delivery, reason)

    def reclaimed(self, subscription: Subscription, count: int) -> None:
        for o in self.observers:
            o.reclaimed(subscription, count)


class GroupLagCollector(Collector):
    """Reads lag and pending of consumer groups from Redis at scrape time (``XINFO GROUPS``).

    ``groups`` are the (stream, group) pairs this process consumes — each process reports its
    own groups, so a group's series comes from the process that owns it. ``streams`` are extra
    stream keys whose length is reported too (the dead-letter stream). Per group:

    - ``lag``: entries added to the stream that the group has not read yet (Redis 7's ``lag``
      field). Redis reports no lag after deletions it cannot account for; then the collector
      counts the entries after the group's ``last-delivered-id`` itself, up to
      :data:`LAG_SCAN_CAP` (a lag at the cap means "at least the cap").
    - ``pending``: entries read by some consumer of the group and not acknowledged yet.

    A group or stream that does not exist yet is skipped (nothing to report); a Redis that
    cannot be reached sets ``multilora_bus_redis_up`` to 0 and skips the rest, so the endpoint
    keeps answering while Redis restarts. Any other error propagates (a bug).
    """

    def __init__(
        self,
        client: redis.Redis,
        groups: Sequence[tuple[str, str]],
        *,
        streams: Sequence[str] = (),
    ) -> None:
        if not groups and not streams:
            raise ConfigError("GroupLagCollector needs at least one (stream, group) or stream")
        self.client = client
        self.groups = tuple(groups)
        self.streams = tuple(dict.fromkeys([*(s for s, _ in self.groups), *streams]))

    def describe(self) -> Iterable[Any]:
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        lag, pending, length, up = self._families()
        try:
            self._read(lag, pending, length)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.warning("metrics: cannot read stream info from Redis (%s)", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield from (lag, pending, length, up)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "multilora_bus_group_lag",
                "Entries in the stream the consumer group has not read yet.",
                labels=["stream", "group"],
            ),
            GaugeMetricFamily(
                "multilora_bus_group_pending",
                "Entries read by the consumer group and not acknowledged yet.",
                labels=["stream", "group"],
            ),
            GaugeMetricFamily(
                "multilora_bus_stream_length",
                "Entries in the stream (XLEN).",
                labels=["stream"],
            ),
            GaugeMetricFamily(
                "multilora_bus_redis_up",
                "1 when the last scrape could read stream info from Redis, else 0.",
            ),
        )

    def _read(
        self, lag: GaugeMetricFamily, pending: GaugeMetricFamily, length: GaugeMetricFamily
    ) -> None:
        info: dict[str, dict[str, dict[str, Any]]] = {}
        for stream in self.streams:
            if not self.client.exists(stream):
                continue
            length.add_metric([stream], float(self.client.xlen(stream)))
            info[stream] = {_s(g["name"]): g for g in self.client.xinfo_groups(stream)}
        for stream, group in self.groups:
            g = info.get(stream, {}).get(group)
            if g is None:
                continue
            lag.add_metric([stream, group], float(self._lag(stream, g)))
            pending.add_metric([stream, group], float(g["pending"]))

    def _lag(self, stream: str, group: dict[str, Any]) -> int:
        value = group.get("lag")
        if value is not None:
            return int(value)
        after = f"({_s(group['last-delivered-id'])}"
        return len(self.client.xrange(stream, min=after, count=LAG_SCAN_CAP) or [])


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def instrument_consumer(
    registry: CollectorRegistry,
    client: redis.Redis,
    subscriptions: Sequence[Subscription],
    *,
    dead_stream: str,
) -> BusMetrics:
    """Bus metrics for one consumer: the observer to pass it, plus lag of its groups.

    Registers a :class:`GroupLagCollector` over ``subscriptions`` (and the length of
    ``dead_stream``) in ``registry`` and returns the :class:`BusMetrics` observer.
    """
    groups = [(s.stream, s.group) for s in subscriptions]
    registry.register(GroupLagCollector(client, groups, streams=[dead_stream]))
    bus = BusMetrics(registry)
    for stream, group in groups:  # export 0 from the start: rate() sees the first reclaim
        bus.reclaimed_total.labels(stream, group)
    return bus


@dataclass(frozen=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful when asked for 0)."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    port: int, registry: CollectorRegistry, *, addr: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    ``port=0`` binds a free port (read it from the result). A port out of range or already in
    use raises :class:`~events.errors.ConfigError` at start-up (fail at boot, not mid-run).
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"metrics port {port} is out of range; use 1..65535 (0: any free port)")
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {addr}:{port} ({exc}); pass another --metrics-port"
        ) from exc
    return MetricsServer(server, thread, int(server.server_address[1]))
