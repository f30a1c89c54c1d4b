"""The trainer's data-parallel ranks: one ``torch.distributed`` group of ``R`` processes.

Rank 0 is the trainer process (the only one on the bus). It starts ranks ``1..R-1`` as child
processes (``multiprocessing``, ``spawn`` start method), each of which builds the same slot model
from a :class:`RankRecipe` (on CUDA rank ``r`` uses device ``base + r``), joins the group, and then
runs :func:`trainer.dist_step.run_order` for every :class:`~trainer.dist_step.StepOrder` rank 0
scatters, until a :class:`~trainer.dist_step.Stop`. What crosses per step, and when slot state
is handed off, is :mod:`trainer.dist_step`'s.

Two process groups, one rendezvous (a ``TCPStore`` on a free localhost port that rank 0 opens):

- the **step group** (``nccl`` on CUDA, ``gloo`` on CPU; the default group) carries the step's
  collectives — hand-off broadcasts, per-slot sums, gradients — under ``step_timeout_s``;
- the **control group** (``gloo``, no practical timeout) carries the orders. The other ranks
  wait in it between steps, however long rank 0 idles; when rank 0 dies its sockets close and
  they exit (they also die with their parent: ``PR_SET_PDEATHSIG``).

Lifecycle and failure:

- :meth:`RankGroup.start` spawns the ranks and joins the group; :meth:`RankGroup.wait_ready`
  returns once every rank has built its model. A rank that fails to start is named there.
- Before a step, :meth:`RankGroup.check` raises :class:`RankError` for a rank that has exited;
  during one, a collective with a dead peer raises, and :meth:`RankGroup.failure` turns that into
  a :class:`RankError` naming the rank and how it ended. The trainer then exits non-zero and its
  restart resumes from the last durable versions under a new epoch.
- Rank 0 stopping (warm SIGTERM) leaves :meth:`RankGroup.close` to scatter ``Stop`` and join the
  ranks; after an error it kills them. The other ranks ignore SIGINT/SIGTERM (a terminal's
  Ctrl-C reaches the whole process group): only rank 0 decides when they stop.

``torch.distributed`` keeps one default group per OS process, so a process holds at most one
:class:`RankGroup` at a time (tests run theirs one after another). ``R = 1`` never builds one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.process import BaseProcess
from types import TracebackType

import torch
import torch.distributed as dist
from torch import Tensor

from events.errors import MultiLoraError
from trainer.dist_step import RankMessage, StepOrder, Stop, run_order
from trainer.inject import MultiLoraModel
from trainer.lora import Kernel
from trainer.optim import SlotAdamW

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONTROL_TIMEOUT = timedelta(days=365)
"""The control group's: the ranks wait there between steps, as long as rank 0 idles."""


class RankError(MultiLoraError):
    """A trainer rank died or could not start; the trainer must restart to recover."""


@dataclass(frozen=True)
class RankRecipe:
    """How every rank builds the same slot model (the trainer config's model fields)."""

    model_path: str
    num_slots: int
    max_rank: int
    dtype: str = "float32"
    device: str = "cpu"
    kernel: Kernel = "auto"
    torch_threads: int = 0
    log_level: str = "INFO"

    def device_of(self, rank: int) -> torch.device:
        """Rank ``r``'s device: ``cuda:(base + r)`` on CUDA, the configured device otherwise."""
        device = torch.device(self.device)
        if device.type != "cuda":
            return device
        return torch.device("cuda", (device.index or 0) + rank)

    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"

    def build(self, rank: int) -> tuple[MultiLoraModel, SlotAdamW]:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        model = MultiLoraModel.from_pretrained(
            self.model_path,
            self.num_slots,
            self.max_rank,
            dtype=getattr(torch, self.dtype),
            device=self.device_of(rank),
            kernel=self.kernel,
        )
        return model, SlotAdamW(model.store, model.table)


