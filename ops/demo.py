"""The demo (the README's main command): RL on SmolLM2-135M with four tenants on two CPU cores.

Starts the local stack (embedded Redis, trainer with 2 slots, one rollout worker, the checkpoint
process), runs ``ops/demo/schedule.toml`` — two adapters start together, a third registers while
they run and waits for a slot, a fourth registers and is cancelled — then prints each adapter's
reward at its first and last steps, where its PEFT export is, and writes a reward-curve PNG and
``demo.json`` under the run directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from events.codec import Decoder
from events.connection import connect
from events.schema import ControlEvent, Exported
from ops.launch import Stack, StackOptions
from ops.plots import plot_curves, step_history

DEMO_DIR = Path(__file__).parent / "demo"


def report(url: str, stack: Stack, out_dir: Path, seconds: float) -> dict[str, Any]:
    client = connect(url)
    history = step_history(client, stack.streams)
    exports: dict[str, str] = {}
    decoder = Decoder(ControlEvent)
    for entry_id, fields in client.xrange(stack.streams.control):
        event = decoder.decode(fields, entry_id.decode())
        if isinstance(event, Exported):
            exports[event.adapter] = event.uri
    adapters: dict[str, dict[str, object]] = {}
    for name, steps in sorted(history.items()):
        if not steps:
            continue  # e.g. cancelled before its first step
        rewards = [m.get("reward_mean", float("nan")) for _, m in steps]
        k = min(3, len(rewards))
        adapters[name] = {
            "steps": len(steps),
            "rewards": [round(r, 4) for r in rewards],
            "start_reward": sum(rewards[:k]) / k,
            "end_reward": sum(rewards[-k:]) / k,
            "export": exports.get(name, ""),
        }
    png = plot_curves(client, stack.streams, str(out_dir / "rewards.png"))
    result = {"seconds": round(seconds, 1), "adapters": adapters, "plot": png}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="multilora demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/smollm2-135m")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--schedule", default=str(DEMO_DIR / "schedule.toml"))
    p.add_argument("--keep", action="store_true", help="keep the previous run directory")
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not args.keep:
        shutil.rmtree(run_dir)
    # one intra-op thread per process: on 2 cores the trainer's and the worker's thread pools
    # would otherwise spin against each other
    options = StackOptions(
        model=args.model,
        workers=1,
        num_slots=2,
        max_rank=16,
        run_dir=str(run_dir),
        max_batch_wait_s=3.0,
        torch_threads=args.torch_threads,
        redis_port=0,
        metrics_port_base=0,
    )
    t0 = time.monotonic()
    with Stack(options) as stack:
        stack.run_schedule(args.schedule, timeout_s=900)
        result = report(stack.url, stack, run_dir, time.monotonic() - t0)
    print(f"\ndemo finished in {result['seconds']} s")
    print("reward = mean reward of the adapter's first / last 3 steps")
    print(f"{'adapter':<12}{'steps':>6}{'start reward':>14}{'end reward':>12}  export")
    for name, row in result["adapters"].items():
        print(
            f"{name:<12}{row['steps']:>6}{row['start_reward']:>14.3f}"
            f"{row['end_reward']:>12.3f}  {row['export']}"
        )
    print(f"reward curves: {result['plot']}; summary: {run_dir / 'demo.json'}")
    return 0
