"""Supervision of ``multilora up``'s processes: restart what dies, with back-off; give up loudly.

A :class:`Supervisor` owns units (:class:`Unit`: a child command line with its log file and
environment, or the embedded Redis server) and the live process of each (``processes``, by
name). It runs in its caller's thread: ``up``'s loop calls :meth:`Supervisor.poll` every
fraction of a second (no thread of its own). The policy (:class:`RestartPolicy`):

- **Every exit is unexpected.** In ``up`` every process is meant to run until ``up`` stops, so
  an exit while the supervisor runs is restarted whatever its code (0 too: someone stopped it
  behind ``up``'s back). A unit whose start raises (:class:`~events.errors.MultiLoraError` or
  ``OSError``: the Redis server exited at start) counts as an exit.
- **Back-off.** The first restart waits ``initial_delay_s`` (0.5 s), each next one twice as
  long, up to ``max_delay_s`` (30 s). A process that stayed up ``reset_after_s`` (60 s) was
  healthy: its next restart waits ``initial_delay_s`` again.
- **Giving up.** A unit that would be restarted for the ``max_restarts + 1``-th time within
  ``window_s`` (5 in 300 s) is in a crash loop; an exit with a code in ``fatal_exit_codes``
  (default ``{2}``: :data:`events.bootstrap.EXIT_CONFIG`, a configuration or Redis server the
  process refused at boot) is given up on at once, since the same command line would be refused
  again and a restart loop would only bury the message. Giving up raises
  :class:`SupervisorError` naming the unit, its exit and its log tail (``up`` exits 1).
  ``max_restarts=0`` never restarts: the first exit gives up (``up`` before supervision).
- **Warm stop.** :meth:`Supervisor.stop` sends SIGTERM to every process, waits up to its
  deadline, then SIGKILLs what is left; tiers stop in descending order (the children, tier 1,
  before the Redis server, tier 0, so their warm shutdown can still commit). Nothing is
  restarted once stop began.
- **Records.** Every restart is logged (stderr and the unit's log file: exit code or signal,
  attempt, delay) and counted; each change of a unit's :class:`UnitRecord` goes to the
  observers (:class:`RestartCounter`: ``multilora_up_restarts_total{process}``;
  :class:`RedisRecorder`: the hash :func:`supervisor_key`, read by ``status``).

``processes`` may be written from outside (a test starting a process again by hand): the
supervisor then watches the new process from that moment.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

import msgspec
import redis
from prometheus_client import CollectorRegistry, Counter

from events.errors import MultiLoraError
from events.streams import Streams
from ops.redis_server import RedisServer

log = logging.getLogger(__name__)

Process = subprocess.Popen[bytes]
UnitState = Literal["running", "restarting", "gave_up", "stopped"]


class SupervisorError(MultiLoraError):
    """The supervisor gave up on a process (crash loop, or a refused configuration)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a process that exited, and when to give up (see the module doc)."""

    initial_delay_s: float = 0.5
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0
    max_restarts: int = 5
    window_s: float = 300.0
    fatal_exit_codes: frozenset[int] = frozenset({2})

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.initial_delay_s < 0:
            raise ValueError(
                f"restart policy {self}: max_restarts must be >= 0, window_s > 0 and "
                "initial_delay_s >= 0"
            )


class Unit(Protocol):
    """Something the supervisor can start again: ``start`` returns the new process."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> Process: ...


@dataclass
class ChildProcess:
    """A child command line: started in its own session (a terminal's Ctrl-C reaches ``up``
    only, which stops the children warm itself), output appended to ``log_path``."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None

    def start(self) -> Process:
        with open(self.log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                list(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(self.env) if self.env is not None else None,
                start_new_session=True,
            )


@dataclass
class RedisUnit:
    """The embedded Redis server: started again on the same data dir and port (its AOF
    replays; clients reconnect to the same URL). Its log is the server's own log file."""

    server: RedisServer
    name: str = "redis"

    @property
    def log_path(self) -> Path:
        return self.server.data_dir / "server.log"

    def start(self) -> Process:
        self.server.start()
        if self.server.process is None:
            raise MultiLoraError(f"redis server on port {self.server.port} did not start")
        return self.server.process


class UnitRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What ``status`` shows of one supervised process (times: s since the epoch)."""

    process: str
    state: UnitState
    pid: int = 0
    restarts: int = 0
    last_exit: str = ""
    last_exit_at: float = 0.0


class SupervisorObserver(Protocol):
    def changed(self, record: UnitRecord, *, restarted: bool) -> None: ...


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``signal SIGKILL`` (Popen's negative return code)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass
class _Watch:
    unit: Unit
    tier: int
    started_at: float = 0.0
    watched: Process | None = None
    due_at: float | None = None  # a restart is scheduled
    delay_s: float = 0.0
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  # restart times within the window
    last_exit: str = ""
    last_exit_at: float = 0.0
    state: UnitState = "running"


class Supervisor:
    """Owns units and their processes; see the module doc for the policy."""

    def __init__(
        self,
        policy: RestartPolicy,
        *,
        observers: Sequence[SupervisorObserver] = (),
        out: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.observers = list(observers)
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.processes: dict[str, Process] = {}
        self._watches: dict[str, _Watch] = {}
        self._stopping = False

    def add(self, unit: Unit, *, tier: int = 1, process: Process | None = None) -> Process:
        """Watch ``unit``: start it, or adopt ``process`` when it already runs."""
        if unit.name in self._watches:
            raise ValueError(f"a unit named {unit.name!r} is supervised already; use another name")
        watch = _Watch(unit, tier, delay_s=self.policy.initial_delay_s)
        self._watches[unit.name] = watch
        proc = process if process is not None else unit.start()
        self._running(watch, proc)
        return proc

    def record(self, name: str) -> UnitRecord:
        w = self._watches[name]
        proc = self.processes.get(name)
        return UnitRecord(
            process=name,
            state=w.state,
            pid=proc.pid if proc is not None and w.state == "running" else 0,
            restarts=w.restarts,
            last_exit=w.last_exit,
            last_exit_at=w.last_exit_at,
        )

    def records(self) -> list[UnitRecord]:
        return [self.record(name) for name in self._watches]

    # --- polling -------------------------------------------------------------------------------

    def poll(self) -> None:
        """Notice exits, start restarts that are due; raise :class:`SupervisorError` when the
        policy gives up on a unit. Does nothing once :meth:`stop` began."""
        if self._stopping:
            return
        now = self.clock()
        for name, w in self._watches.items():
            if w.state == "gave_up":
                continue
            if w.due_at is not None:
                if now >= w.due_at:
                    self._restart(w)
                continue
            proc = self.processes[name]
            if proc is not w.watched:  # started again from outside: watch the new one
                w.watched, w.started_at = proc, now
            code = proc.poll()
            if code is not None:
                self._exited(w, describe_exit(code), code)

    def _exited(self, w: _Watch, how: str, code: int | None) -> None:
        p = self.policy
        now = self.clock()
        uptime = now - w.started_at
        w.last_exit, w.last_exit_at = how, time.time()
        if uptime >= p.reset_after_s:
            w.delay_s = p.initial_delay_s
        while w.recent and now - w.recent[0] > p.window_s:
            w.recent.popleft()
        name = w.unit.name
        why = ""
        if code in p.fatal_exit_codes:
            why = f"exit code {code} means it refused its configuration at boot"
        elif len(w.recent) >= p.max_restarts:
            why = f"{len(w.recent)} restarts within {p.window_s:.0f} s (max_restarts)"
        if why:
            w.state = "gave_up"
            self._notify(w, restarted=False)
            self._say(w, f"{name} {how} after {uptime:.1f} s; giving up: {why}")
            raise SupervisorError(
                f"process {name} {how} after {uptime:.1f} s; gave up ({why}). Fix the cause "
                f"(its log: {w.unit.log_path}) and start again. Log tail:\n"
                f"{log_tail(w.unit.log_path)}"
            )
        w.state, w.due_at = "restarting", now + w.delay_s
        self._say(
            w,
            f"{name} {how} after {uptime:.1f} s; restart {w.restarts + 1} in {w.delay_s:.1f} s",
        )
        w.delay_s = min(p.max_delay_s, max(w.delay_s * 2, p.initial_delay_s))
        self._notify(w, restarted=False)

    def _restart(self, w: _Watch) -> None:
        w.due_at = None
        w.restarts += 1
        w.recent.append(self.clock())
        try:
            proc = w.unit.start()
        except (MultiLoraError, OSError) as exc:
            w.started_at = self.clock()
            self._notify(w, restarted=True)
            self._exited(w, f"failed to start ({exc})", None)
            return
        self._running(w, proc)
        self._say(w, f"{w.unit.name} restarted (attempt {w.restarts}, pid {proc.pid})")
        self._notify(w, restarted=True)

    def _running(self, w: _Watch, proc: Process) -> None:
        self.processes[w.unit.name] = proc
        w.watched, w.started_at, w.state = proc, self.clock(), "running"

    def _say(self, w: _Watch, text: str) -> None:
        line = f"multilora up: {text}"
        print(line, file=self.out, flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(w.unit.log_path, "a") as f:
            f.write(f"{stamp} [supervisor] {line}\n")

    def _notify(self, w: _Watch, *, restarted: bool) -> None:
        record = self.record(w.unit.name)
        for o in self.observers:
            o.changed(record, restarted=restarted)

    # --- stopping ------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm stop: per tier, highest first, SIGTERM every process, wait up to ``timeout_s``
        in all, SIGKILL what is left. Never restarts anything afterwards."""
        self._stopping = True
        deadline = self.clock() + timeout_s
        for tier in sorted({w.tier for w in self._watches.values()}, reverse=True):
            names = [n for n, w in self._watches.items() if w.tier == tier]
            procs = [self.processes[n] for n in names if n in self.processes]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - self.clock()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d ignored SIGTERM until the deadline: SIGKILL", proc.pid)
                    proc.kill()
                    proc.wait()
            for name in names:
                w = self._watches[name]
                w.state, w.due_at = "stopped", None
                self._notify(w, restarted=False)


