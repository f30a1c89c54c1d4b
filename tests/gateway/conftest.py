"""Fixtures for the gateway tests: a gateway on a real Redis, and a fake trainer/worker.

The official SDK drives the gateway unmodified (``tinker.ServiceClient(base_url, api_key)``).
The trainer and rollout workers are replaced by :class:`FakeCompleter`, a hand-written,
numerics-free thread that does what they do *at the bus boundary*: it reads ``ingress``,
``train.requests`` and ``rollout.tasks`` with ``XREAD``, writes the adapter's status hash the way
the trainer does (``phase``, ``registration_id``, ``queue_position``), records sampler paths in
the path index and completes or fails futures with :mod:`events.futures`. Tests steer it: hold a
kind of request, queue instead of admitting, fail the next request of a kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import redis

from events.codec import Decoder
from events.config import BusConfig
from events.connection import connect
from events.effects import Effects
from events.futures import (
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    PathRecord,
    SampledSequence,
    SampleResult,
    SaveWeightsResult,
    complete,
    fail,
    record_path,
    sampler_path,
    state_path,
)
from events.schema import (
    DeregisterRequested,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    RegisterRequested,
    SampleTask,
    SaveWeights,
)
from events.streams import Streams
from orchestrator.gateway.config import GatewayConfig
from orchestrator.gateway.routes import Gateway
from orchestrator.gateway.server import GatewayServer, build

BASE = "tiny-base"
ALICE, BOB = "tml-alice-key", "tml-bob-key"
KEYS = {ALICE: "alice", BOB: "bob"}

Event = RegisterRequested | DeregisterRequested | ForwardBackward | OptimStep | SaveWeights
AnyEvent = Event | LoadWeights | SampleTask


@pytest.fixture(autouse=True)
def _quiet_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


def apply(client: redis.Redis, effects: Effects) -> None:
    """Run queued effects (what the consumer runtime commits with an ack) in one transaction."""
    pipe = client.pipeline(transaction=True)
    for command in effects.commands:
        pipe.execute_command(*command)
    pipe.execute()


@dataclass
class FakeCompleter:
    """Completes the gateway's requests like the trainer and a rollout worker would."""

    client: redis.Redis
    streams: Streams
    admit: bool = True
    hold: set[str] = field(default_factory=set)
    fail_next: dict[str, str] = field(default_factory=dict)
    seen: list[Any] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._decoder = Decoder(AnyEvent)
        self._thread = threading.Thread(target=self._run, name="fake-completer", daemon=True)

    def start(self) -> FakeCompleter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def events(self, kind: type) -> list[Any]:
        with self._lock:
            return [e for e in self.seen if isinstance(e, kind)]

    def wait_for(self, kind: type, count: int = 1, timeout: float = 10) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.events(kind)) < count:
            assert time.monotonic() < deadline, f"no {kind.__name__} on the bus"
            time.sleep(0.02)
        return self.events(kind)

    def set_status(self, model: str, phase: str, **extra: Any) -> None:
        key = self.streams.status(model)
        fields = {"registration_id": model, "phase": phase, **{k: str(v) for k, v in extra.items()}}
        self.client.hset(key, mapping=fields)
        self.client.sadd(self.streams.status_index, model)

    def release(self) -> None:
        """Carry out the held requests now (and stop holding)."""
        with self._lock:
            held, self.held = self.held, []
            self.hold.clear()
        for event in held:
            self._handle(event)

    # ---- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        s = self.streams
        cursors = {s.ingress: "0-0", s.requests: "0-0", s.tasks: "0-0"}
        while not self._stop.is_set():
            for stream, entries in self.client.xread(cursors, block=50) or []:
                for entry_id, fields in entries:
                    cursors[stream.decode()] = entry_id.decode()
                    event = self._decoder.decode(fields, entry_id.decode())
                    with self._lock:
                        self.seen.append(event)
                        kind = type(event).__name__
                        if kind in self.hold:
                            self.held.append(event)
                            continue
                    self._handle(event)

    def _handle(self, event: Any) -> None:
        effects = Effects()
        request_id = getattr(event, "request_id", "")
        message = self.fail_next.pop(type(event).__name__, None)
        if message is not None:
            fail(effects, self.streams, request_id, message, category="user")
            apply(self.client, effects)
            return
        match event:
            case RegisterRequested():
                self.set_status(
                    event.adapter, "running" if self.admit else "queued", queue_position=0
                )
            case DeregisterRequested():
                self.set_status(event.adapter, "retired")
            case ForwardBackward():
                logprobs = tuple(tuple(-0.5 for _ in d.tokens[1:]) for d in event.datums)
                losses = tuple(tuple(0.5 for _ in d.tokens[1:]) for d in event.datums)
                total = sum(sum(x) for x in losses)
                result = ForwardBackwardResult(
                    logprobs=logprobs, elementwise_loss=losses, metrics={"loss:sum": total}
                )
                complete(effects, self.streams, request_id, result)
            case OptimStep():
                step = self.steps[event.adapter] = self.steps.get(event.adapter, 0) + 1
                metrics = {"grad_norm": 1.0, "learning_rate": event.learning_rate}
                complete(
                    effects,
                    self.streams,
                    request_id,
                    OptimStepResult(step=step, version=step, metrics=metrics),
                )
            case SaveWeights():
                make = sampler_path if event.kind == "sampler" else state_path
                path = make(event.adapter, event.name)
                version = self.steps.get(event.adapter, 0)
                record = PathRecord(
                    path=path,
                    kind=event.kind,
                    model=event.adapter,
                    registration_id=event.registration_id,
                    version=version,
                    step=version,
                    uri=f"/artifacts/{event.adapter}/v{version}",
                )
                record_path(effects, self.streams, record)
                complete(
                    effects, self.streams, request_id, SaveWeightsResult(path=path, version=version)
                )
            case LoadWeights():
                complete(
                    effects, self.streams, request_id, LoadWeightsResult(path=event.uri, step=3)
                )
            case SampleTask():
                sequences = tuple(
                    SampledSequence(
                        tokens=tuple(event.prompt_ids[-1] + i + j for j in range(2)),
                        logprobs=(-0.25, -0.75),
                        stop_reason="length",
                    )
                    for i in range(event.num_samples)
                )
                prompt = None
                if event.prompt_logprobs:
                    prompt = (None, *(-1.0 for _ in event.prompt_ids[1:]))
                complete(
                    effects,
                    self.streams,
                    request_id,
                    SampleResult(sequences=sequences, prompt_logprobs=prompt),
                )
        if effects.commands:
            apply(self.client, effects)


@dataclass
class Running:
    url: str
    app: Gateway
    server: GatewayServer


@pytest.fixture
def gateway(redis_url: str, streams: Streams) -> Iterator[Callable[..., Running]]:
    """``gateway(port=0, **config_fields)`` starts a gateway on the test's namespace."""
    started: list[Running] = []
    clients: list[redis.Redis] = []

    def start(port: int = 0, **fields: Any) -> Running:
        settings: dict[str, Any] = {"long_poll_s": 0.2, "api_keys": KEYS, **fields}
        bus = BusConfig(redis_url=redis_url, namespace=streams.namespace)
        config = msgspec.convert({"base_model": BASE, **settings}, GatewayConfig)
        config = msgspec.structs.replace(config, bus=bus)
        client = connect(redis_url)
        clients.append(client)
        app = build(config, client, streams, source="gateway.test")
        server = GatewayServer(app)
        running = Running(server.start("127.0.0.1", port), app, server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.stop()
    for client in clients:
        client.close()


@pytest.fixture
def completer(rclient: redis.Redis, streams: Streams) -> Iterator[FakeCompleter]:
    fake = FakeCompleter(rclient, streams).start()
    yield fake
    fake.stop()