class RankGroup:
    """One rank's handle on the group (rank 0's also owns the child processes).

    Implements :class:`trainer.dist_step.RankComm`. Build rank 0's with :meth:`start`.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        control: dist.ProcessGroup,
        processes: Sequence[BaseProcess] = (),
    ) -> None:
        self._rank = rank
        self._world = world
        self._control = control
        self._processes = list(processes)  # rank r is processes[r - 1]
        self._closed = False

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        recipe: RankRecipe,
        world: int,
        *,
        step_timeout_s: float = 600.0,
        join_timeout_s: float = 600.0,
    ) -> RankGroup:
        """Rank 0: spawn ranks ``1..world-1`` and join the group with them.

        Call it from a thread that outlives the group (the process's main thread): the ranks'
        ``PR_SET_PDEATHSIG`` fires when the thread that started them ends.
        """
        if world < 2:
            raise ValueError(f"a rank group needs world >= 2 (got {world}); R=1 runs without one")
        if dist.is_initialized():
            raise RankError("this process already holds a torch.distributed group; close it first")
        join = timedelta(seconds=join_timeout_s)
        store = dist.TCPStore(HOST, 0, world, is_master=True, timeout=join, wait_for_workers=False)
        context = mp.get_context("spawn")
        processes = []
        for rank in range(1, world):
            process = context.Process(
                target=_rank_main,
                args=(rank, world, store.port, recipe, step_timeout_s, join_timeout_s),
                name=f"trainer-rank-{rank}",
            )
            process.start()
            processes.append(process)
            log.info("trainer rank %d/%d started (pid %s)", rank, world, process.pid)
        try:
            control = _join(0, world, store, recipe, step_timeout_s)
        except RuntimeError as exc:  # a rank that died before joining, or the join timed out
            dead = _wait_dead(processes, grace_s=10.0)
            _kill(processes)
            raise RankError(f"trainer ranks could not join: {dead or exc}") from exc
        return cls(0, world, control, processes)

    def wait_ready(self) -> None:
        """Return once every rank has built its model (raises :class:`RankError` if one died)."""
        try:
            dist.barrier(group=self._control)
        except RuntimeError as exc:
            failure = self.failure(exc)
            if failure is None:
                raise
            raise failure from exc
        log.info("trainer ranks ready: %d processes, backend %s", self._world, dist.get_backend())

    # --- RankComm -----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world(self) -> int:
        return self._world

    @property
    def pids(self) -> dict[int, int | None]:
        """The process id of each other rank (rank 0's group only)."""
        return {rank: p.pid for rank, p in enumerate(self._processes, start=1)}

    def scatter(self, messages: Sequence[RankMessage] | None) -> RankMessage:
        out: list[RankMessage | None] = [None]
        inputs = list(messages) if messages is not None else None
        dist.scatter_object_list(out, inputs, src=0, group=self._control)
        if out[0] is None:
            raise RankError(f"rank {self._rank} received no message from rank 0")
        return out[0]

    def broadcast_(self, tensor: Tensor) -> None:
        dist.broadcast(tensor, src=0)

    def sum_stats(self, stats_N_S: Tensor) -> None:
        dist.all_reduce(stats_N_S)

    def sum_grads(self, grads: Sequence[Tensor]) -> None:
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for every slot
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def check(self) -> None:
        dead = _dead(self._processes)
        if dead:
            raise RankError(f"{dead}; the trainer stops (its restart resumes every adapter)")

    def failure(self, exc: BaseException, *, grace_s: float = 10.0) -> RankError | None:
        """The :class:`RankError` naming the rank that died (waiting up to ``grace_s`` for a rank
        whose connection broke to be reported dead), or ``None`` if every rank lives."""
        dead = _wait_dead(self._processes, grace_s=grace_s)
        if not dead:
            return None
        return RankError(f"{dead} ({exc}); the trainer stops (its restart resumes every adapter)")

    # --- stopping -----------------------------------------------------------------------------

    def close(self, *, graceful: bool = True) -> None:
        """Rank 0: stop the other ranks (``Stop``, then join; killed if they do not leave, or at
        once when not ``graceful``); every rank: leave the group."""
        if self._closed:
            return
        self._closed = True
        if self._rank == 0:
            if graceful and not _dead(self._processes):
                try:
                    self.scatter([Stop()] * self._world)
                except RuntimeError as exc:
                    log.warning("trainer ranks: stop message failed (%s); killing them", exc)
                for process in self._processes:
                    process.join(timeout=30)
            _kill(self._processes)
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(graceful=exc_type is None)


def _dead(processes: Sequence[BaseProcess]) -> str:
    """``"trainer rank 1 (pid 123) was killed by signal 9"`` for each dead rank, joined."""
    dead = []
    for rank, process in enumerate(processes, start=1):  # rank r is processes[r - 1]
        code = process.exitcode
        if code is None:
            continue
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        dead.append(f"trainer rank {rank} (pid {process.pid}) {how}")
    return "; ".join(dead)


def _wait_dead(processes: Sequence[BaseProcess], *, grace_s: float) -> str:
    """:func:`_dead`, after waiting up to ``grace_s`` for one to die if none has yet."""
    if not _dead(processes):
        ready = multiprocessing.connection.wait([p.sentinel for p in processes], timeout=grace_s)
        for process in processes:
            if process.sentinel in ready:  # it closes a moment before the exit status exists
                process.join(timeout=grace_s)
    return _dead(processes)


def _kill(processes: Sequence[BaseProcess]) -> None:
    for process in processes:
        if process.exitcode is None:
            process.kill()  # they ignore SIGTERM: only rank 0 stops them
        process.join(timeout=30)


def _join(
    rank: int, world: int, store: dist.Store, recipe: RankRecipe, step_timeout_s: float
) -> dist.ProcessGroup:
    """Join the step group (the default one) and the control group; return the control group."""
    device = recipe.device_of(rank)
    options: dict[str, object] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device
    dist.init_process_group(
        recipe.backend(),
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=step_timeout_s),
        **options,  # type: ignore[arg-type]
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if control is None:
        raise RankError(f"rank {rank} is not a member of the control group")
    return control


def _rank_main(
    rank: int,
    world: int,
    port: int,
    recipe: RankRecipe,
    step_timeout_s: float,
    join_timeout_s: float,
) -> None:
    """A child rank: join, build the model, then run rank 0's orders until ``Stop``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=recipe.log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"
    )
    store = dist.TCPStore(
        HOST, port, world, is_master=False, timeout=timedelta(seconds=join_timeout_s)
    )
    control = _join(rank, world, store, recipe, step_timeout_s)
    group = RankGroup(rank, world, control)
    model, optimizer = recipe.build(rank)
    dist.barrier(group=control)  # ready
    steps = 0
    try:
        while True:
            match group.scatter(None):
                case Stop(reason=reason):
                    log.info("rank %d stopping after %d steps: %s", rank, steps, reason)
                    break
                case StepOrder() as order:
                    run_order(model, optimizer, order, group)
                    steps += 1
    finally:
        group.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphaned ranks)."""
    if not sys.platform.startswith("linux"):
        return
    parent = mp.parent_process()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)
