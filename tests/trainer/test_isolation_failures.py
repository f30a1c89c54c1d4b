"""Failure isolation in the trainer: one adapter's failed, too long or NaN samples skip only its
own step (with a reason naming the cause), and the other adapters of the same mixed step train
exactly as they would alone.

Numerics run on the tiny llama of ``tiny_model_dir`` (``max_position_embeddings`` 512, the
trainer's token budget); the process test runs the trainer's consumer on a real Redis, playing
the rollout side as :mod:`tests.trainer.test_process` does.
"""

from __future__ import annotations

import logging
import math

import msgspec
import pytest
import torch

from events.schema import Failed, PromptGroup, Retired, RolloutGroup, RolloutTask, Sample, StepDone
from events.specs import LossSpec, OptimSpec
from orchestrator.status import SkipNote, read_one
from tests.trainer.helpers import rel_diff, slot_weights
from tests.trainer.test_process import Bus, group_for, spec
from trainer.batching import AdapterRows, group_rows, rows_of_group
from trainer.inject import MultiLoraModel
from trainer.mixed_step import SlotOutcome, mixed_step, token_budget
from trainer.optim import SlotAdamW
from trainer.skips import (
    every_sample_failed,
    failed_after,
    most_common,
    sample_too_long,
    skip_status_fields,
)

LOSS = LossSpec()
OPTIM = OptimSpec(lr=1e-2)
TIMEOUT = "hangs: timeout after 2s"


def sample(n: int = 2, *, reward: float = 0.0, failed: bool = False, reason: str = "") -> Sample:
    ids = tuple(4 + (7 * i) % 90 for i in range(n))
    return Sample(
        completion_ids=ids,
        logprobs=(-1.0,) * n,
        text="",
        reward=reward,
        failed=failed,
        reason=reason,
    )


def group(*samples: Sample, index: int = 0) -> PromptGroup:
    return PromptGroup(prompt_index=index, prompt_ids=(5, 9, 11), samples=samples)


def healthy(index: int = 0) -> PromptGroup:
    return group(*(sample(3 + k, reward=float(k % 2)) for k in range(4)), index=index)


def build(path, slots: dict[int, int]) -> tuple[MultiLoraModel, SlotAdamW]:
    """A 4-slot model with ``slots[slot] = seed`` configured (rank 2, alpha 4)."""
    model = MultiLoraModel.from_pretrained(path, num_slots=4, max_rank=4)
    optimizer = SlotAdamW(model.store, model.table)
    for slot, seed in slots.items():
        model.configure_slot(slot, rank=2, alpha=4.0, seed=seed)
        optimizer.configure(slot, OPTIM, 10)
    return model, optimizer


