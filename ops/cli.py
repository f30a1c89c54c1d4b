"""The ``multilora`` command: process entry points, the local stack, and tenant commands.

Processes (what the Procfile and ``up`` run)::

    multilora trainer    --model DIR ...     # one per base model
    multilora rollout    --model DIR ...     # N replicas (rollout.worker)
    multilora checkpoint ...                 # 1..N (orchestrator.checkpoint)
    multilora rewards    --reward NAME ...   # RQ workers for slow rewards

Tenants and operators::

    multilora up [--workers N] [--schedule FILE]   # embedded Redis + all processes, locally
    multilora submit adapter.toml | cancel NAME | status | watch | events tail
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
from collections.abc import Sequence
from pathlib import Path

from events.errors import MultiLoraError

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _url(args: argparse.Namespace) -> str:
    return args.redis_url or os.environ.get("REDIS_URL") or DEFAULT_URL


def cmd_trainer(argv: Sequence[str]) -> int:
    from rollout.data import open_source
    from rollout.rewards import builtin_registry
    from trainer.config import TrainerConfig
    from trainer.main import build, run

    p = argparse.ArgumentParser(prog="multilora trainer")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    p.add_argument("--name", default="trainer")
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--base-model", default="", help="name registrations must match")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--num-slots", type=int, default=4)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--artifacts", default="runs/artifacts")
    p.add_argument("--checkpoints", default="runs/checkpoints")
    p.add_argument("--allowed-root", action="append", default=None)
    p.add_argument("--extra-reward", action="append", default=[],
                   help="reward name the rollout workers' operators registered")  # fmt: skip
    p.add_argument("--max-batch-wait-s", type=float, default=2.0)
    p.add_argument("--prompts-per-task", type=int, default=0)
    p.add_argument("--lease-wait-s", type=float, default=0.0)
    p.add_argument("--claim-idle-ms", type=int, default=30_000)
    p.add_argument("--unsafe-redis", action="store_true")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (0: off)")
    args = p.parse_args(argv)
    roots = tuple(args.allowed_root or ["."])
    config = TrainerConfig(
        redis_url=_url(args), namespace=args.namespace, name=args.name, model_path=args.model,
        base_model=args.base_model, device=args.device, dtype=args.dtype,
        num_slots=args.num_slots, max_rank=args.max_rank, artifacts=args.artifacts,
        checkpoints=args.checkpoints, allowed_roots=roots,
        max_batch_wait_s=args.max_batch_wait_s, prompts_per_task=args.prompts_per_task,
        lease_wait_s=args.lease_wait_s, claim_idle_ms=args.claim_idle_ms,
        unsafe_redis=args.unsafe_redis, metrics_port=args.metrics_port,
    )  # fmt: skip
    root_paths = [Path(r) for r in roots]
    known = frozenset(builtin_registry().names()) | frozenset(args.extra_reward)
    process, consumer = build(
        config,
        probe_dataset=lambda spec: len(open_source(spec, allowed_roots=root_paths)),
        known_rewards=known,
    )
    run(process, consumer)
    return 0


def cmd_rollout(argv: Sequence[str]) -> int:
    from rollout.worker import main

    return main(list(argv))


def cmd_checkpoint(argv: Sequence[str]) -> int:
    from orchestrator.checkpoint import main

    return main(list(argv))


def cmd_rewards(argv: Sequence[str]) -> int:
    from events.connection import connect
    from rollout.reward_queue import make_worker

    p = argparse.ArgumentParser(prog="multilora rewards", description="an RQ reward worker")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--queue-prefix", default="multilora:rewards")
    p.add_argument("--reward", action="append", required=True, help="reward names to serve")
    p.add_argument("--burst", action="store_true")
    args = p.parse_args(argv)
    worker = make_worker(connect(_url(args), max_block_ms=60_000), args.queue_prefix, args.reward)
    worker.work(burst=args.burst)
    return 0


def _client(args: argparse.Namespace):  # -> tuple[redis.Redis, Streams]
    from events.connection import connect
    from events.streams import Streams

    return connect(_url(args)), Streams(args.namespace)


def cmd_submit(argv: Sequence[str]) -> int:
    from ops.specfile import load_adapter
    from orchestrator.client import Producer

    p = argparse.ArgumentParser(prog="multilora submit")
    p.add_argument("file", help="adapter spec (TOML, YAML or JSON)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    args = p.parse_args(argv)
    name, spec = load_adapter(args.file)
    client, streams = _client(args)
    registration_id = Producer(client, streams, source="cli").register(name, spec)
    print(f"submitted {name} (registration {registration_id})")
    return 0


def cmd_cancel(argv: Sequence[str]) -> int:
    from orchestrator.client import Producer

    p = argparse.ArgumentParser(prog="multilora cancel")
    p.add_argument("name")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    args = p.parse_args(argv)
    client, streams = _client(args)
    Producer(client, streams, source="cli").deregister(args.name)
    print(f"cancel requested for {args.name}")
    return 0


def cmd_status(argv: Sequence[str]) -> int:
    from ops.report import status_table

    p = argparse.ArgumentParser(prog="multilora status")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    args = p.parse_args(argv)
    client, streams = _client(args)
    print(status_table(client, streams))
    return 0


def cmd_watch(argv: Sequence[str]) -> int:
    from ops.report import watch

    p = argparse.ArgumentParser(prog="multilora watch")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    client, streams = _client(args)
    watch(client, streams, interval_s=args.interval)
    return 0


def cmd_events(argv: Sequence[str]) -> int:
    from ops.report import tail_events

    p = argparse.ArgumentParser(prog="multilora events")
    p.add_argument("what", choices=("tail",))
    p.add_argument("--stream", default="control",
                   choices=("control", "ingress", "tasks", "groups", "dead"))  # fmt: skip
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    args = p.parse_args(argv)
    client, streams = _client(args)
    tail_events(client, streams, args.stream, count=args.count, follow=args.follow)
    return 0


def cmd_plot(argv: Sequence[str]) -> int:
    from ops.report import plot_curves

    p = argparse.ArgumentParser(prog="multilora plot")
    p.add_argument("--out", default="runs/curves.png")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    args = p.parse_args(argv)
    client, streams = _client(args)
    print(plot_curves(client, streams, args.out))
    return 0


def cmd_up(argv: Sequence[str]) -> int:
    from ops.launch import Stack, StackOptions

    p = argparse.ArgumentParser(prog="multilora up")
    p.add_argument("--model", default="", help="local HF model dir (default: a tiny random one)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--num-slots", type=int, default=4)
    p.add_argument("--run-dir", default="runs/local")
    p.add_argument("--schedule", default=None, help="run this schedule, then exit")
    p.add_argument("--namespace", default="multilora")
    p.add_argument(
        "--redis-port",
        type=int,
        default=6379,
        help="embedded Redis port (0: any free one); REDIS_URL overrides",
    )
    p.add_argument(
        "--metrics-port-base",
        type=int,
        default=9400,
        help="trainer /metrics port; checkpoint +1, rollout i +10+i (0: off)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="intra-op threads per process (use 1 on a small CPU host)",
    )
    args = p.parse_args(argv)
    options = StackOptions(model=args.model, workers=args.workers, num_slots=args.num_slots,
                           run_dir=args.run_dir, namespace=args.namespace,
                           metrics_port_base=args.metrics_port_base,
        redis_port=args.redis_port,
                           torch_threads=args.torch_threads)  # fmt: skip
    with Stack(options) as stack:
        if args.schedule:
            return stack.run_schedule(args.schedule)
        stack.serve()
    return 0


def cmd_run(argv: Sequence[str]) -> int:
    from ops.launch import run_schedule_against

    p = argparse.ArgumentParser(prog="multilora run")
    p.add_argument("schedule")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--namespace", default="multilora")
    p.add_argument("--timeout-s", type=float, default=3600)
    args = p.parse_args(argv)
    client, streams = _client(args)
    return run_schedule_against(client, streams, args.schedule, timeout_s=args.timeout_s)


def cmd_demo(argv: Sequence[str]) -> int:
    from ops.demo import main

    return main(list(argv))


COMMANDS = {
    "trainer": cmd_trainer,
    "rollout": cmd_rollout,
    "checkpoint": cmd_checkpoint,
    "rewards": cmd_rewards,
    "up": cmd_up,
    "submit": cmd_submit,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "watch": cmd_watch,
    "events": cmd_events,
    "run": cmd_run,
    "plot": cmd_plot,
    "demo": cmd_demo,
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
