"""Soak: the local stack left running while adapters keep registering, training and leaving.

Runs ``multilora up``'s stack (embedded Redis with its role users, trainer, two rollout workers,
checkpointer) on a tiny random model and keeps ``--concurrent`` adapters in flight: each trains a
few steps and completes, and a new one (a new name) registers in its place; every fifth is
cancelled mid-run instead. The checkpointer's housekeeping runs often (version GC, status
expiry, control-log snapshots and trimming), and its retention windows are compressed like the
run (an ended registration's status lives ``--status-ttl-s``, keeps its spec in the snapshot
``--tombstone-after-s`` and stays there as a tombstone ``--ended-retention-s``; in service: 7
days, an hour, 30 days), so what weeks do to storage happens in minutes. ``snapshot_bytes``
(the control-log snapshot) is what the retention window holds: its steady size over the
registrations ended within the window gives the bytes one ended registration costs.

Every ``--sample-s`` it records each child's resident memory (``VmRSS`` of ``/proc``), Redis's
``used_memory``, the bytes of the version store (``artifacts``: bounded by GC) and of the
checkpoint store (``checkpoints``: every completed adapter's final checkpoint and export, the
product, which grows with the experiments finished by design), and each stream's length.
Samples before ``--warmup-s`` are left out (imports, first steps and caches are not growth).
Reported per quantity: the first and last value after warm-up, the maximum, and the ratio of the
peak in the last third of the run to the peak in the first third (goal: at most 1.10 for RSS,
Redis memory and artifact bytes; a sweep bounds them in a sawtooth, so peaks are compared).

Usage::

    python bench/soak.py                          # 20 minutes, CPU
    python bench/soak.py --duration-s 180 --out /tmp/soak.json   # a quick look

Writes ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import random_model

from events.connection import connect
from events.specs import (
    AdapterSpec,
    DatasetSpec,
    OptimSpec,
    RewardSpec,
    SamplingSpec,
)
from ops.launch import Stack, StackOptions
from orchestrator.client import Producer
from orchestrator.compaction import snapshot_key
from orchestrator.status import read_one

GOAL = 1.10


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root``; files and directories deleted while it walks (GC runs
    meanwhile) are skipped."""
    total = 0
    for parent, _dirs, files in os.walk(root):  # os.walk skips directories that vanish
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


def sample(stack: Stack, client: redis.Redis, run_dir: Path) -> dict[str, Any]:
    streams = stack.streams
    lengths = {}
    for name in ("control", "ingress", "tasks", "groups", "dead"):
        key = getattr(streams, name)
        lengths[name] = int(client.xlen(key)) if client.exists(key) else 0
    return {
        "t": time.monotonic(),
        "rss": {name: rss_bytes(p.pid) for name, p in stack.procs.items()},
        "redis_used_memory": int(client.info("memory")["used_memory"]),
        "artifact_bytes": tree_bytes(run_dir / "artifacts"),
        "checkpoint_bytes": tree_bytes(run_dir / "checkpoints"),
        "streams": lengths,
        "redis_keys": int(client.dbsize()),
        "snapshot_bytes": int(client.hstrlen(snapshot_key(streams), "fleet")),
    }


def spec(data: Path, steps: int, seed: int) -> AdapterSpec:
    return AdapterSpec(
        rank=4,
        alpha=8.0,
        dataset=DatasetSpec(kind="jsonl", path=str(data / "prompts.jsonl")),
        rewards=(RewardSpec(name="regex", params={"pattern": "[0-9]"}),),
        sampling=SamplingSpec(temperature=1.0, max_new_tokens=4),
        optim=OptimSpec(lr=1e-2),
        group_size=4,
        prompts_per_step=2,
        steps=steps,
        checkpoint_interval=steps,
        seed=seed,
    )


