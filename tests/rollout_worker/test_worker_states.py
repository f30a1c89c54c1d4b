"""The rollout worker's state machine on a real bus, with the fake backend (no model).

Fencing by epoch and by ended registration as the lifecycle sees them, syncs answered once per
worker and never for history, and unloading when a registration ends. The numerics of real
generation are tested with the embedded engine in ``test_worker.py``.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from events.codec import Decoder
from events.effects import Effects
from events.errors import HandlerError
from events.schema import (
    Completed,
    ControlEvent,
    DeadLetter,
    DeregisterRequested,
    Failed,
    Retired,
    StepDone,
    Synced,
)
from orchestrator.lifecycle import Phase
from orchestrator.status import WorkerSync
from rollout.groups import served_name
from rollout.worker import TASK_GROUP, SyncError
from tests.rollout_worker.fakes import FakeBackend, as_backend
from tests.rollout_worker.helpers import (
    admitted,
    publish,
    read_control,
    read_groups,
    registered,
    run_burst,
    sync,
    task,
)

pytestmark = pytest.mark.bus
NAME = served_name("math", "r1")


def synced_events(effects: Effects) -> list[Synced]:
    """The ``adapter.synced`` events an :class:`Effects` would ``XADD``."""
    decoder = Decoder(ControlEvent)
    out = []
    for cmd in effects.commands:
        if cmd[0] == "XADD":
            fields = cmd[cmd.index("*") + 1 :]
            event = decoder.decode(dict(zip(fields[::2], fields[1::2], strict=True)))
            if isinstance(event, Synced):
                out.append(event)
    return out


def answers(client, streams) -> list[tuple[str, int]]:
    """``(worker, version)`` of every ``adapter.synced`` on the control log, sorted."""
    return sorted(
        (e.worker, e.version) for e in read_control(client, streams) if isinstance(e, Synced)
    )


def test_the_fake_backend_implements_the_protocol() -> None:
    fake = FakeBackend()
    assert as_backend(fake) is fake  # mypy checks the assignment; this checks it runs


def test_a_task_is_one_batch_and_one_group(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    worker = make_fake_worker("w1")
    publish(rclient, streams.control, registered("math", "r1"), admitted("math", "r1"))
    tasks = [task("math", "r1", fake_versions[0], epoch=1, seed=i) for i in range(2)]
    publish(rclient, streams.tasks, *tasks)
    assert run_burst(redis_url, streams, worker).stats.handled == 4
    assert worker.backend.batches == [9, 9]  # 3 prompts x group_size 3, one batch per task
    groups = {g.task_id: g for g in read_groups(rclient, streams)}
    assert set(groups) == {t.id for t in tasks}
    for group in groups.values():
        assert (group.adapter, group.registration_id, group.epoch, group.version) == (
            "math",
            "r1",
            1,
            0,
        )
        for pg in group.groups:
            assert len({s.completion_ids for s in pg.samples}) > 1  # per-row seeds
            for s in pg.samples:
                assert not s.failed and len(s.logprobs) == len(s.completion_ids) >= 1
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0
    # the same task on another worker with the same weights gives the same samples
    again = make_fake_worker("w2").on_task(tasks[0])
    assert again.commands and worker.backend.versions(NAME) == (0,)


def test_fencing_drops_stale_epochs_and_ended_registrations(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    worker = make_fake_worker("w1")
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        admitted("math", "r1", epoch=2),  # re-admitted after a trainer restart
        registered("old", "r2"),
        admitted("old", "r2", slot=1),
        Failed(adapter="old", registration_id="r2", epoch=1, reason="non-finite loss"),
        Retired(adapter="old", registration_id="r2", epoch=1, slot=1),
        registered("gone", "r3"),
        admitted("gone", "r3", slot=2),
        DeregisterRequested(adapter="gone", registration_id="r3"),
    )
    run_burst(redis_url, streams, worker)  # the control log first: the worker learns the state
    phases = {k: (s.phase, s.epoch) for k, s in worker.states.items()}
    assert phases == {
        "r1": (Phase.ADMITTED, 2),
        "r2": (Phase.RETIRED, 1),
        "r3": (Phase.CANCELLED, 1),
    }
    stale = task("math", "r1", fake_versions[0], epoch=1)
    fresh = task("math", "r1", fake_versions[0], epoch=2)
    retired = task("old", "r2", fake_versions[0], epoch=1)
    cancelled = task("gone", "r3", fake_versions[0], epoch=1)
    unknown = task("new", "r4", fake_versions[0], epoch=1)  # its admission is not read yet: runs
    publish(rclient, streams.tasks, stale, fresh, retired, cancelled, unknown)
    run_burst(redis_url, streams, worker)
    assert sorted(g.task_id for g in read_groups(rclient, streams)) == sorted(
        [fresh.id, unknown.id]
    )
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0  # dropped ones are acked
    assert worker.backend.versions(served_name("old", "r2")) == ()  # never loaded for them
    assert worker.backend.versions(served_name("gone", "r3")) == ()


def test_fencing_follows_the_lifecycle(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1")

    def at(epoch: int):
        return task("math", "r1", fake_versions[0], epoch=epoch)

    # the task queue can run ahead of the control log: a registration not seen yet runs
    assert worker.on_task(at(1)).commands
    assert worker.backend.versions(NAME) == (0,)
    worker.on_control(registered("math", "r1"))
    assert worker.fenced(at(1)) == ""  # registered; its admission under epoch 1 is not read yet
    worker.on_control(admitted("math", "r1", epoch=1))
    assert worker.fenced(at(1)) == ""
    assert worker.fenced(at(0)) == "epoch 0 is older than the registration's epoch 1"
    worker.on_control(admitted("math", "r1", epoch=2))  # resumed under a new epoch
    assert worker.fenced(at(2)) == ""
    assert "older than" in worker.fenced(at(1))
    # a task of a newer epoch than any admission seen moves the fence forward
    assert worker.fenced(at(3)) == ""
    assert "older than" in worker.fenced(at(2))
    worker.on_control(admitted("math", "r1", epoch=3))  # the log catches up
    assert worker.fenced(at(3)) == ""
    worker.on_control(DeregisterRequested(adapter="math", registration_id="r1"))
    assert worker.fenced(at(3)) == "registration 'r1' has ended (cancelled)"
    assert worker.fenced(at(4)) == "registration 'r1' has ended (cancelled)"  # nothing revives it
    assert worker.backend.versions(NAME) == ()  # unloaded
    assert not worker.on_task(at(3)).commands


def test_completing_stops_tasks_and_completion_unloads(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1")
    worker.on_control(registered("math", "r1"))  # steps=2
    worker.on_control(admitted("math", "r1"))
    assert synced_events(worker.on_control(sync("math", "r1", 0, fake_versions[0], epoch=1)))
    assert worker.on_task(task("math", "r1", fake_versions[0], epoch=1)).commands
    worker.on_control(StepDone(adapter="math", registration_id="r1", epoch=1, step=1, version=1))
    assert synced_events(worker.on_control(sync("math", "r1", 1, fake_versions[1], epoch=1)))
    worker.on_control(StepDone(adapter="math", registration_id="r1", epoch=1, step=2, version=2))
    assert worker.states["r1"].phase is Phase.COMPLETING
    assert worker.fenced(task("math", "r1", fake_versions[1], version=1, epoch=1)) == (
        "registration 'r1' has ended (completing)"
    )
    # the final version is still served and answered
    assert synced_events(worker.on_control(sync("math", "r1", 2, fake_versions[2], epoch=1)))
    assert worker.backend.versions(NAME) == (1, 2)
    worker.on_control(Completed(adapter="math", registration_id="r1", epoch=1, step=2, version=2))
    assert worker.backend.versions(NAME) == () and "r1" not in worker.syncs
    assert worker.states["r1"].spec is not None  # completed, still holding its slot
    worker.on_control(Retired(adapter="math", registration_id="r1", epoch=1, slot=0))
    assert worker.states["r1"].phase is Phase.RETIRED
    assert worker.states["r1"].spec is None  # ended: kept as a tombstone
    late = worker.on_control(sync("math", "r1", 2, fake_versions[2], epoch=1), "9-9")
    assert not late.commands and worker.backend.versions(NAME) == ()


def test_sync_loads_the_version_and_publishes_synced(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    worker = make_fake_worker("w1")
    published = time.time() - 0.5
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        sync("math", "r1", 1, fake_versions[1], epoch=1, time=published),
    )
    run_burst(redis_url, streams, worker)
    (s,) = [e for e in read_control(rclient, streams) if isinstance(e, Synced)]
    assert (s.adapter, s.registration_id, s.epoch, s.worker, s.version) == (
        "math",
        "r1",
        1,
        "w1",
        1,
    )
    assert 0.5 <= s.latency_s < 60
    assert worker.backend.versions(NAME) == (1,)
    status = msgspec.json.decode(rclient.hget(streams.status("math"), "sync:w1"), type=WorkerSync)
    assert (status.registration_id, status.version, status.latency_s) == ("r1", 1, s.latency_s)
    assert rclient.sismember(streams.status_index, "math")
    # an older version than the one served is not loaded and not answered
    publish(rclient, streams.control, sync("math", "r1", 0, fake_versions[0], epoch=1))
    run_burst(redis_url, streams, worker)
    assert answers(rclient, streams) == [("w1", 1)]
    assert worker.backend.versions(NAME) == (1,)


def test_a_sync_is_read_ahead_in_the_reader_thread(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    """A sync published while the worker runs reaches the handler with its version already
    fetched, checksummed and read (the handler only loads it); one from before the worker
    started is loaded by the handler itself."""
    worker = make_fake_worker("w1")
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        sync("math", "r1", 0, fake_versions[0], epoch=1, time=worker.started_at - 1),
        sync("math", "r1", 1, fake_versions[1], epoch=1),
    )
    run_burst(redis_url, streams, worker)
    assert answers(rclient, streams) == [("w1", 0), ("w1", 1)]
    assert worker.backend.read_ahead == [(NAME, 1)]


def test_read_ahead_holds_a_bounded_number_of_versions(
    make_fake_worker, fake_versions, redis_url, streams, rclient, monkeypatch
) -> None:
    """Past ``READ_AHEAD_VERSIONS`` versions held read ahead, the reader leaves the rest to the
    handler (a burst of syncs holds no unbounded host memory); every sync is still answered."""
    import rollout.worker

    monkeypatch.setattr(rollout.worker, "READ_AHEAD_VERSIONS", 1)
    worker = make_fake_worker("w1")
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1", epoch=1),
        *[sync("math", "r1", v, fake_versions[v], epoch=1) for v in range(3)],
    )
    run_burst(redis_url, streams, worker)
    assert answers(rclient, streams) == [("w1", 0), ("w1", 1), ("w1", 2)]
    assert worker.backend.read_ahead == [(NAME, 0)]
    assert worker._ahead == 0


def test_each_sync_is_answered_once_per_worker_and_history_never(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1"),
        sync("math", "r1", 0, fake_versions[0], epoch=1),
        sync("math", "r1", 1, fake_versions[1], epoch=1),
    )
    workers = [make_fake_worker("w1"), make_fake_worker("w2")]
    for _ in range(2):  # a second pass finds nothing: every answer was committed with its ack
        for worker in workers:
            run_burst(redis_url, streams, worker)
    assert answers(rclient, streams) == [("w1", 0), ("w1", 1), ("w2", 0), ("w2", 1)]
    # a replica started now replays the log: it records the versions, loads and answers none
    history = rclient.xrevrange(streams.control, count=1)[0][0].decode()
    late = make_fake_worker("w3", history_until=history)
    run_burst(redis_url, streams, late)
    assert late.syncs["r1"].version == 1 and late.backend.versions(NAME) == ()
    assert len(answers(rclient, streams)) == 4
    # a sync published after it started is answered by every replica, once
    publish(rclient, streams.control, sync("math", "r1", 2, fake_versions[2], epoch=1))
    for worker in [*workers, late]:
        run_burst(redis_url, streams, worker)
    assert [a for a in answers(rclient, streams) if a[1] == 2] == [
        ("w1", 2),
        ("w2", 2),
        ("w3", 2),
    ]


def test_a_stale_sync_is_not_answered(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1")
    worker.on_control(registered("math", "r1"))
    worker.on_control(admitted("math", "r1", epoch=1))
    assert synced_events(worker.on_control(sync("math", "r1", 0, fake_versions[0], epoch=1)))
    worker.on_control(admitted("math", "r1", epoch=2))  # re-admitted: epoch 1 is over
    assert not worker.on_control(sync("math", "r1", 1, fake_versions[1], epoch=1)).commands
    assert worker.backend.versions(NAME) == (0,)
    assert synced_events(worker.on_control(sync("math", "r1", 1, fake_versions[1], epoch=2)))
    worker.on_control(DeregisterRequested(adapter="math", registration_id="r1"))
    assert not worker.on_control(sync("math", "r1", 2, fake_versions[2], epoch=2)).commands
    assert worker.backend.versions(NAME) == ()


def test_sync_of_a_version_a_task_loaded_reports_when_serving_began(
    make_fake_worker, fake_versions
) -> None:
    """The task for step k can reach a worker before the sync of version k: the worker loads
    the version for the task, and the sync's latency is measured to that load, not to now."""
    now = [1000.0]
    worker = make_fake_worker("w1", clock=lambda: now[0])
    worker.on_control(registered("math", "r1"))
    worker.on_control(admitted("math", "r1"))
    now[0] = 1000.2  # the task arrives and loads version 1
    worker.on_task(task("math", "r1", fake_versions[1], version=1, epoch=1))
    now[0] = 1003.0  # the sync event is handled after the task's generation
    effects = worker.on_control(sync("math", "r1", 1, fake_versions[1], epoch=1, time=1000.0))
    (synced,) = synced_events(effects)
    assert synced.latency_s == pytest.approx(0.2)
    # a version loaded by the sync itself is served from the time of that load
    effects = worker.on_control(sync("math", "r1", 2, fake_versions[2], epoch=1, time=1002.0))
    (synced,) = synced_events(effects)
    assert synced.latency_s == pytest.approx(1.0)


