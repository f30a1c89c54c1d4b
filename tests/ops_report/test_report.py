"""The operator views against a real Redis: status table, watch, event tail, curves."""

from __future__ import annotations

import io
import threading
import time

import msgspec
import pytest
import redis

from events.codec import encode, stamp
from events.errors import ConfigError
from events.schema import (
    Admitted,
    Completed,
    DeadLetter,
    Failed,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    RolloutTask,
    StepDone,
    Synced,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec, SamplingSpec
from events.streams import Streams
from ops.report import (
    fold_control,
    plot_curves,
    progress_bar,
    status_table,
    step_history,
    tail_events,
    watch,
)

SPEC = AdapterSpec(
    dataset=DatasetSpec(kind="reasoning_gym", name="basic_arithmetic"),
    rewards=(RewardSpec(name="exact_match"),),
    steps=10,
)


def _publish(client: redis.Redis, stream: str, *events: msgspec.Struct) -> None:
    for event in events:
        client.xadd(stream, encode(stamp(event, source="test")))


def _lifecycle(client: redis.Redis, streams: Streams) -> None:
    """alpha trains 2 steps, beta is queued, gamma is rejected, delta completes, eps fails."""
    _publish(
        client,
        streams.control,
        RegisterRequested(adapter="alpha", registration_id="ra", spec=SPEC),
        Admitted(adapter="alpha", registration_id="ra", slot=1, spec=SPEC),
        StepDone(
            adapter="alpha",
            registration_id="ra",
            step=1,
            version=1,
            metrics={"reward_mean": 0.25, "loss": 0.9},
        ),
        Synced(adapter="alpha", registration_id="ra", worker="w1", version=1, latency_s=0.42),
        StepDone(
            adapter="alpha",
            registration_id="ra",
            step=2,
            version=2,
            metrics={"reward_mean": 0.5, "loss": 0.7},
        ),
        RegisterRequested(adapter="beta", registration_id="rb", spec=SPEC),
        Queued(adapter="beta", registration_id="rb", position=0, spec=SPEC),
        Rejected(adapter="gamma", reason="rank 999 exceeds max_rank 64", field="rank"),
        Admitted(adapter="delta", registration_id="rd", slot=2, spec=SPEC),
        StepDone(
            adapter="delta",
            registration_id="rd",
            step=10,
            version=10,
            metrics={"reward_mean": 0.875, "loss": 0.1},
        ),
        Completed(adapter="delta", registration_id="rd", step=10),
        Retired(adapter="delta", registration_id="rd", slot=2),
        Admitted(adapter="eps", registration_id="re", slot=3, spec=SPEC),
        Failed(adapter="eps", registration_id="re", reason="non-finite loss 3 times", step=4),
    )


def _line(table: str, name: str) -> list[str]:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(name + " ")]
    return line.split()


def test_status_table_shows_phase_slot_step_reward_sync_reason(rclient, streams):
    _lifecycle(rclient, streams)
    table = status_table(rclient, streams)
    assert table.splitlines()[0].split()[:3] == ["ADAPTER", "STATE", "SLOT"]
    assert _line(table, "alpha") == ["alpha", "training", "1", "2/10", "0.500", "v1/0.42s"]
    assert _line(table, "beta") == ["beta", "queued", "-", "0/10", "-", "-"]
    gamma = _line(table, "gamma")
    assert gamma[:2] == ["gamma", "rejected"]
    assert "rank 999 exceeds max_rank 64 (field rank)" in table
    assert _line(table, "delta")[:5] == ["delta", "completed", "-", "10/10", "0.875"]
    eps = _line(table, "eps")
    assert eps[:4] == ["eps", "failed", "3", "4/10"]
    assert "non-finite loss 3 times" in " ".join(eps)


def test_status_table_empty_and_undecodable_entries_are_reported(rclient, streams):
    assert "(no adapters)" in status_table(rclient, streams)
    rclient.xadd(streams.control, {"event": b'{"type": "adapter.bogus", "adapter": "x"}'})
    assert "1 control entries did not decode" in status_table(rclient, streams)


def test_reregistration_shows_the_new_run_and_ignores_late_old_work(rclient, streams):
    _publish(
        rclient,
        streams.control,
        Admitted(adapter="a", registration_id="r1", slot=0, spec=SPEC),
        StepDone(adapter="a", registration_id="r1", step=5, version=5, metrics={"loss": 1.0}),
        Admitted(adapter="a", registration_id="r2", slot=1, spec=SPEC),
        StepDone(adapter="a", registration_id="r1", step=6, version=6, metrics={"loss": 1.0}),
        StepDone(adapter="a", registration_id="r2", step=1, version=1, metrics={"loss": 2.0}),
    )
    assert _line(status_table(rclient, streams), "a")[:4] == ["a", "training", "1", "1/10"]
    assert step_history(rclient, streams) == {"a": [(1, {"loss": 2.0})]}


