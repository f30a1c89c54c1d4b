"""Merging concurrent HTTP requests into engine batches (one batching thread).

The first waiting request opens a batch, which closes after ``max_wait_s`` or at
``max_batch_rows`` rows, and runs as one :meth:`~rollout.engine.Engine.generate` call (a mixed
batch across adapters). When a batch fails for a caller's reason (an engine refusal: an unknown
adapter, a bad request), its jobs run again one by one, so only the offending caller gets the
error; an unexpected failure fails every caller of that batch (HTTP 500) and the thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from events.errors import MultiLoraError
from rollout.engine import Engine, GenerateRequest, GenerateResult

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    requests: list[GenerateRequest]
    done: threading.Event
    results: list[GenerateResult] | None = None
    error: BaseException | None = None


class Batcher:
    """Merges concurrent ``submit`` calls into engine batches (one batching thread)."""

    def __init__(
        self, engine: Engine, *, max_batch_rows: int = 256, max_wait_s: float = 0.005
    ) -> None:
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.history: deque[tuple[int, int]] = deque(maxlen=1024)  # (jobs, rows) per batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rollout-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def submit(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Queue ``requests`` as one job; block until its batch ran; re-raise its error."""
        job = _Job(requests=requests, done=threading.Event())
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        if job.results is None:
            raise MultiLoraError("internal: batch finished without results")
        return job.results

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, rows = [first], len(first.requests)
            deadline = time.monotonic() + self.max_wait_s
            stopping = False
            while rows < self.max_batch_rows:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
                rows += len(job.requests)
            self._run_jobs(jobs)
            if stopping:
                return

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Run jobs as one batch; if it fails for a caller's reason, run them one by one so
        only the offending job gets the error."""
        try:
            results = self.engine.generate([r for job in jobs for r in job.requests])
        except MultiLoraError as err:
            if len(jobs) == 1:
                self._finish(jobs[0], error=err)
                return
            for job in jobs:
                self._run_jobs([job])
            return
        except Exception as err:  # a bug: fail these calls loudly (HTTP 500), keep serving
            logger.exception("engine.generate failed")
            for job in jobs:
                self._finish(job, error=err)
            return
        self.history.append((len(jobs), len(results)))
        offset = 0
        for job in jobs:
            self._finish(job, results=results[offset : offset + len(job.requests)])
            offset += len(job.requests)

    @staticmethod
    def _finish(
        job: _Job,
        *,
        results: list[GenerateResult] | None = None,
        error: BaseException | None = None,
    ) -> None:
        job.results, job.error = results, error
        job.done.set()
