"""A short multilora run in one test process: three metrics endpoints fed by real events.

Three registries stand for three processes, as in production:

- ``checkpoint``: reads the control log through a real :class:`~events.consumer.Consumer`
  whose observer is the bus metrics plus :class:`~orchestrator.metrics.AdapterMetrics`;
- ``trainer``: :class:`~trainer.metrics.TrainerMetrics` hooks, plus the lag of its group on
  ``rollout.groups`` (entries published there and not read yet);
- ``rollout``: :class:`~rollout.metrics.RolloutMetrics` hooks for real ``RolloutGroup`` s.

Control events are real (``StepDone`` with the trainer's metric keys, ``Synced``, ...), written
to a real Redis with ``XADD`` and consumed by the consumer runtime.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from events.codec import Decoder, encode
from events.connection import connect
from events.consumer import Consumer, Delivery, HandlerResult, Subscription
from events.effects import Effects
from events.errors import HandlerError
from events.metrics import (
    FanOut,
    MetricsServer,
    instrument_consumer,
    metrics_registry,
    start_metrics_server,
)
from events.schema import (
    Admitted,
    ControlEvent,
    PromptGroup,
    RegisterRequested,
    RolloutGroup,
    Sample,
    StepDone,
    Synced,
)
from events.streams import Streams
from orchestrator.metrics import AdapterMetrics
from rollout.metrics import RolloutMetrics
from tests.observability.conftest import make_spec, step_metrics
from trainer.metrics import TrainerMetrics

REWARDS = {"alpha": 0.25, "beta": 0.75}
"""Reward of each adapter's step 1; every step adds 0.1 (a rising curve)."""

TRAINER_GROUP = "trainer"
CLAIM_IDLE_MS = 200
GROUPS_WAITING = 3
"""Entries on rollout.groups the trainer's group has not read: its lag."""


POISON = "poison"
"""Events of this adapter make the checkpoint's handler fail (HandlerError): dead-lettered."""


def envelope(name: str) -> dict[str, Any]:
    return {"adapter": name, "registration_id": f"reg-{name}", "time": time.time()}


def _handle(delivery: Delivery) -> HandlerResult:
    if getattr(delivery.event, "adapter", "") == POISON:
        raise HandlerError(f"cannot handle events of {POISON!r}")
    return Effects()


