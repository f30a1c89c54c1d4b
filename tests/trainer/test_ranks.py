"""Data-parallel ranks: R=2 trains exactly like R=1; slot state is handed off only when it changed
outside a step; a rank that dies takes rank 0 down with an error naming it.

Rank 0 is this test process; rank 1 is a ``spawn`` child building the same tiny model (gloo on
CPU, one intra-op thread each). The steps are driven directly (no Redis) except in
``test_trainer_process_with_two_ranks_end_to_end``, which runs ``multilora trainer --ranks 2``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from events.codec import Decoder, encode, stamp
from events.schema import (
    Completed,
    ControlEvent,
    PromptGroup,
    Rejected,
    RolloutGroup,
    RolloutTask,
    Sample,
    StepDone,
    TaskEvent,
)
from events.specs import AdapterSpec, DatasetSpec, LossSpec, OptimSpec, RewardSpec
from orchestrator.client import Producer
from tests.trainer.helpers import build, random_batch, rel_diff, slot_weights
from trainer.batch import TrainBatch
from trainer.batching import AdapterRows
from trainer.dist_step import DataParallelStep, split_rows
from trainer.inject import MultiLoraModel
from trainer.lora import BASE_SLOT
from trainer.losses import LossOutput, weighted_nll
from trainer.mixed_step import mixed_step
from trainer.optim import SlotAdamW
from trainer.ranks import RankError, RankGroup, RankRecipe
from trainer.slot_state import load_slot_state, slot_state_dict
from trainer.step import train_step

ROOT = Path(__file__).resolve().parents[2]
NUM_SLOTS, MAX_RANK = 4, 8
ADAPTERS = {  # slot: (rank, alpha, optimizer); slot 2 joins mid-run, slot 0 moves to slot 3
    0: (4, 8.0, OptimSpec(lr=2e-2, max_grad_norm=0.05, weight_decay=0.05)),
    1: (8, 16.0, OptimSpec(lr=1e-2, schedule="cosine", warmup_steps=2, min_lr_ratio=0.2)),
    2: (4, 4.0, OptimSpec(lr=3e-2, betas=(0.8, 0.99))),
}
LOSSES = {0: LossSpec(kl_coef=0.05), 1: LossSpec(), 2: LossSpec(advantage="drgrpo")}
SHARES = {0: 3, 1: 7, 2: 4}  # rows per step
STEPS = 6


def rows_for(slot: int, n: int, seed: int, *, loss_of: int | None = None) -> AdapterRows:
    """One prompt group of ``n`` random samples (random rewards, behaviour log-probs ~ -4.6)."""
    gen = torch.Generator().manual_seed(seed)

    def ints(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(4, 104, (k,), generator=gen).tolist())

    prompt = ints(int(torch.randint(2, 6, (1,), generator=gen)))
    samples = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=gen))
        logprobs = (-4.6 + 0.3 * torch.randn(length, generator=gen)).tolist()
        reward = float(torch.rand(1, generator=gen))
        samples.append(
            Sample(completion_ids=ints(length), logprobs=tuple(logprobs), text="", reward=reward)
        )
    group = PromptGroup(prompt_index=seed, prompt_ids=prompt, samples=tuple(samples))
    loss = LOSSES[slot if loss_of is None else loss_of]
    return AdapterRows(slot, loss, [group], revision=f"registration-{slot}")


def recipe(path: Path) -> RankRecipe:
    return RankRecipe(str(path), NUM_SLOTS, MAX_RANK, torch_threads=1, kernel="segments")


@pytest.fixture
def group(tiny_model_dir) -> Iterator[RankGroup]:
    torch.set_num_threads(1)
    with RankGroup.start(recipe(tiny_model_dir("qwen3")), 2, step_timeout_s=120) as g:
        g.wait_ready()
        yield g


def two_models(
    path: Path,
) -> tuple[tuple[MultiLoraModel, SlotAdamW], tuple[MultiLoraModel, SlotAdamW]]:
    first = {s: ADAPTERS[s] for s in (0, 1)}
    return (
        build(path, first, num_slots=NUM_SLOTS, max_rank=MAX_RANK, kernel="segments"),
        build(path, first, num_slots=NUM_SLOTS, max_rank=MAX_RANK, kernel="segments"),
    )


def state_of(model: MultiLoraModel, optimizer: SlotAdamW, slot: int) -> list[Tensor]:
    r = model.table.rank(slot)
    return [
        model.store.weight_S_R_Q[slot, :r],
        optimizer.exp_avg_S_R_Q[slot, :r],
        optimizer.exp_avg_sq_S_R_Q[slot, :r],
    ]


# --- the split ---------------------------------------------------------------------------------


def test_split_rows_gives_contiguous_slot_sorted_shares_of_about_equal_tokens() -> None:
    batch = random_batch([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], 16, seed=0)
    shares = split_rows(batch, 2)
    ids = [s.slot_ids_B.tolist() for s in shares]
    assert ids[0] + ids[1] == sorted(batch.slot_ids_B.tolist())
    tokens = [int(s.attention_mask_B_T.sum()) for s in shares]
    assert sum(tokens) == int(batch.attention_mask_B_T.sum())
    longest = int(batch.attention_mask_B_T.sum(1).max())
    assert abs(tokens[0] - tokens[1]) <= longest  # one row off the exact half at most
    for share in shares:  # trimmed to the share's own longest row
        assert share.attention_mask_B_T[:, -1].any()


def test_split_rows_gives_every_rank_a_row() -> None:
    batch = random_batch([2, 0], 9, seed=1)
    shares = split_rows(batch, 4)
    assert [s.slot_ids_B.tolist() for s in shares[:2]] == [[0], [2]]
    for idle in shares[2:]:  # no rows left: one base row, no targets
        assert idle.slot_ids_B.tolist() == [BASE_SLOT] and not idle.target_mask_B_T.any()
    assert [s.slot_ids_B.tolist() for s in split_rows(batch, 1)] == [[0, 2]]


# --- R=2 equals R=1 ------------------------------------------------------------------------------


def test_two_ranks_train_exactly_like_one(tiny_model_dir, group: RankGroup) -> None:
    """Mixed ranks (4 and 8), unequal shares (3 vs 7 rows), a KL term, a slot configured fresh
    mid-run and one restored into another slot mid-run: rank 0's weights, moments and metrics
    after every step equal the one-process step's (fp32, 1e-5 relative; elementwise, Adam's
    first update ``±lr`` of a gradient entry that is rounding noise may differ in sign)."""
    path = tiny_model_dir("qwen3")
    (ref, ref_opt), (dp_model, dp_opt) = two_models(path)
    dp = DataParallelStep(group)
    start = slot_weights(ref, 1)
    live = {0: 0, 1: 1}  # adapter -> slot
    handoffs = []
    for k in range(STEPS):
        if k == 2:  # a new adapter in slot 2, configured on rank 0 only
            for model, opt in ((ref, ref_opt), (dp_model, dp_opt)):
                model.configure_slot(2, ADAPTERS[2][0], ADAPTERS[2][1], seed=7)
                opt.configure(2, ADAPTERS[2][2], total_steps=10)
            live[2] = 2
        if k == 4:  # adapter 0 resumed into slot 3 (moments and step count travel too)
            for model, opt in ((ref, ref_opt), (dp_model, dp_opt)):
                state = slot_state_dict(model, opt, 0)
                model.release_slot(0)
                opt.release(0)
                load_slot_state(model, opt, 3, state)
            live[0] = 3
        rows = [
            dataclasses.replace(
                rows_for(slot, SHARES[adapter], seed=10 * k + adapter, loss_of=adapter),
                revision=f"registration-{adapter}-in-{slot}",
            )
            for adapter, slot in live.items()
        ]
        expected = mixed_step(ref, ref_opt, rows, pad_id=0)
        got = dp(dp_model, dp_opt, rows, 0)
        handoffs.append(dp.last_handoffs)
        for slot, outcome in expected.outcomes.items():
            want, have = outcome.result, got.outcomes[slot].result
            assert want is not None and have is not None and not want.skipped
            assert (have.tokens, have.step, have.skipped) == (want.tokens, want.step, False)
            assert have.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-7)
            assert have.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
            for key, value in want.extras.items():
                assert have.extras[key] == pytest.approx(value, rel=1e-5, abs=1e-7)
        for slot in live.values():
            for ours, theirs in zip(
                state_of(dp_model, dp_opt, slot), state_of(ref, ref_opt, slot), strict=True
            ):
                assert rel_diff(ours, theirs) <= 1e-5  # relative, of the whole block
            assert dp_opt.step_count(slot) == ref_opt.step_count(slot)
    # state crossed only when it changed outside a step: at the start, at the join, at the move
    assert handoffs == [(0, 1), (), (2,), (), (3,), ()]
    # one row for two ranks: rank 1 runs a base row (no loss, no gradient) and takes part
    single = random_batch([1], 12, seed=99)
    want = train_step(ref, ref_opt, single, weighted_nll)[1]
    have = dp.train(dp_model, dp_opt, single, weighted_nll, {1: "registration-1-in-1"})[1]
    assert dp.last_handoffs == () and have.tokens == want.tokens
    assert have.loss == pytest.approx(want.loss, rel=1e-5)
    assert rel_diff(slot_weights(dp_model, 1), slot_weights(ref, 1)) <= 1e-5
    assert (slot_weights(ref, 1) - start).norm() > 1e-3  # they trained: the check has teeth


# --- a rank that dies -------------------------------------------------------------------------


def test_a_killed_rank_makes_rank_0_fail_naming_it(tiny_model_dir, group: RankGroup) -> None:
    path = tiny_model_dir("qwen3")
    model, opt = build(
        path, {0: ADAPTERS[0]}, num_slots=NUM_SLOTS, max_rank=MAX_RANK, kernel="segments"
    )
    dp = DataParallelStep(group)
    dp(model, opt, [rows_for(0, 3, seed=0)], 0)
    os.kill(group.pids[1] or 0, signal.SIGKILL)
    with pytest.raises(RankError, match=r"trainer rank 1 \(pid \d+\) was killed by signal 9"):
        dp(model, opt, [rows_for(0, 3, seed=1)], 0)


@dataclasses.dataclass(frozen=True)
class ExitOnRank1:
    """A loss whose forward ends rank 1's process: the failure lands mid-step, in a collective."""

    needs_reference: ClassVar[bool] = False

    def __call__(
        self, logprobs_B_T: Tensor, batch: TrainBatch, ref_logprobs_B_T: Tensor | None
    ) -> LossOutput:
        import torch.distributed as dist

        if dist.get_rank() == 1:
            os._exit(7)
        return weighted_nll(logprobs_B_T, batch, ref_logprobs_B_T)


