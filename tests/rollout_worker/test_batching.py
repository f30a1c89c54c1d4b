"""The rollout worker batches tasks across adapters: one engine call, the same groups.

``RolloutWorker.run_tasks`` generates the rows of every task it is given in ONE
``backend.generate`` call; ``handle`` holds tasks (``DEFER``) until ``flush`` (the consumer's idle
hook, or ``batch_tasks`` held). What must hold whatever the batch holds: each task's group equals
the group it gets alone, a refused row fails only its own task, a fenced task publishes nothing, an
unreachable engine hands every held task back for a retry, and through the real consumer every
task ends with exactly one group and an ack. Numerics on the embedded engine (tiny random Llama,
real PEFT versions); the state machine alone on the fake backend.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from events.connection import connect, durability_problems
from events.consumer import DEFER, Consumer, Delivery
from events.effects import Effects
from events.errors import HandlerError
from events.schema import DeregisterRequested, RolloutTask
from events.specs import SamplingSpec
from rollout.groups import served_name
from rollout.worker import TASK_GROUP, RolloutWorker
from tests.rollout_worker.helpers import (
    CHAIN_SUM,
    GYM,
    admitted,
    publish,
    read_groups,
    registered,
    task,
)

pytestmark = pytest.mark.bus

LOGPROB_ATOL = 1e-5
"""A row's log-probs in a batch vs alone: equal up to float noise of the padded batch (the same
tolerance the engine's own mixed-batch tests use); tokens, text and rewards are exact."""

TIMING = ("id", "time", "source", "worker", "generate_s")
"""Envelope and timing fields of a ``rollout.group`` that differ between two runs of a task."""


# --- helpers -----------------------------------------------------------------------------------


class CountingGenerate:
    """Wraps a backend's ``generate``: records the number of rows of every call."""

    def __init__(self, backend: Any) -> None:
        self.inner = backend.generate
        self.calls: list[int] = []
        backend.generate = self

    def __call__(self, rows: Sequence[Any]) -> Any:
        self.calls.append(len(rows))
        return self.inner(rows)


class RecordingConsumer:
    """The :class:`~events.consumer.Consumer` methods ``flush`` uses, recorded: ``commits`` holds
    ``(effects, deliveries)`` of each commit with its ack (``complete`` of a deferred entry)."""

    def __init__(self) -> None:
        self.commits: list[tuple[Effects, list[Delivery]]] = []
        self.retries: list[tuple[list[Delivery], str]] = []
        self.together: list[list[Delivery]] = []

    def complete(self, effects: Effects, delivery: Delivery, seconds: float) -> bool:
        assert seconds >= 0
        return self.commit(effects, [delivery])

    def complete_all(self, done: list[tuple[Effects, Delivery]], seconds: float) -> int:
        """One commit of several entries: recorded per entry (``commits``) and as one
        (``together``: the entries of each such commit)."""
        self.together.append([d for _, d in done])
        return sum(self.complete(effects, d, seconds) for effects, d in done)

    def commit(self, effects: Effects, deliveries: list[Delivery]) -> bool:
        self.commits.append((effects, list(deliveries)))
        return True

    def retry_later(self, deliveries: list[Delivery], reason: str) -> None:
        self.retries.append((list(deliveries), reason))


def group_of(effects: Effects) -> dict | None:
    """The ``rollout.group`` an :class:`Effects` publishes, decoded (``None``: publishes none)."""
    published = [c for c in effects.commands if c[0] == "XADD"]
    if not published:
        return None
    (cmd,) = published
    fields = cmd[cmd.index("*") + 1 :]
    return msgspec.json.decode(dict(zip(fields[::2], fields[1::2], strict=True))["event"])


def comparable(group: dict | None) -> tuple[dict, list[list[float]]]:
    """``group`` without envelope and timing fields, and its samples' log-probs apart."""
    assert group is not None, "the task published no group"
    rest = {k: v for k, v in group.items() if k not in TIMING}
    logprobs = []
    groups = []
    for pg in rest["groups"]:
        samples = []
        for s in pg["samples"]:
            logprobs.append(s["logprobs"])
            samples.append({k: v for k, v in s.items() if k != "logprobs"})
        groups.append({**pg, "samples": samples})
    return {**rest, "groups": groups}, logprobs


def assert_same_group(batched: dict | None, alone: dict | None) -> None:
    got, got_lp = comparable(batched)
    want, want_lp = comparable(alone)
    assert got == want
    assert len(got_lp) == len(want_lp)
    for a, b in zip(got_lp, want_lp, strict=True):
        assert len(a) == len(b)
        assert all(abs(x - y) <= LOGPROB_ATOL for x, y in zip(a, b, strict=True))


