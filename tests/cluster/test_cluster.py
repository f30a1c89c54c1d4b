"""``multilora cluster`` on a two-node Ray cluster: placement, scale while running, kill -9, down.

The trainer, checkpointer and the Redis the cluster starts are pinned to ``node_a`` (the head),
two rollout workers to ``node_b``; four adapters are registered by a producer outside Ray
(:class:`orchestrator.client.Producer` against the Redis URL ``up`` wrote to ``run_dir``) on the
learnable tiny random model. While they train: ``cluster scale rollout 3`` adds a worker, which
takes tasks (its consumer name appears as ``worker`` of a ``rollout.group``); the child process
of ``rollout.0`` is killed with -9 while it holds a task, and the actor process of ``rollout.1``
too (its child dies with it: ``PR_SET_PDEATHSIG``); Ray restarts both actors, which start their
children again under the same consumer names; ``cluster scale rollout 2`` warm-stops the
third. Every adapter still completes its whole step budget with one ``adapter.step_done`` per
(registration, step), and the task the killed child held is redone. ``cluster down`` leaves no
actor and stops the Redis it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from events.codec import Decoder
from events.connection import connect
from events.schema import Admitted, Completed, ControlEvent, GroupEvent, RolloutGroup, StepDone
from events.streams import Streams
from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model
from orchestrator.client import Producer
from rollout.worker import TASK_GROUP
from tests.cluster.conftest import NEEDS_RAY
from tests.e2e.specs import adapter_spec, digit_reward

pytestmark = [pytest.mark.slow, pytest.mark.bus, NEEDS_RAY]

STEPS = 150
OBSERVER = "cluster-observer"
PROMPTS = ("x:", "y:", "z:", "w:", "v:", "u:", "t:", "s:")
E = TypeVar("E")
CLI = Callable[..., subprocess.CompletedProcess[str]]


class BusView:
    """The test's reads of the deployment's streams (an idle observer group keeps every
    published group from being trimmed)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.client: redis.Redis = connect(url)
        self.streams = Streams(namespace)
        self.client.xgroup_create(self.streams.groups, OBSERVER, id="0", mkstream=True)
        self._control = Decoder(ControlEvent)
        self._groups = Decoder(GroupEvent)

    def events(self, kind: type[E], registration_id: str = "") -> list[E]:
        entries = self.client.xrange(self.streams.control)
        decoded = (self._control.decode(f, i.decode()) for i, f in entries)
        return [
            e for e in decoded if isinstance(e, kind) and registration_id in ("", e.registration_id)
        ]

    def groups(self) -> list[RolloutGroup]:
        entries = self.client.xrange(self.streams.groups)
        return [self._groups.decode(f, i.decode()) for i, f in entries]

    def held_tasks(self, consumer: str) -> list[str]:
        rows = self.client.xpending_range(
            self.streams.tasks, TASK_GROUP, "-", "+", 100, consumername=consumer
        )
        return [r["message_id"].decode() for r in rows]

    def task_ids(self, entry_ids: list[str]) -> set[str]:
        out = set()
        for entry_id in entry_ids:
            for _, fields in self.client.xrange(self.streams.tasks, entry_id, entry_id):
                out.add(json.loads(fields[b"event"])["id"])
        return out

    def lease_pid(self, consumer: str) -> int:
        raw = self.client.get(self.streams.lease(consumer))
        return int(json.loads(raw)["pid"]) if raw else 0


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float = 90.0, poll_s: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return value


def alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status(cli: CLI, namespace: str) -> dict[str, Any]:
    return json.loads(cli("status", "--namespace", namespace, "--json").stdout)


def placement(report: dict[str, Any]) -> dict[str, str]:
    """Actor name -> the custom resource (``node_a``/``node_b``) of the node it runs on."""
    label = {
        n["node_id"]: next(k for k in ("node_a", "node_b") if k in n["resources"])
        for n in report["nodes"]
    }
    return {a["name"]: label[a["node_id"]] for a in report["actors"]}


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in report["actors"]}


