"""``multilora up``'s supervisor on a live stack: it restarts a killed trainer and a killed Redis
itself (the test only kills, then runs ``up``'s supervision rounds), the other processes keep
their pids, every restart is counted; every process beats; a frozen trainer shows in
``status`` as dead and its adapters as ``(trainer dead)``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from events.heartbeat import Liveness, read_processes
from events.schema import Completed
from ops.report import status_table
from ops.supervise import read_supervisor
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward
from tests.e2e.test_crash import assert_steps_once

pytestmark = [pytest.mark.bus]

STEPS = 12
SHORT_TTL_MS = 3000
"""Lease (and heartbeat) TTL of every child in the freeze test: dead within ~3 s of a freeze."""


def tolerant(check: Callable[[], Any]) -> Callable[[], Any]:
    """``check``, reading False while Redis is down (it restarts under the supervisor)."""

    def run() -> Any:
        try:
            return check()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    return run


def liveness(live: LiveStack) -> dict[str, Liveness]:
    return {p.beat.name: p.liveness for p in read_processes(live.client, live.streams)}


def all_alive(live: LiveStack) -> bool:
    states = liveness(live)
    return {"trainer", "rollout.0", "checkpoint"} <= set(states) and all(
        s is Liveness.ALIVE for s in states.values()
    )


def pids(live: LiveStack) -> dict[str, int]:
    return {name: proc.pid for name, proc in live.stack.procs.items()}


def test_up_restarts_a_killed_trainer_and_the_run_completes(
    live_stack: Callable[..., LiveStack], data_dir: Path
) -> None:
    live = live_stack(max_restarts=5)
    reg = live.register("alpha", adapter_spec(data_dir, char_reward("a"), steps=STEPS))
    live.supervise_until("heartbeats of trainer, rollout.0 and checkpoint", lambda: all_alive(live))
    live.supervise_until("step 3", lambda: live.last_step(reg) >= 3)
    before = pids(live)
    os.kill(before["trainer"], signal.SIGKILL)  # not reaped here: the supervisor notices

    live.supervise_until("the run to complete", lambda: live.events(Completed, reg), 90)
    after = pids(live)
    assert after["trainer"] != before["trainer"], "the trainer was not restarted"
    assert {n: p for n, p in after.items() if n != "trainer"} == {
        n: p for n, p in before.items() if n != "trainer"
    }, "a process other than the trainer was restarted"
    assert_steps_once(live, reg, STEPS)
    record = read_supervisor(live.client, live.streams)["trainer"]
    assert record.restarts == 1 and record.last_exit == "signal SIGKILL", record
    assert record.pid == after["trainer"] and record.state == "running"
    assert "trainer signal SIGKILL" in live.log("trainer")
    assert "restart 1 in 0.5 s" in live.log("trainer")
    live.supervise_until("the new trainer's heartbeat", lambda: all_alive(live))
    trainer = next(p for p in read_processes(live.client, live.streams) if p.beat.name == "trainer")
    assert trainer.beat.pid == after["trainer"]
    table = status_table(live.client, live.streams)
    print(table)
    (line,) = [ln for ln in table.splitlines() if ln.startswith("trainer ")]
    assert line.split()[5:7] == ["alive", "1"], line


def test_a_frozen_trainer_shows_dead_in_status_then_alive_again(
    live_stack: Callable[..., LiveStack], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTILORA_LEASE_TTL_MS", str(SHORT_TTL_MS))  # every child's bus config
    live = live_stack(max_restarts=5)
    reg = live.register("alpha", adapter_spec(data_dir, char_reward("a"), steps=400))
    live.supervise_until("step 2", lambda: live.last_step(reg) >= 2)
    live.supervise_until("every process alive", lambda: all_alive(live))
    assert "(trainer" not in status_table(live.client, live.streams)
    live.signal("trainer", signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        live.supervise_until(
            "status to call the trainer dead",
            lambda: liveness(live)["trainer"] is Liveness.DEAD,
            timeout_s=SHORT_TTL_MS / 1000 + 10,
        )
        assert time.monotonic() - frozen_at <= SHORT_TTL_MS / 1000 + 3
        table = status_table(live.client, live.streams)
        print(table)
        assert "running (trainer dead)" in table
        assert liveness(live)["rollout.0"] is Liveness.ALIVE
    finally:
        live.signal("trainer", signal.SIGCONT)
    step = live.last_step(reg)
    live.supervise_until(
        "the trainer alive again", lambda: liveness(live)["trainer"] is Liveness.ALIVE
    )
    live.supervise_until("a step after the thaw", lambda: live.last_step(reg) > step)
    assert "(trainer" not in status_table(live.client, live.streams)
    assert read_supervisor(live.client, live.streams)["trainer"].restarts == 0


def test_up_restarts_a_killed_redis_and_every_process_keeps_running(
    live_stack: Callable[..., LiveStack], data_dir: Path
) -> None:
    live = live_stack(max_restarts=5)
    reg = live.register("alpha", adapter_spec(data_dir, char_reward("a"), steps=STEPS))
    live.supervise_until("step 3", lambda: live.last_step(reg) >= 3)
    before = pids(live)
    os.kill(before["redis"], signal.SIGKILL)

    live.supervise_until(
        "the run to complete after the Redis restart",
        tolerant(lambda: live.events(Completed, reg)),
        90,
    )
    after = pids(live)
    assert after["redis"] != before["redis"], "Redis was not restarted"
    assert {n: p for n, p in after.items() if n != "redis"} == {
        n: p for n, p in before.items() if n != "redis"
    }, "a process died with Redis"
    assert_steps_once(live, reg, STEPS)
    live.supervise_until(
        "the records written again",
        lambda: read_supervisor(live.client, live.streams)["redis"].restarts == 1,
    )
    live.supervise_until("every process alive", lambda: all_alive(live))
