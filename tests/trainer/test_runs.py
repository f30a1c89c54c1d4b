"""An adapter run's task issuing and group holding, and the per-slot outcome of a mixed step."""

from __future__ import annotations

import math

import pytest

from events.schema import PromptGroup, RolloutGroup, Sample
from events.specs import AdapterSpec, DatasetSpec, RewardSpec
from orchestrator.cursor import DataCursor
from trainer.batching import AdapterRows
from trainer.inject import MultiLoraModel
from trainer.mixed_step import mixed_step
from trainer.optim import SlotAdamW
from trainer.runs import AdapterRun, task_seed


def make_run(**spec: object) -> AdapterRun:
    fields: dict[str, object] = {
        "dataset": DatasetSpec(kind="jsonl", path="prompts.jsonl"),
        "rewards": (RewardSpec(name="exact_match"),),
        "steps": 5,
        "prompts_per_step": 4,
        "max_staleness": 1,
    }
    fields.update(spec)
    return AdapterRun(
        name="alpha",
        registration_id="reg-1",
        epoch=1,
        slot=0,
        spec=AdapterSpec(**fields),  # type: ignore[arg-type]
        cursor=DataCursor(100, seed=7),
        uri="store/alpha/reg-1/v000000",
    )


def answer(task_id: str, step: int, epoch: int = 1) -> RolloutGroup:
    samples = tuple(
        Sample(completion_ids=(5,), logprobs=(-1.0,), text="", reward=r) for r in (0.0, 1.0)
    )
    return RolloutGroup(
        adapter="alpha",
        registration_id="reg-1",
        epoch=epoch,
        task_id=task_id,
        step=step,
        version=0,
        worker="rollout.0",
        groups=(PromptGroup(prompt_index=0, prompt_ids=(4,), samples=samples),),
    )


def test_issue_runs_max_staleness_ahead_and_keeps_the_cursor_of_each_step() -> None:
    run = make_run(max_staleness=1)
    start = run.cursor.state()
    tasks = run.issue(prompts_per_task=3)
    # steps 1 and 2 (one ahead of the weights); 4 prompts per step in tasks of 3 and 1
    assert [(t.step, len(t.prompt_indices)) for t in tasks] == [(1, 3), (1, 1), (2, 3), (2, 1)]
    assert run.issued_through == 2 and run.cursor_before[1] == start
    assert {t.weights_uri for t in tasks} == {run.uri} and {t.epoch for t in tasks} == {1}
    assert run.expected == {1: {tasks[0].id, tasks[1].id}, 2: {tasks[2].id, tasks[3].id}}
    assert tasks[0].seed == task_seed(0, "reg-1", 1, 1, 0) != tasks[1].seed
    assert run.issue(prompts_per_task=3) == []  # nothing new until a step trains
    # the prompts continue the cursor: a fresh cursor from the saved state draws the same ones
    again = DataCursor.restore(start)
    assert [i for t in tasks for i in t.prompt_indices] == again.take(8)


def test_issue_stops_at_the_step_budget() -> None:
    run = make_run(steps=2, max_staleness=5)
    assert {t.step for t in run.issue(0)} == {1, 2}


def test_a_step_is_ready_when_every_task_answered() -> None:
    run = make_run()
    first, second = run.issue(prompts_per_task=2)[:2]
    assert not run.ready() and run.waiting()
    assert not run.wants(answer(first.id, 1, epoch=0)), "an old epoch's group"
    assert not run.wants(answer("unknown", 1))
    run.hold("d-a", answer(first.id, 1), now=10.0)  # type: ignore[arg-type]
    assert not run.ready() and run.ready_since is None
    assert not run.wants(answer(first.id, 1)), "answered twice"
    run.hold("d-b", answer(second.id, 1), now=11.0)  # type: ignore[arg-type]
    assert run.ready() and run.ready_since == 11.0
    held = run.take_next()
    assert [(d, g.task_id) for d, g in held] == [("d-a", first.id), ("d-b", second.id)]
    assert run.ready_since is None
    run.advance()
    assert (run.step, run.version, run.next_step) == (1, 1, 2)


def test_reissue_draws_the_next_prompts_for_the_same_step() -> None:
    run = make_run()
    tasks = run.issue(0)
    redo = run.reissue(0)
    assert [t.step for t in redo] == [1]
    assert run.expected[1] == {redo[0].id}
    seen = {i for t in tasks for i in t.prompt_indices}
    assert not seen & set(redo[0].prompt_indices)


def test_release_hands_back_every_held_delivery() -> None:
    run = make_run(max_staleness=2)
    tasks = run.issue(0)
    for task in tasks:
        run.hold(f"d-{task.step}", answer(task.id, task.step), now=0.0)  # type: ignore[arg-type]
    assert run.release() == ["d-1", "d-2", "d-3"] and run.pending == {}


def group(rewards: list[float], *, failed: bool = False, logprob: float = -1.0) -> PromptGroup:
    samples = tuple(
        Sample(completion_ids=(5, 6), logprobs=(logprob, logprob), text="", reward=r, failed=failed)
        for r in rewards
    )
    return PromptGroup(prompt_index=0, prompt_ids=(4, 7), samples=samples)


def test_mixed_step_outcome_per_slot(tiny_model_dir) -> None:
    """Slot 0 trains; slot 1's rows give a non-finite loss (a failure); every sample of slot 2
    failed (a failure too: an adapter whose samples always fail must end failed)."""
    model = MultiLoraModel.from_pretrained(tiny_model_dir("llama"), num_slots=3, max_rank=4)
    optimizer = SlotAdamW(model.store, model.table)
    for slot in range(3):
        model.configure_slot(slot, rank=2, alpha=4.0, seed=slot)
        optimizer.configure(slot, make_run().spec.optim, 5)
    loss = make_run().spec.loss
    rows = [
        AdapterRows(0, loss, [group([0.0, 1.0])]),
        AdapterRows(1, loss, [group([0.0, 1.0], logprob=math.nan)]),
        AdapterRows(2, loss, [group([0.0, 1.0], failed=True)]),
    ]
    step = mixed_step(model, optimizer, rows, pad_id=0)
    trained, skipped, empty = (step.outcomes[s] for s in range(3))
    assert trained.trained and not trained.failed and trained.reason == ""
    metrics = trained.step_metrics(staleness=0.0, step_s=0.5)
    assert metrics["reward_mean"] == 0.5 and metrics["tokens"] == 4.0 and "ratio" in metrics
    assert skipped.failed and skipped.reason == "non-finite loss"
    # every sample failed: a failure (counted, it can fail the adapter), not an empty step
    assert not empty.trained and empty.failed
    assert empty.reason == "every sample failed: sample failed (no reason given) (2 of 2 samples)"
    assert (step.adapters, step.tokens) == (1, 4)
    assert set(step.timings) == {"pack", "forward_backward", "optimizer"}
    with pytest.raises(ValueError, match="did not train"):
        skipped.step_metrics(staleness=0.0, step_s=0.5)
