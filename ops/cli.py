"""The ``multilora`` command: process entry points, the local stack, and tenant commands.

Processes (what the Procfile and ``up`` run)::

    multilora trainer    --model DIR ...     # one per base model
    multilora rollout    --model DIR ...     # N replicas (rollout.worker)
    multilora checkpoint ...                 # 1..N (orchestrator.checkpoint)
    multilora rewards    --reward NAME ...   # RQ workers for slow rewards
    multilora gateway    --base-model NAME --api-key KEY=TENANT ...  # N replicas (Tinker SDK)

Tenants and operators::

    multilora up [--workers N] [--schedule FILE]   # embedded Redis + all processes, locally
    multilora cluster up|scale|status|down         # the same processes as Ray actors
    multilora submit adapter.toml | cancel NAME | status | watch | events tail
    multilora storage [--json]                     # bytes per adapter, Redis memory, streams
    multilora run schedule.toml                    # one-time mode: exits when all are done
    multilora plot --out runs/curves.png           # reward/loss curves from step_done events
    multilora demo --model models/smollm2-135m     # the README's demo

``REDIS_URL`` selects the bus for every command (``up`` starts an embedded server otherwise).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated

import msgspec

from events.config import BusConfig
from events.errors import MultiLoraError


def cmd_trainer(argv: Sequence[str]) -> int:
    from rollout.data import open_source
    from rollout.reward_builtins import builtin_registry
    from trainer.main import main

    def dataset_size(spec, roots) -> int:  # admission's probe: the same reader the workers use
        return len(open_source(spec, allowed_roots=list(roots)))

    return main(argv, dataset_size=dataset_size, rewards=frozenset(builtin_registry().names()))


def cmd_rollout(argv: Sequence[str]) -> int:
    from rollout.main import main

    return main(list(argv))


def cmd_checkpoint(argv: Sequence[str]) -> int:
    from orchestrator.checkpoint import main

    return main(list(argv))


def cmd_gateway(argv: Sequence[str]) -> int:
    from orchestrator.gateway.server import main

    return main(list(argv))


class RewardsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``multilora rewards``: an RQ worker for the queues ``<namespace>:rewards:<reward>``."""

    bus: BusConfig = BusConfig()
    rewards: Annotated[
        tuple[str, ...],
        msgspec.Meta(
            min_length=1, description="reward names to serve", extra={"flags": ("--reward",)}
        ),
    ]


def cmd_rewards(argv: Sequence[str]) -> int:
    import time

    import redis

    from events.bootstrap import configure_logging, open_bus
    from events.config import load
    from rollout.reward_queue import make_worker

    config = load(
        RewardsConfig,
        role="rewards",
        argv=argv,
        prog="multilora rewards",
        description="An RQ worker scoring slow reward terms.",
    )
    configure_logging(config.bus.log_level)
    bus = open_bus(config.bus, config.bus.name or "rewards", max_block_ms=60_000)
    delay_s = 0.5
    while True:  # Redis restarting is not the worker's failure: a new worker once it is back
        worker = make_worker(bus.client, bus.streams.key("rewards"), config.rewards)
        try:
            worker.work(burst=config.bus.burst)
            return 0
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            print(f"multilora rewards: lost Redis ({exc}); again in {delay_s:g} s", file=sys.stderr)
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, 10.0)


def _tenant(prog: str, argv: Sequence[str], declare: Callable[[argparse.ArgumentParser], object]):
    """Parse a tenant or operator command: its own arguments plus the bus target
    (``--redis-url``, ``--namespace``), with the same environment and defaults as every process.
    Returns ``(args, client, streams)``."""
    from events.config import add_flags, load
    from events.connection import connect
    from events.streams import Streams

    p = argparse.ArgumentParser(prog=prog)
    declare(p)
    add_flags(p, BusConfig, only=("redis_url", "namespace"))
    p.set_defaults(redis_url=None, namespace=None)
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in ("redis_url", "namespace") if getattr(args, k)}
    bus = load(BusConfig, role="client", argv=[], overrides=given)
    return args, connect(bus.redis_url), Streams(bus.namespace)


