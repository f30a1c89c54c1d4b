"""Driving a live local stack (``multilora up``'s :class:`ops.launch.Stack`) from a test.

:class:`LiveStack` wraps a started stack: it registers adapters, reads the control log and the
work streams back as decoded events, waits for conditions while watching the children's health,
and kills (``SIGKILL``) and restarts child processes exactly as an operator would: the same
command line, the same log file, the same consumer name (the new process takes the name's lease
because the old holder's pid is dead).

A consumer group ``OBSERVER`` that never reads is created on ``rollout.groups`` and
``rollout.tasks`` before anything is registered: trimming never passes a group's last-delivered
id, so every group and task stays readable for the assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis

from events.codec import Decoder
from events.connection import connect
from events.schema import (
    ControlEvent,
    GroupEvent,
    RolloutGroup,
    RolloutTask,
    StepDone,
    TaskEvent,
)
from events.specs import AdapterSpec
from events.streams import Streams
from ops.launch import Stack, StackOptions
from orchestrator.client import Producer

ROOT = Path(__file__).resolve().parents[2]
OBSERVER = "e2e-observer"


class Routed(Protocol):
    """Any event: every envelope names its registration."""

    @property
    def registration_id(self) -> str: ...


E = TypeVar("E", bound=Routed)

CHAR_REWARD = "char_fraction"
"""The operator reward of :mod:`tests.e2e.rewards`, allow-listed on workers and trainer."""


def stack_options(
    run_dir: Path, namespace: str, data_dir: Path, model: Path, **overrides: Any
) -> StackOptions:
    """Options of a CPU test stack: one thread per process, the test reward allow-listed, the
    test's data folder an allowed root of trainer (admission probe) and workers."""
    extra = {
        "trainer": ["--extra-reward", CHAR_REWARD, "--allowed-root", str(data_dir)],
        "rollout": [
            "--reward",
            f"{CHAR_REWARD}=tests.e2e.rewards:char_fraction",
            "--allowed-root",
            str(data_dir),
            "--block-ms",
            "500",
        ],
    }
    base: dict[str, Any] = {
        "model": str(model),
        "workers": 1,
        "num_slots": 4,
        "max_rank": 8,
        "run_dir": str(run_dir),
        "namespace": namespace,
        "max_batch_wait_s": 0.3,
        "torch_threads": 1,
        "redis_port": 0,
        "metrics_port_base": 0,
        "extra_args": extra,
        "max_restarts": 0,  # tests kill and restart children themselves; pass 5 to supervise
    }
    base.update(overrides)
    return StackOptions(**base)


PROMPTS = ("x:", "y:", "z:", "w:", "v:", "u:", "t:", "s:")


def write_prompts(folder: Path) -> Path:
    """``folder`` with ``prompts.jsonl``: 8 one-character prompts like ``"x:"``, empty labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"prompt": p, "answer": ""}) for p in PROMPTS]
    (folder / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def child_env() -> dict[str, str]:
    """The environment children need to import :mod:`tests.e2e.rewards` (repo root on path)."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