def test_cluster_places_scales_and_loses_nothing_to_kill9(cluster_cli: CLI, tmp_path: Path) -> None:
    began = time.monotonic()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.monotonic() - began, 1)

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"prompt": p, "answer": ""}) for p in PROMPTS]
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    model = write_tiny_model(tmp_path / "model", head_scale=LEARNABLE_HEAD_SCALE)
    namespace, run_dir = f"cl{uuid.uuid4().hex[:8]}", tmp_path / "run"
    a, b = json.dumps({"node_a": 0.01}), json.dumps({"node_b": 0.01})
    cluster_cli(
        "up",
        *("--namespace", namespace, "--run-dir", str(run_dir), "--model", str(model)),
        *("--workers", "2", "--torch-threads", "1", "--rollout-cpus", "0.5"),
        *("--num-slots", "4", "--max-rank", "8", "--max-batch-wait-s", "0.3"),
        *("--allowed-root", str(data), "--rollout-args", "--block-ms 500 --claim-idle-ms 5000"),
        *("--trainer-resources", a, "--checkpoint-resources", a, "--rollout-resources", b),
    )
    mark("up")
    report = status(cluster_cli, namespace)
    assert placement(report) == {
        "redis": "node_a",
        "trainer": "node_a",
        "checkpoint": "node_a",
        "rollout.0": "node_b",
        "rollout.1": "node_b",
    }
    assert {a["state"] for a in report["actors"]} == {"running"}, report["actors"]
    assert "***" in report["redis_url"]  # the password stays in run_dir/redis.url
    url = (run_dir / "redis.url").read_text().strip()
    assert (run_dir / "redis.url").stat().st_mode & 0o077 == 0

    bus = BusView(url, namespace)
    producer = Producer(bus.client, bus.streams, source="cluster-test")
    reg = {
        name: producer.register(name, adapter_spec(data, digit_reward(), steps=STEPS, seed=i))
        for i, name in enumerate(("t0", "t1", "t2", "t3"))
    }

    def at_least(step: int) -> bool:
        done = bus.events(StepDone)
        return all(
            any(e.registration_id == r and e.step >= step for e in done) for r in reg.values()
        )

    wait_for("all four adapters to be admitted", lambda: len(bus.events(Admitted)) == 4)
    wait_for("all four adapters at step 3", lambda: at_least(3))
    mark("training")

    cluster_cli("scale", "rollout", "3", "--namespace", namespace)
    wait_for("a group from rollout.2", lambda: any(g.worker == "rollout.2" for g in bus.groups()))
    mark("scaled up")

    before = by_name(status(cluster_cli, namespace))
    assert before["rollout.0"]["child_pid"] == bus.lease_pid("rollout.0")
    held = wait_for("rollout.0 to hold a task", lambda: bus.held_tasks("rollout.0"), poll_s=0.01)
    os.kill(before["rollout.0"]["child_pid"], signal.SIGKILL)  # the child process
    os.kill(before["rollout.1"]["pid"], signal.SIGKILL)  # the actor process
    held_ids = bus.task_ids(held)
    assert not bus.events(Completed), "killed too late: raise STEPS"
    mark("killed")
    at_kill = max(e.step for e in bus.events(StepDone))
    old_child = before["rollout.1"]["child_pid"]
    wait_for("rollout.1's child to die with its actor", lambda: not alive(old_child), 10)

    def restarted(name: str) -> bool:
        pid = bus.lease_pid(name)
        return pid not in (0, before[name]["child_pid"]) and alive(pid)

    wait_for("both workers restarted", lambda: restarted("rollout.0") and restarted("rollout.1"))
    mark("restarted")
    cluster_cli("scale", "rollout", "2", "--namespace", namespace)
    mark("scaled down")

    wait_for("all four adapters to complete", lambda: len(bus.events(Completed)) == 4, 180)
    mark("completed")
    for name, r in reg.items():
        (completed,) = bus.events(Completed, r)
        assert completed.reason == "budget" and completed.step == STEPS, completed
        steps = [e.step for e in bus.events(StepDone, r)]
        assert steps == list(range(1, STEPS + 1)), f"{name}: steps in log order {steps}"
    groups = bus.groups()
    assert held_ids <= {g.task_id for g in groups}, "the task the killed child held was lost"
    workers = {g.worker for g in groups}
    assert {"rollout.0", "rollout.1", "rollout.2"} <= workers, workers

    after = status(cluster_cli, namespace)
    actors = by_name(after)
    assert set(actors) == {"redis", "trainer", "checkpoint", "rollout.0", "rollout.1"}
    assert placement(after)["rollout.1"] == "node_b"  # restarted where its resources are
    assert actors["rollout.1"]["pid"] != before["rollout.1"]["pid"]
    assert {a["state"] for a in after["actors"]} == {"running"}, after["actors"]
    assert "exited with 0" in (run_dir / "logs/rollout.2.log").read_text()  # a warm stop
    for name in ("rollout.0", "rollout.1"):
        log = (run_dir / f"logs/{name}.log").read_text()
        assert log.count("[cluster] rollout") >= 2, log[-2000:]  # started again by its actor

    cluster_cli("down", "--namespace", namespace)
    mark("down")
    assert status(cluster_cli, namespace)["actors"] == []
    with pytest.raises(redis.ConnectionError):
        connect(url).ping()
    print(f"cluster test: s since start {marks}; step {at_kill} of {STEPS} at the kills")
