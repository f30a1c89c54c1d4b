"""The consumer runtime against a real server: effects once, dead letters, retries, blocking reads,
deferred commits, reclaim, trimming, and a raw (non-Python) producer."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import pytest
import redis

from events.codec import Decoder, encode, stamp
from events.connection import connect
from events.consumer import DEFER, Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import HandlerError
from events.schema import ControlEvent, Failed, IngressEvent, RegisterRequested, Rejected
from events.streams import Streams
from orchestrator.ingress import ingress_subscription
from orchestrator.status import invalid_entry_name
from tests.bus.test_schema import EXAMPLES

pytestmark = pytest.mark.bus


def publish_failed(client: redis.Redis, streams: Streams, n: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        event = stamp(Failed(adapter="a", registration_id=str(i), reason="x"), source="t")
        pipe.xadd(streams.control, encode(event))
    pipe.execute()


def make_consumer(redis_url, streams, handler, *, name="c1", subs=None, **kw) -> Consumer:
    subs = subs or [Subscription(streams.control, "g", Decoder(ControlEvent))]
    kw.setdefault("block_ms", 200)
    return Consumer(lambda: connect(redis_url), streams, name, subs, handler, **kw)


def test_effects_applied_once_and_nothing_left_pending(redis_url, streams, rclient) -> None:
    publish_failed(rclient, streams, 500)
    key = streams.key("effects")

    def handle(d: Delivery) -> Effects:
        return Effects().command("HINCRBY", key, d.event.registration_id, 1)

    stats = make_consumer(redis_url, streams, handle).run(burst=True)
    assert stats.handled == 500
    counts = rclient.hgetall(key)
    assert len(counts) == 500 and set(counts.values()) == {b"1"}
    assert rclient.xpending(streams.control, "g")["pending"] == 0


def test_prepare_runs_in_the_reader_and_a_read_reaches_the_handler_whole(
    redis_url, streams, rclient
) -> None:
    """``Subscription.prepare`` runs beside the handler (its result rides in the delivery; a
    failing one leaves None), and the entries one read returned are all handled before the
    idle hook runs again."""
    import threading

    publish_failed(rclient, streams, 12)
    handler_thread = threading.get_ident()
    seen: list[tuple[str, object]] = []
    idle_at: list[int] = []

    def prepare(event: Failed) -> tuple[int, str]:
        time.sleep(0.005)  # slower than the handler: entries pushed one by one would be seen apart
        if event.registration_id == "3":
            raise ValueError("cannot prepare this one")
        return threading.get_ident(), event.registration_id

    def handle(d: Delivery) -> Effects:
        seen.append((d.event.registration_id, d.prepared))
        return Effects()

    sub = Subscription(streams.control, "g", Decoder(ControlEvent), prepare=prepare, count=12)
    consumer = make_consumer(
        redis_url, streams, handle, subs=[sub], on_idle=lambda: idle_at.append(len(seen))
    )
    stats = consumer.run(burst=True)
    assert stats.handled == 12
    assert [r for r, _ in seen] == [str(i) for i in range(12)]
    assert seen[3][1] is None  # its prepare raised: the handler gets the entry anyway
    made = [p for r, p in seen if r != "3"]
    assert all(isinstance(p, tuple) and p[0] != handler_thread for p in made)
    assert [p[1] for p in made if isinstance(p, tuple)] == [r for r, _ in seen if r != "3"]
    assert set(idle_at) <= {0, 12}  # the one read of 12 was never seen in part


def raw_xadd(url: str, *args: str) -> bytes:
    """XADD over a bare socket in RESP, as a producer in any language would."""
    parsed = urlparse(url)
    parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
    payload = f"*{len(args)}\r\n" + "".join(parts)
    with socket.create_connection((parsed.hostname, parsed.port)) as sock:
        sock.sendall(payload.encode())
        return sock.recv(1024)


def test_raw_resp_producer_is_accepted_and_garbage_is_rejected(redis_url, streams, rclient) -> None:
    good = json.loads(encode(EXAMPLES[0])["event"])
    good.update(id="", time=0, source="")
    assert raw_xadd(redis_url, "XADD", streams.ingress, "*", "event", json.dumps(good))[:1] == b"$"
    raw_xadd(redis_url, "XADD", streams.ingress, "*", "event", '{"type": "adapter.register_req')
    bad_rank = {**good, "adapter": "bad-one", "spec": {**good["spec"], "rank": "sixteen"}}
    raw_xadd(redis_url, "XADD", streams.ingress, "*", "event", json.dumps(bad_rank))
    seen: list[RegisterRequested] = []

    def handle(d: Delivery) -> Effects:
        seen.append(d.event)
        return Effects()

    sub = ingress_subscription(streams, "admission")
    make_consumer(redis_url, streams, handle, subs=[sub]).run(burst=True)
    assert len(seen) == 1 and seen[0].spec.rank == good["spec"]["rank"]
    assert seen[0].id  # filled from the entry id
    dead = [json.loads(f[b"dead"]) for _, f in rclient.xrange(streams.dead)]
    assert len(dead) == 2
    assert "malformed JSON" in dead[0]["reason"] and dead[0]["payload"]["event"].startswith("{")
    assert "$.spec.rank" in dead[1]["reason"]
    rejected = [Decoder(ControlEvent).decode(f) for _, f in rclient.xrange(streams.control)]
    assert all(isinstance(r, Rejected) for r in rejected)
    # an entry naming no usable adapter is reported under its own key, never under ""
    garbage_entry = dead[0]["entry_id"]
    assert [r.adapter for r in rejected] == [invalid_entry_name(garbage_entry), "bad-one"]
    assert "$.spec.rank" in rejected[1].reason


def test_poison_entry_dead_lettered_after_exactly_n_deliveries(redis_url, streams, rclient) -> None:
    publish_failed(rclient, streams, 20)
    poison = "7"
    attempts: dict[str, int] = {}
    key = streams.key("effects")

    def handle(d: Delivery) -> Effects:
        n = d.event.registration_id
        attempts[n] = attempts.get(n, 0) + 1
        if n == poison:
            raise HandlerError(f"cannot process {n}")
        return Effects().command("HINCRBY", key, n, 1)

    consumer = make_consumer(redis_url, streams, handle, claim_idle_ms=100, max_deliveries=4)
    consumer.run(max_events=19 + 4)
    assert attempts[poison] == 4
    assert all(v == 1 for k, v in attempts.items() if k != poison)
    assert len(rclient.hgetall(key)) == 19
    (letter,) = [json.loads(f[b"dead"]) for _, f in rclient.xrange(streams.dead)]
    assert letter["deliveries"] == 4 and "cannot process 7" in letter["reason"]
    assert rclient.xpending(streams.control, "g")["pending"] == 0


def test_blocking_read_of_8s_returns_on_time(redis_url, streams) -> None:
    client = connect(redis_url, max_block_ms=8_000)
    client.xgroup_create(streams.control, "g", id="$", mkstream=True)
    t0 = time.monotonic()
    assert client.xreadgroup("g", "c", {streams.control: ">"}, block=8_000) in ([], None, {})
    elapsed = time.monotonic() - t0
    assert 7.9 <= elapsed < 9.5


def test_deferred_entries_stay_owned_until_committed(redis_url, streams, rclient) -> None:
    publish_failed(rclient, streams, 6)
    held: list[Delivery] = []

    def handle(d: Delivery):
        held.append(d)
        return DEFER

    # claim_idle 1 s, the keeper touching every 0.3 s: a 0.7 s margin on a loaded 2-core box
    consumer = make_consumer(redis_url, streams, handle, claim_idle_ms=1000, lease_ttl_ms=900)
    consumer.run(max_events=6)
    assert rclient.xpending(streams.control, "g")["pending"] == 6
    # a second consumer cannot steal them while the first keeps them fresh
    thief_seen: list[Delivery] = []
    c1 = make_consumer(redis_url, streams, handle, claim_idle_ms=1000, lease_ttl_ms=900)
    c1._in_flight.update({d.ack_key: d for d in held})
    import threading

    keeper = threading.Thread(target=c1._keeper_loop, daemon=True)
    keeper.start()
    time.sleep(1.5)  # past claim_idle: without the keeper's touches they would be stolen now
    thief = make_consumer(
        redis_url,
        streams,
        lambda d: thief_seen.append(d) or Effects(),
        name="thief",
        claim_idle_ms=1000,
    )
    thief.run(burst=True)
    assert thief_seen == []
    key = streams.key("effects")
    assert c1.commit(Effects().command("SET", key, "done"), held)
    c1._stop.set()
    assert rclient.get(key) == b"done"
    assert rclient.xpending(streams.control, "g")["pending"] == 0


def test_commit_refused_after_another_consumer_reclaimed(redis_url, streams, rclient) -> None:
    publish_failed(rclient, streams, 1)
    slow_seen: list[Delivery] = []
    slow = make_consumer(
        redis_url, streams, lambda d: slow_seen.append(d) or DEFER, claim_idle_ms=100
    )
    slow.run(max_events=1)
    time.sleep(0.2)  # slow consumer stalls; its entry goes idle
    key = streams.key("effects")
    fast = make_consumer(
        redis_url,
        streams,
        lambda d: Effects().command("INCRBY", key, 1),
        name="fast",
        claim_idle_ms=100,
    )
    assert fast.run(burst=True).handled == 1
    assert not slow.commit(Effects().command("INCRBY", key, 1), slow_seen)
    assert rclient.get(key) == b"1"


def test_trim_never_drops_unacknowledged_entries(redis_url, streams, rclient) -> None:
    from events.trim import trim_acknowledged

    publish_failed(rclient, streams, 30)
    sub_a = Subscription(streams.control, "a", Decoder(ControlEvent))
    sub_b = Subscription(streams.control, "b", Decoder(ControlEvent))
    make_consumer(redis_url, streams, lambda d: Effects(), subs=[sub_a]).run(burst=True)
    make_consumer(redis_url, streams, lambda d: Effects(), subs=[sub_b], name="c2").run(
        max_events=10
    )
    trim_acknowledged(rclient, streams.control)
    assert rclient.xlen(streams.control) == 20  # group b has delivered 10; 20 remain for it
    make_consumer(redis_url, streams, lambda d: Effects(), subs=[sub_b], name="c2").run(burst=True)
    trim_acknowledged(rclient, streams.control)
    assert rclient.xlen(streams.control) == 0


def test_restart_reads_own_pending_first(redis_url, streams, rclient) -> None:
    publish_failed(rclient, streams, 3)
    make_consumer(redis_url, streams, lambda d: DEFER).run(max_events=3)
    seen: list[int] = []

    def handle(d: Delivery) -> Effects:
        seen.append(d.deliveries)
        return Effects()

    make_consumer(redis_url, streams, handle).run(burst=True)
    assert len(seen) == 3 and all(n >= 1 for n in seen)
    assert rclient.xpending(streams.control, "g")["pending"] == 0


def test_ingress_union_decodes_register(redis_url, streams, rclient) -> None:
    rclient.xadd(streams.ingress, encode(stamp(EXAMPLES[0], source="t")))
    got: list[object] = []
    sub = Subscription(streams.ingress, "g", Decoder(IngressEvent))
    make_consumer(redis_url, streams, lambda d: got.append(d.event) or Effects(), subs=[sub]).run(
        burst=True
    )
    assert isinstance(got[0], RegisterRequested)


def test_lower_priority_subscription_is_handled_first(redis_url, streams, rclient) -> None:
    """A worker's control events jump the queue of read-ahead tasks, and each subscription has
    its own in-flight cap, so a full work queue never stops the control log from being read."""
    for i in range(6):
        event = stamp(Failed(adapter="a", registration_id=f"t{i}", reason="x"), source="t")
        rclient.xadd(streams.tasks, encode(event))
    for i in range(6):
        event = stamp(Failed(adapter="a", registration_id=f"c{i}", reason="x"), source="t")
        rclient.xadd(streams.control, encode(event))
    order: list[str] = []

    def handle(d: Delivery) -> Effects:
        order.append(d.event.registration_id)
        time.sleep(0.05)
        return Effects()

    subs = [
        Subscription(streams.tasks, "w", Decoder(ControlEvent)),
        Subscription(streams.control, "w", Decoder(ControlEvent), priority=-1),
    ]
    make_consumer(redis_url, streams, handle, subs=subs, max_in_flight=2).run(max_events=12)
    last_control = max(i for i, n in enumerate(order) if n.startswith("c"))
    tasks_before = sum(1 for n in order[:last_control] if n.startswith("t"))
    assert tasks_before <= 3, order  # with one shared cap of 2 the controls would wait for tasks


def test_a_subscription_may_read_further_ahead_than_the_consumer_default(
    redis_url, streams, rclient
) -> None:
    """The control log of a worker is read in bulk (its own cap and count) while its work queue
    keeps the consumer's cap of one: every queued control event is handled before the second
    task, even though each handler call is slow."""
    for i in range(3):
        event = stamp(Failed(adapter="a", registration_id=f"t{i}", reason="x"), source="t")
        rclient.xadd(streams.tasks, encode(event))
    order: list[str] = []

    def handle(d: Delivery) -> Effects:
        order.append(d.event.registration_id)
        if d.event.registration_id == "t0":  # 20 control events land while the first task runs
            for i in range(20):
                event = stamp(Failed(adapter="a", registration_id=f"c{i}", reason="x"), source="t")
                rclient.xadd(streams.control, encode(event))
            time.sleep(0.5)
        return Effects()

    bulk = Subscription(
        streams.control, "w", Decoder(ControlEvent), priority=-1, max_in_flight=64, count=64
    )
    subs = [Subscription(streams.tasks, "w", Decoder(ControlEvent)), bulk]
    make_consumer(redis_url, streams, handle, subs=subs, max_in_flight=1).run(max_events=23)
    assert order[0] == "t0" and order[1:21] == [f"c{i}" for i in range(20)], order


def test_complete_all_commits_together_and_refuses_only_a_stolen_entry(
    redis_url, streams, rclient
) -> None:
    publish_failed(rclient, streams, 3)
    held: list[Delivery] = []
    applied: list[int] = []
    key = streams.key("effects")

    def handle(d: Delivery) -> object:
        held.append(d)
        return DEFER

    def idle() -> None:
        if len(held) == 3 and not applied:
            stolen = held[1].entry_id  # another consumer took it over meanwhile
            rclient.xclaim(streams.control, "g", "other", 0, [stolen])
            done = [(Effects().command("HINCRBY", key, d.entry_id, 1), d) for d in held]
            applied.append(consumer.complete_all(done, 0.1))
            consumer.request_stop()

    consumer = make_consumer(redis_url, streams, handle, on_idle=idle)
    stats = consumer.run()
    assert applied == [2] and stats.handled == 2
    assert stats.commits_refused == 2  # the batch as one, then the stolen entry alone
    counts = rclient.hgetall(key)
    assert set(counts) == {held[0].entry_id.encode(), held[2].entry_id.encode()}
    pending = rclient.xpending_range(streams.control, "g", "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [
        (held[1].entry_id, "other")
    ]