def test_sync_with_wrong_sha256_is_rejected_and_dead_lettered(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    worker = make_fake_worker("w1")
    with pytest.raises(SyncError, match="sha256"):
        worker.on_control(sync("math", "r1", 2, fake_versions[2], sha256="0" * 64), "1-1")
    assert isinstance(SyncError("x"), HandlerError)  # retried by the runtime, then dead-lettered
    publish(rclient, streams.control, sync("math", "r1", 2, fake_versions[2], sha256="f" * 64))
    run_burst(redis_url, streams, worker, max_deliveries=1)
    assert answers(rclient, streams) == []
    assert worker.backend.versions(NAME) == ()
    dead = [
        msgspec.json.decode(f[b"dead"], type=DeadLetter) for _, f in rclient.xrange(streams.dead)
    ]
    assert len(dead) == 1 and "sha256" in dead[0].reason


def test_replayed_history_is_recorded_not_loaded(
    make_fake_worker, fake_versions, redis_url, streams, rclient
) -> None:
    """A new replica learns versions from the log, loads lazily, and checks the recorded sha."""
    publish(
        rclient,
        streams.control,
        registered("math", "r1"),
        admitted("math", "r1"),
        sync("math", "r1", 1, fake_versions[1], epoch=1),
        sync("math", "r1", 2, fake_versions[2], epoch=1),
    )
    history = rclient.xrevrange(streams.control, count=1)[0][0].decode()
    worker = make_fake_worker("late", history_until=history)
    run_burst(redis_url, streams, worker)
    assert answers(rclient, streams) == []
    assert worker.backend.versions(NAME) == ()
    assert worker.syncs["r1"].version == 2
    assert worker.on_task(task("math", "r1", fake_versions[2], version=2, epoch=1)).commands
    assert worker.backend.versions(NAME) == (2,)
    # a task whose weights differ from the recorded sync fails its samples, not the worker
    other = make_fake_worker("late2", history_until=history)
    run_burst(redis_url, streams, other)
    effects = other.on_task(task("math", "r1", fake_versions[1], version=2, epoch=1))
    (group,) = _groups(effects)
    samples = [s for pg in group["groups"] for s in pg["samples"]]
    assert samples and all(s["failed"] and "sha256" in s["reason"] for s in samples)


def _groups(effects: Effects) -> list[dict]:
    out = []
    for cmd in effects.commands:
        fields = dict(zip(cmd[3::2], cmd[4::2], strict=True))
        out.append(msgspec.json.decode(fields["event"]))
    return out


def test_an_ended_registration_is_unloaded_and_its_cached_weights_deleted(
    make_fake_worker, fake_versions, streams
) -> None:
    import fsspec

    from rollout.backend import file_sha256

    fs = fsspec.filesystem("memory")
    uri = f"memory://{streams.namespace}/math/r1/v000001"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        fs.pipe_file(f"{uri}/{f}", (fake_versions[1] / f).read_bytes())
    sha = file_sha256(fake_versions[1] / "adapter_model.safetensors")
    worker = make_fake_worker("w1")
    worker.on_control(registered("math", "r1"))
    worker.on_control(admitted("math", "r1"))
    worker.on_control(sync("math", "r1", 1, fake_versions[1], uri=uri, sha256=sha, epoch=1))
    cached = worker.weights.cache_dir / NAME / "v1" / "adapter_model.safetensors"
    assert cached.exists() and worker.served.loaded_sha == {(NAME, 1): sha}
    worker.on_control(Failed(adapter="math", registration_id="r1", epoch=1, reason="nan"))
    assert worker.backend.versions(NAME) == () and not cached.exists()
    assert worker.served.loaded_sha == {} and "r1" not in worker.syncs
    assert ("unload", NAME, 1) in worker.backend.calls
    worker.on_control(Retired(adapter="math", registration_id="r1", epoch=1, slot=0))
    assert worker.states["r1"].phase is Phase.RETIRED
    assert not worker.on_task(task("math", "r1", fake_versions[1], version=1, epoch=1)).commands


def test_an_unreachable_engine_leaves_the_task_for_a_retry(make_fake_worker, fake_versions) -> None:
    worker = make_fake_worker("w1")
    worker.backend.available = False
    with pytest.raises(HandlerError, match="engine unavailable"):
        worker.on_task(task("math", "r1", fake_versions[0]))
    worker.backend.available = True
    assert worker.on_task(task("math", "r1", fake_versions[0])).commands
