"""Finished RL experiments per GPU-hour: N experiments trained together in one service, against
the same N run one after another.

(Over 600 lines: the experiments' book, the runs, the metrics read back from the bus and the
processes, the learning comparison and the figure all build or read one results layout.)

Each experiment is one adapter with its own reasoning-gym task, reward, learning rate and rank
(:data:`BOOK`; past eight, the book repeats with other seeds), trained with GRPO for ``--steps``
steps. One stack (embedded Redis, trainer with N slots, ``--workers`` rollout workers sharing the
device, checkpointer) serves three phases, in this order:

1. **warm-up**: one short adapter, not counted (CUDA kernels, allocator, first loads);
2. **together**: all N registered at once; ``together_s`` runs from the first registration until
   every experiment has completed and its final checkpoint is written;
3. **alone**: the same N specs (same spec seeds: initialisation and data order), each registered
   only after the one before it has finished; ``sequential_s`` is the sum of their times.

``speedup = sequential_s / together_s`` is the ratio of experiments finished per GPU-hour. The
service's start-up is outside both. Sampling seeds are per registration (a hash of the spec's
seed and the registration id), so the two runs of an experiment draw different samples.

Learning is read from each step's ``reward_mean`` (a ``step_done`` metric): ``start_reward`` is
the mean over the first 20 % of steps (of both runs), ``end_reward_*`` over the last 20 %.
The noise of an end reward is the standard error over those steps; the two runs agree when they
differ by at most twice the combined standard error.

Where the together run's time goes (``time_shares``, fractions of ``together_s``; the processes
run at once, so they overlap and need not sum to 1): ``generation`` — the union of the rollout
worker's batch intervals (each ``rollout.group`` lands ``generate_s`` after its batch began);
``sync`` — the workers' adapter loads on their handler threads
(``multilora_rollout_adapter_load_seconds``, summed over workers; a load a sync needs happens
between batches, one a task needs inside its batch's interval); ``training`` — forward,
backward and optimizer
(``multilora_trainer_step_phase_seconds``); ``control_plane`` — the rest of the trainer's steps
(packing, version capture, events) and the commit after each; ``idle`` — no generation and no
step running.

The peer baseline: ``bench/trl_grpo.py`` trains one of the same experiments with TRL's
``GRPOTrainer`` and a PEFT adapter; given its result (``--trl``), ``trl_s x N`` is the time of N
such experiments one after another (``speedup_vs_trl_sequential = trl_s x N / together_s``;
TRL's time is its ``train()`` alone, ours runs to the final checkpoint).

Usage::

    python bench/experiments.py --small                    # CPU, tiny random model: a quick check
    python bench/experiments.py --device cuda --dtype bfloat16 --model /tmp/smollm2-135m \\
        --n 8 --steps 30 --out $OUT/experiments.json --logs $OUT/logs   # the GPU run
                                                           # (bench/carry.py: the model)
    python bench/experiments.py --plot bench/results/experiments.json   # redraw the figure
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import OBSERVER, Bus, entry_s, random_model, trainer_phases
from report import write_json

from events.connection import connect
from events.schema import CheckpointSaved, Completed, RegisterRequested, StepDone
from ops.launch import Stack, StackOptions, run_schedule_against

TEMPLATE = "Q: {input} A: The answer is "
ARITH = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "allow_negation": False,
    "allow_parentheses": False,
}
RG = [{"name": "reasoning_gym"}]
MATH = [
    {"name": "math"},
    {"name": "length_penalty", "weight": 0.1, "params": {"max_chars": 6, "buffer_chars": 4}},
]

# name, reasoning-gym task, its config, reward terms, learning rate, rank
BOOK: tuple[tuple[str, str, dict[str, Any], list[dict[str, Any]], float, int], ...] = (
    ("sums", "basic_arithmetic", {**ARITH, "operators": ["+"]}, RG, 1e-3, 8),
    ("products", "basic_arithmetic", {**ARITH, "operators": ["*"]}, MATH, 3e-4, 16),
    ("differences", "basic_arithmetic", {**ARITH, "operators": ["-"]}, RG, 1e-3, 8),
    ("chain2", "chain_sum", {"min_terms": 2, "max_terms": 2, "max_digits": 2}, RG, 1e-3, 4),
    ("sums-slow", "basic_arithmetic", {**ARITH, "operators": ["+"]}, MATH, 3e-4, 16),
    ("sums2", "basic_arithmetic", {**ARITH, "operators": ["+"], "max_digits": 2}, RG, 1e-3, 8),
    ("chain3", "chain_sum", {"min_terms": 3, "max_terms": 3, "max_digits": 1}, RG, 1e-3, 8),
    ("products-rg", "basic_arithmetic", {**ARITH, "operators": ["*"]}, RG, 1e-3, 4),
)


def experiment(i: int, args: argparse.Namespace) -> dict[str, Any]:
    """The ``i``-th experiment's adapter spec (as a spec file's data, ``name`` included)."""
    name, task, config, rewards, lr, rank = BOOK[i % len(BOOK)]
    seed = i // len(BOOK)
    return {
        "name": f"{name}-{seed}" if seed else name,
        "rank": rank,
        "alpha": 2.0 * rank,
        "steps": args.steps,
        "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step,
        "max_staleness": 1,
        "checkpoint_interval": args.steps,
        "seed": seed,
        "dataset": {
            "kind": "reasoning_gym",
            "name": task,
            "size": 1000,
            "seed": 1 + i,
            "prompt_template": TEMPLATE,
            "config": config,
        },
        "rewards": rewards,
        "sampling": {"temperature": 0.8, "max_new_tokens": args.max_new_tokens, "stop": ["\n"]},
        "optim": {"lr": lr},
    }


def write_schedule(folder: Path, label: str, specs: list[dict[str, Any]]) -> Path:
    """A schedule that registers ``specs`` (spec files beside it) and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = []
    for spec in specs:
        path = folder / f"{label}-{spec['name']}.json"
        path.write_text(json.dumps(spec))
        steps.append({"register": path.name})
    schedule = folder / f"{label}.json"
    schedule.write_text(json.dumps({"step": steps}))
    return schedule