def cmd_submit(argv: Sequence[str]) -> int:
    from ops.specfile import load_adapter
    from orchestrator.client import Producer

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", help="adapter spec (TOML, YAML or JSON)")

    args, client, streams = _tenant("multilora submit", argv, declare)
    name, spec = load_adapter(args.file)
    registration_id = Producer(client, streams, source="cli").register(name, spec)
    print(f"submitted {name} (registration {registration_id})")
    return 0


def cmd_cancel(argv: Sequence[str]) -> int:
    from orchestrator.client import Producer

    args, client, streams = _tenant("multilora cancel", argv, lambda p: p.add_argument("name"))
    Producer(client, streams, source="cli").deregister(args.name)
    print(f"cancel requested for {args.name}")
    return 0


def cmd_status(argv: Sequence[str]) -> int:
    from events.heartbeat import DEFAULT_STALL_AFTER_S
    from ops.report import status_table

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--stall-after-s",
            type=float,
            default=DEFAULT_STALL_AFTER_S,
            help="a process with work and no progress for this long is stalled",
        )

    args, client, streams = _tenant("multilora status", argv, declare)
    print(status_table(client, streams, stall_after_s=args.stall_after_s))
    return 0


def cmd_watch(argv: Sequence[str]) -> int:
    from ops.watch import watch

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument("--interval", type=float, default=1.0)

    args, client, streams = _tenant("multilora watch", argv, declare)
    watch(client, streams, interval_s=args.interval)
    return 0


def cmd_events(argv: Sequence[str]) -> int:
    from ops.tail import tail_events

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument("what", choices=("tail",))
        choices = ("control", "ingress", "tasks", "groups", "dead")
        p.add_argument("--stream", default="control", choices=choices)
        p.add_argument("--count", type=int, default=20)
        p.add_argument("--follow", "-f", action="store_true")

    args, client, streams = _tenant("multilora events", argv, declare)
    tail_events(client, streams, args.stream, count=args.count, follow=args.follow)
    return 0


def cmd_plot(argv: Sequence[str]) -> int:
    from ops.plots import plot_curves

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="runs/curves.png")

    args, client, streams = _tenant("multilora plot", argv, declare)
    print(plot_curves(client, streams, args.out))
    return 0


def cmd_up(argv: Sequence[str]) -> int:
    from events.config import load
    from ops.launch import Stack, StackOptions

    options = load(
        StackOptions,
        role="up",
        argv=argv,
        prog="multilora up",
        description="Embedded Redis plus every process, locally.",
    )
    with Stack(options) as stack:
        if options.schedule:
            return stack.run_schedule(options.schedule)
        stack.serve()
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    from ops.launch import run_schedule_against

    def declare(p: argparse.ArgumentParser) -> None:
        p.add_argument("schedule")
        p.add_argument("--timeout-s", type=float, default=3600)

    args, client, streams = _tenant("multilora run", argv, declare)
    return run_schedule_against(client, streams, args.schedule, timeout_s=args.timeout_s)


def cmd_storage(argv: Sequence[str]) -> int:
    from ops.storage_report import cmd_storage as storage

    return storage(argv)


def cmd_demo(argv: Sequence[str]) -> int:
    from ops.demo import main

    return main(list(argv))


def cmd_cluster(argv: Sequence[str]) -> int:
    from ops.cluster import main  # imports ray itself, lazily: the local path never does

    return main(list(argv))


COMMANDS = {
    "trainer": cmd_trainer,
    "rollout": cmd_rollout,
    "checkpoint": cmd_checkpoint,
    "rewards": cmd_rewards,
    "gateway": cmd_gateway,
    "up": cmd_up,
    "submit": cmd_submit,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "storage": cmd_storage,
    "watch": cmd_watch,
    "events": cmd_events,
    "run": cmd_run,
    "plot": cmd_plot,
    "demo": cmd_demo,
    "cluster": cmd_cluster,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(
        level=os.environ.get("MULTILORA_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return COMMANDS[argv[0]](argv[1:])
    except MultiLoraError as exc:
        print(f"multilora {argv[0]}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