@dataclass
class Workload:
    client: redis.Redis
    redis_url: str
    streams: Streams
    registries: dict[str, CollectorRegistry] = field(default_factory=dict)
    servers: list[MetricsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.registries = {
            name: metrics_registry() for name in ("checkpoint", "trainer", "rollout")
        }
        control = Subscription(self.streams.control, "checkpoint", Decoder(ControlEvent))
        self.bus = instrument_consumer(
            self.registries["checkpoint"], self.client, [control], dead_stream=self.streams.dead
        )
        self.adapters = AdapterMetrics(self.registries["checkpoint"])
        self.consumer = Consumer(
            lambda: connect(self.redis_url, max_block_ms=500),
            self.streams,
            "checkpoint.0",
            [control],
            _handle,
            block_ms=100,
            idle_s=0.05,
            max_deliveries=2,
            claim_idle_ms=CLAIM_IDLE_MS,
            observer=FanOut([self.bus, self.adapters.observer(self.streams.control)]),
        )
        groups = Subscription(self.streams.groups, TRAINER_GROUP, Decoder(ControlEvent))
        instrument_consumer(
            self.registries["trainer"], self.client, [groups], dead_stream=self.streams.dead
        )
        self.trainer = TrainerMetrics(self.registries["trainer"])
        self.rollout = RolloutMetrics(self.registries["rollout"])

    # --- endpoints -----------------------------------------------------------------------------

    def serve(self) -> list[str]:
        """Start one /metrics endpoint per registry; returns the scrape targets."""
        for registry in self.registries.values():
            self.servers.append(start_metrics_server(0, registry, addr="127.0.0.1"))
        return [f"127.0.0.1:{s.port}" for s in self.servers]

    def close(self) -> None:
        for s in self.servers:
            s.close()

    # --- the run ---------------------------------------------------------------------------------

    def publish(self, event: Any) -> None:
        self.client.xadd(self.streams.control, encode(event))

    def admit(self) -> None:
        spec = make_spec(steps=10)
        for slot, name in enumerate(REWARDS):
            env: dict[str, Any] = {
                "adapter": name,
                "registration_id": f"reg-{name}",
                "time": time.time(),
            }
            self.publish(RegisterRequested(**env, spec=spec))
            self.publish(Admitted(**env, epoch=1, slot=slot, spec=spec))
        self.client.xadd(self.streams.control, {"event": b"{truncated"})  # dead-lettered
        poison = StepDone(adapter=POISON, registration_id="reg-poison", step=1, version=1)
        self.publish(poison)  # handler fails: retried once (reclaimed), then dead-lettered
        # a checkpoint replica reads the first entry and crashes: reclaimed after CLAIM_IDLE_MS
        self.consumer.ensure_groups()
        self.client.xreadgroup(
            "checkpoint", "checkpoint.crashed", {self.streams.control: ">"}, count=1
        )
        time.sleep(1.5 * CLAIM_IDLE_MS / 1000)
        self.client.xgroup_create(self.streams.groups, TRAINER_GROUP, id="0", mkstream=True)
        for _ in range(GROUPS_WAITING):
            self.client.xadd(self.streams.groups, {"event": b"{}"})
        self.trainer.slot_usage(used=len(REWARDS), free=2)
        self.trainer.queue(1)

    def step(self, k: int) -> None:
        """Every adapter takes step ``k``; the trainer and a rollout worker report their side."""
        for name, reward in REWARDS.items():
            env: dict[str, Any] = {
                "adapter": name,
                "registration_id": f"reg-{name}",
                "time": time.time(),
            }
            extra = {"kl": 0.01 * k} if name == "beta" else {}
            metrics = step_metrics(k, reward + 0.1 * (k - 1), **extra)
            self.publish(StepDone(**env, epoch=1, step=k, version=k, metrics=metrics))
            self.publish(Synced(**env, epoch=1, worker="rollout.0", version=k, latency_s=0.05 * k))
            self.rollout.task_done(rollout_group(name, k))
        self.trainer.step_phases(
            wait_s=0.01,
            forward_backward_s=0.2,
            optimizer_s=0.05,
            publish_s=0.03,
            tokens=192,
            adapters=len(REWARDS),
        )
        self.trainer.deferred(2)
        with self.rollout.load_timer():
            time.sleep(0.001)
        self.rollout.adapters_loaded(len(REWARDS))
        self.rollout.task_dropped()

    def run_burst(self, steps: int) -> None:
        """The whole run at once, consumed in burst mode (no Prometheus needed)."""
        self.admit()
        for k in range(1, steps + 1):
            self.step(k)
        self.consumer.run(burst=True)

    def run_live(self, steps: int, gap_s: float) -> None:
        """The run spread over ``steps * gap_s`` seconds while the consumer reads live."""
        thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.admit()
        thread.start()
        try:
            for k in range(1, steps + 1):
                self.step(k)
                time.sleep(gap_s)
            deadline = time.monotonic() + 10
            while self.adapters_step("alpha") < steps and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            self.consumer.request_stop()
            thread.join(timeout=10)

    def adapters_step(self, name: str) -> float:
        v = self.registries["checkpoint"].get_sample_value(
            "multilora_adapter_step", {"adapter": name}
        )
        return v or 0.0


def rollout_group(adapter: str, step: int) -> RolloutGroup:
    """A scored group of 4 samples: 3 generated (one whose reward failed), 1 failed prompt."""
    ok = Sample(completion_ids=(5, 6, 7), logprobs=(-0.1, -0.2, -0.3), text="abc", reward=1.0)
    bad_reward = Sample(
        completion_ids=(5, 6),
        logprobs=(-0.1, -0.2),
        text="ab",
        reward=0.0,
        failed=True,
        reason="math: no answer",
    )
    error = Sample(
        completion_ids=(),
        logprobs=(),
        text="",
        reward=0.0,
        finish_reason="error",
        failed=True,
        reason="prompt too long",
    )
    return RolloutGroup(
        adapter=adapter,
        registration_id=f"reg-{adapter}",
        epoch=1,
        task_id=f"t{step}",
        step=step,
        version=step - 1,
        worker="rollout.0",
        generate_s=0.5,
        groups=(
            PromptGroup(prompt_index=0, prompt_ids=(1, 2), samples=(ok, ok, bad_reward)),
            PromptGroup(prompt_index=1, prompt_ids=(), samples=(error,)),
        ),
    )