# --- observers ---------------------------------------------------------------------------------


class RestartCounter:
    """``multilora_up_restarts_total{process}``: restarts started by the supervisor (every unit's
    series exists from 0, so ``increase()`` sees the first restart)."""

    def __init__(self, registry: CollectorRegistry, names: Sequence[str] = ()) -> None:
        self.total = Counter(
            "multilora_up_restarts_total",
            "Processes restarted by `multilora up`'s supervisor after they exited.",
            ["process"],
            registry=registry,
        )
        for name in names:
            self.total.labels(name)

    def changed(self, record: UnitRecord, *, restarted: bool) -> None:
        if restarted:
            self.total.labels(record.process).inc()


def supervisor_key(streams: Streams) -> str:
    """Hash ``<ns>:supervisor``: process name -> JSON :class:`UnitRecord` (``up`` writes it)."""
    return streams.key("supervisor")


class RedisRecorder:
    """Writes each unit's record to :func:`supervisor_key`. While Redis is unreachable (it is
    one of the units) records wait in memory; :meth:`flush` (each poll) writes them later."""

    def __init__(self, client: redis.Redis, streams: Streams) -> None:
        self.client = client
        self.key = supervisor_key(streams)
        self.pending: dict[str, UnitRecord] = {}

    def reset(self) -> None:
        """Forget a previous ``up``'s records (a fresh ``up`` counts from zero)."""
        self.client.delete(self.key)

    def changed(self, record: UnitRecord, *, restarted: bool) -> None:
        self.pending[record.process] = record
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        mapping = {name: msgspec.json.encode(r) for name, r in self.pending.items()}
        try:
            self.client.hset(self.key, mapping=mapping)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.debug("supervisor records wait for Redis (%s)", exc)
            return
        self.pending.clear()


def read_supervisor(client: redis.Redis, streams: Streams) -> dict[str, UnitRecord]:
    """The records ``up`` wrote, by process name (empty when no supervisor runs here)."""
    raw = client.hgetall(supervisor_key(streams))
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): msgspec.json.decode(v, type=UnitRecord)
        for k, v in raw.items()
    }