def moments(optimizer: SlotAdamW, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    return optimizer.exp_avg_S_R_Q[slot].clone(), optimizer.exp_avg_sq_S_R_Q[slot].clone()


# --- pure pieces -------------------------------------------------------------------------------


def test_skip_reasons_name_the_most_common_cause() -> None:
    failures = {"DataError: gone": 2, TIMEOUT: 30}
    assert most_common(failures) == (TIMEOUT, 30)
    assert most_common({}) == ("", 0)
    assert every_sample_failed(failures, 32) == (
        f"every sample failed: {TIMEOUT} (30 of 32 samples; 1 other reason)"
    )
    assert (
        every_sample_failed({TIMEOUT: 8}, 8) == f"every sample failed: {TIMEOUT} (8 of 8 samples)"
    )
    long = every_sample_failed({"x" * 1000: 1}, 1)
    assert len(long) < 400 and "..." in long
    assert (
        failed_after("every sample failed: x", 3)
        == "3 steps in a row skipped: every sample failed: x"
    )
    assert sample_too_long(600, 512).startswith(
        "sample of 600 tokens exceeds the trainer's budget of 512 (the base model's "
    )
    assert "lower the adapter's sampling.max_new_tokens" in sample_too_long(600, 512)


def test_skip_status_fields_are_a_count_and_a_json_note() -> None:
    note = SkipNote(step=4, reason="non-finite loss", in_a_row=2, time=12.5)
    fields = skip_status_fields(note, skips=5)
    assert fields["skips"] == "5"
    assert msgspec.json.decode(fields["last_skip"], type=SkipNote) == note
    with pytest.raises(ValueError, match="skips=1 is fewer than the 2 skips in a row"):
        skip_status_fields(note, skips=1)


def test_group_rows_drops_a_too_long_sample_alone_and_counts_it() -> None:
    long = sample(600, reward=1.0)
    rows, stats = group_rows(
        [AdapterRows(0, LOSS, [group(sample(2), sample(3, reward=1.0), long, sample(2))])],
        max_tokens=512,
    )
    assert len(rows) == 3 and max(len(r.tokens) for r in rows) <= 512
    st = stats[0]
    assert (st.samples, st.samples_seen, st.samples_failed, st.groups) == (3, 4, 1, 1)
    assert st.failures == {sample_too_long(603, 512): 1}
    assert not st.all_failed
    rows, stats = group_rows([AdapterRows(0, LOSS, [group(long, long)])], max_tokens=512)
    assert rows == [] and stats[0].all_failed
    rows, _ = group_rows([AdapterRows(0, LOSS, [group(long, long)])])  # no budget: kept
    assert len(rows) == 2


def test_rows_made_as_groups_arrive_equal_rows_made_at_the_step() -> None:
    """The trainer makes each group's rows when it arrives (``AdapterRows.prepared``); a step
    over them packs exactly what it would have made itself, stats included."""
    failed = group(*(sample(failed=True, reason=TIMEOUT) for _ in range(4)))
    mixed = group(sample(2), sample(3, reward=1.0), sample(600, reward=0.5), sample(2))
    flat = group(sample(2, reward=1.0), sample(3, reward=1.0))
    groups = [mixed, failed, flat, group(sample(4), sample(1, reward=2.0))]
    filtered = LossSpec(filter_zero_variance=True)
    for loss in (LOSS, filtered):
        plain = AdapterRows(3, loss, groups, temperature=0.7)
        made = [rows_of_group(g, 3, loss, 0.7, 512) for g in groups]
        prepared = AdapterRows(3, loss, groups, temperature=0.7, prepared=made)
        assert group_rows([plain], max_tokens=512) == group_rows([prepared], max_tokens=512)
        rows, stats = group_rows([prepared], max_tokens=512)
        assert rows and stats[3].samples_failed == 5 and stats[3].samples_seen == 12


def test_every_sample_failed_is_a_skip_but_filtered_groups_are_not() -> None:
    failed = group(*(sample(failed=True, reason=TIMEOUT) for _ in range(4)))
    flat = group(sample(2, reward=1.0), sample(3, reward=1.0))
    one_left = group(sample(2), sample(failed=True, reason=TIMEOUT))
    filtered = LossSpec(filter_zero_variance=True)
    _, stats = group_rows(
        [
            AdapterRows(0, LOSS, [failed, failed]),
            AdapterRows(1, filtered, [flat]),
            AdapterRows(2, LOSS, [one_left]),
        ]
    )
    every, empty, partial = (SlotOutcome(stats[s], None) for s in range(3))
    assert every.failed and every.reason == f"every sample failed: {TIMEOUT} (8 of 8 samples)"
    assert not empty.failed and empty.reason == "no usable sample group"
    assert not partial.failed and partial.reason == "no usable sample group"


# --- the mixed step ----------------------------------------------------------------------------


def test_failed_and_too_long_adapters_skip_and_the_healthy_one_trains_as_alone(
    tiny_model_dir,
) -> None:
    """Slot 0 healthy; slot 1's rewards all timed out; slot 2's samples are all longer than the
    budget. Slots 1 and 2 are skipped with their reasons and untouched; slot 0's update equals
    a solo step on its own groups; the batch is never wider than the budget."""
    path = tiny_model_dir("llama")
    model, optimizer = build(path, {0: 10, 1: 11, 2: 12})
    solo, solo_opt = build(path, {0: 10})
    assert token_budget(model) == 512
    timed_out = group(*(sample(failed=True, reason=TIMEOUT) for _ in range(4)))
    too_long = group(sample(600), sample(601, reward=1.0), sample(700))
    before = {s: (slot_weights(model, s), *moments(optimizer, s)) for s in (1, 2)}
    widths: list[int] = []

    def train(model, optimizer, batch, loss_fn, **kwargs):
        widths.append(batch.tokens_B_T.shape[1])
        from trainer.step import train_step

        return train_step(model, optimizer, batch, loss_fn, **kwargs)

    rows = [
        AdapterRows(0, LOSS, [healthy(0), healthy(1)]),
        AdapterRows(1, LOSS, [timed_out]),
        AdapterRows(2, LOSS, [too_long]),
    ]
    step = mixed_step(model, optimizer, rows, pad_id=0, train=train)
    alone = mixed_step(solo, solo_opt, rows[:1], pad_id=0)
    assert widths and max(widths) <= 512
    ok, bad, long = (step.outcomes[s] for s in range(3))
    assert ok.trained and alone.outcomes[0].trained
    assert bad.failed and bad.reason == f"every sample failed: {TIMEOUT} (4 of 4 samples)"
    assert long.failed and long.reason.startswith(
        "every sample failed: sample of 603 tokens exceeds the trainer's budget of 512"
    )
    assert long.stats.samples_failed == 3 and long.stats.failures[sample_too_long(703, 512)] == 1
    assert step.adapters == 1
    for s in (1, 2):
        weights, avg, avg_sq = before[s]
        assert torch.equal(slot_weights(model, s), weights)
        assert torch.equal(optimizer.exp_avg_S_R_Q[s], avg)
        assert torch.equal(optimizer.exp_avg_sq_S_R_Q[s], avg_sq)
        assert optimizer.step_count(s) == 0
    assert ok.result is not None and alone.outcomes[0].result is not None
    assert ok.result.loss == pytest.approx(alone.outcomes[0].result.loss, rel=1e-5)
    assert rel_diff(slot_weights(model, 0), slot_weights(solo, 0)) <= 1e-5


@pytest.mark.parametrize("kernel", ["loop", "segments"])
def test_a_nan_weight_in_one_slot_changes_no_other_slot(tiny_model_dir, kernel: str) -> None:
    """Slot 1's adapter holds a NaN (a poisoned weight): its loss is non-finite, its step is
    skipped with the reason and its state untouched; slots 0 and 2, sharing two mixed steps
    with it, end within 1e-5 of their solo runs on the same groups, Adam moments too."""
    path = tiny_model_dir("llama")

    def make(slots: dict[int, int]) -> tuple[MultiLoraModel, SlotAdamW]:
        model = MultiLoraModel.from_pretrained(path, num_slots=4, max_rank=4, kernel=kernel)  # type: ignore[arg-type]
        optimizer = SlotAdamW(model.store, model.table)
        for slot, seed in slots.items():
            model.configure_slot(slot, rank=2, alpha=4.0, seed=seed)
            optimizer.configure(slot, OPTIM, 10)
        return model, optimizer

    model, optimizer = make({0: 10, 1: 11, 2: 12})
    solos = {s: make({s: 10 + s}) for s in (0, 2)}
    with torch.no_grad():
        model.store.weight_S_R_Q[1, 0, 0] = math.nan
    poisoned = slot_weights(model, 1)
    for k in range(2):
        rows = [
            AdapterRows(s, LOSS, [healthy(2 * k + s), healthy(2 * k + s + 1)]) for s in range(3)
        ]
        step = mixed_step(model, optimizer, rows, pad_id=0)
        bad = step.outcomes[1]
        assert bad.failed and bad.reason == "non-finite loss"
        assert step.adapters == 2
        for s, (solo, solo_opt) in solos.items():
            alone = mixed_step(solo, solo_opt, [rows[s]], pad_id=0).outcomes[s]
            assert step.outcomes[s].trained and alone.trained
    torch.testing.assert_close(slot_weights(model, 1), poisoned, rtol=0, atol=0, equal_nan=True)
    assert optimizer.step_count(1) == 0
    assert torch.count_nonzero(optimizer.exp_avg_S_R_Q[1]) == 0
    for s, (solo, solo_opt) in solos.items():
        assert torch.isfinite(slot_weights(model, s)).all()
        assert rel_diff(slot_weights(model, s), slot_weights(solo, s)) <= 1e-5
        for mine, theirs in zip(moments(optimizer, s), moments(solo_opt, s), strict=True):
            assert rel_diff(mine, theirs) <= 1e-4


# --- the process, on the bus -------------------------------------------------------------------


def timed_out_group(task: RolloutTask) -> RolloutGroup:
    """What a worker answers when every call of the adapter's reward timed out."""
    bad = sample(failed=True, reason=TIMEOUT)
    groups = tuple(
        PromptGroup(prompt_index=i, prompt_ids=(5, 9), samples=(bad, bad))
        for i in task.prompt_indices
    )
    return msgspec.structs.replace(group_for(task), groups=groups)


@pytest.fixture
def bus2(redis_url, rclient, streams, tmp_path, tiny_model_dir) -> Bus:
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=2, max_rank=4)
    return Bus(redis_url, rclient, streams, tmp_path, model)


