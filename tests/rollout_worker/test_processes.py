"""THE crash test: three ``python -m rollout.main`` processes on one task stream.

One worker is killed with SIGKILL while it holds a task; another is frozen (SIGSTOP) while it
holds one until a live worker has taken its entries over, then thawed, so it finishes the
task and tries to commit a group for an entry that is no longer its own. Every task must still
end up with exactly one ``rollout.group`` on the stream: none missing, none twice.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from events.codec import Decoder
from events.connection import durability_problems
from events.schema import TaskEvent
from events.specs import SamplingSpec
from events.streams import Streams
from rollout.worker import TASK_GROUP
from tests.rollout_worker.helpers import admitted, publish, read_groups, task

pytestmark = [pytest.mark.bus, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
N_TASKS = 12
# ~0.3 s of generation per task on one idle CPU thread: 6 prompts x 8 samples x <= 96 tokens
SLOW = SamplingSpec(temperature=1.0, max_new_tokens=96)


def start_worker(url: str, streams: Streams, name: str, tiny: Path, data: Path, unsafe: bool):
    cmd = [
        *(sys.executable, "-m", "rollout.main"),
        f"--redis-url={url}",
        f"--namespace={streams.namespace}",
        f"--name={name}",
        f"--model={tiny}",
        f"--allowed-root={data}",
        "--claim-idle-ms=1500",
        "--block-ms=300",
        "--torch-threads=1",
        "--max-prompt-tokens=64",
        # small batches: each worker keeps taking tasks (with the default 8, one worker could
        # take every task left in one read, and w1 might never hold one to be frozen with)
        "--batch-tasks=2",
    ]
    if unsafe:
        cmd.append("--unsafe-redis")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def held_by(client: redis.Redis, streams: Streams, name: str) -> list[str]:
    rows = client.xpending_range(streams.tasks, TASK_GROUP, "-", "+", 100, consumername=name)
    return [r["message_id"].decode() for r in rows]


def wait_for(what: str, check, timeout_s: float = 60.0, procs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited early: {p.stderr.read().decode()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_three_workers_publish_each_group_once_despite_kill_and_freeze(
    redis_url, streams, rclient, tiny_dir, data_root, versions
) -> None:
    unsafe = bool(durability_problems(rclient))
    publish(rclient, streams.control, admitted("math", "r1"))
    names = ["w0", "w1", "w2"]
    procs = {n: start_worker(redis_url, streams, n, tiny_dir, data_root, unsafe) for n in names}
    try:

        def all_listening() -> bool:
            if not rclient.exists(streams.control):
                return False
            groups = {g["name"].decode() for g in rclient.xinfo_groups(streams.control)}
            return {f"rollout.{n}" for n in names} <= groups

        wait_for("three workers", all_listening, procs=procs.values())
        prompts = tuple(i % 3 for i in range(6))
        tasks = [
            task(
                "math",
                "r1",
                versions[0],
                prompt_indices=prompts,
                group_size=8,
                sampling=SLOW,
                seed=i,
            )
            for i in range(N_TASKS)
        ]
        publish(rclient, streams.tasks, *tasks)
        entry_task = {
            eid.decode(): Decoder(TaskEvent).decode(fields).id
            for eid, fields in rclient.xrange(streams.tasks)
        }

        # SIGKILL w0 while it holds a task
        wait_for("w0 to take a task", lambda: held_by(rclient, streams, "w0"), procs=[procs["w0"]])
        time.sleep(0.15)
        procs["w0"].send_signal(signal.SIGKILL)
        procs["w0"].wait()
        killed_with = held_by(rclient, streams, "w0")
        assert killed_with, "w0 died holding no task; the kill proves nothing"

        # freeze w1 while it holds a task until w2 has taken every one of them over
        frozen_with: list[str] = []
        while not frozen_with:  # what w1 holds once frozen (it may commit just before the stop)
            wait_for("w1 to take a task", lambda: held_by(rclient, streams, "w1"))
            procs["w1"].send_signal(signal.SIGSTOP)
            frozen_with = held_by(rclient, streams, "w1")
            if not frozen_with:
                procs["w1"].send_signal(signal.SIGCONT)
        wait_for(
            "w2 to take over w1's tasks",
            lambda: not set(frozen_with) & set(held_by(rclient, streams, "w1")),
            procs=[procs["w2"]],
        )
        procs["w1"].send_signal(signal.SIGCONT)

        def all_done() -> bool:
            done = {g.task_id for g in read_groups(rclient, streams)}
            idle = rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0
            return len(done) == N_TASKS and idle

        wait_for("every task's group", all_done, timeout_s=90, procs=[procs["w2"]])
        time.sleep(1.0)  # give a refused (or, if broken, duplicate) late commit time to land
    finally:
        for name in ("w1", "w2"):
            procs[name].send_signal(signal.SIGCONT)
            procs[name].send_signal(signal.SIGTERM)
    logs = {}
    for name in ("w1", "w2"):
        assert procs[name].wait(timeout=30) == 0  # warm shutdown on SIGTERM
        logs[name] = procs[name].stderr.read().decode()

    groups = read_groups(rclient, streams)
    counts = collections.Counter(g.task_id for g in groups)
    assert set(counts) == {t.id for t in tasks}, "a task's group is missing"
    assert max(counts.values()) == 1 and len(groups) == N_TASKS, f"duplicates: {counts}"
    worker_of = {g.task_id: g.worker for g in groups}
    assert all(worker_of[entry_task[e]] != "w0" for e in killed_with)
    assert all(worker_of[entry_task[e]] == "w2" for e in frozen_with)
    assert "commit refused" in logs["w1"], "the thawed worker's late commit was not refused"
    for g in groups:
        assert len(g.groups) == 6 and all(len(pg.samples) == 8 for pg in g.groups)
        assert all(not s.failed for pg in g.groups for s in pg.samples)