def samples_of(group: dict | None) -> list[dict]:
    assert group is not None
    return [s for pg in group["groups"] for s in pg["samples"]]


def deliveries(worker: RolloutWorker, tasks: Sequence[RolloutTask]) -> list[Delivery]:
    """``tasks`` as the consumer would hand them over from the task queue."""
    sub = next(s for s in worker.subscriptions() if s.group == TASK_GROUP)
    return [Delivery(sub, f"{i + 1}-0", t, 1) for i, t in enumerate(tasks)]


def mixed_tasks(versions: dict[int, Path]) -> list[RolloutTask]:
    """Four tasks of two registrations, three weight versions and two datasets/rewards."""
    return [
        task("math", "r1", versions[0], epoch=1, seed=1),
        task("code", "r2", versions[2], epoch=1, seed=1, group_size=2),
        task("math", "r1", versions[1], version=1, epoch=1, seed=3, prompt_indices=(2, 0)),
        task(
            "code",
            "r2",
            versions[2],
            epoch=1,
            seed=4,
            dataset=CHAIN_SUM,
            rewards=GYM,
            prompt_indices=(4, 0),
            group_size=2,
        ),
    ]


# --- numerics on the embedded engine -------------------------------------------------------------


def test_a_batch_gives_each_task_the_group_it_gets_alone_in_one_engine_call(
    make_worker, versions
) -> None:
    tasks = mixed_tasks(versions)
    worker = make_worker("batch")
    counted = CountingGenerate(worker.backend)
    batched = [group_of(e) for e in worker.run_tasks(tasks)]
    rows = [len(t.prompt_indices) * t.group_size for t in tasks]
    assert counted.calls == [sum(rows)]  # every task's rows in ONE engine call

    alone_worker = make_worker("alone")
    alone_calls = CountingGenerate(alone_worker.backend)
    alone = [group_of(alone_worker.on_task(t)) for t in tasks]  # same order: same loads
    assert alone_calls.calls == rows
    for t, b, a in zip(tasks, batched, alone, strict=True):
        assert b is not None and b["task_id"] == t.id and b["version"] == t.version
        assert not any(s["failed"] for s in samples_of(b)), samples_of(b)
        assert_same_group(b, a)
    # the batch really mixes policies: the same prompt and row seeds under other weights differ
    by_weights = [samples_of(b)[0]["completion_ids"] for b in batched[:2]]
    assert by_weights[0] != by_weights[1]


def test_a_refused_row_fails_only_its_own_task(make_worker, versions) -> None:
    # a prompt + 600 new tokens exceed the tiny model's 512 positions: the engine refuses the row
    too_long = SamplingSpec(temperature=1.0, max_new_tokens=600)
    good_a = task("math", "r1", versions[0], epoch=1, seed=1)
    bad = task("code", "r2", versions[1], epoch=1, seed=2, sampling=too_long)
    good_b = task("code", "r2", versions[1], epoch=1, seed=3, prompt_indices=(1,))
    worker = make_worker("batch")
    counted = CountingGenerate(worker.backend)
    a, refused, b = (group_of(e) for e in worker.run_tasks([good_a, bad, good_b]))
    assert counted.calls[0] == 9 + 9 + 3  # tried as one batch first

    failed = samples_of(refused)
    assert refused is not None and refused["task_id"] == bad.id and len(failed) == 9
    assert all(s["failed"] and s["completion_ids"] == [] for s in failed)
    assert all("RowRefusedError" in s["reason"] for s in failed)
    assert all("max_position_embeddings 512" in s["reason"] for s in failed)

    alone_worker = make_worker("alone")
    for batched, t in ((a, good_a), (b, good_b)):
        assert not any(s["failed"] for s in samples_of(batched))
        assert_same_group(batched, group_of(alone_worker.on_task(t)))


def test_a_batch_needing_more_versions_than_the_engine_keeps_still_runs(
    make_worker, versions
) -> None:
    # the engine keeps 2 versions per adapter; alone, each of these tasks runs
    tasks = [
        task("math", "r1", versions[v], version=v, epoch=1, seed=v, prompt_indices=(0,))
        for v in range(3)
    ]
    tasks.append(task("code", "r2", versions[0], epoch=1, seed=9, prompt_indices=(1,)))
    alone_worker = make_worker("alone")
    alone = [group_of(alone_worker.on_task(t)) for t in tasks]
    assert all(not s["failed"] for g in alone for s in samples_of(g))

    # newest version first: the older tasks use the newer version their batch-mate loaded
    groups = [group_of(e) for e in make_worker("batch").run_tasks(tasks)]
    for t, g in zip(tasks, groups, strict=True):
        assert g is not None and g["task_id"] == t.id
        assert not any(s["failed"] for s in samples_of(g))


