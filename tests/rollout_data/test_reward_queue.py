"""Slow rewards on RQ against a real Redis-protocol server: remote scoring, failures, timeouts."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis
from rq import SimpleWorker

from events.errors import ConfigError
from events.specs import DatasetSpec, RewardSpec
from rollout.data import PromptItem, open_source
from rollout.reward_builtins import builtin_registry
from rollout.reward_queue import RQRewardRunner, make_worker, queue_name
from rollout.rewards import RewardComposite, TermRequest, TermValue

pytestmark = pytest.mark.bus


def chain_sum_items(k: int) -> list[PromptItem]:
    spec = DatasetSpec(kind="reasoning_gym", name="chain_sum", size=k, seed=5)
    src = open_source(spec, allowed_roots=[])
    return [src[i] for i in range(k)]


def request(name: str, completion: str, item: PromptItem) -> TermRequest:
    return TermRequest(spec=RewardSpec(name=name), completion=completion, item=item)


def test_jobs_are_scored_by_a_worker(redis_conn: redis.Redis, queue_prefix: str) -> None:
    right, wrong = chain_sum_items(2)
    runner = RQRewardRunner(redis_conn, queue_prefix, timeout_s=10)
    jobs = runner.submit(
        [
            request("reasoning_gym", right.label, right),
            request("reasoning_gym", f"<answer>{int(wrong.label) + 1}</answer>", wrong),
            request("math", "#### 3", PromptItem(index=0, prompt="q", label="3")),
            request("no_such_reward", "x", right),
        ]
    )
    names = ("reasoning_gym", "reasoning_gym", "math", "no_such_reward")
    assert [j.origin for j in jobs] == [queue_name(queue_prefix, n) for n in names]
    worker = make_worker(
        redis_conn,
        queue_prefix,
        ["reasoning_gym", "math", "no_such_reward"],
        worker_class=SimpleWorker,
    )
    worker.work(burst=True)
    values = runner.wait(jobs)
    assert values[:3] == [TermValue(value=1.0), TermValue(value=0.0), TermValue(value=1.0)]
    assert values[3].failed
    assert "RewardError: unknown reward 'no_such_reward'" in values[3].reason


def test_reward_failures_come_back_as_values(redis_conn: redis.Redis, queue_prefix: str) -> None:
    """A reward that raises on the worker is a failed value, not a failed job."""
    runner = RQRewardRunner(redis_conn, queue_prefix, timeout_s=10)
    jobs = runner.submit(
        [request("reasoning_gym", "1", PromptItem(index=3, prompt="q", label="1"))]
    )
    make_worker(redis_conn, queue_prefix, ["reasoning_gym"], worker_class=SimpleWorker).work(
        burst=True
    )
    (value,) = runner.wait(jobs)
    assert value.failed and "RewardError" in value.reason and "item 3" in value.reason


def test_timeout_is_recorded_and_job_cancelled(redis_conn: redis.Redis, queue_prefix: str) -> None:
    """No worker listens: every term fails with the timeout after about timeout_s."""
    item = chain_sum_items(1)[0]
    runner = RQRewardRunner(redis_conn, queue_prefix, timeout_s=0.4)
    start = time.monotonic()
    jobs = runner.submit([request("reasoning_gym", item.label, item)] * 3)
    values = runner.wait(jobs)
    elapsed = time.monotonic() - start
    assert values == [TermValue(failed=True, reason="timeout after 0.4s")] * 3
    assert 0.35 < elapsed < 3.0
    assert all(job.get_status(refresh=True) == "canceled" for job in jobs)
    # a worker that shows up later does not run the cancelled jobs
    worker = make_worker(redis_conn, queue_prefix, ["reasoning_gym"], worker_class=SimpleWorker)
    worker.work(burst=True)
    assert all(job.get_status(refresh=True) == "canceled" for job in jobs)


def test_composite_sends_remote_terms_to_a_worker_process(
    redis_conn: redis.Redis, redis_url: str, queue_prefix: str
) -> None:
    """End to end: a separate worker process scores the remote term while the runner blocks."""
    items = chain_sum_items(3)
    registry = builtin_registry(remote=["reasoning_gym"])
    composite = RewardComposite.from_specs(
        [
            RewardSpec(name="reasoning_gym", weight=1.0),
            RewardSpec(
                name="length_penalty", weight=0.5, params={"max_chars": 8, "buffer_chars": 4}
            ),
        ],
        registry,
    )
    completions = [items[0].label, "<answer>999999</answer>", f"{items[2].label}\n"]
    script = (
        "import redis, rq; from rollout.reward_queue import make_worker; "
        f"conn = redis.Redis.from_url({redis_url!r}, socket_timeout=30); "
        f"make_worker(conn, {queue_prefix!r}, ['reasoning_gym'], worker_class=rq.SimpleWorker)"
        ".work(max_jobs=3)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        runner = RQRewardRunner(redis_conn, queue_prefix, timeout_s=20)
        results = composite.score_batch(completions, items, remote=runner)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.failed for r in results] == [False, False, False]
    assert [r.terms["reasoning_gym"] for r in results] == [1.0, 0.0, 1.0]
    assert results[1].terms["length_penalty"] == -1.0  # 23 characters > max_chars
    assert results[0].total == pytest.approx(1.0 + 0.5 * results[0].terms["length_penalty"])


def test_socket_timeout_must_exceed_the_reward_timeout(redis_url: str) -> None:
    explicit = redis.Redis.from_url(redis_url, socket_timeout=1)
    with pytest.raises(ConfigError, match=r"socket_timeout \(1s\)"):
        RQRewardRunner(explicit, "p", timeout_s=5)
    default = redis.Redis.from_url(redis_url)  # redis-py 8's default: 5 s
    with pytest.raises(ConfigError, match=r"socket_timeout \(5s\)"):
        RQRewardRunner(default, "p", timeout_s=10)
    RQRewardRunner(redis.Redis.from_url(redis_url, socket_timeout=None), "p", timeout_s=10)
    with pytest.raises(ConfigError, match="timeout_s must be > 0"):
        RQRewardRunner(explicit, "p", timeout_s=0)
    with pytest.raises(ConfigError, match="queue_prefix"):
        RQRewardRunner(explicit, "", timeout_s=0.5)