@pytest.mark.bus
def test_an_adapter_whose_samples_all_fail_fails_with_the_cause_and_the_other_trains(
    bus2: Bus, caplog
) -> None:
    """alpha's rewards time out on every sample: each of its steps is skipped (issued again),
    and the second in a row (max_failures=2) fails it with the samples' reason; beta, in the
    same mixed steps, trains its whole budget, one step_done per step."""
    caplog.set_level(logging.INFO, logger="trainer")
    alpha = bus2.producer.register("alpha", spec(steps=5))
    beta = bus2.producer.register("beta", spec(steps=3, seed=1))
    bus2.run(lambda t: timed_out_group(t) if t.adapter == "alpha" else group_for(t))
    (failed,) = bus2.events(Failed, "alpha")
    assert failed.registration_id == alpha and failed.step == 0
    assert TIMEOUT in failed.reason and "skipped: every sample failed: " in failed.reason
    assert bus2.events(Retired, "alpha") and not bus2.events(StepDone, "alpha")
    assert len([t for t in bus2.tasks() if t.adapter == "alpha" and t.step == 1]) == 2
    done = bus2.events(StepDone, "beta")
    assert [(d.step, d.registration_id) for d in done] == [(k, beta) for k in (1, 2, 3)]
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.process"]
    assert any(line.startswith("alpha step 1 not taken: every sample failed: ") for line in lines)