def scrape(port: int) -> dict[str, float]:
    """``{family_sum: seconds, family_count: n}`` of every histogram on a ``/metrics`` endpoint
    (summed over labels)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``[start, end]`` intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def rewards_by_registration(bus: Bus) -> dict[str, list[float]]:
    """``{registration id: [reward_mean of step 1, 2, ...]}`` (a redelivered step counts once)."""
    steps: dict[str, dict[int, float]] = {}
    for _, e in bus.control():
        if isinstance(e, StepDone) and "reward_mean" in e.metrics:
            steps.setdefault(e.registration_id, {})[e.step] = e.metrics["reward_mean"]
    return {rid: [r for _, r in sorted(s.items())] for rid, s in steps.items()}


def registrations_since(bus: Bus, after_ms: int) -> dict[str, str]:
    """``{adapter name: registration id}`` of the registrations published after ``after_ms``."""
    return {
        e.adapter: e.registration_id
        for eid, e in bus.control()
        if isinstance(e, RegisterRequested) and int(eid.split("-")[0]) > after_ms
    }


def span(bus: Bus, registration_ids: set[str]) -> tuple[float, float]:
    """From the first ``register_requested`` of ``registration_ids`` to the last of their
    ``completed`` and final ``checkpoint_saved`` (server times of the entries, s)."""
    starts, ends = [], []
    for eid, e in bus.control():
        if e.registration_id not in registration_ids:
            continue
        if isinstance(e, RegisterRequested):
            starts.append(entry_s(eid))
        elif isinstance(e, Completed) or (isinstance(e, CheckpointSaved) and e.final):
            ends.append(entry_s(eid))
    if len(starts) != len(registration_ids) or not ends:
        raise RuntimeError(f"registrations {sorted(registration_ids)} did not all finish")
    return min(starts), max(ends)


def tail_stats(values: list[float], share: float = 0.2) -> tuple[float, float, float]:
    """(mean of the first ``share``, mean of the last ``share``, standard error of the last)."""
    if not values:
        return math.nan, math.nan, math.nan
    k = max(1, round(share * len(values)))
    last = values[-k:]
    se = statistics.stdev(last) / math.sqrt(k) if k > 1 else math.nan
    return statistics.fmean(values[:k]), statistics.fmean(last), se


def learning(name: str, together: list[float], alone: list[float]) -> dict[str, Any]:
    """One experiment's learning verdicts (module doc)."""
    start_t, end_t, se_t = tail_stats(together)
    start_a, end_a, se_a = tail_stats(alone)
    noise = 2.0 * math.sqrt(
        (se_t if se_t == se_t else 0.0) ** 2 + (se_a if se_a == se_a else 0.0) ** 2
    )
    start = statistics.fmean([start_t, start_a])
    return {
        "name": name,
        "start_reward": start,
        "end_reward_together": end_t,
        "end_reward_alone": end_a,
        "noise": noise,
        "within_noise": abs(end_t - end_a) <= noise,
        "rises_together": end_t > start_t,
        "rises_alone": end_a > start_a,
        "rewards_together": [round(r, 4) for r in together],
        "rewards_alone": [round(r, 4) for r in alone],
    }


