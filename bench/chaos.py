"""Chaos benchmark: the local stack under waves of adapters while random processes are SIGKILLed.

Runs :class:`tests.chaos.harness.ChaosStack` (embedded Redis, trainer, two rollout workers,
checkpointer, RQ rewards worker; tiny random model, CPU) for ``--duration-s``: a new wave of
adapters starts whenever the previous one is nearly done — per wave ``a`` (in-process reward),
``r`` (the ``regex`` reward, scored on the RQ worker), ``c`` (cancelled at step 5), ``d``
(registered once ``a`` reached step 5) and ``c`` again (registered once the first ``c`` ended).
Meanwhile a random process of ``--victims`` is killed every ``--kill-gap-s`` seconds. After the
last wave drains, :func:`tests.chaos.history.check` reads the history back and the result is
printed as a table and written as JSON: ``duration_s``, ``kills`` (per process kind), ``exits``
(processes that died on their own and were restarted), ``adapters``, ``steps_applied``,
``lost``, ``applied_twice``, ``stale_trained``, ``max_artifact_bytes`` (sampled every second;
``--max-artifact-bytes`` > 0 makes it a checked bound), ``violations`` (per kind, and the
first ones in full), ``date``, ``command``. Version GC runs in the checkpointer's storage pass,
first ``housekeeping_interval_s`` (60 s) after the process starts, so a checkpointer killed more
often than that never collects: ``--housekeeping-interval-s`` shortens the period.

Usage::

    python bench/chaos.py --duration-s 300 --seed 1
    python bench/chaos.py --duration-s 60 --victims trainer,rollout --out /tmp/chaos.json
    python bench/chaos.py --duration-s 60 --break no-epoch-check   # must report violations

Exit status: 0 when the checker found no violation, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from events.specs import AdapterSpec
from ops.launch import Stack
from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model
from orchestrator.lifecycle import AdapterState, is_ended

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/chaos.py` puts bench/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

from tests.chaos.harness import (  # noqa: E402
    KINDS,
    ChaosOptions,
    ChaosStack,
    Plan,
    chaos_stack_options,
)
from tests.chaos.history import check, counts  # noqa: E402
from tests.e2e.harness import LiveStack, child_env  # noqa: E402
from tests.e2e.specs import adapter_spec, char_reward, digit_reward  # noqa: E402

PROMPTS = [f"{c}:" for c in "abcdefghijklmnop"]
MAX_RANK = 8


def wave(n: int, data: Path, steps: int) -> list[Plan]:
    """The adapters of wave ``n`` (names ``w<n>-...``)."""

    def spec(reward: str, steps: int, seed: int) -> AdapterSpec:
        chosen = digit_reward() if reward == "regex" else char_reward(reward)
        return adapter_spec(data, chosen, steps=steps, seed=100 * n + seed, checkpoint_interval=5)

    w = f"w{n}"
    return [
        Plan(f"{w}-a", spec("a", steps, 0)),
        Plan(f"{w}-r", spec("regex", steps, 1)),
        Plan(f"{w}-c", spec("c", 3 * steps, 2), cancel_at=5),
        Plan(f"{w}-d", spec("d", steps // 2 + 2, 3), after=f"{w}-a", after_step=5),
        Plan(f"{w}-c", spec("e", steps // 2, 4), after=f"{w}-c"),
    ]


class Waves:
    """``extend`` of :meth:`ChaosStack.run`: the next wave once at most one registration of the
    run is still live and the previous wave is fully registered, until ``duration_s``."""

    def __init__(self, chaos: ChaosStack, data: Path, duration_s: float, steps: int) -> None:
        self.chaos, self.data, self.duration_s, self.steps = chaos, data, duration_s, steps
        self.started = 1
        self.per_wave = len(wave(0, data, steps))

    def __call__(self, elapsed_s: float, states: dict[str, AdapterState]) -> Sequence[Plan]:
        ids = [rid for _, rid in self.chaos.record.registrations]
        if elapsed_s >= self.duration_s or len(ids) < self.started * self.per_wave:
            return []
        live = [rid for rid in ids if rid not in states or not is_ended(states[rid])]
        if len(live) > 1:
            return []
        self.started += 1
        return wave(self.started - 1, self.data, self.steps)


def run(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"prompt": q, "answer": ""}) for q in PROMPTS]
    (data / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    model = write_tiny_model(run_dir / "model", head_scale=LEARNABLE_HEAD_SCALE)
    os.environ.pop("REDIS_URL", None)  # the harness kills the embedded Redis
    os.environ.update(child_env())
    victims = tuple(v for v in args.victims.split(",") if v)
    options = ChaosOptions(
        seed=args.seed,
        kill_gap_s=(args.kill_gap_s[0], args.kill_gap_s[1]),
        victims=victims,
        timeout_s=args.duration_s + args.drain_s,
        wait_for_finals=not args.broken,
    )
    stack_opts = chaos_stack_options(run_dir / "stack", "chaos", data, model)
    if args.housekeeping_interval_s:
        every = ("--housekeeping-interval-s", str(args.housekeeping_interval_s))
        extra = {**stack_opts.extra_args, "checkpoint": every}
        stack_opts = msgspec.structs.replace(stack_opts, extra_args=extra)
    broken = (
        [sys.executable, "-m", "tests.chaos.broken_trainer", "--break", args.broken, "trainer"]
        if args.broken
        else []
    )
    on_sigterm = signal.getsignal(signal.SIGTERM)
    stack = Stack(stack_opts).__enter__()
    try:
        live = LiveStack(stack)
        chaos = ChaosStack(live, options, trainer_command=broken)
        finished, error = True, ""
        try:
            chaos.run(
                wave(0, data, args.steps), extend=Waves(chaos, data, args.duration_s, args.steps)
            )
        except AssertionError as exc:  # not drained in time: check what the history says anyway
            finished, error = False, str(exc).split("\n", 1)[0]
        bound = args.max_artifact_bytes or None
        verdict = check(
            chaos.history(model=str(model), max_rank=MAX_RANK), max_artifact_bytes=bound
        )
        record = chaos.record
        live.close()
    finally:
        stack.__exit__(None, None, None)
        signal.signal(signal.SIGTERM, on_sigterm)
    return {
        "duration_s": round(record.duration_s, 1),
        "finished": finished,
        **({"error": error} if error else {}),
        "kills": {k: record.kills.get(k, 0) for k in KINDS},
        "exits": dict(record.exits),
        "adapters": len(record.registrations),
        "cancelled": len(record.cancelled),
        "steps_applied": verdict.steps_applied,
        "lost": verdict.lost,
        "applied_twice": verdict.applied_twice,
        "stale_trained": verdict.stale_trained,
        "checkpoints_checked": verdict.checkpoints_checked,
        "max_artifact_bytes": verdict.max_artifact_bytes,
        "max_artifact_bytes_bound": bound,
        "violations": counts(verdict),
        "first_violations": [str(v) for v in verdict.violations[:10]],
        "ok": verdict.ok and finished,
        "seed": args.seed,
        "housekeeping_interval_s": args.housekeeping_interval_s or None,
        "victims": list(victims),
        "broken": args.broken or None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
    }


def print_table(out: dict[str, Any]) -> None:
    kills = ", ".join(f"{k} {n}" for k, n in out["kills"].items())
    exits = ", ".join(f"{k} {n}" for k, n in out["exits"].items()) or "none"
    rows = [
        ("duration", f"{out['duration_s']:.0f} s" + ("" if out["finished"] else " (not drained)")),
        ("kills", f"{sum(out['kills'].values())} ({kills})"),
        ("exits on their own (restarted)", exits),
        ("adapters (cancelled)", f"{out['adapters']} ({out['cancelled']})"),
        ("steps applied", str(out["steps_applied"])),
        ("lost steps", str(out["lost"])),
        ("steps applied twice", str(out["applied_twice"])),
        ("steps trained on stale work", str(out["stale_trained"])),
        ("checkpoints verified + restored", str(out["checkpoints_checked"])),
        ("max artifact store bytes", f"{out['max_artifact_bytes'] / 1e6:.1f} MB"),
        ("violations", json.dumps(out["violations"]) if out["violations"] else "none"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for line in out["first_violations"]:
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/chaos.py", description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=300.0, help="start waves for this long")
    p.add_argument("--drain-s", type=float, default=300.0, help="then wait this long at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--victims", default=",".join(KINDS), help=f"comma list of {KINDS}")
    p.add_argument("--kill-gap-s", type=float, nargs=2, default=(3.0, 8.0), metavar=("LO", "HI"))
    p.add_argument("--steps", type=int, default=20, help="budget of a wave's main adapters")
    p.add_argument("--max-artifact-bytes", type=int, default=0, help="the bound (0: report)")
    p.add_argument(
        "--housekeeping-interval-s",
        type=float,
        default=0.0,
        help="the checkpointer's storage pass period (0: its default)",
    )
    p.add_argument(
        "--break", dest="broken", default="", choices=("", "no-epoch-check", "lose-version-write")
    )
    p.add_argument("--run-dir", default="", help="keep the run here (default: a temp dir)")
    p.add_argument("--out", default="bench/results/chaos.json")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="multilora-chaos-"))
    out = run(args, run_dir)
    print_table(out)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
