"""In-process reward failures stay in their sample: raising, NaN/inf, and calls past a deadline.

A hanging reward is played by a function that blocks on a :class:`threading.Event` the test sets
at the end, so no thread outlives the test.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import pytest

from events.specs import RewardSpec
from rollout.data import PromptItem
from rollout.reward_builtins import builtin_registry
from rollout.rewards import RewardComposite, RewardDeadline, RewardError, RewardRegistry

ITEMS = [PromptItem(index=i, prompt=f"q{i}", label="") for i in range(4)]


class Hang:
    """A reward that blocks until released when the completion says ``"hang"``, else 1.0."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0
        self.returned = 0

    def __call__(self, completion: str, item: PromptItem) -> float:
        self.started += 1
        if completion == "hang":
            self.release.wait(30)
        self.returned += 1
        return 1.0


@pytest.fixture
def hang() -> Iterator[Hang]:
    fn = Hang()
    yield fn
    fn.release.set()


def registry_with(hang: Hang) -> RewardRegistry:
    registry = builtin_registry()
    registry.register("hangs", hang, value_range=(0.0, 1.0))
    registry.register("raises", lambda c, item: 1.0 / (item.index - 1), value_range=(-1.0, 1.0))
    registry.register("nan", lambda c, item: math.nan if item.index == 2 else 0.5)
    registry.register("inf", lambda c, item: -math.inf)
    registry.register("huge", lambda c, item: 1e308)
    registry.register("one", lambda c, item: 1.0)
    return registry


def composite(registry: RewardRegistry, *names: str, weight: float = 1.0) -> RewardComposite:
    return RewardComposite.from_specs([RewardSpec(name=n, weight=weight) for n in names], registry)


def test_a_raising_reward_fails_only_its_sample(hang: Hang) -> None:
    reward = composite(registry_with(hang), "raises")
    deadline = RewardDeadline(2.0)
    results = reward.score_batch(["a"] * 4, ITEMS, deadline=deadline)
    assert [r.failed for r in results] == [False, True, False, False]
    assert results[1].reason == "raises: ZeroDivisionError: float division by zero"
    assert results[1].total == 0.0
    assert [r.total for r in results] == [-1.0, 0.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("names", "weight", "failed", "reason"),
    [
        (("nan",), 1.0, [False, False, True, False], "nan: returned non-finite nan"),
        (("inf",), 1.0, [True] * 4, "inf: returned non-finite -inf"),
        (
            ("huge", "huge"),
            1.7,
            [True] * 4,
            "weighted total is non-finite (inf); lower the terms' weights",
        ),
    ],
)
def test_non_finite_rewards_fail_their_sample_and_never_reach_the_total(
    hang: Hang, names: tuple[str, ...], weight: float, failed: list[bool], reason: str
) -> None:
    reward = composite(registry_with(hang), *names, weight=weight)
    results = reward.score_batch(["a"] * 4, ITEMS, deadline=RewardDeadline(2.0))
    assert [r.failed for r in results] == failed
    assert all(math.isfinite(r.total) for r in results)
    assert all(r.total == 0.0 and r.reason == reason for r in results if r.failed)


def test_a_hanging_call_fails_its_sample_after_the_deadline_and_scoring_moves_on(
    hang: Hang,
) -> None:
    reward = composite(registry_with(hang), "hangs", "one")
    deadline = RewardDeadline(0.3, max_hung=2)
    t0 = time.monotonic()
    results = reward.score_batch(["ok", "hang", "ok", "ok"], ITEMS, deadline=deadline)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2.0, elapsed
    assert [r.failed for r in results] == [False, True, False, False]
    assert results[1].reason == "hangs: timeout after 0.3s"
    assert results[1].terms == {"one": 1.0}  # the other term of that sample was scored
    assert deadline.hung("hangs") == 1 and deadline.hung("one") == 0
    hang.release.set()  # the hung call returns late: its result is dropped, the count released
    for _ in range(100):
        if deadline.hung("hangs") == 0:
            break
        time.sleep(0.01)
    assert deadline.hung("hangs") == 0
    assert not reward.score("hang", ITEMS[0], deadline).failed  # released: scores normally


def test_after_max_hung_calls_a_reward_fails_at_once_and_others_still_score(hang: Hang) -> None:
    """Hung threads cannot pile up: past ``max_hung`` abandoned calls of one reward, its later
    calls are not started and fail at once; a different reward is unaffected."""
    registry = registry_with(hang)
    reward = composite(registry, "hangs")
    deadline = RewardDeadline(0.2, max_hung=2)
    t0 = time.monotonic()
    results = reward.score_batch(["hang"] * 4 + ["ok"] * 4, ITEMS * 2, deadline=deadline)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.2 * 2 + 1.0, elapsed  # two deadlines, then no more waiting
    assert all(r.failed for r in results)
    assert [r.reason for r in results[:2]] == ["hangs: timeout after 0.2s"] * 2
    assert all(
        r.reason == "hangs: timeout after 0.2s (not called: 2 earlier calls are still hung)"
        for r in results[2:]
    )
    assert hang.started == 2 and deadline.hung("hangs") == 2
    other = composite(registry, "one").score_batch(["a"] * 2, ITEMS[:2], deadline=deadline)
    assert [r.failed for r in other] == [False, False]


def test_calls_reuse_runner_threads_and_a_hung_one_holds_only_its_own(hang: Hang) -> None:
    registry = registry_with(hang)
    deadline = RewardDeadline(0.2, max_hung=2)
    results = composite(registry, "one").score_batch(["a"] * 40, ITEMS * 10, deadline=deadline)
    assert not any(r.failed for r in results)
    assert deadline.runners == 1  # one thread ran all 40 calls, one after another
    composite(registry, "hangs").score("hang", ITEMS[0], deadline)  # holds its runner
    results = composite(registry, "one").score_batch(["a"] * 8, ITEMS * 2, deadline=deadline)
    assert not any(r.failed for r in results)
    assert deadline.runners == 2  # the hung call kept one; the others shared one more
    hang.release.set()
    for _ in range(100):
        if deadline.hung("hangs") == 0:
            break
        time.sleep(0.01)
    composite(registry, "one").score_batch(["a"] * 8, ITEMS * 2, deadline=deadline)
    assert deadline.runners == 2  # the released runner went back to work: no new thread


def test_bad_deadline_settings_are_refused() -> None:
    with pytest.raises(RewardError, match="timeout_s must be > 0, got 0"):
        RewardDeadline(0.0)
    with pytest.raises(RewardError, match="max_hung must be >= 1, got 0"):
        RewardDeadline(1.0, max_hung=0)
