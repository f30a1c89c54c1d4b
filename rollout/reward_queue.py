"""Slow rewards on RQ: score reward terms on ``rewards`` worker processes, with a deadline.

Rewards registered ``remote=True`` (e.g. a slow verifier) are scored by :class:`RQRewardRunner`
instead of in the rollout worker: one RQ job per (completion, term) on the queue
``f"{queue_prefix}:{reward_name}"``, so operators can run and scale workers per reward class
(:func:`make_worker`). The runner enqueues a whole batch at once, then waits for all results with
*one* deadline of ``timeout_s`` seconds (a blocking ``XREAD`` on the jobs' result streams, no
polling). A job that has not finished by then is cancelled and its term comes back failed with
reason ``"timeout after Xs"``; a job that raised comes back failed with the exception's last
line. Failures confine to their sample; the runner never raises for them.

Security: workers run :func:`score_term_job`, a fixed function of this module, which looks the
reward up in a fresh :func:`rollout.reward_builtins.builtin_registry` by name; nothing named in
a job or an event is imported. (Operator entry-point rewards therefore run in-process only.)

Wire format: job arguments and results are JSON (``rq.serializers.JSONSerializer``), so payloads
are inspectable and no pickle crosses Redis. Workers must use the same serializer; build them with
:func:`make_worker` or run ``rq worker -S rq.serializers.JSONSerializer <queues>``.

redis-py: ``socket_timeout`` on the connection must exceed ``timeout_s`` (the longest blocking
read), else the read times out first; the constructor checks it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.worker.base import BaseWorker

from events.errors import ConfigError
from rollout.reward_builtins import builtin_registry
from rollout.rewards import TermRequest, TermValue, evaluate_term


def score_term_job(request: dict[str, Any]) -> dict[str, Any]:
    """RQ job: score one :class:`TermRequest` (as JSON builtins); returns a :class:`TermValue`.

    Unknown reward names and bad parameters raise :class:`rollout.rewards.RewardError`, which
    fails the job (the runner records it); reward-function errors come back as failed values.
    """
    req = msgspec.convert(request, TermRequest)
    entry = builtin_registry().get(req.spec.name)
    entry.validate(req.spec.params)
    value = evaluate_term(entry, req.spec.params, req.completion, req.item)
    return msgspec.to_builtins(value)  # type: ignore[no-any-return]


def queue_name(queue_prefix: str, reward_name: str) -> str:
    """The RQ queue that scores ``reward_name``."""
    return f"{queue_prefix}:{reward_name}"


def make_worker(
    redis_conn: Any,
    queue_prefix: str,
    reward_names: Sequence[str],
    *,
    worker_class: type[BaseWorker] = Worker,
    name: str | None = None,
) -> BaseWorker:
    """An RQ worker for the queues of ``reward_names`` with the runner's JSON serializer.

    Call ``.work()`` (``burst=True`` in tests) on the result; ``rq.SimpleWorker`` runs jobs
    without forking.
    """
    queues = [
        Queue(queue_name(queue_prefix, n), connection=redis_conn, serializer=JSONSerializer)
        for n in reward_names
    ]
    return worker_class(queues, connection=redis_conn, serializer=JSONSerializer, name=name)


class RQRewardRunner:
    """A :class:`rollout.rewards.RemoteScorer` that scores terms on RQ workers."""

    def __init__(
        self, redis_conn: Any, queue_prefix: str, timeout_s: float, *, result_ttl_s: int = 600
    ) -> None:
        """``redis_conn``: a redis-py client; ``timeout_s``: the deadline for a whole batch."""
        if not timeout_s > 0:
            raise ConfigError(f"reward timeout_s must be > 0, got {timeout_s}")
        if not queue_prefix:
            raise ConfigError("reward queue_prefix must be non-empty, e.g. 'multilora:rewards'")
        socket_timeout = _socket_timeout(redis_conn)
        if socket_timeout is not None and socket_timeout <= timeout_s:
            raise ConfigError(
                f"the Redis connection's socket_timeout ({socket_timeout}s) must exceed the "
                f"reward timeout ({timeout_s}s); raise socket_timeout or lower timeout_s"
            )
        self._redis = redis_conn
        self._prefix = queue_prefix
        self._timeout_s = timeout_s
        self._result_ttl_s = result_ttl_s
        self._queues: dict[str, Queue] = {}

    def _queue(self, reward_name: str) -> Queue:
        if reward_name not in self._queues:
            self._queues[reward_name] = Queue(
                queue_name(self._prefix, reward_name),
                connection=self._redis,
                serializer=JSONSerializer,
            )
        return self._queues[reward_name]

    def submit(self, requests: Sequence[TermRequest]) -> list[Job]:
        """Enqueue one job per request (in order). Jobs not started within ``timeout_s`` expire."""
        job_timeout = math.ceil(self._timeout_s) + 1  # the worker kills a job running past this
        jobs: list[Job] = []
        for req in requests:
            jobs.append(
                self._queue(req.spec.name).enqueue_call(
                    score_term_job,
                    args=(msgspec.to_builtins(req),),
                    timeout=job_timeout,
                    ttl=job_timeout,
                    result_ttl=self._result_ttl_s,
                    failure_ttl=self._result_ttl_s,
                    description=f"reward {req.spec.name} item {req.item.index}",
                )
            )
        return jobs

    def wait(self, jobs: Sequence[Job], *, timeout_s: float | None = None) -> list[TermValue]:
        """Each job's value, waiting at most ``timeout_s`` (default: the runner's) for all."""
        budget = self._timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        results: dict[str, TermValue] = {}
        pending = {Result.get_key(job.id): job for job in jobs}
        while pending:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            try:
                replies = self._redis.xread(dict.fromkeys(pending, "0-0"), block=remaining_ms)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(min(0.2, remaining_ms / 1000))  # Redis restarting: wait, in budget
                continue
            for stream_key, entries in replies or []:
                key = stream_key.decode() if isinstance(stream_key, bytes) else stream_key
                job = pending.pop(key)
                result_id, payload = entries[-1]
                result = Result.restore(
                    job.id, result_id.decode(), payload, self._redis, JSONSerializer
                )
                results[job.id] = _term_value(job, result)
        for job in pending.values():
            _cancel(job)
            results[job.id] = TermValue(failed=True, reason=f"timeout after {budget:g}s")
        return [results[job.id] for job in jobs]

    def score_terms(self, requests: Sequence[TermRequest]) -> list[TermValue]:
        """Submit and wait: one value per request, in order; never raises for job failures."""
        return self.wait(self.submit(requests)) if requests else []


def _socket_timeout(redis_conn: Any) -> float | None:
    """The socket timeout the client's connections use (redis-py 8 defaults to 5 s when unset)."""
    pool = redis_conn.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        return pool.connection_kwargs["socket_timeout"]  # type: ignore[no-any-return]
    return pool.connection_class(**pool.connection_kwargs).socket_timeout  # type: ignore[no-any-return]


def _term_value(job: Job, result: Result) -> TermValue:
    if result.type == Result.Type.SUCCESSFUL:
        return msgspec.convert(result.return_value, TermValue)
    detail = (result.exc_string or "").strip().splitlines()
    reason = detail[-1] if detail else result.type.name.lower()
    return TermValue(failed=True, reason=f"remote job {job.id} failed: {reason}")


def _cancel(job: Job) -> None:
    """Cancel a job we stopped waiting for, so no worker spends time on it later."""
    try:
        job.cancel()
    except InvalidJobOperation:  # it finished or was cancelled in the meantime
        return