def time_shares(
    bus: Bus, window: tuple[float, float], before: dict[str, float], after: dict[str, float]
) -> dict[str, float]:
    """The together run's time shares (module doc); ``before``/``after``: the trainer's and the
    worker's histogram sums around it."""
    t0, t1 = window
    wall = t1 - t0
    batches = []
    for eid, g in bus.groups():
        landed = entry_s(eid)
        if t0 <= landed <= t1:
            batches.append((max(t0, landed - g.generate_s), landed))
    steps = [
        (e.metrics["started_at"], e.metrics["started_at"] + e.metrics.get("step_s", 0.0))
        for _, e in bus.control()
        if isinstance(e, StepDone) and t0 <= e.metrics.get("started_at", -1.0) <= t1
    ]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    compute = delta("trainer.forward_backward") + delta("trainer.optimizer")
    control = delta("trainer.publish") + delta("trainer.tail")
    return {
        "generation": union_s(batches) / wall,
        "sync": delta("multilora_rollout_adapter_load_seconds_sum") / wall,
        "training": compute / wall,
        "control_plane": control / wall,
        "idle": 1.0 - union_s(batches + steps) / wall,
    }


def details(bus: Bus, windows: list[tuple[float, float]]) -> dict[str, float]:
    """How the rollout worker and the trainer ran inside ``windows``: medians of the tasks per
    engine batch (groups that landed in one commit), a batch's ``generate_s``, the adapters per
    trainer step (``step_done`` with one ``started_at``) and a step's ``step_s``."""

    def inside(t: float) -> bool:
        return any(t0 <= t <= t1 for t0, t1 in windows)

    batches: dict[str, list[float]] = {}
    for eid, g in bus.groups():
        if inside(entry_s(eid)):
            batches.setdefault(eid.split("-")[0], []).append(g.generate_s)
    steps: dict[float, list[float]] = {}
    for _, e in bus.control():
        if isinstance(e, StepDone) and inside(e.metrics.get("started_at", -1.0)):
            steps.setdefault(e.metrics["started_at"], []).append(e.metrics.get("step_s", 0.0))

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    return {
        "tasks_per_batch": median([len(b) for b in batches.values()]),
        "batch_s": median([max(b) for b in batches.values()]),
        "batches": len(batches),
        "adapters_per_step": median([len(s) for s in steps.values()]),
        "step_s": median([max(s) for s in steps.values()]),
        "trainer_steps": len(steps),
    }


def sums(trainer_port: int, worker_ports: list[int]) -> dict[str, float]:
    """The histogram sums :func:`time_shares` differences: the trainer's, and the workers'
    added up."""
    total = {f"trainer.{k}": v for k, (v, _) in trainer_phases(trainer_port).items()}
    for port in worker_ports:
        for name, value in scrape(port).items():
            total[name] = total.get(name, 0.0) + value
    return total


