"""Chaos over real processes: adapters come and go while any process, Redis included, is killed.

The run: three adapters at the start (``a`` and ``c`` rewarded in-process, ``r`` by the built-in
``regex`` reward scored on the RQ ``rewards`` worker), ``c`` cancelled at step 3, ``d``
registered once ``a`` reached step 3 (it waits for a slot) and ``c`` registered again once the
first ``c`` ended (work of the retired registration must never train the new one). Meanwhile a
random process is SIGKILLed every few seconds and restarted as a supervisor would. Afterwards
:func:`tests.chaos.history.check` must find no violation.

The checker can fail: the same harness, run on a trainer with one guarantee deliberately broken
(:mod:`tests.chaos.broken_trainer`) and killed at a controlled moment, must report it.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from events.schema import RolloutGroup
from events.specs import AdapterSpec
from orchestrator.lifecycle import AdapterState, is_ended
from tests.chaos.harness import KINDS, ChaosOptions, ChaosStack, Plan
from tests.chaos.history import Verdict, check
from tests.e2e.specs import adapter_spec, char_reward, digit_reward

pytestmark = [pytest.mark.bus, pytest.mark.slow]

MAX_RANK = 8


def spec(data_dir: Path, reward: str, steps: int, seed: int) -> AdapterSpec:
    chosen = digit_reward() if reward == "regex" else char_reward(reward)
    return adapter_spec(
        data_dir, chosen, steps=steps, seed=seed, checkpoint_interval=3, keep_checkpoints=100
    )


def scenario(data_dir: Path) -> list[Plan]:
    return [
        Plan("a", spec(data_dir, "a", steps=10, seed=0)),
        Plan("r", spec(data_dir, "regex", steps=10, seed=1)),
        Plan("c", spec(data_dir, "c", steps=40, seed=2), cancel_at=3),
        Plan("d", spec(data_dir, "d", steps=8, seed=3), after="a", after_step=3),
        Plan("c", spec(data_dir, "e", steps=6, seed=4), after="c"),
    ]


def until_every_kind_killed(
    chaos: ChaosStack, data_dir: Path, most: int = 12
) -> Callable[[float, dict[str, AdapterState]], list[Plan]]:
    """An ``extend`` that registers one more short adapter whenever every registration so far
    has ended while some process kind was never killed (up to ``most`` of them): on a fast
    machine (and with steps computing beside the loop) the scenario can finish before the kill
    schedule reached every kind."""
    added = 0

    def extend(elapsed_s: float, states: dict[str, AdapterState]) -> list[Plan]:
        nonlocal added
        record = chaos.record
        ended = all(rid in states and is_ended(states[rid]) for _, rid in record.registrations)
        if not ended or set(record.kills) >= set(KINDS) or added >= most:
            return []
        added += 1
        return [Plan(f"more{added}", spec(data_dir, "a", steps=6, seed=10 + added))]

    return extend


def verdict_of(chaos: ChaosStack, chaos_model: Path, bound: int | None = None) -> Verdict:
    return check(chaos.history(model=str(chaos_model), max_rank=MAX_RANK), max_artifact_bytes=bound)


def test_random_sigkills_of_every_process_break_no_guarantee(
    chaos_stack: Callable[..., ChaosStack], data_dir: Path, chaos_model: Path
) -> None:
    chaos = chaos_stack(ChaosOptions(seed=7, kill_gap_s=(2.0, 5.0), timeout_s=200))
    record = chaos.run(scenario(data_dir), extend=until_every_kind_killed(chaos, data_dir))
    verdict = verdict_of(chaos, chaos_model)
    summary = f"kills {dict(record.kills)}, exits {dict(record.exits)}\n{verdict.report()}"
    print(summary)
    assert verdict.ok, summary
    assert sum(record.kills.values()) >= len(KINDS), summary
    assert set(record.kills) == set(KINDS), summary
    assert verdict.steps_applied >= 10 + 10 + 3 + 8 + 6, summary
    assert verdict.checkpoints_checked >= 5, summary
    # the remote adapter's rewards came back from the RQ worker (scored, not failed)
    remote = [g for g in chaos.live.groups() if g.adapter == "r"]
    scored = [s for g in remote for p in g.groups for s in p.samples if not s.failed]
    assert scored, "no sample of the remote-reward adapter was scored"


def freeze_holding_groups(chaos: ChaosStack, timeout_s: float = 30.0) -> list[RolloutGroup]:
    """SIGSTOP the trainer at a moment it holds deferred groups; returns those groups."""
    live = chaos.live
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if live.pending(live.streams.groups, "trainer", "trainer"):
            live.signal("trainer", signal.SIGSTOP)
            held = live.pending(live.streams.groups, "trainer", "trainer")
            if held:
                return live.group_by_entry(held)
            live.signal("trainer", signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the trainer never held a deferred group")


def kill_trainer_once(at_step: int, *, frozen: bool) -> Callable[[ChaosStack, dict], None]:
    """An ``on_tick`` that kills the trainer (frozen while it holds groups, if asked) once the
    first two registrations both reached ``at_step``, and starts it again."""
    done: list[bool] = []

    def tick(chaos: ChaosStack, states: dict) -> None:
        ids = [rid for _, rid in chaos.record.registrations[:2]]
        if done or len(ids) < 2 or not all(r in states and states[r].step >= at_step for r in ids):
            return
        if frozen:
            freeze_holding_groups(chaos)
        chaos.kill("trainer")
        chaos.restart("trainer")
        chaos.record.kills["trainer"] += 1
        done.append(True)

    return tick


@pytest.mark.parametrize(
    ("mode", "caught"),
    [("no-epoch-check", "stale_trained"), ("lose-version-write", "applied_twice")],
    ids=["no-epoch-check", "lose-version-write"],
)
def test_the_checker_catches_a_broken_trainer(
    chaos_stack: Callable[..., ChaosStack],
    data_dir: Path,
    chaos_model: Path,
    mode: str,
    caught: str,
) -> None:
    broken = [sys.executable, "-m", "tests.chaos.broken_trainer", "--break", mode, "trainer"]
    options = ChaosOptions(victims=(), timeout_s=120, wait_for_finals=False)
    chaos = chaos_stack(options, trainer_command=broken)
    plans = [
        Plan("a", spec(data_dir, "a", steps=12, seed=0)),
        Plan("b", spec(data_dir, "b", steps=12, seed=1)),
    ]
    chaos.run(plans, on_tick=kill_trainer_once(4, frozen=mode == "no-epoch-check"))
    verdict = verdict_of(chaos, chaos_model)
    print(verdict.report())
    assert verdict.of(caught), f"{mode} went unnoticed:\n{verdict.report()}"  # type: ignore[arg-type]
    if caught == "stale_trained":
        assert verdict.stale_trained >= 1, verdict.report()
    else:
        assert verdict.applied_twice >= 1, verdict.report()
