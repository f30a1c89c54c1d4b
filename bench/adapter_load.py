"""How long a new adapter version takes to load into a live engine (the worker's sync cost).

Every RL step of every adapter loads one new version on each rollout worker, so in a run of many
adapters the loads add up (a fifth to a quarter of the wall time in ``bench/experiments.py``'s
together run on an H200). This times :meth:`rollout.engine.Engine.load_adapter` with the files
already read (as the worker's reader thread hands them over): ``--adapters`` adapters of each
rank on every linear, ``--versions`` versions each, round robin, so versions retire and slots are
reused as in a run. The first round (cold slots) is left out of the median.

Usage::

    python bench/adapter_load.py --out bench/results/adapter_load_cpu.json
    python bench/adapter_load.py --device cuda --dtype bfloat16 --out $OUT/adapter_load.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, where a bench file would shadow a package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.engine_phases import write_adapters  # noqa: E402
from bench.report import write_json  # noqa: E402
from events.adapter_format import read_peft_adapter  # noqa: E402
from ops.models import write_tiny_model  # noqa: E402
from rollout.engine import Engine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--small", action="store_true", help="a tiny random model (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--versions", type=int, default=12)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    model = write_tiny_model(tmp / "tiny", "llama") if args.small else Path(args.model)
    if not (model / "config.json").exists():
        parser.error(f"--model {model}: no config.json there; run `make model` or pass --small")
    ranks = [int(r) for r in args.ranks.split(",")]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    rows = []
    for rank in ranks:
        paths = write_adapters(base, tmp / f"r{rank}", [rank] * args.adapters)
        adapters = [read_peft_adapter(p) for p in paths]
        engine = Engine.from_pretrained(
            model,
            dtype=args.dtype,
            device=args.device,
            max_loras=2 * args.adapters,
            max_lora_rank=max(ranks),
            keep_versions=2,
        )
        times: list[float] = []
        for version in range(1, args.versions + 1):
            for i, adapter in enumerate(adapters):
                start = time.perf_counter()
                engine.load_adapter(f"a{i}", version, adapter.path, adapter=adapter)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        steady = times[args.adapters :]
        rows.append(
            {
                "rank": rank,
                "adapter_mib": adapters[0].nbytes / 2**20,
                "modules": len(adapters[0].weights),
                "first_ms": times[0] * 1e3,
                "median_ms": statistics.median(steady) * 1e3,
                "p90_ms": sorted(steady)[int(0.9 * (len(steady) - 1))] * 1e3,
            }
        )
    print(f"model {model.name}  device {args.device}  dtype {args.dtype}")
    print(f"{'rank':>5}{'MiB':>8}{'modules':>9}{'first ms':>10}{'median ms':>11}{'p90 ms':>9}")
    for r in rows:
        print(
            f"{r['rank']:>5}{r['adapter_mib']:>8.1f}{r['modules']:>9}{r['first_ms']:>10.1f}"
            f"{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}"
        )
    if args.out:
        result = {
            "model": model.name,
            "device": args.device,
            "dtype": args.dtype,
            "adapters": args.adapters,
            "versions": args.versions,
            "rows": rows,
            "torch": torch.__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        }
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