class LiveStack:
    """A started :class:`Stack` plus the test's view of its bus."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.streams: Streams = stack.streams
        self.client: redis.Redis = connect(stack.url)
        self.producer = Producer(self.client, self.streams, source="e2e")
        for stream in (self.streams.groups, self.streams.tasks):  # kept readable: never trimmed
            self.client.xgroup_create(stream, OBSERVER, id="0", mkstream=True)
        self._control = Decoder(ControlEvent)
        self._groups = Decoder(GroupEvent)
        self._tasks = Decoder(TaskEvent)
        self.down: set[str] = set()  # children killed on purpose and not restarted yet

    # --- input ---------------------------------------------------------------------------------

    def register(self, name: str, spec: AdapterSpec) -> str:
        return self.producer.register(name, spec)

    def xadd_ingress(self, payload: str) -> str:
        """A raw producer's ``XADD <ns>:ingress * event <payload>``; returns the entry id."""
        entry = self.client.xadd(self.streams.ingress, {"event": payload})
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    # --- reading the bus -----------------------------------------------------------------------

    def control(self) -> list[tuple[str, Any]]:
        """Every control-log entry as ``(entry_id, event)``, in log order."""
        return [
            (eid.decode(), self._control.decode(fields, eid.decode()))
            for eid, fields in self.client.xrange(self.streams.control)
        ]

    def events(self, kind: type[E], registration_id: str = "") -> list[E]:
        """Control events of one type (of one registration when given), in log order."""
        return [
            e
            for _, e in self.control()
            if isinstance(e, kind) and registration_id in ("", e.registration_id)
        ]

    def groups(self, after: str = "") -> list[RolloutGroup]:
        """Every rollout group published so far (kept by the observer group), or only those
        after stream entry ``after``."""
        low = f"({after}" if after else "-"
        return [
            self._groups.decode(fields, eid.decode())
            for eid, fields in self.client.xrange(self.streams.groups, min=low)
        ]

    def last_delivered(self, stream: str, group: str) -> str:
        """The last entry id of ``stream`` delivered to consumer group ``group``."""
        for info in self.client.xinfo_groups(stream):
            if info["name"].decode() == group:
                return str(info["last-delivered-id"].decode())
        raise AssertionError(f"no consumer group {group!r} on {stream}")

    def tasks(self, entry_ids: Iterable[str]) -> list[RolloutTask]:
        out = []
        for entry_id in entry_ids:
            for eid, fields in self.client.xrange(self.streams.tasks, entry_id, entry_id):
                out.append(self._tasks.decode(fields, eid.decode()))
        return out

    def group_by_entry(self, entry_ids: Iterable[str]) -> list[RolloutGroup]:
        out = []
        for entry_id in entry_ids:
            for eid, fields in self.client.xrange(self.streams.groups, entry_id, entry_id):
                out.append(self._groups.decode(fields, eid.decode()))
        return out

    def pending(self, stream: str, group: str, consumer: str) -> list[str]:
        """Entry ids of ``stream`` delivered to ``consumer`` of ``group`` and not acknowledged."""
        rows = self.client.xpending_range(stream, group, "-", "+", 1000, consumername=consumer)
        return [r["message_id"].decode() for r in rows]

    def last_step(self, registration_id: str) -> int:
        steps = [e.step for e in self.events(StepDone, registration_id)]
        return max(steps, default=0)

    # --- waiting and processes -----------------------------------------------------------------

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float = 90.0) -> Any:
        """Poll ``check`` until truthy; fail naming ``what`` (with log tails) on timeout or when a
        child process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            self.check()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}\n" + self.log_tails()
                )
            time.sleep(0.1)

    def check(self) -> None:
        """Fail naming any child that exited, except those this test killed on purpose."""
        for name, proc in self.stack.procs.items():
            if name not in self.down and proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n" + self.log_tails())

    def log_tails(self, chars: int = 2000) -> str:
        logs = sorted((self.stack.run_dir / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def log(self, name: str) -> str:
        return (self.stack.run_dir / "logs" / f"{name}.log").read_text(errors="replace")

    def pid(self, name: str) -> int:
        return self.stack.procs[name].pid

    def signal(self, name: str, signum: signal.Signals) -> None:
        os.kill(self.pid(name), signum)

    def kill(self, name: str) -> None:
        """SIGKILL child ``name`` and reap it."""
        proc = self.stack.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.down.add(name)

    def restart(self, name: str) -> None:
        """Start ``name`` again with the command line and log file the stack gave it."""
        old = self.stack.procs[name]
        if old.poll() is None:
            raise AssertionError(f"{name} (pid {old.pid}) still runs; kill it first")
        log = open(self.stack.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115
        self.stack.logs.append(log)  # closed by the stack's exit
        env = self.stack.child_env(old.args[3])  # [python, -m, ops.cli, ROLE, ...]
        self.stack.procs[name] = subprocess.Popen(
            old.args, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        self.down.discard(name)

    def supervise_until(self, what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """Poll ``check`` until truthy while running ``up``'s supervision rounds
        (:meth:`ops.launch.Stack.check`: children that exited are restarted by the stack's
        supervisor, as under ``multilora up``); fail naming ``what`` on timeout or when the
        supervisor gives up."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.stack.check()
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}\n" + self.log_tails()
                )
            time.sleep(0.1)

    def lease_holder(self, consumer: str) -> dict[str, Any]:
        raw = self.client.get(self.streams.lease(consumer))
        return json.loads(raw) if raw else {}

    def close(self) -> None:
        self.client.close()
