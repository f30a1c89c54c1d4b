"""A chaos harness over the real local stack: adapters come and go while processes are killed.

:class:`ChaosStack` wraps a started :class:`tests.e2e.harness.LiveStack` (embedded Redis,
trainer, rollout workers, checkpointer) and adds what the stack does not start: an RQ
``rewards`` worker (``multilora rewards --reward regex``; the rollout workers are started with
``--remote-reward regex``, so every adapter rewarded by the built-in ``regex`` is scored there,
:mod:`rollout.reward_queue`). It then plays a scenario (:class:`Plan`: register at start or once
another adapter reached a step or ended, cancel at a step) and, meanwhile, SIGKILLs a random
process — Redis included — at random moments, restarting it as a supervisor would: the same
command line and log file; for Redis the same port and data directory, so the AOF replays.

Chaos policy (:class:`ChaosOptions`): the next kill comes ``kill_gap_s`` (uniform) after the
last restart, but only once the run made progress since the last kill (a new ``step_done`` or
final checkpoint): killing faster than the processes can start would prove nothing but
starvation. A victim stays dead ``down_s`` (uniform). The harness is also the supervisor of
processes that exit on their own (``exits``): they are restarted (command line and environment
as the stack started them) at most once per
``restart_backoff_s``. Kills stop once every adapter has ended and been finally checkpointed.
(The stack's own supervisor, :mod:`ops.supervise`, acts only when :meth:`ops.launch.Stack.check`
runs, which the harness never calls: restarts are the harness's alone, so they are counted.)

Three observer consumer groups that never read (on the control log, ``rollout.tasks`` and
``rollout.groups``) keep every entry readable: trimming (:mod:`events.trim`, the control log's
compaction) never passes a group's floor, and a consumer-less group is destroyed only after
``events.trim.GroupJanitor``'s retention (a day), far longer than any chaos run.
:meth:`ChaosStack.history` reads the run back as a :class:`tests.chaos.history.History`, with
every existing checkpoint verified against its manifest and restored into a fresh slot through
the trainer's own restore path (:func:`restore_checkpoints`).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import redis

from events.codec import Decoder, new_id
from events.schema import (
    CheckpointSaved,
    ControlEvent,
    DeadLetter,
    GroupEvent,
    RolloutGroup,
    RolloutTask,
    TaskEvent,
)
from events.specs import AdapterSpec
from ops.launch import LogFollower, StackOptions
from orchestrator.lifecycle import AdapterState, is_ended
from tests.chaos.history import CheckpointFacts, History
from tests.e2e.harness import ROOT, LiveStack, stack_options

OBSERVER = "chaos-observer"
REMOTE_REWARD = "regex"
"""The built-in reward the rollout workers send to the RQ ``rewards`` worker."""
KINDS = ("redis", "trainer", "rollout", "checkpoint", "rewards")
"""Process kinds a kill may pick (``rollout`` picks one of the workers)."""
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

T = TypeVar("T")


class ChaosOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the harness kills (see the module doc). ``victims`` empty: no random kills (a test
    then kills at controlled moments itself); ``timeout_s``: the whole scenario's deadline;
    ``wait_for_finals``: the run ends only once every completed adapter has its final checkpoint
    (off for a broken trainer whose versions cannot be checkpointed)."""

    seed: int = 0
    kill_gap_s: tuple[float, float] = (3.0, 8.0)
    down_s: tuple[float, float] = (0.2, 1.5)
    victims: tuple[str, ...] = KINDS
    restart_backoff_s: float = 2.0
    sample_every_s: float = 1.0
    timeout_s: float = 150.0
    wait_for_finals: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.victims) - set(KINDS))
        if unknown:
            raise ValueError(f"victims {unknown} are not process kinds; use some of {KINDS}")
        for name, (lo, hi) in (("kill_gap_s", self.kill_gap_s), ("down_s", self.down_s)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)} must be (low, high) with 0 <= low <= high")


@dataclass(frozen=True)
class Plan:
    """One adapter of a scenario: registered at the start (``after=""``) or once adapter
    ``after`` (its latest registration) reached ``after_step`` (0: once it ended); cancelled
    once it reached ``cancel_at`` (0: never)."""

    name: str
    spec: AdapterSpec
    after: str = ""
    after_step: int = 0
    cancel_at: int = 0


@dataclass
class RunRecord:
    """What the harness did: kills per process kind, own exits per process, registrations
    (``(name, registration id)`` in order), the ones it cancelled, sampled artifact bytes."""

    kills: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    registrations: list[tuple[str, str]] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    artifact_bytes: list[int] = field(default_factory=list)
    duration_s: float = 0.0