@pytest.mark.bus
def test_skips_are_counted_in_status_and_the_failure_says_how_many(bus2: Bus) -> None:
    bus2.producer.register("alpha", spec(steps=5))
    bus2.run(timed_out_group)
    (failed,) = bus2.events(Failed, "alpha")
    assert failed.reason.startswith("2 steps in a row skipped: every sample failed: ")
    fields = {
        k.decode(): v.decode() for k, v in bus2.client.hgetall(bus2.streams.status("alpha")).items()
    }
    assert fields["skips"] == "2"
    note = msgspec.json.decode(fields["last_skip"], type=SkipNote)
    assert (note.step, note.in_a_row) == (1, 2) and TIMEOUT in note.reason
    assert note.registration_id == failed.registration_id
    shown = read_one(bus2.client, bus2.streams, "alpha")  # what `multilora status` shows
    assert shown is not None and (shown.skips, shown.last_skip) == (2, note)


def test_a_sample_without_one_logprob_per_token_is_dropped_alone_with_the_reason() -> None:
    bad = Sample(completion_ids=(7, 8, 9), logprobs=(-1.0,), text="", reward=1.0)
    rows, stats = group_rows([AdapterRows(0, LOSS, [group(sample(2), bad, sample(3, reward=1.0))])])
    assert len(rows) == 2
    assert stats[0].failures == {
        "1 log-probs for 3 completion tokens (the rollout worker must return one log-prob per "
        "token)": 1
    }