def test_a_rank_dying_mid_step_fails_the_collective_naming_it(
    tiny_model_dir, group: RankGroup
) -> None:
    path = tiny_model_dir("qwen3")
    model, opt = build(
        path, {0: ADAPTERS[0]}, num_slots=NUM_SLOTS, max_rank=MAX_RANK, kernel="segments"
    )
    dp = DataParallelStep(group)
    batch = random_batch([0, 0, 0, 0], 9, seed=0)
    with pytest.raises(RankError, match=r"trainer rank 1 \(pid \d+\) exited with code 7"):
        dp.train(model, opt, batch, ExitOnRank1(), {0: "registration-0"})


# --- the trainer process, end to end -------------------------------------------------------------


def adapter(steps: int, rank: int, seed: int) -> AdapterSpec:
    return AdapterSpec(
        rank=rank,
        alpha=2.0 * rank,
        dataset=DatasetSpec(kind="jsonl", path="prompts.jsonl"),
        rewards=(RewardSpec(name="exact"),),
        group_size=2,
        prompts_per_step=2,
        steps=steps,
        max_staleness=1,
        seed=seed,
    )


def answer(task: RolloutTask) -> RolloutGroup:
    groups = tuple(
        PromptGroup(
            prompt_index=i,
            prompt_ids=(5 + i % 50, 9, 11),
            samples=tuple(
                Sample(
                    completion_ids=(10, 11 + j, 12),
                    logprobs=(-4.0, -4.0, -4.0),
                    text="",
                    reward=float(j),
                )
                for j in range(2)
            ),
        )
        for i in task.prompt_indices
    )
    return RolloutGroup(
        adapter=task.adapter,
        registration_id=task.registration_id,
        epoch=task.epoch,
        task_id=task.id,
        step=task.step,
        version=task.version,
        worker="test",
        groups=groups,
    )


