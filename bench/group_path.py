"""A rollout group's path through the trainer, part by part: read from Redis, decode, make into
rows, pack into the step's batch.

When the trainer waits for rollouts, this path — from the last group of a step landing to the
step starting — is the control plane on the step's critical path (``bench/e2e.py``'s
``bus_read_and_dispatch``); when rollouts keep up, the packing still is. Each part is timed
alone, in this process, on synthetic groups of ``--shapes`` (``PROMPTSxSAMPLESxTOKENS``; a step
of ``--adapters`` adapters reads ``--adapters`` groups), against a real Redis (the embedded one
unless ``REDIS_URL``):

* ``read_ms``: one ``XREADGROUP`` returning the step's groups (reply parsing; hiredis when
  installed);
* ``decode_ms``: the groups' JSON decoded into events (:class:`events.codec.Decoder`);
* ``rows_ms``: the groups made into rows (:func:`trainer.batching.rows_of_group`);
* ``pack_ms``: the rows packed into one batch (:func:`trainer.batching.pack`).

``--baseline DIR`` runs the same measurement on another tree (e.g. ``git archive REV | tar -x
-C DIR``) in a child process right after, and prints both and the ratios.

Usage::

    python bench/group_path.py
    python bench/group_path.py --baseline /tmp/old --out bench/results/group_path.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import write_json  # bench/report.py: run as a script, bench/ is on the path


def measure(shapes: list[str], adapters: int, repeats: int) -> dict[str, dict[str, float]]:
    """``{shape: {part: ms}}``, each part the median of ``repeats`` timings."""
    sys.path.insert(0, os.getcwd())
    if os.environ.get("BENCH_NO_HIREDIS"):  # the baseline as installed before hiredis
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    import statistics

    from events.codec import Decoder, encode
    from events.connection import connect
    from events.schema import GroupEvent, PromptGroup, RolloutGroup, Sample
    from events.specs import LossSpec
    from ops.redis_server import RedisServer
    from trainer.batching import pack, rows_of_group

    rng = random.Random(0)

    def group(prompts: int, samples: int, tokens: int, adapter: int) -> RolloutGroup:
        return RolloutGroup(
            adapter=f"a{adapter}",
            registration_id=f"r{adapter}",
            epoch=1,
            task_id=f"t{adapter}",
            step=3,
            version=2,
            worker="w",
            groups=tuple(
                PromptGroup(
                    prompt_index=i,
                    prompt_ids=tuple(rng.randrange(32_000) for _ in range(32)),
                    samples=tuple(
                        Sample(
                            completion_ids=tuple(rng.randrange(32_000) for _ in range(tokens)),
                            logprobs=tuple(-rng.random() * 5 for _ in range(tokens)),
                            text="",
                            reward=float(rng.random() < 0.5),
                        )
                        for _ in range(samples)
                    ),
                )
                for i in range(prompts)
            ),
        )

    def median_ms(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    server = None if os.environ.get("REDIS_URL") else RedisServer()
    url = server.__enter__().url if server is not None else os.environ["REDIS_URL"]
    out: dict[str, dict[str, float]] = {}
    try:
        client = connect(url)
        decoder = Decoder(GroupEvent, max_bytes=64 << 20)
        loss = LossSpec()
        for shape in shapes:
            prompts, samples, tokens = (int(x) for x in shape.split("x"))
            events = [group(prompts, samples, tokens, a) for a in range(adapters)]
            fields = [encode(e) for e in events]
            key = f"bench:group_path:{shape}"
            client.delete(key)
            client.xgroup_create(key, "g", id="0", mkstream=True)
            for _ in range(repeats):
                for f in fields:
                    client.xadd(key, f)

            def read(key: str = key) -> object:
                return client.xreadgroup("g", "c", {key: ">"}, count=adapters)

            decoded = [decoder.decode(f, "1-0") for f in fields]

            def rows(decoded: list[Any] = decoded) -> list[Any]:
                return [
                    rows_of_group(pg, a, loss, 1.0, 1 << 20)
                    for a, e in enumerate(decoded)
                    for pg in e.groups
                ]

            packed = [r for part in rows() for r in part.rows]

            def decode(fields: list[Any] = fields) -> object:
                return [decoder.decode(f, "1-0") for f in fields]

            def pack_all(packed: list[Any] = packed) -> object:
                return pack(packed, 0)

            out[shape] = {
                "bytes": float(sum(len(v) for f in fields for v in f.values())),
                "rows": float(len(packed)),
                "read_ms": median_ms(read),
                "decode_ms": median_ms(decode),
                "rows_ms": median_ms(rows),
                "pack_ms": median_ms(pack_all),
            }
            client.delete(key)
        client.close()
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    return out


PARTS = ("read_ms", "decode_ms", "rows_ms", "pack_ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--shapes", default="4x8x8,8x8x128", help="PROMPTSxSAMPLESxTOKENS, comma-separated"
    )
    p.add_argument("--adapters", type=int, default=8, help="groups a step reads (one per adapter)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--baseline", default="", help="another tree to measure right after")
    p.add_argument(
        "--baseline-without-hiredis",
        action="store_true",
        help="the baseline's redis-py parses in Python",
    )
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results/group_path.json")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    now = measure(shapes, args.adapters, args.repeats)
    if args.json_only:
        print(json.dumps(now))
        return 0
    before = None
    if args.baseline:
        child = [sys.executable, str(Path(__file__).resolve()), "--json-only"]
        child += ["--shapes", args.shapes, "--adapters", str(args.adapters)]
        child += ["--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONPATH": args.baseline}
        if args.baseline_without_hiredis:
            env["BENCH_NO_HIREDIS"] = "1"
        done = subprocess.run(
            child, cwd=args.baseline, env=env, capture_output=True, text=True, check=True
        )
        before = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'shape':<10} {'rows':>5} {'KB':>7}  " + "  ".join(f"{p:>16}" for p in PARTS))
    for shape in shapes:
        m = now[shape]
        cells = []
        for part in PARTS:
            cell = f"{m[part]:.3f}"
            if before is not None:
                cell = f"{before[shape][part]:.3f}->{cell}"
            cells.append(f"{cell:>16}")
        print(f"{shape:<10} {m['rows']:>5.0f} {m['bytes'] / 1e3:>7.0f}  " + "  ".join(cells))
    result: dict[str, Any] = {
        "adapters": args.adapters,
        "repeats": args.repeats,
        "now": now,
        "baseline": before,
        "baseline_tree": args.baseline or None,
        "baseline_without_hiredis": args.baseline_without_hiredis,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python bench/group_path.py " + shlex.join(argv or sys.argv[1:]),
    }
    if before is not None:
        result["ratio_before_over_now"] = {
            s: {p: before[s][p] / now[s][p] for p in PARTS if now[s][p] > 0} for s in shapes
        }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
