"""Scaling benchmark: rollout throughput with 1, 2, 4 workers; trainer step time with R=1 vs R=2.

Two measurements on one host (CPU by default, tiny random models), each reported as a ratio to
its one-process baseline:

* **rollout** — the local stack (:class:`ops.launch.Stack`: embedded Redis, trainer, ``W``
  rollout workers, checkpointer; one intra-op thread each) with four adapters kept busy (long
  budgets, ``max_staleness`` 2, one prompt per task so a step's prompts spread over the
  workers). Throughput is the completion tokens (and samples) of the ``rollout.group`` events
  that land after the first ``--warmup-groups`` groups, over ``--window-s`` seconds of stream
  time (Redis entry ids). ``W`` = 1, 2, 4: ``tokens_per_s`` and ``vs_1`` (÷ the ``W=1`` rate).
* **trainer** — one mixed train step (forward, backward, per-slot AdamW) of four adapters of
  ranks 8/16 over a fixed batch on a random Qwen3-shaped model (``--train-hidden``,
  ``--train-layers``): the median of ``--iters`` after ``--warmup`` untimed steps, at ``R=1``
  (:func:`trainer.step.train_step` with every core) and ``R=2``
  (:class:`trainer.dist_step.DataParallelStep` over a gloo :class:`trainer.ranks.RankGroup`,
  the cores split between the two ranks). ``speedup_r2`` = R=1 time ÷ R=2 time at equal cores;
  ``r1_per_rank_threads_s`` is R=1 on one rank's share of the cores (the ideal R=2 is half).

Every process shares the host's cores: on a 2-core host four workers (plus the trainer and
Redis) cannot beat two, and R=2 on CPU trades intra-op threads for ranks; the numbers say what
the host gives, not what a GPU node would.

Usage::

    python bench/scale.py                                # ~3 min on 2 cores
    python bench/scale.py --workers 1 2 --window-s 8     # quicker
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, where bench/rollout.py would shadow the `rollout` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from events.codec import Decoder  # noqa: E402
from events.connection import connect  # noqa: E402
from events.schema import GroupEvent, RolloutGroup  # noqa: E402
from events.specs import (  # noqa: E402
    AdapterSpec,
    DatasetSpec,
    OptimSpec,
    RewardSpec,
    SamplingSpec,
)
from ops.launch import Stack, StackOptions  # noqa: E402
from ops.models import write_tiny_model  # noqa: E402
from orchestrator.client import Producer  # noqa: E402

OBSERVER = "bench-observer"  # a group that never reads: keeps every rollout group for counting
ADAPTERS = 4


# --- rollout ------------------------------------------------------------------------------------


def rollout_spec(data: Path, args: argparse.Namespace, seed: int) -> AdapterSpec:
    return AdapterSpec(
        rank=8,
        alpha=16.0,
        dataset=DatasetSpec(kind="jsonl", path=str(data / "prompts.jsonl")),
        rewards=(RewardSpec(name="regex", params={"pattern": "[0-9]"}),),
        sampling=SamplingSpec(temperature=1.0, max_new_tokens=args.max_new_tokens),
        optim=OptimSpec(lr=1e-2),
        group_size=args.group_size,
        prompts_per_step=4,
        steps=100_000,
        max_staleness=2,
        checkpoint_interval=100_000,
        seed=seed,
    )


def groups_since(client: Any, stream: str, after: str) -> list[tuple[float, RolloutGroup]]:
    decoder = Decoder(GroupEvent)
    out = []
    for eid, fields in client.xrange(stream, min=f"({after}" if after else "-"):
        event = decoder.decode(fields, eid.decode())
        if isinstance(event, RolloutGroup):
            out.append((int(eid.decode().split("-")[0]) / 1000.0, event))
    return out


def rollout_throughput(workers: int, model: Path, data: Path, args: argparse.Namespace) -> dict:
    """Completion tokens/s of ``workers`` rollout workers in the local stack (module doc)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"multilora-scale-w{workers}-"))
    options = StackOptions(
        model=str(model),
        workers=workers,
        num_slots=ADAPTERS,
        max_rank=8,
        run_dir=str(run_dir),
        namespace="bench",
        max_batch_wait_s=0.0,
        torch_threads=1,
        redis_port=0,
        metrics_port_base=0,
        extra_args={
            "trainer": ("--allowed-root", str(data), "--prompts-per-task", "1"),
            "rollout": ("--allowed-root", str(data)),
        },
    )
    with Stack(options) as stack:
        client = connect(stack.url)
        client.xgroup_create(stack.streams.groups, OBSERVER, id="0", mkstream=True)
        producer = Producer(client, stack.streams, source="bench")
        for i in range(ADAPTERS):
            producer.register(f"adapter-{i}", rollout_spec(data, args, seed=i))
        deadline = time.monotonic() + args.timeout_s
        while client.xlen(stack.streams.groups) < args.warmup_groups:
            stack.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {args.warmup_groups} rollout groups in {args.timeout_s} s")
            time.sleep(0.1)
        (start_id, _), *_ = client.xrevrange(stack.streams.groups, count=1)
        start_s = int(start_id.decode().split("-")[0]) / 1000.0
        time.sleep(args.window_s)
        stack.check()
        window = groups_since(client, stack.streams.groups, start_id.decode())
    if not window:
        raise RuntimeError(
            f"no rollout group in the {args.window_s} s window with {workers} workers"
        )
    span_s = window[-1][0] - start_s
    samples = [s for _, g in window for pg in g.groups for s in pg.samples]
    tokens = sum(len(s.completion_ids) for s in samples)
    return {
        "workers": workers,
        "groups": len(window),
        "samples": len(samples),
        "completion_tokens": tokens,
        "span_s": span_s,
        "tokens_per_s": tokens / span_s,
        "samples_per_s": len(samples) / span_s,
        "task_s_p50": statistics.median(g.generate_s for _, g in window),
    }


