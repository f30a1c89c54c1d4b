"""Heartbeats from the consumer runtime against a real server: the beat key and its TTL, the
registry that keeps a dead process visible, what counts as progress, and the liveness that
``status`` reads back (alive, stalled, dead, stopped)."""

from __future__ import annotations

import threading
import time

import pytest

from events.codec import Decoder
from events.connection import connect
from events.consumer import DEFER, Consumer, Delivery, Subscription
from events.effects import Effects
from events.heartbeat import (
    Heartbeat,
    Liveness,
    ProcessBeat,
    heartbeat_key,
    prune_processes,
    read_processes,
    registry_key,
)
from events.schema import ControlEvent
from tests.bus.test_consumer import publish_failed

pytestmark = pytest.mark.bus


def consumer(redis_url, streams, handler, *, lease_ttl_ms=600, **kw) -> Consumer:
    hb = Heartbeat(streams, "worker", "w1", ttl_ms=lease_ttl_ms)
    subs = [Subscription(streams.control, "g", Decoder(ControlEvent))]
    return Consumer(
        lambda: connect(redis_url),
        streams,
        "w1",
        subs,
        handler,
        block_ms=200,
        lease_ttl_ms=lease_ttl_ms,
        heartbeat=hb,
        **kw,
    )


def only(rclient, streams, **kw):
    (status,) = read_processes(rclient, streams, **kw)
    return status