def chaos_stack_options(
    run_dir: Path, namespace: str, data_dir: Path, model: Path, **overrides: Any
) -> StackOptions:
    """:func:`tests.e2e.harness.stack_options` with two rollout workers, three slots, and the
    ``regex`` reward scored remotely (``--remote-reward``, a 10 s deadline per batch)."""
    base = stack_options(run_dir, namespace, data_dir, model, workers=2, num_slots=3)
    remote = ("--remote-reward", REMOTE_REWARD, "--reward-timeout-s", "10")
    extra = {**base.extra_args, "rollout": (*base.extra_args["rollout"], *remote)}
    return msgspec.structs.replace(base, extra_args=extra, **overrides)


def rewards_command(live: LiveStack, rewards: Sequence[str]) -> list[str]:
    """The ``multilora rewards`` command line serving ``rewards`` on the stack's bus."""
    bus = [
        "--redis-url",
        live.stack.redis_url_for("rewards"),
        "--namespace",
        live.streams.namespace,
    ]
    names = [a for r in rewards for a in ("--reward", r)]
    return [sys.executable, "-m", "ops.cli", "rewards", *bus, *names]


def tree_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (0 when missing); files vanishing meanwhile skipped."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
    return total


class ChaosStack:
    """A live stack plus a rewards worker, a supervisor and a chaos monkey (module doc)."""

    def __init__(
        self,
        live: LiveStack,
        options: ChaosOptions,
        *,
        rewards: Sequence[str] = (REMOTE_REWARD,),
        trainer_command: Sequence[str] = (),
    ) -> None:
        """``trainer_command``: a replacement for the trainer's ``python -m ops.cli trainer``
        prefix (e.g. ``python -m tests.chaos.broken_trainer --break MODE trainer``); the trainer
        the stack started is killed before anything is registered and started that way."""
        if "redis" in options.victims and live.stack.server is None:
            raise ValueError("Redis is a victim but the stack uses REDIS_URL; unset REDIS_URL")
        self.live = live
        self.options = options
        self.rng = random.Random(options.seed)
        self.record = RunRecord()
        self.client = live.client
        self.streams = live.streams
        for stream in (self.streams.control, self.streams.tasks, self.streams.groups):
            self.client.xgroup_create(stream, OBSERVER, id="0", mkstream=True)
        self.follower = LogFollower(self.client, self.streams)
        self.restart_due: dict[str, float] = {}  # killed on purpose -> when to restart it
        self._last_restart: dict[str, float] = {}
        # the environment the stack gives each role (its Redis user's URL): asked of the stack,
        # not read from /proc, which misses a process that happens to be restarting just now
        self._envs = {
            name: live.stack.child_env(_argv(proc)[3])
            for name, proc in live.stack.procs.items()
            if name != "redis"
        }
        self.respawn("rewards", rewards_command(live, rewards))
        if trainer_command:
            old = live.stack.procs["trainer"]
            live.kill("trainer")
            self.respawn("trainer", [*trainer_command, *_argv(old)[4:]])

    # --- processes -----------------------------------------------------------------------------

    def respawn(self, name: str, args: Sequence[str]) -> None:
        """Start process ``name`` with ``args`` and the environment the stack gives its role
        (:meth:`ops.launch.Stack.child_env`), its output appended to ``logs/<name>.log``."""
        stack = self.live.stack
        log = open(stack.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115
        stack.logs.append(log)  # closed by the stack's exit
        threads = stack.options.torch_threads
        env = self._envs.get(name) or {
            **os.environ,
            **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
        }
        self._envs[name] = env
        stack.procs[name] = subprocess.Popen(
            list(args), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        self.live.down.discard(name)
        self._last_restart[name] = time.monotonic()

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (``"redis"``: the server); it stays down until :meth:`restart` (or,
        inside :meth:`run`, until its restart is due)."""
        if name == "redis":
            server = self.live.stack.server
            if server is None:
                raise ValueError("the stack uses REDIS_URL: its Redis is not ours to kill")
            server.kill()
        else:
            self.live.kill(name)
        self.restart_due[name] = float("inf")

    def restart(self, name: str) -> None:
        """Start ``name`` again exactly as before (Redis: same port and data dir, AOF replays)."""
        if name == "redis":
            server = self.live.stack.server
            if server is None:
                raise ValueError("the stack uses REDIS_URL: its Redis is not ours to restart")
            server.start()
            if server.process is not None and name in self.live.stack.procs:
                self.live.stack.procs[name] = server.process  # what the stack stops at exit
        else:
            self.respawn(name, _argv(self.live.stack.procs[name]))
        self.restart_due.pop(name, None)
        self._last_restart[name] = time.monotonic()

    def supervise(self) -> None:
        """Restart every process that exited on its own (counted in ``exits``), with backoff."""
        now = time.monotonic()
        for name, proc in list(self.live.stack.procs.items()):
            if name in self.restart_due or proc.poll() is None:
                continue
            if now - self._last_restart.get(name, 0.0) < self.options.restart_backoff_s:
                continue
            self.record.exits[name] += 1
            self.restart(name)

    def bus(self, call: Callable[[], T], timeout_s: float = 60.0) -> T:
        """``call()`` on the bus, retried while Redis is unreachable (it may be restarting)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return call()
            except REDIS_ERRORS:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # --- the run -------------------------------------------------------------------------------

    def _victim(self) -> str:
        """A random process of a random kind among the kinds killed least so far (so a run of
        ``len(victims)`` kills has killed every kind once)."""
        fewest = min(self.record.kills[k] for k in self.options.victims)
        kind = self.rng.choice([k for k in self.options.victims if self.record.kills[k] == fewest])
        if kind == "rollout":
            workers = [n for n in self.live.stack.procs if n.startswith("rollout.")]
            return self.rng.choice(sorted(workers))
        return kind

    def _progress(self, states: Iterable[AdapterState]) -> int:
        return sum(s.step for s in states) + len(self.follower.final_checkpoints)

    def _done(self, states: dict[str, AdapterState], pending: Sequence[Plan]) -> bool:
        """Every plan registered and ended; every registration that trained and completed has
        its final checkpoint."""
        ids = [rid for _, rid in self.record.registrations]
        if pending or any(rid not in states or not is_ended(states[rid]) for rid in ids):
            return False
        trained = {
            rid for rid in ids if states[rid].epoch >= 1 and states[rid].final_step is not None
        }
        return not self.options.wait_for_finals or trained <= self.follower.final_checkpoints

    def run(
        self,
        plans: Sequence[Plan],
        *,
        extend: Callable[[float, dict[str, AdapterState]], Sequence[Plan]] | None = None,
        on_tick: Callable[[ChaosStack, dict[str, AdapterState]], None] | None = None,
    ) -> RunRecord:
        """Play ``plans`` under chaos until every adapter ended (see :meth:`_done`).

        ``extend(elapsed_s, states)`` may add plans on every tick (a long run adds waves);
        ``on_tick(self, states)`` lets a test act at controlled moments. Raises AssertionError
        naming what is unfinished, with log tails, after ``options.timeout_s``.
        """
        o = self.options
        t0 = time.monotonic()
        pending = list(plans)
        latest: dict[str, str] = {}  # adapter name -> its latest registration id
        cancels: dict[str, int] = {}  # registration id -> cancel at step
        progress_at_kill = -1
        next_kill = t0 + self.rng.uniform(*o.kill_gap_s)
        next_sample = t0
        states: dict[str, AdapterState] = {}
        while True:
            now = time.monotonic()
            for name, due in list(self.restart_due.items()):
                if now >= due:
                    self.restart(name)
            self.supervise()
            if now >= next_sample:
                self.record.artifact_bytes.append(tree_bytes(self.live.stack.run_dir / "artifacts"))
                next_sample = now + o.sample_every_s
            if "redis" not in self.restart_due:
                states = dict(self.bus(self.follower.refresh))
                self._register_due(pending, latest, cancels, states)
                self._cancel_due(cancels, states)
                if extend is not None:
                    pending += extend(now - t0, states)
                if on_tick is not None:
                    on_tick(self, states)
                if self._done(states, pending):
                    break
                progress = self._progress(states.values())
                if o.victims and now >= next_kill and progress > progress_at_kill:
                    victim = self._victim()
                    kind = victim.split(".")[0]
                    self.kill(victim)
                    self.restart_due[victim] = now + self.rng.uniform(*o.down_s)
                    self.record.kills[kind] += 1
                    progress_at_kill = progress
                    next_kill = self.restart_due[victim] + self.rng.uniform(*o.kill_gap_s)
            if now - t0 > o.timeout_s:
                raise AssertionError(self._unfinished(states, pending, now - t0))
            time.sleep(0.1)
        for name in list(self.restart_due):
            self.restart(name)
        self.record.duration_s = time.monotonic() - t0
        return self.record

    def _register_due(
        self,
        pending: list[Plan],
        latest: dict[str, str],
        cancels: dict[str, int],
        states: dict[str, AdapterState],
    ) -> None:
        for plan in list(pending):
            if plan.after:
                state = states.get(latest.get(plan.after, ""))
                if state is None:
                    continue
                reached = state.step >= plan.after_step if plan.after_step else is_ended(state)
                if not reached:
                    continue
            rid = new_id()  # chosen here, so a retried XADD registers once
            self.bus(
                partial(self.live.producer.register, plan.name, plan.spec, registration_id=rid)
            )
            pending.remove(plan)
            latest[plan.name] = rid
            self.record.registrations.append((plan.name, rid))
            if plan.cancel_at:
                cancels[rid] = plan.cancel_at

    def _cancel_due(self, cancels: dict[str, int], states: dict[str, AdapterState]) -> None:
        for rid, at in list(cancels.items()):
            state = states.get(rid)
            if state is None or state.step < at:
                continue
            producer = self.live.producer
            self.bus(
                partial(producer.deregister, state.name, registration_id=state.registration_id)
            )
            del cancels[rid]
            self.record.cancelled.add(rid)

    def _unfinished(
        self, states: dict[str, AdapterState], pending: Sequence[Plan], t: float
    ) -> str:
        rows = [
            f"  {name} {rid}: "
            + (f"{s.phase} step {s.step}/{s.steps_total}" if (s := states.get(rid)) else "unseen")
            for name, rid in self.record.registrations
        ]
        finals = sorted(self.follower.final_checkpoints)
        return (
            f"the chaos run did not finish in {t:.0f} s (kills {dict(self.record.kills)}, exits "
            f"{dict(self.record.exits)}); not yet registered: {[p.name for p in pending]}; final "
            f"checkpoints of {finals}\n" + "\n".join(rows) + "\n" + self.live.log_tails(1500)
        )

    # --- reading the run back ------------------------------------------------------------------

    def history(self, *, model: str, max_rank: int) -> History:
        """The run as a :class:`History`: all three streams, the dead letters, and the facts of
        every checkpoint directory that still exists (verified and restored)."""
        control = self._read(self.streams.control, Decoder(ControlEvent))
        groups: list[tuple[str, RolloutGroup]] = self._read(
            self.streams.groups, Decoder(GroupEvent, max_bytes=64 << 20)
        )
        tasks: list[tuple[str, RolloutTask]] = [
            (i, t)
            for i, t in self._read(self.streams.tasks, Decoder(TaskEvent))
            if isinstance(t, RolloutTask)
        ]
        dead = [
            msgspec.json.decode(fields[b"dead"], type=DeadLetter)
            for _, fields in self.bus(lambda: self.client.xrange(self.streams.dead))
        ]
        uris = sorted({e.uri for _, e in control if isinstance(e, CheckpointSaved)})
        existing = [u for u in uris if Path(u).is_dir()]
        return History(
            control=control,
            groups=groups,
            tasks=tasks,
            dead_letters=dead,
            checkpoints=restore_checkpoints(model, max_rank, existing),
            artifact_bytes=tuple(self.record.artifact_bytes),
            cancelled=frozenset(self.record.cancelled),
        )

    def _read(self, stream: str, decoder: Decoder) -> list[tuple[str, Any]]:
        entries = self.bus(lambda: self.client.xrange(stream))
        return [(eid.decode(), decoder.decode(fields, eid.decode())) for eid, fields in entries]


def _argv(proc: subprocess.Popen[bytes]) -> list[str]:
    """The command line a process was started with (the stack starts every one from a list)."""
    return [str(a) for a in proc.args]  # type: ignore[union-attr]


def restore_checkpoints(
    model: str, max_rank: int, uris: Sequence[str]
) -> dict[str, CheckpointFacts]:
    """Verify each checkpoint directory against its manifest, then load it into a fresh slot of
    a one-slot copy of the base model through the trainer's restore path
    (:meth:`trainer.versions.VersionPublisher.restore`): the facts per uri."""
    from events.errors import MultiLoraError
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.checkpoint_store import verify
    from trainer.inject import MultiLoraModel
    from trainer.optim import SlotAdamW
    from trainer.versions import VersionPublisher

    if not uris:
        return {}
    slots = MultiLoraModel.from_pretrained(model, 1, max_rank)
    optimizer = SlotAdamW(slots.store, slots.table)
    scratch = Path(uris[0]).parent
    publisher = VersionPublisher(
        model=slots, optimizer=optimizer, artifacts=ArtifactStore(str(scratch)), base_model=model
    )
    facts: dict[str, CheckpointFacts] = {}
    for uri in uris:
        try:
            manifest = verify(uri)
            run = publisher.restore(manifest.adapter, manifest.registration_id, 0, uri)
        except MultiLoraError as exc:  # a missing or corrupt file, a bad format or manifest
            facts[uri] = CheckpointFacts(uri, error=f"{type(exc).__name__}: {exc}")
            continue
        error = ""
        if (run.step, run.version) != (manifest.step, manifest.version):
            error = (
                f"restored step {run.step} version {run.version}; manifest says step "
                f"{manifest.step} version {manifest.version}"
            )
        elif manifest.cursor is not None and run.cursor.state() != manifest.cursor:
            error = f"restored cursor {run.cursor.state()} != manifest cursor {manifest.cursor}"
        facts[uri] = CheckpointFacts(uri, error=error, step=run.step, version=run.version)
    return facts
