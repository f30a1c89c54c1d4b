"""The rollout worker as a state machine on a real bus: tasks to groups, fencing, syncs, errors."""

from __future__ import annotations

import math
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
    Retired,
    Synced,
)
from events.specs import DatasetSpec, RewardSpec, SamplingSpec
from orchestrator.status import WorkerSync
from rollout.worker import TASK_GROUP, SyncError, entry_at_or_before, row_seed, served_name
from tests.rollout_worker.helpers import (
    CHAIN_SUM,
    GYM,
    admitted,
    publish,
    read_control,
    read_groups,
    run_burst,
    sync,
    task,
    write_peft_adapter,
)

pytestmark = pytest.mark.bus


def effects_events(effects: Effects) -> list[object]:
    """The control events an :class:`Effects` would ``XADD``."""
    decoder = Decoder(ControlEvent)
    out = []
    for cmd in effects.commands:
        if cmd[0] == "XADD":
            fields = cmd[cmd.index("*") + 1 :]
            out.append(decoder.decode(dict(zip(fields[::2], fields[1::2], strict=True))))
    return out


def test_tasks_become_one_group_each_with_right_fields(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    worker = make_worker("w1")
    publish(rclient, streams.control, admitted("math", "r1", epoch=1))
    tasks = [task("math", "r1", versions[0], epoch=1, seed=i) for i in range(2)]
    tasks += [
        task("math", "r1", versions[1], version=1, epoch=1, dataset=CHAIN_SUM, rewards=GYM,
             prompt_indices=(4, 0), group_size=2)
        for _ in range(2)
    ]  # fmt: skip
    publish(rclient, streams.tasks, *tasks)
    stats = run_burst(redis_url, streams, worker).stats
    assert stats.handled == 5  # one control event, four tasks

    groups = read_groups(rclient, streams)
    assert sorted(g.task_id for g in groups) == sorted(t.id for t in tasks)
    by_id = {t.id: t for t in tasks}
    tokenizer = worker.backend.tokenizer
    for group in groups:
        t = by_id[group.task_id]
        assert (group.adapter, group.registration_id, group.epoch) == ("math", "r1", 1)
        assert (group.version, group.step, group.worker) == (t.version, t.step, "w1")
        assert group.source == "w1" and group.generate_s > 0
        assert [pg.prompt_index for pg in group.groups] == list(t.prompt_indices)
        for pg in group.groups:
            assert len(pg.samples) == t.group_size
            assert pg.prompt_ids and len(pg.prompt_ids) <= 256
            for s in pg.samples:
                assert not s.failed, s.reason
                assert 1 <= len(s.completion_ids) <= t.sampling.max_new_tokens
                assert len(s.logprobs) == len(s.completion_ids)
                assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
                assert s.finish_reason in ("stop", "length")
                assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
                low = -0.1 if t.dataset == CHAIN_SUM else 0.0  # 0.1 * length_penalty in [-1, 0]
                assert low <= s.reward <= 1.0
                assert set(s.reward_terms) == {r.name for r in t.rewards}
            # different per-row seeds: the samples of one prompt are not all the same
            assert len({s.completion_ids for s in pg.samples}) > 1
    jsonl = next(g for g in groups if g.task_id == tasks[0].id)
    assert jsonl.groups[0].prompt_ids == tuple(tokenizer("1+2=")["input_ids"])
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0
    assert worker.backend.versions(served_name("math", "r1")) == (0, 1)


def test_same_task_gives_same_samples_on_another_worker(make_worker, versions) -> None:
    t = task("math", "r1", versions[0], group_size=4)
    first = make_worker("a").on_task(t)
    second = make_worker("b").on_task(t)

    def samples(effects) -> list:
        fields = dict(zip(effects.commands[0][3::2], effects.commands[0][4::2], strict=True))
        group = msgspec.json.decode(fields["event"])
        return [pg["samples"] for pg in group["groups"]]

    assert samples(first) == samples(second)


def test_row_seeds_are_distinct_and_stable() -> None:
    seeds = {row_seed(7, p, g, o) for p in range(20) for g in range(16) for o in range(2)}
    assert len(seeds) == 20 * 16 * 2
    assert row_seed(7, 3, 1) == row_seed(7, 3, 1) and row_seed(7, 3, 1) != row_seed(8, 3, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_fencing_drops_stale_epochs_and_ended_registrations(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    worker = make_worker("w1")
    cancel = DeregisterRequested(adapter="gone", registration_id="r3")
    publish(rclient, streams.control, admitted("math", "r1", epoch=2), admitted("old", "r2"),
            Retired(adapter="old", registration_id="r2", slot=0), admitted("gone", "r3"),
            cancel)  # fmt: skip
    run_burst(redis_url, streams, worker)  # the control log first: the worker learns the state
    stale = task("math", "r1", versions[0], epoch=1)
    fresh = task("math", "r1", versions[0], epoch=2)
    retired = task("old", "r2", versions[0])
    cancelled = task("gone", "r3", versions[0])
    unknown = task("new", "r4", versions[0])  # its admitted is not seen yet: it runs
    publish(rclient, streams.tasks, stale, fresh, retired, cancelled, unknown)
    run_burst(redis_url, streams, worker)
    assert sorted(g.task_id for g in read_groups(rclient, streams)) == sorted(
        [fresh.id, unknown.id]
    )
    assert rclient.xpending(streams.tasks, TASK_GROUP)["pending"] == 0  # dropped ones are acked


def test_fencing_state_machine_resume_and_completion(make_worker, versions) -> None:
    worker = make_worker("w1")
    worker.on_task(task("math", "r1", versions[0]))
    assert worker.backend.versions(served_name("math", "r1")) == (0,)
    worker.on_control(Completed(adapter="math", registration_id="r1", step=3))
    assert worker.backend.versions(served_name("math", "r1")) == ()  # unloaded
    assert worker.fenced(task("math", "r1", versions[0])) == "registration 'r1' has ended"
    worker.on_control(admitted("math", "r1", epoch=1))  # resumed under a new epoch
    assert worker.fenced(task("math", "r1", versions[0], epoch=1)) == ""
    assert "older than" in worker.fenced(task("math", "r1", versions[0], epoch=0))
    # a task of a newer epoch than any admitted seen moves the fence forward
    assert worker.fenced(task("math", "r1", versions[0], epoch=3)) == ""
    assert "older than" in worker.fenced(task("math", "r1", versions[0], epoch=1))


def test_sync_loads_the_version_and_publishes_synced(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    worker = make_worker("w1")
    published = time.time() - 0.5
    publish(rclient, streams.control, admitted("math", "r1", epoch=1),
            sync("math", "r1", 1, versions[1], epoch=1, time=published))  # fmt: skip
    run_burst(redis_url, streams, worker)
    synced = [e for e in read_control(rclient, streams) if isinstance(e, Synced)]
    assert len(synced) == 1
    s = synced[0]
    assert (s.adapter, s.registration_id, s.epoch, s.worker, s.version) == (
        "math",
        "r1",
        1,
        "w1",
        1,
    )
    assert 0.5 <= s.latency_s < 60
    assert worker.backend.versions(served_name("math", "r1")) == (1,)
    status = msgspec.json.decode(rclient.hget(streams.status("math"), "sync:w1"), type=WorkerSync)
    assert (status.registration_id, status.version, status.latency_s) == ("r1", 1, s.latency_s)
    assert rclient.sismember(streams.status_index, "math")
    # an older version than the one served is not loaded and not answered
    publish(rclient, streams.control, sync("math", "r1", 0, versions[0], epoch=1))
    run_burst(redis_url, streams, worker)
    assert len([e for e in read_control(rclient, streams) if isinstance(e, Synced)]) == 1
    assert worker.backend.versions(served_name("math", "r1")) == (1,)


def test_sync_of_a_version_a_task_loaded_reports_when_serving_began(make_worker, versions) -> None:
    """The task for step k can reach a worker before the sync of version k: the worker loads
    the version for the task, and the sync's latency is measured to that load, not to now."""
    now = [1000.0]
    worker = make_worker("w1", clock=lambda: now[0])
    worker.on_control(admitted("math", "r1"))
    now[0] = 1000.2  # the task arrives and loads version 1
    worker.on_task(task("math", "r1", versions[1], version=1))
    now[0] = 1003.0  # the sync event is handled after the task's generation
    effects = worker.on_control(sync("math", "r1", 1, versions[1], time=1000.0), "9-0")
    (synced,) = [e for e in effects_events(effects) if isinstance(e, Synced)]
    assert synced.latency_s == pytest.approx(0.2)
    # a version loaded by the sync itself is served from the time of that load
    effects = worker.on_control(sync("math", "r1", 2, versions[2], time=1002.0), "9-1")
    (synced,) = [e for e in effects_events(effects) if isinstance(e, Synced)]
    assert synced.latency_s == pytest.approx(1.0)


def test_sync_with_wrong_sha256_is_rejected_and_dead_lettered(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    worker = make_worker("w1")
    with pytest.raises(SyncError, match="sha256"):
        worker.on_control(sync("math", "r1", 2, versions[2], sha256="0" * 64), "1-1")
    assert isinstance(SyncError("x"), HandlerError)  # retried by the runtime, then dead-lettered
    publish(rclient, streams.control, sync("math", "r1", 2, versions[2], sha256="f" * 64))
    run_burst(redis_url, streams, worker, max_deliveries=1)
    assert not [e for e in read_control(rclient, streams) if isinstance(e, Synced)]
    assert worker.backend.versions(served_name("math", "r1")) == ()
    dead = [
        msgspec.json.decode(f[b"dead"], type=DeadLetter) for _, f in rclient.xrange(streams.dead)
    ]
    assert len(dead) == 1 and "sha256" in dead[0].reason


def test_replayed_history_is_recorded_not_loaded(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    """A new replica learns versions from the log, loads lazily, and checks the recorded sha."""
    publish(rclient, streams.control, admitted("math", "r1"),
            sync("math", "r1", 1, versions[1]), sync("math", "r1", 2, versions[2]))  # fmt: skip
    history = rclient.xrevrange(streams.control, count=1)[0][0].decode()
    worker = make_worker("late", history_until=history)
    run_burst(redis_url, streams, worker)
    assert not [e for e in read_control(rclient, streams) if isinstance(e, Synced)]
    assert worker.backend.versions(served_name("math", "r1")) == ()
    assert worker.syncs["r1"].version == 2
    good = worker.on_task(task("math", "r1", versions[2], version=2))
    assert worker.backend.versions(served_name("math", "r1")) == (2,)
    assert good.commands
    # a task whose weights differ from the recorded sync fails its samples, not the worker
    worker2 = make_worker("late2", history_until=history)
    run_burst(redis_url, streams, worker2)
    group = _group(worker2.on_task(task("math", "r1", versions[1], version=2)))
    assert all(s["failed"] and "sha256" in s["reason"] for s in _samples(group))
    assert entry_at_or_before("5-0", "5-1") and not entry_at_or_before("6-0", "5-9")


def _group(effects) -> dict:
    cmd = effects.commands[0]
    fields = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    return msgspec.json.decode(fields["event"])


def _samples(group: dict) -> list[dict]:
    return [s for pg in group["groups"] for s in pg["samples"]]


def test_known_failures_become_failed_samples(
    make_worker, versions, data_root, tiny_dir, tmp_path
) -> None:
    worker = make_worker("w1", max_prompt_tokens=32)
    # a too-long prompt (row 3) and an index out of range fail their own samples only
    group = _group(worker.on_task(task("math", "r1", versions[0], prompt_indices=(0, 3, 99))))
    ok, long, missing = group["groups"]
    assert not any(s["failed"] for s in ok["samples"])
    assert all(s["failed"] and "max_prompt_tokens=32" in s["reason"] for s in long["samples"])
    assert long["prompt_ids"] == [] and len(long["samples"]) == 3
    assert all(s["failed"] and "out of range" in s["reason"] for s in missing["samples"])
    # a dataset outside the allowed roots, an unknown reward, weights that cannot be read or
    # served (rank 16 > the engine's max rank 8), bad sampling: the whole group fails
    too_big = write_peft_adapter(tiny_dir, tmp_path / "rank16", seed=1, rank=16)
    cases = {
        "DataError": {"dataset": DatasetSpec(kind="jsonl", path="/etc/passwd")},
        "RewardError": {"rewards": (RewardSpec(name="no_such_reward"),)},
        "WeightsError": {"weights": data_root},
        "AdapterLoadError": {"weights": too_big},
        "SamplingParamError": {"sampling": SamplingSpec(top_p=0.0)},
    }
    for version, (reason, overrides) in enumerate(cases.items(), start=5):
        weights = overrides.pop("weights", versions[0])
        failed = _group(worker.on_task(task("math", "r1", weights, version=version, **overrides)))
        samples = _samples(failed)
        assert len(samples) == 9 and all(s["failed"] and reason in s["reason"] for s in samples)
        assert all(s["completion_ids"] == [] for s in samples)
    recovered = _samples(_group(worker.on_task(task("math", "r1", versions[0]))))
    assert not any(s["failed"] for s in recovered)  # the worker goes on serving


def test_a_raising_reward_fails_its_samples_and_the_worker_goes_on(make_worker, versions) -> None:
    from rollout.rewards import builtin_registry

    def picky(completion: str, item) -> float:
        if item.index == 1:
            raise ZeroDivisionError("verifier divided by zero")
        return 1.0

    registry = builtin_registry()
    registry.register("picky", picky, value_range=(0.0, 1.0))
    worker = make_worker("w1", registry=registry)
    rewards = (RewardSpec(name="picky"),)
    group = _group(worker.on_task(task("math", "r1", versions[0], rewards=rewards)))
    first, second, third = group["groups"]
    assert all(not s["failed"] and s["reward"] == 1.0 for s in first["samples"] + third["samples"])
    assert all(s["failed"] and "ZeroDivisionError" in s["reason"] for s in second["samples"])
    assert all(s["completion_ids"] for s in second["samples"])  # generated, just not scored


def test_versions_in_a_remote_store_are_fetched_verified_and_reloaded_when_rewritten(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    """``memory://`` stands for any fsspec store; a version written again is loaded again."""
    import fsspec

    from rollout.backend import file_sha256

    fs = fsspec.filesystem("memory")
    uri = f"memory://{streams.namespace}/math/r1/v000001"
    files = ("adapter_config.json", "adapter_model.safetensors")

    def put(source) -> str:
        for f in files:
            fs.pipe_file(f"{uri}/{f}", (source / f).read_bytes())
        return file_sha256(source / "adapter_model.safetensors")

    worker = make_worker("w1")
    first = put(versions[1])
    worker.on_control(sync("math", "r1", 1, versions[1], uri=uri, sha256=first), "1-1")
    name = served_name("math", "r1")
    assert worker.backend.versions(name) == (1,) and worker.loaded_sha[(name, 1)] == first
    cached = worker.weights.cache_dir / name / "v1" / "adapter_model.safetensors"
    assert file_sha256(cached) == first
    before = _samples(_group(worker.on_task(task("math", "r1", versions[0], version=1))))
    second = put(versions[2])  # the trainer redid step 1 after a crash
    effects = worker.on_control(sync("math", "r1", 1, versions[2], uri=uri, sha256=second), "1-2")
    assert effects.commands  # answered with synced
    assert worker.loaded_sha[(name, 1)] == second and file_sha256(cached) == second
    after = _samples(_group(worker.on_task(task("math", "r1", versions[0], version=1))))
    assert [s["completion_ids"] for s in before] != [s["completion_ids"] for s in after]
    with pytest.raises(SyncError, match="cannot read"):
        worker.on_control(sync("math", "r1", 2, versions[2], uri=uri + "-missing"), "1-3")
    worker.on_control(Retired(adapter="math", registration_id="r1", slot=0))
    assert not cached.exists() and worker.backend.versions(name) == ()