# --- the state machine on the fake backend ------------------------------------------------------


def test_fenced_tasks_in_a_batch_publish_nothing_and_are_acked(
    make_fake_worker, fake_versions
) -> None:
    worker = make_fake_worker("w1", batch_tasks=8)
    for event in (
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        admitted("math", "r1", epoch=2),  # re-admitted: epoch 1 is over
        registered("code", "r2"),
        admitted("code", "r2", epoch=1, slot=1),
        registered("gone", "r3"),
        admitted("gone", "r3", epoch=1, slot=2),
    ):
        worker.on_control(event)
    fresh = task("math", "r1", fake_versions[0], epoch=2, seed=1)
    stale = task("math", "r1", fake_versions[0], epoch=1, seed=2)
    other = task("code", "r2", fake_versions[1], epoch=1, seed=3)
    ended = task("gone", "r3", fake_versions[2], epoch=1, seed=4)
    tasks = [stale, fresh, ended, other]
    consumer = RecordingConsumer()
    worker.consumer = consumer  # type: ignore[assignment]
    held = deliveries(worker, tasks)
    assert all(worker.handle(d) is DEFER for d in held)  # held, not run yet
    assert worker.backend.batches == [] and consumer.commits == []
    # the registration ends while its task waits: fencing is decided when the batch runs
    worker.on_control(DeregisterRequested(adapter="gone", registration_id="r3"))
    worker.flush()

    assert worker.backend.batches == [9 + 9]  # one engine call, the live tasks' rows only
    assert [ds for _, ds in consumer.commits] == [[d] for d in held]  # each with its own group
    assert consumer.together == [held]  # ... all in one commit
    published = {t.id: group_of(e) for t, (e, _) in zip(tasks, consumer.commits, strict=True)}
    assert published[stale.id] is None and published[ended.id] is None
    for t in (fresh, other):
        g = published[t.id]
        assert g is not None and g["task_id"] == t.id and g["epoch"] == t.epoch
        assert not any(s["failed"] for s in samples_of(g))
    assert consumer.retries == [] and worker._batch == []
    assert worker.backend.versions(served_name("gone", "r3")) == ()  # never loaded for it
    # the same batch straight through run_tasks: the same verdicts
    again = worker.run_tasks(tasks)
    assert [bool(e.commands) for e in again] == [False, True, False, True]


