"""kill -9 of every process of a live run: the run completes, nothing is lost or applied twice.

Trainer (two adapters train, a third waits for a slot): it is frozen (SIGSTOP) at a moment when
it holds deferred groups of the current epoch, so the set of groups it held is read exactly, then
killed (SIGKILL) and started again with the same command line. The new process takes the consumer
name's lease (the old pid is dead), replays the control log, resumes every adapter from its latest
version under epoch + 1 and admits the waiting one when a slot frees.

Rollout worker and checkpointer: killed while the run goes on (the worker while it holds a task,
the checkpointer across checkpoint-due steps), then restarted; the held task is redone and every
due checkpoint is written.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    Queued,
    RolloutGroup,
    StepDone,
    SyncRequested,
)
from orchestrator.checkpoint_store import verify
from rollout.worker import TASK_GROUP
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward

pytestmark = [pytest.mark.bus]

STEPS = 60


def assert_steps_once(live: LiveStack, registration_id: str, steps: int) -> list[StepDone]:
    """StepDone steps of the registration strictly increase in log order, 1..steps, no gaps."""
    done = live.events(StepDone, registration_id)
    got = [e.step for e in done]
    assert got == list(range(1, steps + 1)), f"steps in log order: {got}"
    versions = [e.version for e in done]
    assert versions == sorted(set(versions)), f"versions in log order: {versions}"
    return done


def freeze_holding_groups(live: LiveStack, timeout_s: float = 30.0) -> list[RolloutGroup]:
    """SIGSTOP the trainer at a moment it holds deferred groups; returns those groups."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live.pending(live.streams.groups, "trainer", "trainer"):
            live.signal("trainer", signal.SIGSTOP)
            held = live.pending(live.streams.groups, "trainer", "trainer")
            if held:
                return live.group_by_entry(held)
            live.signal("trainer", signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the trainer never held a deferred group")


def test_trainer_kill9_resumes_every_adapter_without_applying_a_step_twice(
    live_stack: Callable[..., LiveStack], data_dir: Path
) -> None:
    live = live_stack(num_slots=2)
    reg = {
        name: live.register(name, adapter_spec(data_dir, char_reward(c), steps=STEPS, seed=i))
        for i, (name, c) in enumerate((("alpha", "a"), ("beta", "b")))
    }
    waiting = live.register("gamma", adapter_spec(data_dir, char_reward("c"), steps=6, seed=2))
    live.wait_for(
        "both adapters at step 5", lambda: all(live.last_step(r) >= 5 for r in reg.values())
    )
    assert live.events(Queued, waiting) and not live.events(Admitted, waiting)
    old_pid = live.pid("trainer")
    held = freeze_holding_groups(live)
    delivered = live.last_delivered(live.streams.groups, "trainer")  # frozen: stable
    live.kill("trainer")
    before = {name: live.events(StepDone, r) for name, r in reg.items()}
    assert all(0 < len(b) < STEPS for b in before.values()), "killed too late"
    assert {g.epoch for g in held} == {1}, held
    log_at_restart = len(live.log("trainer"))

    live.restart("trainer")
    live.wait_for(
        "all three adapters to complete after the restart",
        lambda: len(live.events(Completed)) == 3,
        timeout_s=120,
    )

    holder = live.lease_holder("trainer")
    assert holder.get("pid") not in (None, old_pid), holder
    for name, r in reg.items():
        (completed,) = live.events(Completed, r)
        assert completed.reason == "budget" and completed.step == STEPS, completed
        done = assert_steps_once(live, r, STEPS)
        last = before[name][-1]
        # Resumed from its latest version, under a bumped epoch, once.
        admitted = live.events(Admitted, r)
        assert [a.epoch for a in admitted] == [1, 2], admitted
        resumed = admitted[1]
        assert resumed.start_step == last.step and resumed.resumed_from == last.state_uri
        syncs = [s for s in live.events(SyncRequested, r) if s.epoch == 2]
        assert syncs[0].version == last.version and syncs[0].uri == last.state_uri
        after = [d for d in done if d.step > last.step]
        assert after[0].version == last.version + 1
        assert {d.epoch for d in done if d.step <= last.step} == {1}
        assert {d.epoch for d in after} == {2}, "a step after the restart kept the old epoch"
    # The registration that waited for a slot across the crash got one and trained once.
    assert [a.epoch for a in live.events(Admitted, waiting)] == [1]
    assert_steps_once(live, waiting, 6)
    # Every old-epoch group the dead trainer had not trained (the ones it held, and those it had
    # not read yet) reached the new trainer, which dropped each of them.
    resumed_ids = set(reg.values())
    later = live.groups(after=delivered)
    untrained = held + [g for g in later if g.epoch == 1 and g.registration_id in resumed_ids]
    new_log = live.log("trainer")[log_at_restart:]
    for group in untrained:
        assert f"dropping group {group.task_id} of {group.adapter}" in new_log, group.task_id
    assert not live.pending(live.streams.groups, "trainer", "trainer")


def test_rollout_worker_and_checkpointer_kill9_lose_nothing(
    live_stack: Callable[..., LiveStack], data_dir: Path
) -> None:
    live = live_stack()
    interval = 4
    specs = {
        name: adapter_spec(
            data_dir,
            char_reward(c),
            steps=STEPS,
            seed=i,
            checkpoint_interval=interval,
            keep_checkpoints=100,
        )
        for i, (name, c) in enumerate((("alpha", "a"), ("beta", "b")))
    }
    reg = {name: live.register(name, spec) for name, spec in specs.items()}
    live.wait_for(
        "both adapters at step 3", lambda: all(live.last_step(r) >= 3 for r in reg.values())
    )

    # The checkpointer dies; at least two due steps pass while it is dead.
    live.kill("checkpoint")
    at_kill = min(live.last_step(r) for r in reg.values())
    saved_at_kill = len(live.events(CheckpointSaved))
    # The worker dies while it holds a task; nothing moves until it is back.
    held = live.wait_for(
        "the worker to hold a task",
        lambda: live.pending(live.streams.tasks, TASK_GROUP, "rollout.0"),
    )
    live.kill("rollout.0")
    live.restart("rollout.0")
    live.wait_for(
        "two checkpoint-due steps to pass without a checkpointer",
        lambda: all(live.last_step(r) >= at_kill + 2 * interval for r in reg.values()),
    )
    assert len(live.events(CheckpointSaved)) == saved_at_kill, "saved by a dead checkpointer?"
    live.restart("checkpoint")
    live.wait_for(
        "both adapters to complete", lambda: len(live.events(Completed)) == 2, timeout_s=120
    )
    live.wait_for(
        "the final checkpoints",
        lambda: len([e for e in live.events(CheckpointSaved) if e.final]) == 2,
    )

    published = {g.task_id for g in live.groups()}
    held_tasks = [t.id for t in live.tasks(held)]
    assert set(held_tasks) <= published, "the task the dead worker held was never done"
    for r in reg.values():
        assert_steps_once(live, r, STEPS)
        saved = live.events(CheckpointSaved, r)
        steps = {e.step for e in saved if not e.final}
        due = set(range(interval, STEPS + 1, interval))
        assert due <= steps, f"missing checkpoints for steps {sorted(due - steps)}"
        for event in saved:
            manifest = verify(event.uri)
            assert manifest.step == event.step
        (final,) = [e for e in saved if e.final]
        assert final.step == STEPS
