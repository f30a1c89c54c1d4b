"""A consumer process for the bus crash tests (run as ``python -m tests.bus.worker``).

Each event carries a number ``n`` (in ``registration_id``); handling it increments
``<ns>:effects`` field ``n``. ``--mode atomic`` returns the increment as an effect, committed with
the ack; ``--mode naive`` applies it directly, then acks in a second step: the classic "apply then
ack" bug, which a kill between the two steps turns into a duplicate effect.
"""

from __future__ import annotations

import argparse
import logging
import time

import msgspec

from events.codec import Decoder
from events.connection import connect
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.schema import ControlEvent
from events.streams import Streams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", choices=("atomic", "naive"), default="atomic")
    parser.add_argument("--claim-idle-ms", type=int, default=1000)
    parser.add_argument("--lease-wait-s", type=float, default=0.0)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    streams = Streams(args.namespace)
    client = connect(args.url)
    effects_key = streams.key("effects")

    def handle(d: Delivery) -> Effects:
        n = d.event.registration_id
        if args.mode == "atomic":
            return Effects().command("HINCRBY", effects_key, n, 1)
        client.hincrby(effects_key, n, 1)
        time.sleep(0.002)  # the window between "apply" and "ack"
        return Effects()

    sub = Subscription(streams.control, "chaos", Decoder(ControlEvent), trim=False)
    consumer = Consumer(
        lambda: connect(args.url),
        streams,
        args.name,
        [sub],
        handle,
        block_ms=500,
        claim_idle_ms=args.claim_idle_ms,
        lease_ttl_ms=5_000,
        lease_wait_s=args.lease_wait_s,
    )
    consumer.install_signal_handlers()
    print("ready", flush=True)
    consumer.run(burst=args.burst)
    msgspec.json.encode(consumer.stats)


if __name__ == "__main__":
    main()