def summary(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per quantity over the samples after warm-up: the first and last value, the maximum, and
    ``ratio`` = the maximum of the last third over the maximum of the first third (quantities
    that a periodic sweep bounds move in a sawtooth; their peaks are what must not grow)."""
    t0 = samples[0]["t"]
    steady = [s for s in samples if s["t"] - t0 >= warmup_s] or samples[-1:]
    third = max(1, len(steady) // 3)
    early, late = steady[:third], steady[-third:]

    def row(get: Any) -> dict[str, float]:
        peak_early = float(max(get(s) for s in early))
        peak_late = float(max(get(s) for s in late))
        return {
            "start": float(get(steady[0])),
            "end": float(get(steady[-1])),
            "max": float(max(get(s) for s in steady)),
            "ratio": peak_late / peak_early if peak_early else float("nan"),
        }

    out: dict[str, Any] = {
        f"rss_{name}": row(lambda s, n=name: s["rss"].get(n, 0)) for name in steady[0]["rss"]
    }
    out["redis_used_memory"] = row(lambda s: s["redis_used_memory"])
    out["redis_keys"] = row(lambda s: s["redis_keys"])
    out["artifact_bytes"] = row(lambda s: s["artifact_bytes"])
    out["checkpoint_bytes"] = row(lambda s: s["checkpoint_bytes"])
    out["snapshot_bytes"] = row(lambda s: s.get("snapshot_bytes", 0))
    for name in steady[0]["streams"]:
        out[f"stream_{name}"] = row(lambda s, n=name: s["streams"][n])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=1200.0)
    p.add_argument("--warmup-s", type=float, default=180.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--housekeeping-interval-s", type=float, default=15.0)
    # the retention windows, compressed like the run (defaults: 7 days, an hour, 30 days)
    p.add_argument("--status-ttl-s", type=int, default=120)
    p.add_argument("--tombstone-after-s", type=float, default=30.0)
    p.add_argument("--ended-retention-s", type=float, default=300.0)
    p.add_argument("--run-dir", default="")
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args(argv)

    base = Path(args.run_dir or tempfile.mkdtemp(prefix="multilora-soak-"))
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"prompt": f"{c}:", "answer": ""}) for c in "abcdefghijklmnop"]
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    model = random_model(base / "model", 64, 2)
    run_dir = base / "stack"
    options = StackOptions(
        model=str(model),
        workers=2,
        num_slots=4,
        max_rank=8,
        run_dir=str(run_dir),
        namespace="soak",
        max_batch_wait_s=0.5,
        torch_threads=1,
        redis_port=0,
        metrics_port_base=0,
        extra_args={
            "trainer": ["--allowed-root", str(data)],
            "rollout": ["--allowed-root", str(data)],
            "checkpoint": [
                "--housekeeping-interval-s",
                str(args.housekeeping_interval_s),
                "--compact-interval-s",
                str(4 * args.housekeeping_interval_s),
                "--compact-entries",
                "2000",
                "--status-ttl-s",
                str(args.status_ttl_s),
                "--tombstone-after-s",
                str(args.tombstone_after_s),
                "--ended-retention-s",
                str(args.ended_retention_s),
            ],
        },
    )
    samples: list[dict[str, Any]] = []
    counts = {"registered": 0, "completed": 0, "cancelled": 0}
    t0 = time.monotonic()
    with Stack(options) as stack:
        client = connect(stack.url)
        producer = Producer(client, stack.streams, source="soak")
        live: dict[str, int] = {}  # name -> index
        names = (f"soak-{i:05d}" for i in itertools.count())
        next_sample = time.monotonic()
        while time.monotonic() - t0 < args.duration_s:
            stack.check()
            for name, i in list(live.items()):
                status = read_one(client, stack.streams, name)
                if status is None or status.phase is None:
                    continue
                if i % 5 == 4 and status.step >= 2 and not is_ended_phase(status.phase):
                    producer.deregister(name)
                    counts["cancelled"] += 1
                    live[name] = -1  # cancel sent: wait for it to end
                elif is_ended_phase(status.phase):
                    counts["completed"] += status.phase.value in ("completed", "retired")
                    del live[name]
            while len(live) < args.concurrent:
                name = next(names)
                index = counts["registered"]
                producer.register(name, spec(data, args.steps, seed=index))
                live[name] = index
                counts["registered"] += 1
            if time.monotonic() >= next_sample:
                samples.append(sample(stack, client, run_dir))
                next_sample += args.sample_s
                last = samples[-1]
                print(
                    f"{last['t'] - t0:7.0f} s  registered {counts['registered']:4d}  "
                    f"redis {last['redis_used_memory'] / 2**20:6.1f} MiB  "
                    f"artifacts {last['artifact_bytes'] / 2**20:6.1f} MiB  "
                    f"trainer rss {last['rss'].get('trainer', 0) / 2**20:6.0f} MiB",
                    flush=True,
                )
            time.sleep(0.5)
        samples.append(sample(stack, client, run_dir))
        keys = largest_keys(client, 12)
    result = summary(samples, args.warmup_s)
    flat = ["redis_used_memory", "artifact_bytes", *[k for k in result if k.startswith("rss_")]]
    worst = max(result[k]["ratio"] for k in flat if result[k]["start"])
    out = {
        "duration_s": time.monotonic() - t0,
        "warmup_s": args.warmup_s,
        "adapters": counts,
        "worst_ratio": worst,
        "goal_ratio": GOAL,
        "quantities": result,
        "samples": len(samples),
        "largest_keys": keys,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
    }
    print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def largest_keys(client: redis.Redis, top: int) -> list[dict[str, Any]]:
    """The ``top`` keys by ``MEMORY USAGE`` at the end of the run (where Redis's memory went)."""
    sizes = []
    for key in client.scan_iter(count=500):
        used = client.memory_usage(key, samples=0)
        if used is not None:
            sizes.append({"key": key.decode() if isinstance(key, bytes) else key, "bytes": used})
    sizes.sort(key=lambda row: -row["bytes"])
    return sizes[:top]


def is_ended_phase(phase: Any) -> bool:
    return phase.value in ("completed", "cancelled", "failed", "retired", "rejected")


def print_table(out: dict[str, Any]) -> None:
    print(f"\nsoak {out['duration_s']:.0f} s, adapters {out['adapters']}")
    print(f"{'quantity':28s} {'start':>12s} {'end':>12s} {'max':>12s} {'late/early':>10s}")
    for name, row in out["quantities"].items():
        print(
            f"{name:28s} {row['start']:12.0f} {row['end']:12.0f} {row['max']:12.0f} "
            f"{row['ratio']:10.3f}"
        )
    for row in out.get("largest_keys", []):
        print(f"  {row['bytes']:12d}  {row['key']}")
    print(f"worst late/early peak of RSS, Redis memory, artifacts: {out['worst_ratio']:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