def start_trainer(
    redis_url: str, namespace: str, tmp: Path, model: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        *(sys.executable, "-m", "ops.cli", "trainer", "--model", str(model), "--ranks", "2"),
        *("--redis-url", redis_url, "--namespace", namespace, "--unsafe-redis"),
        *("--artifacts", str(tmp / "artifacts"), "--checkpoints", str(tmp / "checkpoints")),
        *("--allowed-root", str(tmp), "--num-slots", "2", "--max-rank", "4"),
        *("--max-batch-wait-s", "0", "--torch-threads", "1", "--block-ms", "100"),
    ]
    log = open(tmp / "trainer.log", "wb")  # noqa: SIM115  (owned by the child)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(
    what: str, done: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if proc.poll() is not None:
            raise AssertionError(
                f"trainer exited ({proc.returncode}) before {what}:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout_s} s:\n{log.read_text()}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is gone too
        return fh.read().split()[2] != "Z"


@pytest.mark.bus
def test_trainer_process_with_two_ranks_end_to_end(
    redis_url, rclient, streams, tmp_path, tiny_model_dir
) -> None:
    """``multilora trainer --ranks 2`` on a real Redis, the test playing the rollout workers: two
    adapters (ranks 2 and 4) train to their budgets; SIGTERM stops rank 0 warm and rank 1 with
    it; then a restart's rank 1 killed mid-run makes the trainer exit non-zero, naming it."""
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(40))
    )
    model = tiny_model_dir("llama")
    producer = Producer(rclient, streams)
    producer.register("alpha", adapter(steps=4, rank=2, seed=0))
    producer.register("beta", adapter(steps=3, rank=4, seed=1))
    control, tasks = Decoder(ControlEvent), Decoder(TaskEvent)
    answered: set[str] = set()

    def events(kind: type) -> list:
        decoded = (control.decode(f, i.decode()) for i, f in rclient.xrange(streams.control))
        return [e for e in decoded if isinstance(e, kind)]

    def serve() -> None:
        for entry, fields in rclient.xrange(streams.tasks):
            task = tasks.decode(fields, entry.decode())
            if task.id not in answered:
                rclient.xadd(streams.groups, encode(stamp(answer(task), source="test")))
                answered.add(task.id)

    def serving(done: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            serve()
            assert not events(Rejected), events(Rejected)
            return done()

        return check

    log = tmp_path / "trainer.log"
    proc = start_trainer(redis_url, streams.namespace, tmp_path, model)
    try:
        wait_for("completions", serving(lambda: len(events(Completed)) == 2), proc, log, 120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    (pid,) = [int(p) for p in re.findall(r"trainer rank 1/2 started \(pid (\d+)\)", text)]
    assert "rank1 trainer.ranks: rank 1 stopping after" in text, text
    assert not alive(pid)
    done = {(e.adapter, e.step) for e in events(StepDone)}
    assert done == {("alpha", s) for s in range(1, 5)} | {("beta", s) for s in range(1, 4)}
    assert {(e.adapter, e.reason) for e in events(Completed)} == {
        ("alpha", "budget"),
        ("beta", "budget"),
    }

    # a second life: a long adapter; kill its rank 1 mid-run
    producer.register("gamma", adapter(steps=500, rank=4, seed=2))
    proc = start_trainer(redis_url, streams.namespace, tmp_path, model)
    try:
        gamma_steps = serving(lambda: sum(e.adapter == "gamma" for e in events(StepDone)) >= 2)
        wait_for("gamma's steps", gamma_steps, proc, log, 120)
        (pid,) = [
            int(p) for p in re.findall(r"trainer rank 1/2 started \(pid (\d+)\)", log.read_text())
        ]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            serve()
            time.sleep(0.05)
        assert proc.returncode == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.search(
        r"multilora trainer: error: trainer rank 1 \(pid \d+\) was killed by signal 9",
        log.read_text(),
    )
