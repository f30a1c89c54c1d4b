"""The trainer process in one test process: a real Redis, a tiny model, a scripted rollout side.

The test plays the rollout workers: it answers every task on ``rollout.tasks`` with a group of
scored samples on ``rollout.groups``, and runs the trainer's consumer in burst mode between
answers. What it checks is the loop of :mod:`trainer.process` end to end, on the bus: admit or
queue, issue, collect, train, publish, complete; the typed dispatch; fencing; failure after
``max_failures`` skipped steps; the INFO log a user reads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from events.codec import Decoder, encode, stamp
from events.connection import connect
from events.consumer import Consumer
from events.schema import (
    Admitted,
    Completed,
    ControlEvent,
    Failed,
    PromptGroup,
    Queued,
    Retired,
    RolloutGroup,
    RolloutTask,
    Sample,
    StepDone,
    SyncRequested,
    TaskEvent,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec
from events.streams import Streams
from orchestrator.admission import Admission
from orchestrator.artifacts import ArtifactStore
from orchestrator.client import Producer
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.process import TrainerProcess

pytestmark = [pytest.mark.bus]


def spec(steps: int, seed: int = 0) -> AdapterSpec:
    return AdapterSpec(
        rank=2,
        alpha=4.0,
        dataset=DatasetSpec(kind="jsonl", path="prompts.jsonl"),
        rewards=(RewardSpec(name="exact_match"),),
        group_size=2,
        prompts_per_step=2,
        steps=steps,
        max_staleness=1,
        seed=seed,
    )


class Bus:
    """The trainer under test and the scripted rollout side."""

    def __init__(
        self,
        redis_url: str,
        client: redis.Redis,
        streams: Streams,
        tmp: Path,
        model,
        **process: object,
    ):
        self.client, self.streams = client, streams
        self.process = TrainerProcess(
            client=client,
            streams=streams,
            model=model,
            optimizer=SlotAdamW(model.store, model.table),
            admission=Admission(
                base_model="tiny",
                max_rank=4,
                known_rewards=frozenset({"exact_match"}),
                probe_dataset=lambda _: 40,
            ),
            artifacts=ArtifactStore(str(tmp / "artifacts")),
            checkpoints=str(tmp / "checkpoints"),
            base_model="tiny",
            **{"max_batch_wait_s": 0.0, "max_failures": 2, **process},  # type: ignore[arg-type]
        )
        self.consumer = Consumer(
            lambda: connect(redis_url),
            streams,
            "trainer",
            self.process.subscriptions(),
            self.process.handle,
            block_ms=50,
            on_start=self.process.recover,
            on_idle=self.process.on_idle,
            on_stop=self.process.drain,
            idle_s=0.01,
        )
        self.process.consumer = self.consumer
        self.producer = Producer(client, streams)
        self.answered: set[str] = set()

    def control(self) -> list[ControlEvent]:
        decoder = Decoder(ControlEvent)
        return [decoder.decode(f, i.decode()) for i, f in self.client.xrange(self.streams.control)]

    def events(self, kind: type, adapter: str) -> list:
        return [e for e in self.control() if isinstance(e, kind) and e.adapter == adapter]

    def tasks(self) -> list[RolloutTask]:
        decoder = Decoder(TaskEvent)
        return [decoder.decode(f, i.decode()) for i, f in self.client.xrange(self.streams.tasks)]

    def answer(self, make: Callable[[RolloutTask], RolloutGroup]) -> int:
        """Answer every task not answered yet; returns how many."""
        new = [t for t in self.tasks() if t.id not in self.answered]
        for task in new:
            self.client.xadd(self.streams.groups, encode(stamp(make(task), source="test")))
            self.answered.add(task.id)
        return len(new)

    def ended(self) -> bool:
        """Every registration has completed or failed."""
        registered = {e.registration_id for e in self.control() if isinstance(e, Admitted | Queued)}
        ended = {e.registration_id for e in self.control() if isinstance(e, Completed | Failed)}
        return bool(registered) and registered <= ended

    def run(self, make: Callable[[RolloutTask], RolloutGroup], timeout_s: float = 60.0) -> None:
        """Run the trainer (its consumer in a thread) and answer its tasks until every
        registration ended."""
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                self.consumer.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        try:
            while not self.ended() and not errors:
                if time.monotonic() > deadline:
                    raise AssertionError(f"not every registration ended in {timeout_s} s")
                self.answer(make)
                time.sleep(0.02)
        finally:
            self.consumer.request_stop()
            thread.join(timeout=10)
        if errors:
            raise errors[0]


def group_for(
    task: RolloutTask, *, rewards: tuple[float, float] = (0.0, 1.0), **changes: object
) -> RolloutGroup:
    """A well-formed answer to ``task``: two samples per prompt, ``rewards``."""
    groups = tuple(
        PromptGroup(
            prompt_index=i,
            prompt_ids=(5 + i % 50, 9),
            samples=tuple(
                Sample(completion_ids=(10, 11), logprobs=(-1.0, -1.0), text="", reward=r)
                for r in rewards
            ),
        )
        for i in task.prompt_indices
    )
    fields: dict = {
        "adapter": task.adapter,
        "registration_id": task.registration_id,
        "epoch": task.epoch,
        "task_id": task.id,
        "step": task.step,
        "version": task.version,
        "worker": "test",
        "groups": groups,
    }
    return RolloutGroup(**{**fields, **changes})


@pytest.fixture
def bus(redis_url, rclient, streams, tmp_path, tiny_model_dir) -> Bus:
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=1, max_rank=4)
    return Bus(redis_url, rclient, streams, tmp_path, model)


def test_two_adapters_share_one_slot_in_turn(bus: Bus, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    alpha = bus.producer.register("alpha", spec(steps=3))
    beta = bus.producer.register("beta", spec(steps=2, seed=1))
    bus.run(group_for)

    (admitted,) = bus.events(Admitted, "alpha")
    assert (admitted.slot, admitted.epoch, admitted.registration_id) == (0, 1, alpha)
    assert [q.position for q in bus.events(Queued, "beta")] == [0]
    for name, steps in (("alpha", 3), ("beta", 2)):
        done = bus.events(StepDone, name)
        assert [(d.step, d.version) for d in done] == [(k, k) for k in range(1, steps + 1)]
        assert all(math.isfinite(d.metrics["loss"]) for d in done)
        assert [d.metrics["reward_mean"] for d in done] == [0.5] * steps
        syncs = bus.events(SyncRequested, name)
        assert [s.version for s in syncs] == list(range(steps + 1))
        assert [s.uri for s in syncs[1:]] == [d.state_uri for d in done]
        (completed,) = bus.events(Completed, name)
        assert (completed.reason, completed.step) == ("budget", steps)
        assert [r.slot for r in bus.events(Retired, name)] == [0]
    # beta got the slot alpha left, after alpha's retirement
    kinds = [(type(e).__name__, e.adapter) for e in bus.control()]
    assert kinds.index(("Retired", "alpha")) < kinds.index(("Admitted", "beta"))
    assert bus.events(Admitted, "beta")[0].registration_id == beta
    assert not bus.client.xpending(bus.streams.groups, "trainer")["pending"]

    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.process"]
    assert any(line.startswith("admitted alpha to slot 0 (registration") for line in lines)
    assert any(line.startswith("queued beta") and "position 0" in line for line in lines)
    step_lines = [line for line in lines if line.startswith("step: ")]
    assert len(step_lines) == 5, step_lines  # one per mixed step: 3 of alpha, 2 of beta
    assert step_lines[0].startswith("step: alpha 1/3 (reward 0.500, loss ")
    assert "completed alpha at step 3/3 (version 3); slot 0 retired" in lines


def test_stale_and_unknown_groups_are_dropped_not_trained(bus: Bus, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    bus.producer.register("alpha", spec(steps=1))
    bus.consumer.run(burst=True)
    (task,) = bus.tasks()
    stale = [
        group_for(task, epoch=0),
        group_for(task, task_id="not-a-task"),
        group_for(task, registration_id="another"),
    ]
    for g in stale:
        bus.client.xadd(bus.streams.groups, encode(stamp(g, source="test")))
    bus.run(group_for)
    assert [d.step for d in bus.events(StepDone, "alpha")] == [1]
    assert bus.events(StepDone, "alpha")[0].metrics["groups"] == 2.0  # the real task's only
    dropped = [r.getMessage() for r in caplog.records if "dropping group" in r.getMessage()]
    assert len(dropped) == 3, dropped
    assert not bus.client.xpending(bus.streams.groups, "trainer")["pending"]


def test_an_adapter_fails_after_max_failures_skipped_steps(bus: Bus, caplog) -> None:
    """Rewards whose sum overflows give non-finite advantages, hence a non-finite loss: the step
    is skipped and issued again with new prompts; the second skip in a row (max_failures=2)
    fails the adapter."""
    caplog.set_level(logging.INFO, logger="trainer")
    bus.producer.register("alpha", spec(steps=5))
    bus.run(lambda task: group_for(task, rewards=(1e308, 1.7e308)))
    (failed,) = bus.events(Failed, "alpha")
    assert (failed.reason, failed.step) == ("2 steps in a row skipped: non-finite loss", 0)
    assert bus.events(Retired, "alpha") and not bus.events(StepDone, "alpha")
    assert not bus.events(Completed, "alpha")
    redone = [t.prompt_indices for t in bus.tasks() if t.step == 1]
    assert len(redone) == 2 and redone[0] != redone[1], "step 1 issued again, new prompts"
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.process"]
    assert "failed alpha at step 0/5 (version 0); slot 0 retired" in lines
    assert not bus.client.xpending(bus.streams.groups, "trainer")["pending"]


def test_cancel_while_queued_and_while_training(bus: Bus, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    bus.producer.register("alpha", spec(steps=50))
    bus.producer.register("beta", spec(steps=2))
    bus.consumer.run(burst=True)
    bus.producer.deregister("beta")
    bus.producer.deregister("alpha")
    bus.run(group_for)
    (beta,) = bus.events(Completed, "beta")
    assert beta.reason == "cancelled" and not bus.events(Admitted, "beta")
    (alpha,) = bus.events(Completed, "alpha")
    trained = [d.step for d in bus.events(StepDone, "alpha")]
    assert alpha.reason == "cancelled" and alpha.step == len(trained) < 50
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.process"]
    assert any(line.startswith("cancelled beta while queued") for line in lines)
    at = f"step {alpha.step}/50 (version {alpha.step})"
    assert f"cancelled alpha at {at}; slot 0 retired" in lines
    assert not bus.client.xpending(bus.streams.groups, "trainer")["pending"]
