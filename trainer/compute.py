"""The mixed step computing on its own thread, while the trainer's loop goes on.

The trainer's loop (:mod:`trainer.process`) is one handler thread: it reads groups, holds them,
decides what each step meant and commits it. Run inline, every part of that is on the step's
critical path: the next step cannot start while the loop reports and commits the last one, and
groups that land while a step computes wait until it returns before they are even held. So the
loop *launches* a step (:meth:`ComputeThread.submit`) and *lands* it when it is done:

- the job — pack, forward/backward, optimizer, and the device-to-host copies of the slots that
  trained (:func:`trainer.publish.capture_slot`, so the next step may move those slots at once)
  — runs on the compute thread and touches only the model, the optimizer and its own inputs;
- meanwhile the loop holds arriving groups, settles steps whose versions became durable and
  commits;
- when the job is done (its future wakes the loop), the loop decides what it meant, launches
  the next step if one is ready, and only then reports and commits.

**Nothing else may touch the model or the optimizer while a job runs:** admitting or finishing a
run (slot reset), serving a client request (AdamW on its slot, loading weights), writing a
version synchronously. The loop lands the step first (:meth:`trainer.process.TrainerProcess.land`)
or, where landing would put work on the critical path, defers the part that would touch them
(a settle that finishes a run waits until the step has landed).

``threads=False`` runs each job inline (the future is done when :meth:`submit` returns): the
same decisions in the same order, without the overlap (``--no-overlap-steps``: for A/B
measurements, and where the interpreter is the bottleneck — on a CPU with a tiny model the
loop's work beside the job competes with it for the GIL). A data-parallel step
(:class:`trainer.dist_step.DataParallelStep`) runs on the compute thread like any other: rank 0's
collectives may come from any one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Computed(Generic[T]):
    """A job's result and when it finished on the compute thread (``perf_counter`` seconds)."""

    value: T
    finished: float


class ComputeThread:
    """One job at a time off the loop's thread; ``on_done`` is called once a job's future holds
    its result (on the compute thread), to wake the loop. ``device``: the torch device the jobs
    run on (a CUDA device is made current on the compute thread: the current device is per
    thread)."""

    def __init__(
        self,
        *,
        threads: bool = True,
        device: torch.device | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.on_done = on_done
        self._pool: ThreadPoolExecutor | None = None
        if threads:
            self._pool = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="compute",
                initializer=_use_device,
                initargs=(device,),
            )

    def submit(self, job: Callable[[], T]) -> Future[Computed[T]]:
        """Run ``job`` (after any job before it); its future holds the result or its error."""
        if self._pool is None:
            future: Future[Computed[T]] = Future()
            future.set_running_or_notify_cancel()
            try:
                future.set_result(_timed(job))
            except BaseException as exc:
                future.set_exception(exc)
        else:
            future = self._pool.submit(_timed, job)
        if self.on_done is not None:
            on_done = self.on_done
            future.add_done_callback(lambda _: on_done())
        return future

    def close(self) -> None:
        """Wait for the job in flight; stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _timed(job: Callable[[], T]) -> Computed[T]:
    value = job()
    return Computed(value, time.perf_counter())


def _use_device(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