def port_base(workers: int) -> int:
    """A ``metrics_port_base`` whose ports are free: trainer at base, checkpoint base + 1, ``up``
    base + 2, rollout worker ``i`` base + 10 + i (:class:`ops.launch.StackOptions`)."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            for offset in (0, 1, 2, *range(10, 10 + workers)):
                with socket.socket() as sock:
                    sock.bind(("0.0.0.0", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no free range of metrics ports")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The together run, then the one-by-one runs; the results so far are written to
    ``--out`` after each (``complete`` false until the last), so a run cut short keeps them,
    and the processes' logs are copied to ``--logs`` at the end, however it ends."""
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="multilora-experiments-"))
    try:
        return _run(args, run_dir)
    finally:
        logs = run_dir / "stack" / "logs"
        if args.logs and logs.is_dir():
            shutil.copytree(logs, args.logs, dirs_exist_ok=True)
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    model = args.model or str(random_model(run_dir / "model", 64, 2))
    device = ["--device", args.device, "--dtype", args.dtype]
    base = port_base(args.workers)
    trainer_port, worker_ports = base, [base + 10 + i for i in range(args.workers)]
    specs = [experiment(i, args) for i in range(args.n)]
    options = StackOptions(
        model=model,
        workers=args.workers,
        num_slots=args.n,
        max_rank=max(s["rank"] for s in specs),
        run_dir=str(run_dir / "stack"),
        namespace="experiments",
        max_batch_wait_s=args.max_batch_wait_s,
        torch_threads=1 if args.device == "cpu" else 0,
        redis_port=0,
        metrics_port_base=base,
        extra_args={
            "trainer": device,
            "rollout": [
                *device,
                "--batch-tasks",
                str(args.batch_tasks or max(1, -(-args.n // args.workers))),
                "--max-batch-rows",
                str(max(256, args.n * args.group_size * args.prompts_per_step)),
            ],
        },
    )
    schedules = run_dir / "schedules"
    warm = {**specs[0], "name": "warm-up", "steps": 2, "checkpoint_interval": 2}
    timeout = args.timeout_s
    with Stack(options) as stack:
        client = connect(stack.url)
        client.xgroup_create(stack.streams.groups, OBSERVER, id="0", mkstream=True)
        bus = Bus(client, stack.streams)

        def play(
            label: str, batch: list[dict[str, Any]]
        ) -> tuple[dict[str, str], tuple[float, float]]:
            """Register ``batch``, wait until all have finished; their registration ids by
            name, and the span from the first registration to the last finish."""
            path = write_schedule(schedules, label, batch)
            since = int(time.time() * 1000) - 1
            run_schedule_against(
                client,
                stack.streams,
                str(path),
                timeout_s=timeout,
                health=stack.check,
                progress=False,
            )
            ids = registrations_since(bus, since)
            t0, t1 = span(bus, set(ids.values()))
            print(f"[experiments] {label}: {t1 - t0:.1f} s", flush=True)
            return ids, (t0, t1)

        play("warm-up", [warm])
        before = sums(trainer_port, worker_ports)
        together_ids, window = play("together", specs)
        after = sums(trainer_port, worker_ports)
        shares = time_shares(bus, window, before, after)
        loads = "multilora_rollout_adapter_load_seconds"
        together = {
            **details(bus, [window]),
            "load_ms": 1e3
            * (after[f"{loads}_sum"] - before[f"{loads}_sum"])
            / max(1.0, after[f"{loads}_count"] - before[f"{loads}_count"]),
        }
        alone_ids: dict[str, str] = {}
        alone_windows: dict[str, tuple[float, float]] = {}
        runs = [] if args.together_only else specs
        for spec in [None, *runs]:
            if spec is not None:
                name = spec["name"]
                ids, alone_windows[name] = play(f"alone-{name}", [spec])
                alone_ids[name] = ids[name]
            ran = {"together": together, "alone": details(bus, list(alone_windows.values()))}
            result = _result(
                args,
                specs,
                window,
                alone_windows,
                ran,
                shares,
                rewards_by_registration(bus),
                together_ids,
                alone_ids,
            )
            result["complete"] = len(alone_windows) == len(runs)
            if not result["complete"]:
                write_json(args.out, result)
    return result


def _result(
    args: argparse.Namespace,
    specs: list[dict[str, Any]],
    window: tuple[float, float],
    alone_windows: dict[str, tuple[float, float]],
    ran: dict[str, Any],
    shares: dict[str, float],
    rewards: dict[str, list[float]],
    together_ids: dict[str, str],
    alone_ids: dict[str, str],
) -> dict[str, Any]:
    """The results file's content from what has run so far."""
    alone_s = {name: t1 - t0 for name, (t0, t1) in alone_windows.items()}
    together_s = window[1] - window[0]
    done = alone_s and len(alone_s) == len(specs)
    sequential_s = sum(alone_s.values()) if done else math.nan
    per_hour = 3600.0 * args.n
    return {
        "device": args.device,
        "model": args.model or "random qwen3 hidden=64 layers=2",
        "dtype": args.dtype,
        "n_adapters": args.n,
        "steps": args.steps,
        "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step,
        "max_new_tokens": args.max_new_tokens,
        "workers": args.workers,
        "together_s": together_s,
        "sequential_s": sequential_s,
        "speedup": sequential_s / together_s,
        "experiments_per_gpu_hour_together": per_hour / together_s,
        "experiments_per_gpu_hour_sequential": per_hour / sequential_s,
        "alone_s": alone_s,
        "ran": ran,
        **trl_baseline(args, together_s),
        "experiments": [
            {
                **learning(
                    n, rewards.get(together_ids[n], []), rewards.get(alone_ids.get(n, ""), [])
                ),
                "task": s["dataset"]["name"],
                "rewards": [r["name"] for r in s["rewards"]],
                "lr": s["optim"]["lr"],
                "rank": s["rank"],
            }
            for n, s in ((s["name"], s) for s in specs)
        ],
        "time_shares": shares,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
    }


def trl_baseline(args: argparse.Namespace, together_s: float) -> dict[str, Any]:
    """TRL's time for one experiment (``bench/trl_grpo.py``'s result, ``--trl``) and the peer
    baseline it gives: that time x N, one after another."""
    if not args.trl:
        return {"trl_s": None, "trl_reason": args.trl_reason}
    trl = json.loads(Path(args.trl).read_text())
    return {
        "trl_s": trl["trl_s"],
        "trl_experiment": trl["experiment"],
        "trl_steps": trl["steps"],
        "trl_end_reward": trl["end_reward"],
        "trl_sequential_s": trl["trl_s"] * args.n,
        "speedup_vs_trl_sequential": trl["trl_s"] * args.n / together_s,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """One panel per experiment: reward against step, together and alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["experiments"]
    cols = min(4, len(rows))
    lines = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols, 2.6 * lines), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        for key, label in (("rewards_together", "together"), ("rewards_alone", "alone")):
            ys = row[key]
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=label)
        ax.set_title(f"{row['name']} (r{row['rank']}, lr {row['lr']:g})", fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("reward_mean")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(
        f"{result['n_adapters']} experiments on {Path(result['model']).name} ({result['device']}):"
        f" together {result['together_s']:.0f} s, one by one {result['sequential_s']:.0f} s",
        fontsize="medium",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['n_adapters']} experiments x {result['steps']} steps on {result['model']} "
        f"({result['device']})"
    )
    print(f"together     {result['together_s']:8.1f} s")
    print(f"one by one   {result['sequential_s']:8.1f} s")
    print(f"speedup      {result['speedup']:8.2f} x  (experiments per GPU-hour)")
    if result.get("trl_s") is not None:
        print(
            f"TRL, one experiment {result['trl_s']:.1f} s; {result['n_adapters']} of them one by "
            f"one take {result['speedup_vs_trl_sequential']:.2f} x as long as together"
        )
    head = f"{'experiment':<14}{'start':>7}{'together':>10}{'alone':>8}{'noise':>7}  agree rises"
    print(head)
    for row in result["experiments"]:
        rises = "yes" if row["rises_together"] and row["rises_alone"] else "no"
        print(
            f"{row['name']:<14}{row['start_reward']:>7.3f}{row['end_reward_together']:>10.3f}"
            f"{row['end_reward_alone']:>8.3f}{row['noise']:>7.3f}"
            f"  {'yes' if row['within_noise'] else 'no':>5} {rises:>5}"
        )
    print(
        "time shares of the together run: "
        + ", ".join(f"{k} {v:.1%}" for k, v in result["time_shares"].items())
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/experiments.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model", default="", help="local HF model dir (default: a tiny random one)")
    p.add_argument("--n", type=int, default=8, help="experiments")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--max-batch-wait-s", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1, help="rollout workers (one GPU: all share it)")
    p.add_argument(
        "--batch-tasks",
        type=int,
        default=0,
        help="tasks per engine batch (default: N / workers, so each worker takes its share)",
    )
    p.add_argument("--small", action="store_true", help="2 experiments x 3 steps (a quick check)")
    p.add_argument(
        "--together-only", action="store_true", help="skip the one-by-one runs (a diagnosis)"
    )
    p.add_argument("--timeout-s", type=float, default=1800.0)
    p.add_argument("--run-dir", default="", help="keep the run here (default: a temp dir)")
    p.add_argument("--logs", default="", help="copy the processes' logs here when the run ends")
    p.add_argument("--trl", default="", help="bench/trl_grpo.py's result for the same settings")
    p.add_argument("--trl-reason", default="not run (no --trl result given)")
    p.add_argument("--out", default="bench/results/experiments.json")
    p.add_argument("--png", default="", help="the figure (default: beside --out)")
    p.add_argument("--plot", default="", help="only redraw the figure of this results file")
    args = p.parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        print(plot(result, Path(args.png or Path(args.plot).with_suffix(".png"))))
        return 0
    if args.small:
        args.n, args.steps, args.group_size, args.prompts_per_step = 2, 3, 4, 2
    result = run(args)
    print_table(result)
    out = write_json(args.out, result)
    print(f"wrote {out}")
    try:
        print(f"wrote {plot(result, Path(args.png or out.with_suffix('.png')))}")
    except ImportError as exc:  # the figure can be drawn later from the JSON (--plot)
        print(f"no figure ({exc}); redraw with --plot {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