def test_an_unreachable_engine_hands_every_held_task_back(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1", batch_tasks=8)
    consumer = RecordingConsumer()
    worker.consumer = consumer  # type: ignore[assignment]
    tasks = [task(f"a{i}", f"r{i}", fake_versions[i], epoch=1, seed=i) for i in range(3)]
    held = deliveries(worker, tasks)
    for d in held:
        assert worker.handle(d) is DEFER
    worker.backend.available = False
    worker.flush()
    (handed_back,) = consumer.retries
    assert handed_back[0] == held  # every held delivery, in order, once
    assert "HandlerError" in handed_back[1] and "engine unavailable" in handed_back[1]
    assert consumer.commits == [] and worker._batch == []  # nothing committed, nothing kept
    worker.flush()  # nothing held: nothing to do
    assert len(consumer.retries) == 1 and consumer.commits == []
    with pytest.raises(HandlerError, match="engine unavailable"):
        worker.run_tasks(tasks)


def test_a_full_batch_runs_at_once(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1", batch_tasks=3)
    consumer = RecordingConsumer()
    worker.consumer = consumer  # type: ignore[assignment]
    tasks = [task(f"a{i % 2}", f"r{i % 2}", fake_versions[i % 2], seed=i) for i in range(4)]
    held = deliveries(worker, tasks)
    for d in held[:2]:
        assert worker.handle(d) is DEFER
    assert consumer.commits == [] and worker.backend.batches == []
    assert worker.handle(held[2]) is DEFER  # the third fills the batch: it runs now
    assert worker.backend.batches == [27]
    assert [ds for _, ds in consumer.commits] == [[d] for d in held[:3]]
    assert all(group_of(e) is not None for e, _ in consumer.commits)
    assert worker.handle(held[3]) is DEFER and len(consumer.commits) == 3  # held again
    worker.flush()
    assert worker.backend.batches == [27, 9] and consumer.commits[3][1] == [held[3]]


def test_without_a_consumer_or_batching_tasks_run_at_once(make_fake_worker, fake_versions) -> None:
    one = task("math", "r1", fake_versions[0], seed=1)
    unbatched = make_fake_worker("w1")  # batch_tasks=1, even with a consumer
    unbatched.consumer = RecordingConsumer()  # type: ignore[assignment]
    unwired = make_fake_worker("w2", batch_tasks=8)  # no consumer to commit a batch with
    for worker in (unbatched, unwired):
        (d,) = deliveries(worker, [one])
        result = worker.handle(d)
        assert isinstance(result, Effects) and group_of(result) is not None
        assert worker.backend.batches == [9] and worker._batch == []


def batching_consumer(redis_url: str, streams, worker: RolloutWorker, **kw: Any) -> Consumer:
    """``worker`` on a real consumer wired as :func:`rollout.main.build` wires it."""
    kw.setdefault("block_ms", 200)
    consumer = Consumer(
        lambda: connect(redis_url),
        streams,
        worker.name,
        worker.subscriptions(),
        worker.handle,
        count=1,
        max_in_flight=worker.batch_tasks + 1,
        on_idle=worker.flush,
        on_stop=worker.flush,
        **kw,
    )
    worker.consumer = consumer
    return consumer


@pytest.mark.timeout(60)  # a held entry never handed back would keep the burst running
def test_an_unreachable_engine_leaves_the_held_entries_pending_on_the_bus(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    worker = make_fake_worker("w1", batch_tasks=8)
    worker.backend.available = False
    tasks = [task(f"a{i}", f"r{i}", fake_versions[i], epoch=1, seed=i) for i in range(3)]
    publish(rclient, streams.tasks, *tasks)
    consumer = batching_consumer(redis_url, streams, worker)
    stats = consumer.run(burst=True)
    consumer.client.close()
    assert stats.retried == 3 and stats.dead_lettered == 0 and stats.handled == 0
    assert read_groups(rclient, streams) == []  # nothing committed
    pending = rclient.xpending_range(streams.tasks, TASK_GROUP, "-", "+", 10)
    assert len(pending) == 3 and all(p["consumer"] == b"w1" for p in pending)  # for a retry


# --- through rollout.main's wiring, the real consumer and Redis -------------------------------


@pytest.mark.timeout(120)  # a held task never committed would keep the burst running
def test_main_build_batches_queued_tasks_and_acks_each_once(
    tiny_dir, data_root, versions, redis_url, streams, rclient, tmp_path
) -> None:
    from events.bootstrap import open_bus
    from rollout.config import load_config
    from rollout.main import build

    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        registered("code", "r2"),
        admitted("code", "r2", epoch=1, slot=1),
    )
    tasks = [
        *mixed_tasks(versions),
        task("math", "r1", versions[0], epoch=1, seed=5, prompt_indices=(1,)),
        task("code", "r2", versions[2], epoch=1, seed=6, prompt_indices=(0, 2)),
    ]
    publish(rclient, streams.tasks, *tasks)  # all queued before the worker starts

    argv = [
        f"--redis-url={redis_url}",
        f"--namespace={streams.namespace}",
        "--name=b1",
        f"--model={tiny_dir}",
        f"--allowed-root={data_root}",
        "--block-ms=200",
        "--max-prompt-tokens=256",
        f"--weights-cache={tmp_path / 'cache'}",
    ]
    if durability_problems(rclient):
        argv.append("--unsafe-redis")
    config = load_config(argv, environ={})
    assert config.batch_tasks == 8  # the process default
    bus = open_bus(config.bus, config.bus.name, role="rollout")
    consumer = build(config, bus)
    worker = consumer.handler.__self__  # type: ignore[attr-defined]
    assert isinstance(worker, RolloutWorker) and worker.consumer is consumer
    counted = CountingGenerate(worker.backend)
    try:
        stats = consumer.run(burst=True)
    finally:
        consumer.client.close()
        bus.client.close()

    groups = read_groups(rclient, streams)
    counts = collections.Counter(g.task_id for g in groups)
    assert counts == {t.id: 1 for t in tasks}, counts  # one group per task, none twice
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0  # every task acked
    assert stats.retried == 0 and stats.dead_lettered == 0 and stats.commits_refused == 0
    assert stats.handled == 4 + len(tasks)  # control events, and each deferred task completed
    assert 1 <= len(counted.calls) < len(tasks), counted.calls  # batched across tasks
    assert sum(counted.calls) == sum(len(t.prompt_indices) * t.group_size for t in tasks)
    by_id = {t.id: t for t in tasks}
    for g in groups:
        t = by_id[g.task_id]
        assert (g.adapter, g.registration_id, g.version, g.worker) == (
            t.adapter,
            t.registration_id,
            t.version,
            "b1",
        )
        assert not any(s.failed for pg in g.groups for s in pg.samples)
