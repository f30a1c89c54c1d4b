"""One tenant's failure stays its own, on the live local stack: three adapters share one trainer
and one rollout worker; one's reward hangs on every call, one's raises on every call, the third
is healthy.

The worker fails each sample of the hanging reward after its per-call deadline (the worker's
default, :class:`rollout.rewards.RewardDeadline`: after two hung calls it stops calling that
reward, so only the first task of that adapter waits), and every sample of the raising one at
once; the trainer skips both adapters' steps, and after ``max_failures`` (3) skips in a row
fails each with the samples' reason, which ``multilora status`` shows. The healthy adapter
completes its whole budget meanwhile, one step at a time, nothing restarted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from events.schema import Completed, Failed, StepDone
from events.specs import RewardSpec
from orchestrator.lifecycle import Phase
from orchestrator.status import read_one
from tests.e2e.harness import CHAR_REWARD, LiveStack
from tests.e2e.specs import adapter_spec, char_reward

pytestmark = [pytest.mark.bus]

STEPS = 6
REWARDS = {CHAR_REWARD: "char_fraction", "hangs": "hangs", "explodes": "explodes"}
DEADLINE_S = 5.0
"""The rollout worker's default deadline of one in-process reward call."""


def extra_args(data_dir: str) -> dict[str, list[str]]:
    """The stack's extra flags: every test reward allow-listed on the trainer and the worker."""
    trainer = ["--allowed-root", data_dir]
    rollout = ["--allowed-root", data_dir, "--block-ms", "500"]
    for name, fn in REWARDS.items():
        trainer += ["--extra-reward", name]
        rollout += ["--reward", f"{name}=tests.e2e.rewards:{fn}"]
    return {"trainer": trainer, "rollout": rollout}


def test_a_hanging_and_a_raising_reward_fail_their_adapters_and_the_healthy_one_trains(
    live_stack: Callable[..., LiveStack], data_dir
) -> None:
    live = live_stack(extra_args=extra_args(str(data_dir)))
    t0 = time.monotonic()
    healthy = live.register("healthy", adapter_spec(data_dir, char_reward("a"), steps=STEPS))
    hanging = live.register("hanging", adapter_spec(data_dir, RewardSpec(name="hangs"), seed=1))
    raising = live.register("raising", adapter_spec(data_dir, RewardSpec(name="explodes"), seed=2))

    def ended(reg: str) -> bool:
        return bool(live.events(Completed, reg) or live.events(Failed, reg))

    live.wait_for("every adapter ended", lambda: all(map(ended, (healthy, hanging, raising))))
    elapsed = time.monotonic() - t0

    (done,) = live.events(Completed, healthy)
    assert done.reason == "budget" and not live.events(Failed, healthy)
    steps = live.events(StepDone, healthy)
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    gaps = [b.time - a.time for a, b in itertools.pairwise(steps)]
    print(f"healthy: {STEPS} steps in {elapsed:.1f} s, gaps between steps {gaps}")
    # the one task whose hung calls were waited for (2 x the deadline) is the only slow one
    assert max(gaps) < 2 * DEADLINE_S + 8.0, gaps

    for reg, name, cause in (
        (hanging, "hanging", f"hangs: timeout after {DEADLINE_S:g}s"),
        (raising, "raising", "explodes: ZeroDivisionError: verifier divided by zero"),
    ):
        (failed,) = live.events(Failed, reg)
        assert (
            "steps in a row skipped: every sample failed: " in failed.reason
            and cause in failed.reason
        )
        assert not live.events(StepDone, reg)
        status = read_one(live.client, live.streams, name)
        assert status is not None and status.registration_id == reg
        print(f"{name}: {status.phase} {status.reason!r}")
        assert status.phase in (Phase.FAILED, Phase.RETIRED) and cause in status.reason, status
    live.check()  # nothing crashed or was restarted