def wait_until(what, check, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_a_running_consumer_beats_with_a_ttl_and_a_warm_stop_marks_it_stopped(
    redis_url, streams, rclient
) -> None:
    c = consumer(redis_url, streams, lambda d: Effects())
    runner = threading.Thread(target=c.run)
    runner.start()
    try:
        key = heartbeat_key(streams, "worker", "w1")
        wait_until("the first beat", lambda: rclient.exists(key))
        first = float(rclient.hget(key, "beat_at"))
        assert 0 < rclient.pttl(key) <= 600
        fields = rclient.hgetall(key)
        assert {b"role", b"name", b"host", b"pid", b"started_at", b"progress_at"} <= set(fields)
        wait_until("a later beat", lambda: float(rclient.hget(key, "beat_at")) > first)
        status = only(rclient, streams)
        assert status.liveness is Liveness.ALIVE and status.beat.name == "w1"
        assert status.beat_age_s < 0.6
    finally:
        c.request_stop()
        runner.join(timeout=10)
    assert not rclient.exists(key)
    status = only(rclient, streams)
    assert status.liveness is Liveness.STOPPED and status.beat.stopped_at > 0


def test_a_process_that_stops_beating_stays_visible_as_dead(redis_url, streams, rclient) -> None:
    hb = Heartbeat(streams, "trainer", "trainer", ttl_ms=300)
    hb.beat(rclient)
    assert only(rclient, streams).liveness is Liveness.ALIVE
    time.sleep(0.5)  # no beat for longer than the TTL: the key expired, the registry keeps it
    assert not rclient.exists(hb.key) and rclient.hexists(registry_key(streams), "trainer:trainer")
    status = only(rclient, streams)
    assert status.liveness is Liveness.DEAD and status.beat_age_s >= 0.3
    # a beat older than its TTL is dead even while its key exists (a writer's slow clock)
    beat = hb.beat(rclient)
    assert rclient.exists(hb.key)
    (late,) = read_processes(rclient, streams, now=beat.beat_at + 10)
    assert late.liveness is Liveness.DEAD


def test_processes_gone_past_the_retention_are_forgotten_the_others_kept(
    redis_url, streams, rclient
) -> None:
    old_dead = Heartbeat(streams, "rollout", "rollout.host-a.0", ttl_ms=300)
    old_stopped = Heartbeat(streams, "rollout", "rollout.host-b.0", ttl_ms=300)
    dead = Heartbeat(streams, "trainer", "trainer", ttl_ms=300)
    alive = Heartbeat(streams, "checkpoint", "checkpoint", ttl_ms=60_000)
    dead_at = old_dead.beat(rclient).beat_at
    old_stopped.beat(rclient)
    old_stopped.stopped(rclient)
    time.sleep(0.4)  # the short TTLs expire: dead, or stopped warm
    dead.beat(rclient)
    beat = alive.beat(rclient)
    time.sleep(0.4)
    now = beat.beat_at + 100.0  # pretend 100 s later; the alive one beat "just now" (its key)
    assert prune_processes(rclient, streams, retention_s=1000.0, now=now) == []
    forgotten = prune_processes(rclient, streams, retention_s=50.0, now=now)
    assert forgotten == ["rollout:rollout.host-a.0", "rollout:rollout.host-b.0", "trainer:trainer"]
    # the alive process's record is as old, but its beat key exists: it stays
    assert [p.beat.name for p in read_processes(rclient, streams)] == ["checkpoint"]
    # a process that beats again between the read and the removal keeps its record
    old_dead.beat(rclient)
    assert prune_processes(rclient, streams, retention_s=0.0, now=dead_at + 10**6) == []
    assert {p.beat.name for p in read_processes(rclient, streams)} == {
        "checkpoint",
        "rollout.host-a.0",
    }


def test_progress_is_a_handled_or_deferred_delivery_or_a_commit_not_an_idle_hook(
    redis_url, streams, rclient
) -> None:
    idle_calls = 0

    def idle() -> None:
        nonlocal idle_calls
        idle_calls += 1

    c = consumer(redis_url, streams, lambda d: DEFER, on_idle=idle, idle_s=0.02)
    hb = c.heartbeat
    assert hb is not None
    runner = threading.Thread(target=c.run)  # no entries wait: the loop runs only its idle hook
    runner.start()
    try:
        wait_until("idle hooks", lambda: idle_calls >= 3)
    finally:
        c.request_stop()
        runner.join(timeout=10)
    assert not runner.is_alive()
    assert hb.progress_at == hb.started_at
    publish_failed(rclient, streams, 1)
    before = hb.progress_at
    time.sleep(0.01)
    c.run(max_events=1)  # deferred: the entry went into the process's state
    deferred_at = hb.progress_at
    assert deferred_at > before
    time.sleep(0.01)
    assert c.commit(Effects(), [])  # nothing applied: not progress
    assert hb.progress_at == deferred_at
    assert c.commit(Effects().command("SET", streams.key("x"), "1"), [])
    assert hb.progress_at > deferred_at


def test_an_alive_process_holding_work_without_progress_reads_as_stalled(
    redis_url, streams, rclient
) -> None:
    release = threading.Event()

    def handle(d: Delivery) -> Effects:
        release.wait(10)  # a wedged handler: the keeper still beats
        return Effects()

    c = consumer(redis_url, streams, handle)
    publish_failed(rclient, streams, 1)
    runner = threading.Thread(target=c.run, kwargs={"max_events": 1})
    runner.start()
    try:
        status = wait_until(
            "a beat with the entry in flight",
            lambda: [s for s in read_processes(rclient, streams) if s.beat.in_flight == 1],
        )[0]
        assert status.liveness is Liveness.ALIVE
        time.sleep(0.5)
        assert only(rclient, streams, stall_after_s=0.3).liveness is Liveness.STALLED
        assert only(rclient, streams, stall_after_s=30).liveness is Liveness.ALIVE
        idle = only(rclient, streams, stall_after_s=0.3, has_work=lambda b: False)
        assert idle.liveness is Liveness.ALIVE, "a process without work is never stalled"
    finally:
        release.set()
        runner.join(timeout=10)
    assert only(rclient, streams).beat.handled == 1


def test_role_specific_fields_travel_with_the_beat_and_reserved_ones_are_refused(
    streams, rclient
) -> None:
    hb = Heartbeat(streams, "trainer", "t", ttl_ms=5000)
    hb.note(model="tiny")
    with pytest.raises(ValueError, match="reserved"):
        hb.note(pid="1")
    hb.beat(rclient, in_flight=3)
    assert rclient.hget(hb.key, "model") == b"tiny"
    beat: ProcessBeat = only(rclient, streams).beat
    assert beat.extra == {"model": "tiny"} and beat.in_flight == 3 and beat.process == "trainer:t"
