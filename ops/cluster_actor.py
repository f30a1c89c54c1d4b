"""The one actor class of ``multilora cluster``: a process entry point run as a watched child.

A :class:`ProcessActor` starts its :class:`~ops.cluster_spec.Launch` as a child process in
``__init__`` (so a restarted actor starts it again) and waits on it from a thread:

- exit 0 (a warm stop: SIGTERM from ``down`` or ``scale``) or 2 (refused at boot — a bad flag,
  a configuration or Redis server the process refuses: a restart would not help): the actor stays,
  its ``info`` says ``stopped`` or ``refused``;
- anything else (a signal, exit 1): the actor ends its own process (``os._exit``), which Ray
  counts as a crash and answers by restarting the actor (its ``max_restarts``) — no sooner than
  :data:`MIN_UPTIME_S` after the child started, so a process that cannot start does not spin.

The child is started through :data:`_DIE_WITH_PARENT`, which sets ``PR_SET_PDEATHSIG`` before
``exec``: an actor killed with -9 takes its child with it, so its restart never meets an orphan
still holding the consumer name's lease and its pending entries. Importing this module needs no
ray (``ray.remote(ProcessActor)`` is applied where actors are started).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec

from events.bootstrap import EXIT_CONFIG, EXIT_OK
from ops.cluster_spec import REDIS_PASSWORD, Launch

MIN_UPTIME_S = 5.0
"""A child that crashes sooner is restarted no sooner than this after its start (no hot loop)."""

_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
if prctl is not None:
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the actor
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)  # the actor died before the line above
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActorInfo(msgspec.Struct, frozen=True):
    """What an actor says about itself. ``state``: ``running``; ``stopped`` (exit 0, a warm stop);
    ``refused`` (exit 2, refused at boot: not restarted); ``crashed`` (the actor exits now and Ray
    restarts it)."""

    name: str
    role: str
    state: str
    node_id: str
    node_ip: str
    pid: int
    child_pid: int
    exit_code: int | None
    log: str


class ProcessActor:
    """Runs one :class:`Launch` as its child process and lives and dies with it (see the module
    doc). Wrapped with ``ray.remote`` where it is started, so importing it needs no ray."""

    def __init__(self, launch: Launch) -> None:
        import ray

        self.launch = launch
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None
        self.error: OSError | None = None
        command = self._command()
        Path(launch.log).parent.mkdir(parents=True, exist_ok=True)
        ready = threading.Event()
        threading.Thread(target=self._watch, args=(command, ready), daemon=True).start()
        ready.wait()
        if self.error is not None:  # the actor is not created (and not restarted)
            raise self.error

    def _command(self) -> list[str]:
        if self.launch.role == "redis":
            from ops.redis_server import RedisServer

            data_dir, port = self.launch.args
            command = RedisServer(data_dir, port=int(port), host=self.node_ip).command()
            auth = Path(data_dir) / "auth.conf"  # a config file first, then the flags
            auth.touch(mode=0o600)
            auth.write_text(f"requirepass {self.launch.env[REDIS_PASSWORD]}\n")
            return [command[0], str(auth), *command[1:]]
        return [sys.executable, "-m", "ops.cli", self.launch.role, *self.launch.args]

    def _watch(self, command: list[str], ready: threading.Event) -> None:
        """Start the child (from this thread, which outlives it: the death signal is tied to the
        thread that forked) and wait; a crash ends the actor so Ray restarts it."""
        with open(self.launch.log, "ab") as log:
            header = f"[cluster] {self.launch.name} on {self.node_ip}: {shlex.join(command)}\n"
            log.write(header.encode())
            log.flush()
            try:
                self.child = subprocess.Popen(
                    [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.launch.env},
                    cwd=self.launch.cwd,
                )
            except OSError as err:
                self.error = err
            finally:
                ready.set()
            if self.child is None:
                return
            started = time.monotonic()
            code = self.child.wait()
            if self.stopping or code in (EXIT_OK, EXIT_CONFIG):
                log.write(f"[cluster] {self.launch.name} exited with {code}\n".encode())
                return
            log.write(f"[cluster] {self.launch.name} crashed ({code}); Ray restarts it\n".encode())
        time.sleep(max(0.0, MIN_UPTIME_S - (time.monotonic() - started)))
        os._exit(1)  # not a clean actor exit: Ray restarts the actor, which restarts the child

    def job(self) -> Launch:
        return self.launch

    def info(self) -> ActorInfo:
        child = self.child
        code = child.poll() if child is not None else None
        state = {None: "running", EXIT_OK: "stopped", EXIT_CONFIG: "refused"}.get(code, "crashed")
        if self.stopping and code is None:
            state = "stopping"
        return ActorInfo(
            self.launch.name,
            self.launch.role,
            state,
            self.node_id,
            self.node_ip,
            os.getpid(),
            child.pid if child is not None else 0,
            code,
            self.launch.log,
        )

    def stop(self, timeout_s: float) -> int | None:
        """Warm stop: SIGTERM the child, SIGKILL it after ``timeout_s``; its exit code."""
        self.stopping = True
        child = self.child
        if child is None:
            return None
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return child.returncode
