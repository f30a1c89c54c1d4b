"""Bus benchmark: publish→handled latency and throughput of the consumer runtime on loopback.

A publisher process XADDs events at a fixed rate (default 1,000/s); one consumer (the project's
runtime, atomic effect+ack commit per event) handles them; each handler records
``now - event.time``. Reports p50/p99 latency, handled events/s, and the same server's raw
pipelined ``XADD`` rate as the ceiling. Prints a table and writes JSON.

    python bench/bus.py --out bench/results/bus.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from events.codec import Decoder, encode, stamp
from events.connection import connect
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.schema import ControlEvent, Failed
from events.streams import Streams
from ops.redis_server import RedisServer


def xadd_ceiling(url: str, streams: Streams, n: int) -> float:
    client = connect(url)
    payload = encode(stamp(Failed(adapter="a", reason="x"), source="bench"))
    key = streams.key("ceiling")
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, payload)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    return n / (time.perf_counter() - t0)


def publish(url: str, namespace: str, n: int, rate: float) -> None:
    """The producer: its own process, as in production (no GIL shared with the consumer).

    It starts after a second, once the consumer is parked in its blocking read: the numbers are
    the steady state, not the consumer's start-up.
    """
    client = connect(url)
    time.sleep(1.0)
    stream = Streams(namespace).control
    t0 = time.perf_counter()
    for i in range(n):
        client.xadd(stream, encode(stamp(Failed(adapter="a", reason="x"), source="b")))
        delay = t0 + (i + 1) / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def run_latency(
    url: str, streams: Streams, n: int, rate: float, warmup: int = 1000
) -> dict[str, float]:
    """Latency and rate of ``n`` events after ``warmup`` events (first-call costs: script
    loading, connection set-up, lazy imports) that are handled but not counted."""
    latencies: list[float] = []
    key = streams.key("effects")

    handled_at: list[float] = []

    def handle(d: Delivery) -> Effects:
        now = time.time()
        latencies.append(now - d.event.time)
        handled_at.append(now)
        return Effects().command("INCRBY", key, 1)

    sub = Subscription(streams.control, "bench", Decoder(ControlEvent), start_id="$")
    consumer = Consumer(lambda: connect(url), streams, "bench", [sub], handle, block_ms=1000)
    consumer.ensure_groups()

    pub = multiprocessing.get_context("spawn").Process(
        target=publish, args=(url, streams.namespace, warmup + n, rate)
    )
    pub.start()
    consumer.run(max_events=warmup + n)
    pub.join()
    elapsed = handled_at[-1] - handled_at[warmup]
    lat_ms = np.array(latencies[warmup:]) * 1000
    return {
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "events_per_s": (n - 1) / elapsed,
        "offered_per_s": rate,
        "warmup_events": warmup,
    }


def saturate(url: str, streams: Streams, n: int) -> float:
    """Handled events/s when the backlog is already there (the runtime's own ceiling)."""
    client = connect(url)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(streams.tasks, encode(stamp(Failed(adapter="a", reason="x"), source="b")))
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    sub = Subscription(streams.tasks, "sat", Decoder(ControlEvent))
    consumer = Consumer(lambda: connect(url), streams, "sat", [sub], lambda d: Effects())
    t0 = time.perf_counter()
    consumer.run(max_events=n)
    return n / (time.perf_counter() - t0)


def _env_prefix() -> str:
    forced = os.environ.get("MULTILORA_REDIS_SERVER")
    return f"MULTILORA_REDIS_SERVER={shlex.quote(forced)} " if forced else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1_000.0)
    parser.add_argument("--out", default="bench/results/bus.json")
    args = parser.parse_args()
    with RedisServer() as server:
        streams = Streams("bench")
        lat = run_latency(server.url, streams, args.events, args.rate)
        backlog = saturate(server.url, streams, args.events)
        ceiling = xadd_ceiling(server.url, streams, 50_000)
        origin = server.binary.origin
        version = connect(server.url).info("server")["redis_version"]
    result = {
        **lat,
        "backlog_events_per_s": backlog,
        "xadd_ceiling_per_s": ceiling,
        "server": f"{origin} (redis_version {version})",
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{len(os.sched_getaffinity(0))} cores, {platform.system()}".strip(),
        "date": dt.date.today().isoformat(),
        "command": _env_prefix() + "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    print(f"{'metric':<28}{'value':>14}")
    for key in ("p50_ms", "p99_ms", "events_per_s", "backlog_events_per_s", "xadd_ceiling_per_s"):
        print(f"{key:<28}{result[key]:>14.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
