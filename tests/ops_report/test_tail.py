"""``multilora events tail`` against a real Redis: one line per entry, other streams, follow."""

from __future__ import annotations

import io
import threading
import time

import msgspec
import pytest

from events.errors import ConfigError
from events.schema import Admitted, DeadLetter, Retired, RolloutTask
from events.specs import SamplingSpec
from ops.tail import tail_events
from tests.ops_report.log import SPEC, lifecycle, publish


def test_tail_prints_the_last_entries_one_line_each(rclient, streams):
    lifecycle(rclient, streams)
    out = io.StringIO()
    tail_events(rclient, streams, "control", count=3, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "adapter.admitted  eps" in lines[1]
    assert "adapter.failed  eps  non-finite loss 3 times" in lines[2]
    first_id = rclient.xrevrange(streams.control, count=3)[-1][0].decode()
    assert lines[0].startswith(first_id)


def test_tail_other_streams_and_dead_letters(rclient, streams):
    task = RolloutTask(
        adapter="alpha",
        registration_id="ra",
        step=3,
        version=2,
        weights_uri="u",
        prompt_indices=(1, 2),
        group_size=4,
        dataset=SPEC.dataset,
        rewards=SPEC.rewards,
        sampling=SamplingSpec(),
    )
    publish(rclient, streams.tasks, task)
    letter = DeadLetter(
        stream=streams.ingress,
        group="g",
        entry_id="1-0",
        reason="bad json",
        deliveries=1,
        consumer="c",
        time=0.0,
        payload={"event": "{"},
    )
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
    publish(rclient, streams.control, Admitted(adapter="a", slot=0, spec=SPEC))
    out = io.StringIO()

    def publish_later() -> None:
        time.sleep(0.2)
        publish(rclient, streams.control, Retired(adapter="a", slot=0))

    thread = threading.Thread(target=publish_later)
    thread.start()
    tail_events(
        rclient, streams, "control", count=1, follow=True, out=out, block_ms=3000, max_follow=1
    )
    thread.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "adapter.admitted" in lines[0] and "adapter.retired  a  slot=0" in lines[1]
