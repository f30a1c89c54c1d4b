"""``multilora up --schedule``: the schedule runner returns once every adapter is done.

One slot, three adapters: ``first`` takes the slot, ``queued`` waits behind it and is cancelled
while it waits (it never gets a slot), ``late`` waits and trains after ``first``. The run must
return (not hang on the cancelled one) and, when it returns, the final checkpoints of the
adapters that trained must be on disk, even when the checkpointer is slow to take them: it is
frozen until a few seconds after both have completed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from events.schema import Admitted, CheckpointSaved, Completed, DeregisterRequested, Queued
from orchestrator.checkpoint_store import verify
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward

pytestmark = [pytest.mark.bus]


def write_adapter(folder: Path, name: str, data_dir: Path, steps: int) -> str:
    spec = adapter_spec(data_dir, char_reward("a"), steps=steps, checkpoint_interval=100)
    data = {"name": name, **msgspec.to_builtins(spec)}
    (folder / f"{name}.json").write_bytes(msgspec.json.encode(data))
    return f"{name}.json"


def test_schedule_with_a_cancel_in_the_queue_returns_with_final_checkpoints(
    live_stack: Callable[..., LiveStack], data_dir: Path, tmp_path: Path
) -> None:
    live = live_stack(num_slots=1)
    folder = tmp_path / "schedule"
    folder.mkdir()
    steps = [
        {"register": write_adapter(folder, "first", data_dir, 6)},
        {"register": write_adapter(folder, "queued", data_dir, 6)},
        {"register": write_adapter(folder, "late", data_dir, 4)},
        {"cancel": "queued"},
    ]
    schedule = folder / "schedule.json"
    schedule.write_bytes(msgspec.json.encode({"step": steps}))

    def thaw_late() -> None:
        live.wait_for("both to complete", lambda: len(trained_and_completed(live)) == 2)
        time.sleep(3.0)
        live.signal("checkpoint", signal.SIGCONT)

    live.signal("checkpoint", signal.SIGSTOP)
    thaw = threading.Thread(target=thaw_late, daemon=True)
    thaw.start()
    try:
        assert live.stack.run_schedule(str(schedule), timeout_s=90) == 0
        finals = {e.adapter: e for e in live.events(CheckpointSaved) if e.final}
    finally:
        thaw.join(timeout=120)
        live.signal("checkpoint", signal.SIGCONT)

    assert set(finals) == {"first", "late"}, "the schedule returned before the final checkpoints"
    for name, steps_total in (("first", 6), ("late", 4)):
        assert verify(finals[name].uri).step == steps_total
    assert {e.adapter for e in live.events(Queued)} >= {"queued", "late"}
    assert [e.adapter for e in live.events(DeregisterRequested)] == ["queued"]
    assert not [e for e in live.events(Admitted) if e.adapter == "queued"]
    (ended,) = [e for e in live.events(Completed) if e.adapter == "queued"]
    assert ended.reason == "cancelled" and ended.epoch == 0, ended
    # a registration that never held a slot has nothing to checkpoint: acknowledged unchanged
    assert f"no adapter.admitted seen for queued/{ended.registration_id}" not in live.log(
        "checkpoint"
    )


def trained_and_completed(live: LiveStack) -> list[Completed]:
    """``completed`` events of registrations that held a slot (epoch >= 1)."""
    return [e for e in live.events(Completed) if e.epoch >= 1]