# --- trainer ------------------------------------------------------------------------------------


def train_batch(seed: int, rows_per_adapter: int, seq: int) -> Any:
    from trainer.batch import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    b = ADAPTERS * rows_per_adapter
    lengths = torch.randint(seq // 2, seq + 1, (b,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    tokens = torch.randint(4, 104, (b, seq), generator=gen) * mask
    loss_mask = mask.clone()
    loss_mask[:, : seq // 4] = 0
    return TrainBatch(
        slot_ids_B=torch.arange(b) % ADAPTERS,
        tokens_B_T=tokens,
        attention_mask_B_T=mask,
        loss_mask_B_T=loss_mask,
        advantages_B_T=torch.randn(b, seq, generator=gen),
    )


def step_time(model_dir: Path, args: argparse.Namespace, *, ranks: int, threads: int) -> float:
    """Median seconds of one train step (module doc) at ``ranks`` ranks of ``threads`` threads."""
    from trainer.dist_step import DataParallelStep
    from trainer.losses import weighted_nll
    from trainer.ranks import RankGroup, RankRecipe
    from trainer.step import train_step

    torch.set_num_threads(threads)
    recipe = RankRecipe(str(model_dir), ADAPTERS, 16, torch_threads=threads)
    model, optimizer = recipe.build(0)
    for slot in range(ADAPTERS):
        model.configure_slot(slot, 8 if slot % 2 else 16, 16.0, seed=slot)
        optimizer.configure(slot, OptimSpec(lr=1e-3), total_steps=10_000)
    batch = train_batch(0, args.rows_per_adapter, args.seq)
    revisions = {slot: f"adapter-{slot}" for slot in range(ADAPTERS)}
    times = []
    if ranks == 1:
        for _ in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            train_step(model, optimizer, batch, weighted_nll)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[args.warmup :])
    with RankGroup.start(recipe, ranks) as group:
        group.wait_ready()
        step = DataParallelStep(group)
        for _ in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            step.train(model, optimizer, batch, weighted_nll, revisions)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[args.warmup :])


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--window-s", type=float, default=15.0)
    p.add_argument("--warmup-groups", type=int, default=12)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=180.0)
    p.add_argument("--train-hidden", type=int, default=256)
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--rows-per-adapter", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--out", default="bench/results/scale.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="multilora-scale-"))
    t_start = time.monotonic()

    data = tmp / "data"
    data.mkdir()
    rows = [json.dumps({"prompt": f"{c}:", "answer": ""}) for c in "abcdefghijklmnop"]
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    tiny = write_tiny_model(tmp / "tiny", "qwen3")
    rollout = {w: rollout_throughput(w, tiny, data, args) for w in args.workers}
    base = rollout[min(rollout)]["tokens_per_s"]
    for result in rollout.values():
        result["vs_1"] = result["tokens_per_s"] / base

    hidden = args.train_hidden
    heads = max(4, hidden // 64)
    shape = {"hidden_size": hidden, "num_layers": args.train_layers, "num_heads": heads}
    train_model = write_tiny_model(
        tmp / "train",
        "qwen3",
        **shape,
        num_kv_heads=max(1, heads // 4),
        intermediate_size=3 * hidden,
    )
    per_rank = max(1, cores // 2)
    r1 = step_time(train_model, args, ranks=1, threads=cores)
    r1_narrow = step_time(train_model, args, ranks=1, threads=per_rank)
    r2 = step_time(train_model, args, ranks=2, threads=per_rank)
    trainer = {
        "r1_s": r1,
        "r2_s": r2,
        "r1_per_rank_threads_s": r1_narrow,
        "speedup_r2": r1 / r2,
        "threads": {"r1": cores, "r2_per_rank": per_rank},
        "model": {**shape, "family": "qwen3 (random)"},
        "batch": {"adapters": ADAPTERS, "rows_per_adapter": args.rows_per_adapter, "seq": args.seq},
        "ranks_of_adapters": [16, 8, 16, 8],
    }

    out = {
        "rollout": {str(w): r for w, r in rollout.items()},
        "trainer": trainer,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "machine": {
            "cpus": cores,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "rollout_setup": {
            "adapters": ADAPTERS,
            "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens,
            "window_s": args.window_s,
            "model": "tiny qwen3 (hidden 64, 2 layers)",
        },
        "wall_s": time.monotonic() - t_start,
    }
    print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_table(out: dict[str, Any]) -> None:
    rows = [("rollout workers", "tokens/s", "vs 1")]
    for w, r in out["rollout"].items():
        rows.append((f"  W={w}", f"{r['tokens_per_s']:.0f}", f"{r['vs_1']:.2f}x"))
    t = out["trainer"]
    rows += [
        ("trainer ranks", "step s", "vs R=1"),
        (f"  R=1 ({t['threads']['r1']} threads)", f"{t['r1_s']:.3f}", "1.00x"),
        (
            f"  R=2 ({t['threads']['r2_per_rank']} thread(s) each)",
            f"{t['r2_s']:.3f}",
            f"{t['speedup_r2']:.2f}x",
        ),
        (
            f"  R=1 ({t['threads']['r2_per_rank']} thread(s))",
            f"{t['r1_per_rank_threads_s']:.3f}",
            f"{t['r1_s'] / t['r1_per_rank_threads_s']:.2f}x",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>10}  {ratio:>7}")


if __name__ == "__main__":
    raise SystemExit(main())
