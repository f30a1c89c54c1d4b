"""End-to-end service benchmark: the local stack (``multilora up``) under adapters that come and go.

Runs the real processes (embedded Redis, trainer, rollout worker(s), checkpointer) and measures,
from the events they publish:

* ``register_to_first_step_s``: from a tenant's ``register_requested`` (producer time) to the
  adapter's first ``step_done`` (trainer time), for an adapter registered while two others train
  (median over the ``--joiners`` joiners). ``register_to_first_step_cold_s`` is the same for the
  first adapters, registered as the stack starts (process start-up included).
* ``step_s``: median interval between consecutive ``step_done`` of the two long-running
  adapters (their step cadence).
* ``stall_steps``: how far the long-running adapters' cadence stalls when another adapter is
  admitted or leaves (budget reached, or cancelled). For each such event at time ``t`` and each
  long-running adapter, the interval between its two ``step_done`` around ``t`` is divided by its
  median interval; ``stall = interval / median - 1`` steps (0 = no stall). Reported: the worst
  (``stall_steps``) and the mean (``stall_steps_mean``) over all events and adapters.
  ``trainer_stall_steps`` is the trainer's own part of it: for the step of a long-running adapter
  whose interval spans the event, how much longer than usual the trainer took from its last
  group landing to its ``step_done`` (in steps; the rest of a stall is the rollout side, e.g. one
  worker generating the newcomer's tasks before theirs).
* ``sync_p50_ms`` / ``sync_p99_ms``: ``adapter.synced`` ``latency_s`` — from the trainer
  publishing a version (its ``sync_requested`` time) to a worker serving it, every worker. A
  worker answers only syncs it has not already overtaken (a task may have loaded a newer version
  first); ``syncs_answered`` / ``syncs_requested`` say how many. A worker handles a sync between
  two tasks, so the time one task takes (``task_s_p50``/``task_s_p99``: ``generate_s`` of the
  ``rollout.group`` events, generation plus scoring) bounds how long a sync can wait.
* ``control_plane_share``: the share of a trainer step's critical path that is not forward,
  backward or optimizer. Versions are written behind the step (:mod:`trainer.behind`), so the
  critical path of a step runs from ``ready`` — when the last rollout group it trains on landed in
  Redis (that group's stream entry id) or, if later, when the trainer's loop was free after its
  previous step — until the loop is free to start the next one: ``bus_read_and_dispatch`` (ready
  to the step's ``started_at``, a ``step_done`` metric; Redis and the trainer share the host
  clock), then the step (Prometheus ``multilora_trainer_step_phase_seconds``: ``forward_backward``
  and ``optimizer`` are the compute, ``publish`` the rest of the step's job: taking the rows,
  packing the batch, copying the new versions off the device; ``pack_s``, a ``step_done``
  metric, is the packing part), then the tail (``multilora_trainer_step_tail_seconds``: from
  the job's end until the loop could launch the next step — noticing it, deciding it, settling
  the step before it, waiting for its writes if they are slower than a step). The step computes
  on the trainer's compute thread (:mod:`trainer.compute`), so reporting and the atomic commit
  run beside the next step, off its path (``MULTILORA_TRAINER_OVERLAP_STEPS=false`` runs each
  job inline on the loop, where groups landing meanwhile wait for it; its share reads low, as
  the commit then follows the next inline job). ``share = (W - compute) / W`` with
  ``W`` the sum of the means. Writing the versions itself (``version_write_s``) is off the
  critical path unless the loop had to wait for it (``version_wait_s``). ``max_batch_wait_s`` is 0
  here, so adapters are not held back to share a step.

Usage::

    python bench/e2e.py                                  # CPU, tiny random model (~20 s)
    python bench/e2e.py --device cpu --small             # quicker check
    python bench/e2e.py --device cuda --model models/smollm2-135m --out $OUT/e2e.json
    python bench/e2e.py --device cuda --random-hidden 1024 --random-layers 8 --out $OUT/e2e.json

On CPU every process runs one intra-op thread (they share the host's cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import shlex
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from events.codec import Decoder
from events.connection import connect
from events.schema import (
    Admitted,
    Completed,
    ControlEvent,
    GroupEvent,
    RegisterRequested,
    Retired,
    RolloutGroup,
    StepDone,
    Synced,
    SyncRequested,
)
from events.specs import AdapterSpec, DatasetSpec, OptimSpec, RewardSpec, SamplingSpec
from events.streams import Streams
from ops.launch import Stack, StackOptions
from orchestrator.client import Producer

OBSERVER = "bench-observer"  # a group that never reads: keeps every rollout group for analysis
LONG = ("long-a", "long-b")


def entry_s(entry_id: str) -> float:
    """Redis stream entry id -> seconds since the epoch (the server's clock at XADD).

    An id holds the XADD time truncated to the millisecond, so the id alone reads on average
    half a millisecond early (a bias the size of the control-plane budget of a GPU step); the
    midpoint of its millisecond is the unbiased estimate."""
    return (int(entry_id.split("-")[0]) + 0.5) / 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class Bus:
    """Reads the stack's streams back as decoded events with their entry ids."""

    def __init__(self, client: redis.Redis, streams: Streams) -> None:
        self.client = client
        self.streams = streams
        self._control = Decoder(ControlEvent)
        self._groups = Decoder(GroupEvent)

    def control(self) -> list[tuple[str, Any]]:
        return [
            (eid.decode(), self._control.decode(f, eid.decode()))
            for eid, f in self.client.xrange(self.streams.control)
        ]

    def groups(self) -> list[tuple[str, RolloutGroup]]:
        return [
            (eid.decode(), self._groups.decode(f, eid.decode()))
            for eid, f in self.client.xrange(self.streams.groups)
        ]

    def steps(self, registration_id: str) -> int:
        done = [
            e.step
            for _, e in self.control()
            if isinstance(e, StepDone) and e.registration_id == registration_id
        ]
        return max(done, default=0)

    def retired(self, registration_id: str) -> bool:
        return any(
            isinstance(e, Retired) and e.registration_id == registration_id
            for _, e in self.control()
        )


def wait(what: str, check: Callable[[], bool], stack: Stack, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        stack.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def make_spec(data: Path, args: argparse.Namespace, steps: int, seed: int) -> AdapterSpec:
    return AdapterSpec(
        rank=args.rank,
        alpha=2.0 * args.rank,
        dataset=DatasetSpec(kind="jsonl", path=str(data / "prompts.jsonl")),
        rewards=(RewardSpec(name="regex", params={"pattern": "[0-9]"}),),
        sampling=SamplingSpec(temperature=1.0, max_new_tokens=args.max_new_tokens),
        optim=OptimSpec(lr=1e-2),
        group_size=args.group_size,
        prompts_per_step=args.prompts_per_step,
        steps=steps,
        checkpoint_interval=max(1, steps),
        seed=seed,
    )


def scenario(stack: Stack, bus: Bus, data: Path, args: argparse.Namespace) -> dict[str, str]:
    """Two long adapters train; joiners register, train to their budget and leave; one more is
    cancelled mid-run; then the long ones are cancelled. Returns name -> registration id."""
    producer = Producer(bus.client, bus.streams, source="bench")
    reg: dict[str, str] = {}
    t = args.timeout_s

    def long_ones_past(step: int) -> Callable[[], bool]:
        return lambda: all(bus.steps(reg[n]) >= step for n in LONG)

    def newest_long_step() -> int:
        return max(bus.steps(reg[n]) for n in LONG)

    def gone(*names: str) -> Callable[[], bool]:
        return lambda: all(bus.retired(reg[n]) for n in names)

    for i, name in enumerate(LONG):
        reg[name] = producer.register(name, make_spec(data, args, 100_000, i))
    wait("warm-up steps", long_ones_past(args.warmup), stack, t)
    for j in range(args.joiners):
        name = f"joiner-{j}"
        reg[name] = producer.register(name, make_spec(data, args, args.joiner_steps, 10 + j))
        wait(f"{name} to finish", gone(name), stack, t)
        wait("steady steps", long_ones_past(newest_long_step() + 3), stack, t)
    reg["cancelled"] = producer.register("cancelled", make_spec(data, args, 100_000, 99))
    wait("cancelled to train", lambda: bus.steps(reg["cancelled"]) >= 2, stack, t)
    producer.deregister("cancelled")
    wait("cancelled to leave", gone("cancelled"), stack, t)
    wait("steady steps", long_ones_past(newest_long_step() + 4), stack, t)
    for name in LONG:
        producer.deregister(name)
    wait("all to leave", gone(*reg), stack, t)
    return reg


def analyse(bus: Bus, reg: dict[str, str]) -> dict[str, Any]:
    control = bus.control()
    by_reg: dict[str, list[StepDone]] = {}
    for _, e in control:
        if isinstance(e, StepDone):
            by_reg.setdefault(e.registration_id, []).append(e)
    registered = {e.registration_id: e.time for _, e in control if isinstance(e, RegisterRequested)}

    def first_step_s(name: str) -> float:
        return by_reg[reg[name]][0].time - registered[reg[name]]

    joiners = [n for n in reg if n.startswith("joiner-")] + ["cancelled"]
    # cadence of the long-running adapters
    intervals: dict[str, list[float]] = {}
    for name in LONG:
        times = [s.time for s in by_reg[reg[name]]]
        intervals[name] = [b - a for a, b in itertools.pairwise(times)]
    medians = {n: statistics.median(v) for n, v in intervals.items()}
    # stalls around admissions and departures of other adapters
    names = {reg[n]: n for n in joiners}
    moments = [
        (e.time, f"{type(e).__name__.lower()} {names[e.registration_id]}")
        for _, e in control
        if isinstance(e, Admitted | Completed) and e.registration_id in names
    ]
    details: list[dict[str, Any]] = []
    t_first = min((t for t, _ in moments), default=0.0)
    stalls: list[float] = []
    trainer_stalls: list[float] = []
    landed: dict[tuple[str, int, int], float] = {}
    for eid, g in bus.groups():
        key = (g.registration_id, g.epoch, g.step)
        landed[key] = max(landed.get(key, 0.0), entry_s(eid))
    for name in LONG:
        done = by_reg[reg[name]]
        times = [s.time for s in done]
        # the trainer's turnaround of a step: its last group landed -> its step_done committed
        turn = {
            s.time: s.time - landed[(s.registration_id, s.epoch, s.step)]
            for s in done
            if (s.registration_id, s.epoch, s.step) in landed
        }
        usual = statistics.median(turn.values()) if turn else 0.0
        for t, what in moments:
            around = [(a, b) for a, b in itertools.pairwise(times) if a <= t < b]
            if around:
                a, b = around[0]
                stalls.append(max(0.0, (b - a) / medians[name] - 1.0))
                extra = turn.get(b, usual) - usual
                trainer_stalls.append(max(0.0, extra / medians[name]))
                details.append(
                    {
                        "window": (a, b),
                        "at_s": round(t - t_first, 3),
                        "event": what,
                        "adapter": name,
                        "stall_steps": round(stalls[-1], 2),
                        "trainer_steps": round(trainer_stalls[-1], 2),
                    }
                )
    # sync latency
    syncs_ms = [1000.0 * e.latency_s for _, e in control if isinstance(e, Synced)]
    requested = sum(isinstance(e, SyncRequested) for _, e in control)
    generate_s = [g.generate_s for _, g in bus.groups()]
    return {
        "register_to_first_step_s": statistics.median(first_step_s(n) for n in joiners),
        "register_to_first_step_cold_s": statistics.median(first_step_s(n) for n in LONG),
        "step_s": statistics.median(medians.values()),
        "stall_steps": max(stalls, default=0.0),
        "stall_steps_mean": statistics.fmean(stalls) if stalls else 0.0,
        "stall_events": len(stalls),
        "trainer_stall_steps": max(trainer_stalls, default=0.0),
        "sync_p50_ms": percentile(syncs_ms, 50),
        "sync_p99_ms": percentile(syncs_ms, 99),
        "syncs_answered": len(syncs_ms),
        "syncs_requested": requested,
        "task_s_p50": percentile(generate_s, 50),
        "task_s_p99": percentile(generate_s, 99),
        "steps_total": sum(len(v) for v in by_reg.values()),
        "stalls": [
            {k: v for k, v in d.items() if k != "window"}
            for d in sorted(details, key=lambda d: d["at_s"])
        ],
        "worst_stall_timeline": worst_timeline(bus, control, details),
    }


def worst_timeline(
    bus: Bus, control: list[tuple[str, Any]], details: list[dict[str, Any]]
) -> list[str]:
    """What happened on the bus during the worst stall's interval (from the long-running
    adapter's ``step_done`` before it to the one after): control events, and groups landing
    (adapter, step, generation time), seconds from the interval's start."""
    if not details:
        return []
    worst = max(details, key=lambda d: d["stall_steps"])
    a, b = worst["window"]
    lines = [f"worst stall: {worst['event']}, {worst['adapter']} {worst['stall_steps']} steps"]
    rows: list[tuple[float, str]] = []
    for eid, e in control:
        t = entry_s(eid)
        if a - 0.05 <= t <= b + 0.05:
            tag, step = type(e).__struct_config__.tag, getattr(e, "step", "")
            rows.append((t, f"{tag:<22} {getattr(e, 'adapter', ''):<12} {step}"))
    for eid, g in bus.groups():
        t = entry_s(eid)
        if a - 0.05 <= t <= b + 0.05:
            rows.append((t, f"{'group lands':<22} {g.adapter:<12} {g.step} ({g.generate_s:.3f} s)"))
    lines += [f"{t - a:+8.3f}  {what}" for t, what in sorted(rows)]
    return lines


def step_windows(
    bus: Bus, control: list[tuple[str, Any]], after_s: float
) -> tuple[list[float], list[float]]:
    """Per trainer step: from ``ready`` to the trainer's loop picking it up (``started_at``),
    and from ``ready`` to its handler holding the step's last group (``ready_at``), seconds
    (see the module doc). A trainer step is the set of ``step_done`` with one
    ``started_at``; the loop is free again ``step_s`` (its own, a ``step_done`` metric) plus
    ``after_s`` (the mean rest of a step and its tail) after it started."""
    arrivals: dict[tuple[str, int, int], float] = {}
    for eid, g in bus.groups():
        key = (g.registration_id, g.epoch, g.step)
        arrivals[key] = max(arrivals.get(key, 0.0), entry_s(eid))
    steps: dict[float, list[StepDone]] = {}
    for _, e in control:
        if isinstance(e, StepDone) and "started_at" in e.metrics:
            steps.setdefault(e.metrics["started_at"], []).append(e)
    dispatch, read = [], []
    free = 0.0  # when the loop was free again after the previous step
    for started, events in sorted(steps.items()):
        landed = max(arrivals.get((e.registration_id, e.epoch, e.step), 0.0) for e in events)
        ready = max(landed, free)
        if landed and started >= ready:
            dispatch.append(started - ready)
            held = max(e.metrics.get("ready_at", started) for e in events)
            read.append(max(0.0, held - ready))
        free = started + max(e.metrics.get("step_s", 0.0) for e in events) + after_s
    return dispatch, read


def control_plane(
    bus: Bus, control: list[tuple[str, Any]], timings: dict[str, tuple[float, int]]
) -> dict[str, Any]:
    """The control-plane share of the step critical path, and its parts (module doc)."""
    steps = timings["forward_backward"][1]
    mean = {phase: total / max(1, n) for phase, (total, n) in timings.items()}
    compute = mean["forward_backward"] + mean["optimizer"]
    publish, tail = mean["publish"], mean["tail"]
    step_s = [e.metrics["step_s"] for _, e in control if isinstance(e, StepDone)]
    packing = max(0.0, statistics.fmean(step_s) - compute) if step_s else 0.0
    dispatch_s, read_s = step_windows(bus, control, max(0.0, publish - packing) + tail)
    dispatch = statistics.fmean(dispatch_s) if dispatch_s else 0.0
    window = dispatch + compute + publish + tail
    pack_s = [
        e.metrics["pack_s"] for _, e in control if isinstance(e, StepDone) and "pack_s" in e.metrics
    ]
    pack = statistics.fmean(pack_s) if pack_s else 0.0
    return {
        "control_plane_share": (window - compute) / window,
        "share": {
            "compute": compute / window,
            "bus_read_and_dispatch": dispatch / window,
            "publish": publish / window,
            "  of which packing the batch": pack / window,
            "settle_and_commit": tail / window,
        },
        "bus_read_s": statistics.fmean(read_s) if read_s else 0.0,
        "dispatch_s": dispatch,
        "step_window_s": window,
        "step_compute_s": compute,
        "version_write_s": mean.get("version_write", 0.0),
        "version_wait_s": mean.get("version_wait", 0.0),
        "trainer_steps": steps,
        "trainer_steps_timed": len(dispatch_s),
        "control_parts_ms": {
            phase.removeprefix("control."): 1000.0 * value
            for phase, value in mean.items()
            if phase.startswith("control.")
        },
    }


def trainer_phases(port: int) -> dict[str, tuple[float, int]]:
    """``{phase: (seconds summed, count)}`` from the trainer's ``/metrics``: the step phases,
    plus ``tail`` (settling and committing after a step), ``version_write`` and
    ``version_wait``."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = {
        "multilora_trainer_step_tail_seconds": "tail",
        "multilora_trainer_version_write_seconds": "version_write",
        "multilora_trainer_version_wait_seconds": "version_wait",
    }
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        control = family.name == "multilora_trainer_step_control_seconds"
        phases = family.name == "multilora_trainer_step_phase_seconds"
        if not (phases or control or family.name in families):
            continue
        for sample in family.samples:
            phase = families.get(family.name) or sample.labels.get("phase", "")
            if control:
                phase = "control." + sample.labels.get("part", "")
            if sample.name.endswith("_sum"):
                sums[phase] = sample.value
            elif sample.name.endswith("_count"):
                counts[phase] = int(sample.value)
    if not counts or not counts.get("forward_backward"):
        raise RuntimeError(f"the trainer at :{port} exported no step phase timings")
    return {phase: (sums[phase], counts[phase]) for phase in sums}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def random_model(path: Path, hidden: int, layers: int) -> Path:
    from ops.models import write_tiny_model

    heads = max(4, hidden // 64)
    return write_tiny_model(
        path,
        "qwen3",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        intermediate_size=3 * hidden,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model", default="", help="local HF model dir (default: a random model)")
    p.add_argument("--random-hidden", type=int, default=64)
    p.add_argument("--random-layers", type=int, default=2)
    p.add_argument("--small", action="store_true", help="fewer steps (a quick check)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--joiners", type=int, default=3)
    p.add_argument("--joiner-steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--run-dir", default="", help="keep the run here (default: a temp dir)")
    p.add_argument("--out", default="bench/results/e2e.json")
    args = p.parse_args(argv)
    if args.small:
        args.joiners, args.joiner_steps, args.warmup = 1, 3, 4

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="multilora-e2e-"))
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompts = [f"{c}:" for c in "abcdefghijklmnop"]
    rows = [json.dumps({"prompt": q, "answer": ""}) for q in prompts]
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    model = args.model or str(
        random_model(run_dir / "model", args.random_hidden, args.random_layers)
    )
    device = ["--device", args.device, "--dtype", args.dtype]
    metrics_port = free_port()
    options = StackOptions(
        model=model,
        workers=args.workers,
        num_slots=4,
        max_rank=max(8, args.rank),
        run_dir=str(run_dir / "stack"),
        namespace="bench",
        max_batch_wait_s=0.0,
        torch_threads=1 if args.device == "cpu" else 0,
        redis_port=0,
        metrics_port_base=0,
        extra_args={
            "trainer": [*device, "--allowed-root", str(data), "--metrics-port", str(metrics_port)],
            "rollout": [*device, "--allowed-root", str(data)],
        },
    )
    t0 = time.monotonic()
    with Stack(options) as stack:
        client = connect(stack.url)
        client.xgroup_create(stack.streams.groups, OBSERVER, id="0", mkstream=True)
        bus = Bus(client, stack.streams)
        reg = scenario(stack, bus, data, args)
        result = analyse(bus, reg)
        result.update(control_plane(bus, bus.control(), trainer_phases(metrics_port)))
    wall = time.monotonic() - t0
    out = {
        "device": args.device,
        **{k: result[k] for k in ("register_to_first_step_s", "step_s", "stall_steps")},
        **{k: result[k] for k in ("sync_p50_ms", "sync_p99_ms", "control_plane_share")},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "model": args.model
        or f"random qwen3 hidden={args.random_hidden} layers={args.random_layers}",
        "workers": args.workers,
        "dtype": args.dtype,
        "adapter": {
            "rank": args.rank,
            "group_size": args.group_size,
            "prompts_per_step": args.prompts_per_step,
            "max_new_tokens": args.max_new_tokens,
        },
        "wall_s": wall,
        **{k: v for k, v in result.items() if k not in ("step_s",)},
    }
    print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def print_table(out: dict[str, Any]) -> None:
    rows = [
        ("device", out["device"], ""),
        ("register -> first step (warm)", f"{out['register_to_first_step_s']:.2f}", "s"),
        ("register -> first step (cold)", f"{out['register_to_first_step_cold_s']:.2f}", "s"),
        ("step cadence (median interval)", f"{out['step_s']:.3f}", "s"),
        ("trainer step critical path", f"{out['step_window_s']:.3f}", "s"),
        ("  forward/backward + optimizer", f"{out['step_compute_s']:.3f}", "s"),
        ("stall on join/leave (max)", f"{out['stall_steps']:.2f}", "steps"),
        ("stall on join/leave (mean)", f"{out['stall_steps_mean']:.2f}", "steps"),
        ("  of it in the trainer (max)", f"{out['trainer_stall_steps']:.2f}", "steps"),
        ("sync latency p50", f"{out['sync_p50_ms']:.1f}", "ms"),
        ("sync latency p99", f"{out['sync_p99_ms']:.1f}", "ms"),
        ("syncs answered / requested", f"{out['syncs_answered']}/{out['syncs_requested']}", ""),
        ("rollout task p50 / p99", f"{out['task_s_p50']:.3f}/{out['task_s_p99']:.3f}", "s"),
        ("control-plane share of step", f"{out['control_plane_share']:.1%}", ""),
        *[(f"  {part}", f"{share:.1%}", "") for part, share in out["share"].items()],
        *[(f"  loop: {part}", f"{ms:.2f}", "ms") for part, ms in out["control_parts_ms"].items()],
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>10} {unit}")
    for line in out.get("worst_stall_timeline", []):
        print(line)
    print("stalls (s after the first join/leave, event, long-running adapter, steps, trainer's):")
    for d in out["stalls"]:
        print(
            f"  {d['at_s']:7.2f}  {d['event']:<22} {d['adapter']:<8} {d['stall_steps']:5.2f} "
            f"{d['trainer_steps']:5.2f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