def test_status_hashes_fill_adapters_missing_from_the_log(rclient, streams):
    rclient.sadd(streams.status_index, "old")
    rclient.hset(
        streams.status("old"),
        mapping={
            "phase": "training",
            "slot": "0",
            "step": "7",
            "steps_total": "20",
            "reward_mean": "0.3",
        },
    )
    assert _line(status_table(rclient, streams), "old")[:5] == [
        "old", "training", "0", "7/20", "0.300",
    ]  # fmt: skip


def test_fold_keeps_one_entry_per_step_on_redelivery():
    events = [
        Admitted(adapter="a", registration_id="r", slot=0, spec=SPEC),
        StepDone(adapter="a", registration_id="r", step=1, version=1, metrics={"loss": 1.0}),
        StepDone(adapter="a", registration_id="r", step=1, version=1, metrics={"loss": 1.0}),
        StepDone(adapter="a", registration_id="r", step=2, version=2, metrics={"loss": 0.5}),
    ]
    view = fold_control(events)
    assert [s for s, _ in view.history["a"]] == [1, 2]
    assert view.rows["a"].loss == 0.5


def test_plot_curves_writes_a_png(rclient, streams, tmp_path):
    _lifecycle(rclient, streams)
    history = step_history(rclient, streams)
    assert [s for s, _ in history["alpha"]] == [1, 2]
    assert history["alpha"][1][1]["reward_mean"] == 0.5
    path = plot_curves(rclient, streams, tmp_path / "sub" / "curves.png")
    data = (tmp_path / "sub" / "curves.png").read_bytes()
    assert path.endswith("curves.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_curves_with_no_steps_still_writes(rclient, streams, tmp_path):
    path = plot_curves(rclient, streams, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
    assert path == str(tmp_path / "empty.png")


def test_tail_prints_the_last_entries_one_line_each(rclient, streams):
    _lifecycle(rclient, streams)
    out = io.StringIO()
    tail_events(rclient, streams, "control", count=3, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "adapter.admitted  eps" in lines[1]
    assert "adapter.failed  eps  non-finite loss 3 times" in lines[2]
    first_id = rclient.xrevrange(streams.control, count=3)[-1][0].decode()
    assert lines[0].startswith(first_id)


def test_tail_other_streams_and_dead_letters(rclient, streams):
    task = RolloutTask(adapter="alpha", registration_id="ra", step=3, version=2, weights_uri="u",
                       prompt_indices=(1, 2), group_size=4, dataset=SPEC.dataset,
                       rewards=SPEC.rewards, sampling=SamplingSpec())  # fmt: skip
    _publish(rclient, streams.tasks, task)
    letter = DeadLetter(stream=streams.ingress, group="g", entry_id="1-0", reason="bad json",
                        deliveries=1, consumer="c", time=0.0, payload={"event": "{"})  # fmt: skip
    rclient.xadd(streams.dead, {"dead": msgspec.json.encode(letter)})
    rclient.xadd(streams.ingress, {"event": b"{not json"})
    out = io.StringIO()
    tail_events(rclient, streams, "tasks", count=5, out=out)
    assert "rollout.task  alpha  step=3 v2 prompts=2" in out.getvalue()
    out = io.StringIO()
    tail_events(rclient, streams, "dead", count=5, out=out)
    assert "deliveries=1  bad json" in out.getvalue()
    out = io.StringIO()
    tail_events(rclient, streams, "ingress", count=5, out=out)
    assert "<undecodable: malformed JSON" in out.getvalue()
    with pytest.raises(ConfigError, match="unknown stream 'nope'"):
        tail_events(rclient, streams, "nope")


def test_tail_follow_prints_new_entries(rclient, streams):
    _publish(rclient, streams.control, Admitted(adapter="a", slot=0, spec=SPEC))
    out = io.StringIO()

    def publish_later() -> None:
        time.sleep(0.2)
        _publish(rclient, streams.control, Retired(adapter="a", slot=0))

    thread = threading.Thread(target=publish_later)
    thread.start()
    tail_events(rclient, streams, "control", count=1, follow=True, out=out, block_ms=3000,
                max_follow=1)  # fmt: skip
    thread.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "adapter.admitted" in lines[0] and "adapter.retired  a  slot=0" in lines[1]


def test_watch_draws_progress_bars(rclient, streams):
    _lifecycle(rclient, streams)
    out = io.StringIO()
    watch(rclient, streams, interval_s=0.05, out=out, iterations=2)
    text = out.getvalue()
    assert text.count("\x1b[2J") == 2
    assert f"alpha  {progress_bar(2, 10)}" in text and "reward 0.500" in text
    assert progress_bar(2, 10, width=10) == "[##........]"
    assert progress_bar(3, 0, width=4) == "[....]"
    with pytest.raises(ConfigError, match="positive"):
        watch(rclient, streams, interval_s=0)
