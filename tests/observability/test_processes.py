"""The process entry points serve their metrics: ``--metrics-port`` on real processes.

A real checkpoint process (``python -m orchestrator.checkpoint``) reads control events and
serves per-adapter series, which disappear when the adapter retires; a real rollout worker
(``python -m rollout.main``, tiny model, real PEFT adapter) loads a version, runs a task and
serves its rollout and bus metrics. Both are scraped over HTTP like Prometheus does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from events.connection import durability_problems
from events.schema import Admitted, Failed, Retired, StepDone, Synced
from events.specs import SamplingSpec
from events.streams import Streams
from ops.models import write_tiny_model
from rollout.worker import TASK_GROUP
from tests.observability.conftest import REPO, free_port, make_spec, step_metrics
from tests.rollout_worker.helpers import admitted, publish, sync, task, write_peft_adapter

pytestmark = pytest.mark.bus
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_scrape(
    port: int, ok: Callable[[Samples], bool], proc: subprocess.Popen[bytes], timeout_s: float = 60.0
) -> Samples:
    deadline = time.monotonic() + timeout_s
    last: Samples = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            last = scrape(port)
        except OSError:
            time.sleep(0.1)
            continue
        if ok(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout_s} s; last scrape: {sorted(last)[:40]}")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_checkpoint_process_serves_adapter_metrics(
    redis_url: str, streams: Streams, rclient: redis.Redis, tmp_path: Path, spawn: Any
) -> None:
    port = free_port()
    unsafe = ["--unsafe-redis"] if durability_problems(rclient) else []
    proc = spawn(
        "orchestrator.checkpoint",
        *("--redis-url", redis_url, "--namespace", streams.namespace),
        *("--artifacts-root", str(tmp_path / "artifacts")),
        *("--checkpoints-root", str(tmp_path / "checkpoints")),
        *("--block-ms", "200", "--metrics-port", str(port), *unsafe),
        name="checkpoint",
    )
    spec = make_spec(steps=10, checkpoint_interval=100)  # no step is due: nothing to promote
    env: dict[str, Any] = {"adapter": "alpha", "registration_id": "r1", "epoch": 1}
    events: list[Any] = [Admitted(**env, slot=0, spec=spec)]
    for k in (1, 2):
        events.append(StepDone(**env, step=k, version=k, metrics=step_metrics(k, 0.4 + 0.1 * k)))
        events.append(Synced(**env, worker="rollout.0", version=k, latency_s=0.3))
    publish(rclient, streams.control, *events)

    def caught_up(s: Any) -> bool:  # the last event (a sync) handled, not only the last step
        sync = get(s, "multilora_adapter_sync_latency_seconds_count", adapter="alpha")
        return get(s, "multilora_adapter_step", adapter="alpha") == 2 and sync == 2

    s = wait_scrape(port, caught_up, proc)
    assert get(s, "multilora_adapter_reward_mean", adapter="alpha") == pytest.approx(0.6)
    assert get(s, "multilora_adapter_steps_total", adapter="alpha") == 2
    assert get(s, "multilora_adapter_sync_latency_seconds_count", adapter="alpha") == 2
    assert get(s, "multilora_adapter_state", adapter="alpha", phase="running") == 1
    control = {"stream": streams.control, "group": "checkpoint"}
    assert get(s, "multilora_bus_group_lag", **control) == 0
    handled = {"stream": streams.control, "type": "adapter.step_done"}
    assert get(s, "multilora_bus_events_handled_total", **handled) == 2
    assert get(s, "process_resident_memory_bytes") is not None  # per-process standard metrics

    ended = Failed(**env, reason="ends the test", step=2)  # failed, then retired: ended
    publish(rclient, streams.control, ended, Retired(**env, slot=0))
    s = wait_scrape(port, lambda s: not any(dict(k[1]).get("adapter") for k in s), proc)
    handled = {"stream": streams.control, "type": "adapter.retired"}
    assert get(s, "multilora_bus_events_handled_total", **handled) == 1


def test_rollout_worker_process_serves_rollout_metrics(
    redis_url: str, streams: Streams, rclient: redis.Redis, tmp_path: Path, spawn: Any
) -> None:
    tiny = write_tiny_model(tmp_path / "tiny", "llama")
    weights = write_peft_adapter(tiny, tmp_path / "artifacts" / "math" / "v0", seed=3)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    (data / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = free_port()
    unsafe = ["--unsafe-redis"] if durability_problems(rclient) else []
    proc = spawn(
        "rollout.main",
        *("--redis-url", redis_url, "--namespace", streams.namespace, "--name", "w0"),
        *("--model", str(tiny), "--allowed-root", str(data), "--block-ms", "200"),
        *("--torch-threads", "1", "--metrics-port", str(port), *unsafe),
        name="rollout",
    )
    # wait until the worker's groups exist (it reads the control log from its start)
    wait_scrape(port, lambda s: get(s, "multilora_rollout_tasks_total", outcome="done") == 0, proc)
    sampling = SamplingSpec(temperature=1.0, max_new_tokens=6)
    publish(
        rclient,
        streams.control,
        admitted("math", "r1", epoch=1),
        sync("math", "r1", 0, weights, epoch=1),
    )
    work = task(
        "math", "r1", weights, epoch=1, prompt_indices=(0, 1), group_size=2, sampling=sampling
    )
    publish(rclient, streams.tasks, work)

    def done(s: Samples) -> bool:
        return get(s, "multilora_rollout_tasks_total", outcome="done") == 1

    s = wait_scrape(port, done, proc)
    assert get(s, "multilora_rollout_samples_total") == 4
    assert (get(s, "multilora_rollout_tokens_generated_total") or 0) > 0
    assert get(s, "multilora_rollout_adapter_load_seconds_count") == 1
    assert get(s, "multilora_rollout_adapters_loaded") == 1
    assert get(s, "multilora_rollout_generation_seconds_count") == 1
    tasks = {"stream": streams.tasks, "group": TASK_GROUP}
    assert get(s, "multilora_bus_group_lag", **tasks) == 0
    handled = {"stream": streams.tasks, "type": "rollout.task"}
    assert get(s, "multilora_bus_events_handled_total", **handled) == 1
