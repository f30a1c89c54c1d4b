"""One process bootstrap, used by every process on the bus.

A process is a config, a handler and this::

    def main(argv: Sequence[str] | None = None) -> int:
        config = load(CheckpointConfig, role="checkpoint", argv=argv, prog="multilora checkpoint")
        return run_process("checkpoint", config.bus, lambda bus: build(config, bus))

:func:`run_process` does, in order: configure logging; connect to Redis (socket timeout above the
longest blocking read); refuse a server that can lose acknowledged events
(:func:`events.connection.check_durability`); hand a :class:`Bus` to ``build``, which returns the
process's :class:`~events.consumer.Consumer` (built with :meth:`Bus.consumer`, so every process gets
the same bus settings and bus metrics); serve Prometheus metrics; install the warm/cold shutdown
signals; log one ``ready`` line; run the consumer (its lease, its ``on_start`` recovery, its
handler, its heartbeat: :mod:`events.heartbeat`, under the process's role and name) until
stopped or, with ``burst``, drained; log one ``stopped`` line. With ``MULTILORA_PROFILE_DIR``
set (:data:`PROFILE_ENV`), the handler thread runs under :mod:`cProfile` and its profile is
written there when the process stops.

Exit codes: 0 after a warm stop or a drained burst; 2 when the configuration or the Redis server
is refused at boot (the message names the value and the fix); 1 when the bus fails at run time in a
known way (a lost lease, Redis gone for too long). Any other exception is a bug and propagates: a
crash, which at-least-once delivery makes safe.
"""

from __future__ import annotations

import cProfile
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from events.config import BusConfig
from events.connection import check_durability, connect
from events.consumer import Consumer, Handler, Observer, Subscription
from events.errors import BusError, ConfigError, UnsafeRedisError
from events.heartbeat import Heartbeat
from events.metrics import (
    FanOut,
    MetricsServer,
    instrument_consumer,
    metrics_registry,
    start_metrics_server,
)
from events.streams import Streams

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(url: str) -> str:
    """``url`` without its password (for logs)."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


@dataclass
class Bus:
    """What a process's ``build`` gets: its bus settings, a client, its streams and metrics."""

    config: BusConfig
    name: str
    streams: Streams
    client: redis.Redis
    registry: CollectorRegistry
    max_block_ms: int
    observers: list[Observer] = field(default_factory=list)
    role: str = ""
    """The process's role (``trainer``, ``rollout`` ...): its heartbeat's key; empty: ``name``."""

    def connect(self) -> redis.Redis:
        """A new client with this process's settings (each reader thread has its own)."""
        return connect(self.config.redis_url, max_block_ms=self.max_block_ms, name=self.name)

    def consumer(
        self,
        subscriptions: list[Subscription],
        handler: Handler,
        *,
        observers: Sequence[Observer] = (),
        **options: Any,
    ) -> Consumer:
        """The process's consumer, with the bus settings, bus metrics and heartbeat filled in
        (the heartbeat's TTL is the lease's: a process beats wherever it renews its lease).

        ``options`` are the consumer's own keyword arguments (``on_start``, ``on_idle``,
        ``count``, ``max_in_flight`` ...).
        """
        c = self.config
        bus_metrics = instrument_consumer(
            self.registry, self.client, subscriptions, dead_stream=self.streams.dead
        )
        return Consumer(
            self.connect,
            self.streams,
            self.name,
            subscriptions,
            handler,
            block_ms=c.block_ms,
            claim_idle_ms=c.claim_idle_ms,
            max_deliveries=c.max_deliveries,
            lease_ttl_ms=c.lease_ttl_ms,
            lease_wait_s=c.lease_wait_s,
            observer=FanOut([bus_metrics, *observers]),
            heartbeat=Heartbeat(
                self.streams, self.role or self.name, self.name, ttl_ms=c.lease_ttl_ms
            ),
            **options,
        )


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` (an earlier basicConfig keeps its handler; the level wins)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)


def open_bus(config: BusConfig, name: str, *, max_block_ms: int = 0, role: str = "") -> Bus:
    """Connect and check the server's durability; raises UnsafeRedisError if it can lose data."""
    block = max(config.block_ms, max_block_ms)
    client = connect(config.redis_url, max_block_ms=block, name=name)
    check_durability(client, allow_unsafe=config.unsafe_redis)
    registry = metrics_registry()
    return Bus(config, name, Streams(config.namespace), client, registry, block, role=role)


PROFILE_ENV = "MULTILORA_PROFILE_DIR"
"""When set, a process profiles its handler thread (where its state machine runs) with
:mod:`cProfile` and writes ``<dir>/<role>.<name>.prof`` when it stops (read it with
:mod:`pstats`; on Python 3.12 and later the profile also sees the other threads). The profiler
slows every Python call: use it to see where a process's time goes, never to time it."""


def _profiler() -> cProfile.Profile | None:
    if not os.environ.get(PROFILE_ENV):
        return None
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _dump_profile(profiler: cProfile.Profile, role: str, name: str) -> None:
    profiler.disable()
    folder = Path(os.environ[PROFILE_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{role}.{name}.prof".replace("/", "_")
    profiler.dump_stats(str(path))
    log.info("profile of %s %s written to %s", role, name, path)


def run_process(
    role: str,
    config: BusConfig,
    build: Callable[[Bus], Consumer],
    *,
    default_name: str = "",
    max_block_ms: int = 0,
) -> int:
    """Bootstrap, build and run one process; returns its exit code (see the module doc)."""
    configure_logging(config.log_level)
    name = config.name or default_name or role
    server: MetricsServer | None = None
    try:
        bus = open_bus(config, name, max_block_ms=max_block_ms, role=role)
        consumer = build(bus)
        if config.metrics_port:
            server = start_metrics_server(config.metrics_port, bus.registry)
    except (ConfigError, UnsafeRedisError) as exc:
        print(f"multilora {role}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    consumer.install_signal_handlers()
    streams = ", ".join(f"{s.stream} ({s.group})" for s in consumer.subscriptions)
    metrics = f"; metrics on :{server.port}" if server else ""
    url = redact(config.redis_url)
    log.info("%s %s ready: %s, reading %s%s", role, name, url, streams, metrics)
    profiler = _profiler()
    try:
        stats = consumer.run(burst=config.burst)
    except BusError as exc:
        print(f"multilora {role}: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:  # a process may run inside a larger program (tests, a launcher): leave it as found
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
        if profiler is not None:
            _dump_profile(profiler, role, name)
    log.info("%s %s stopped: %s", role, name, stats)
    return EXIT_OK
