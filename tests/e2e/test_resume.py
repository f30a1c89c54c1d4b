"""A registration with ``resume: true`` continues the adapter's latest checkpoint exactly: the same
weights and optimizer state, the next step number and the next prompts of the saved data cursor."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from safetensors.torch import load as load_safetensors

from events.adapter_format import STATE_JSON, STATE_TENSORS, decode_training_state
from events.codec import Decoder
from events.schema import (
    Admitted,
    CheckpointSaved,
    RolloutTask,
    StepDone,
    SyncRequested,
    TaskEvent,
)
from orchestrator.artifacts import ArtifactStore
from orchestrator.cursor import DataCursor
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward

pytestmark = [pytest.mark.bus]


def test_resume_continues_the_latest_checkpoint(
    live_stack: Callable[..., LiveStack], data_dir
) -> None:
    live = live_stack(num_slots=1)
    first_spec = adapter_spec(data_dir, char_reward("a"), steps=4, checkpoint_interval=2)
    first = live.register("res", first_spec)
    final = live.wait_for(
        "the final checkpoint of the first registration",
        lambda: [e for e in live.events(CheckpointSaved, first) if e.final],
    )[0]
    assert final.step == 4

    resumed_spec = msgspec.structs.replace(first_spec, steps=6, resume=True)
    second = live.register("res", resumed_spec)
    live.wait_for("the resumed registration to finish", lambda: live.last_step(second) >= 6)

    (admitted,) = live.events(Admitted, second)
    assert admitted.start_step == 4 and admitted.resumed_from == final.uri
    assert [e.step for e in live.events(StepDone, second)] == [5, 6]  # no step redone

    store = ArtifactStore(str(live.stack.run_dir / "artifacts"))
    # weights and Adam state: the resumed registration's first version is the checkpoint's
    sync = next(e for e in live.events(SyncRequested, second) if e.step == 4)
    saved = load_safetensors(store.read_file(final.uri, STATE_TENSORS))
    restored = load_safetensors(store.read_file(sync.uri, STATE_TENSORS))
    assert saved.keys() == restored.keys()
    for key in saved:
        assert saved[key].equal(restored[key]), key
    info = decode_training_state(store.read_file(sync.uri, STATE_JSON))
    assert info.slot.step == 4  # Adam's step counter carried over, not restarted
    # data: the next prompts are the saved cursor's next prompts
    saved_info = decode_training_state(store.read_file(final.uri, STATE_JSON))
    expected = DataCursor.restore(saved_info.cursor).take(first_spec.prompts_per_step)
    tasks = [t for t in all_tasks(live) if t.registration_id == second and t.step == 5]
    assert [list(t.prompt_indices) for t in tasks] == [expected]
    assert info.step == 4


def all_tasks(live: LiveStack) -> list[RolloutTask]:
    decoder = Decoder(TaskEvent)
    return [decoder.decode(f, e.decode()) for e, f in live.client.xrange(live.streams.tasks)]
