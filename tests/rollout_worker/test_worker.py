"""The rollout worker on the embedded engine: tasks to groups, real samples, failures, reloads.

The state machine alone (fencing, syncs, history, unloading) runs on the fake backend in
``test_worker_states.py``.
"""

from __future__ import annotations

import math

import msgspec
import pytest

from events.schema import DeregisterRequested, Retired
from events.specs import DatasetSpec, RewardSpec, SamplingSpec
from rollout.groups import row_seed, served_name
from rollout.worker import TASK_GROUP, SyncError, entry_at_or_before
from tests.rollout_worker.helpers import (
    CHAIN_SUM,
    GYM,
    admitted,
    publish,
    read_groups,
    registered,
    run_burst,
    sync,
    task,
    write_peft_adapter,
)

pytestmark = pytest.mark.bus


def test_tasks_become_one_group_each_with_right_fields(
    make_worker, versions, redis_url, streams, rclient
) -> None:
    worker = make_worker("w1")
    publish(rclient, streams.control, admitted("math", "r1", epoch=1))
    tasks = [task("math", "r1", versions[0], epoch=1, seed=i) for i in range(2)]
    tasks += [
        task(
            "math",
            "r1",
            versions[1],
            version=1,
            epoch=1,
            dataset=CHAIN_SUM,
            rewards=GYM,
            prompt_indices=(4, 0),
            group_size=2,
        )
        for _ in range(2)
    ]
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


def test_entry_ids_compare_as_numbers() -> None:
    assert entry_at_or_before("5-0", "5-1") and entry_at_or_before("5-1", "5-1")
    assert not entry_at_or_before("6-0", "5-9") and entry_at_or_before("9-0", "10-0")


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
    from rollout.reward_builtins import builtin_registry

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
    worker.on_control(registered("math", "r1"))
    worker.on_control(admitted("math", "r1", epoch=1))
    first = put(versions[1])
    worker.on_control(sync("math", "r1", 1, versions[1], uri=uri, sha256=first, epoch=1), "1-1")
    name = served_name("math", "r1")
    assert worker.backend.versions(name) == (1,) and worker.served.loaded_sha[(name, 1)] == first
    cached = worker.weights.cache_dir / name / "v1" / "adapter_model.safetensors"
    assert file_sha256(cached) == first
    before = _samples(_group(worker.on_task(task("math", "r1", versions[0], version=1, epoch=1))))
    second = put(versions[2])  # the trainer redid step 1 after a crash
    redo = sync("math", "r1", 1, versions[2], uri=uri, sha256=second, epoch=1)
    effects = worker.on_control(redo, "1-2")
    assert effects.commands  # answered with synced
    assert worker.served.loaded_sha[(name, 1)] == second and file_sha256(cached) == second
    after = _samples(_group(worker.on_task(task("math", "r1", versions[0], version=1, epoch=1))))
    assert [s["completion_ids"] for s in before] != [s["completion_ids"] for s in after]
    with pytest.raises(SyncError, match="cannot read"):
        worker.on_control(sync("math", "r1", 2, versions[2], uri=uri + "-missing", epoch=1), "1-3")
    worker.on_control(DeregisterRequested(adapter="math", registration_id="r1"))
    assert not cached.exists() and worker.backend.versions(name) == ()
    worker.on_control(Retired(adapter="math", registration_id="r1", epoch=1, slot=0))
    assert worker.states["r1"].phase == "retired"
