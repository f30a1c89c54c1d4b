"""Where one mixed-adapter engine batch spends its time: prefill, decode forwards, sampling, loads.

The experiments benchmark (``bench/experiments.py``) sees a 512-row batch cost 1.7x a 64-row
one although the extra rows are almost free for the GPU. This script takes the embedded
engine alone, on the experiments' shape (short arithmetic prompts, temperature 0.8, a ``"\\n"``
stop string, 6 new tokens, one adapter per task of the ranks in ``bench/experiments.py``'s book,
on every projection), and times each phase of :meth:`Engine.generate` with a device
synchronisation around it:

* ``prefill_ms``: the first forward (all prompt tokens);
* ``decode_ms``: the other forwards, summed (one token per live row each);
* ``sample_ms``: :meth:`Engine._step` summed (the draws, the stop checks, the bookkeeping);
* ``other_ms``: the rest of the call (row set-up, padding, results, text);

for each ``--rows`` (spread over the adapters like tasks of 64 rows), and the cost of loading
one published version (``read_ms``: files to tensors; ``load_ms``: tensors into a slot).
``--profile`` adds the operator table of one batch of the largest size (torch.profiler).

Usage::

    python bench/engine_phases.py --device cpu --model models/smollm2-135m --layers 2
    python bench/engine_phases.py --device cuda --dtype bfloat16 --model <dir> --random \\
        --profile --out $OUT/engine_phases.json     # random weights of the dir's shape
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, where rollout.py would shadow the `rollout` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import write_json  # noqa: E402
from events.adapter_format import read_peft_adapter  # noqa: E402
from rollout.adapter_slots import AdapterRef  # noqa: E402
from rollout.engine import Engine, GenerateRequest  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = (8, 16, 8, 4, 16, 8, 8, 4)  # bench/experiments.py's book, in order
ROWS_PER_TASK = 64  # 8 prompts x 8 samples


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The base model (weights of ``--model``, or random ones of its shape) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = AutoConfig.from_pretrained(args.model)
    if args.layers:
        config.num_hidden_layers = args.layers
    if args.random or args.layers:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(args.device), tokenizer


def write_adapters(model: Any, root: Path, ranks: list[int]) -> list[Path]:
    """One random PEFT LoRA per rank on every projection of ``model``, saved under ``root``."""
    import copy

    from peft import LoraConfig, get_peft_model

    cpu = copy.deepcopy(model).to("cpu", torch.float32)
    paths = []
    for i, rank in enumerate(ranks):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        peft_model = get_peft_model(copy.deepcopy(cpu), config)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        peft_model.save_pretrained(str(root / f"a{i}"))
        paths.append(root / f"a{i}")
    return paths


class PhaseTimer:
    """Wraps the engine's ``_forward`` and ``_step`` with synchronised timers."""

    def __init__(self, engine: Engine, device: str) -> None:
        self.device = device
        self.ms: dict[str, float] = defaultdict(float)
        self.forwards = 0
        forward, step = engine._forward, engine._step

        def timed_forward(*a: Any, **kw: Any) -> Any:
            name = "prefill_ms" if self.forwards == 0 else "decode_ms"
            self.forwards += 1
            return self._time(name, lambda: forward(*a, **kw))

        def timed_step(*a: Any, **kw: Any) -> Any:
            return self._time("sample_ms", lambda: step(*a, **kw))

        engine._forward = timed_forward  # type: ignore[method-assign]
        engine._step = timed_step  # type: ignore[method-assign]

    def _time(self, name: str, fn: Callable[[], Any]) -> Any:
        sync(self.device)
        start = time.perf_counter()
        out = fn()
        sync(self.device)
        self.ms[name] += 1e3 * (time.perf_counter() - start)
        return out

    def reset(self) -> None:
        self.ms.clear()
        self.forwards = 0


def requests(tokenizer: Any, refs: list[AdapterRef], rows: int, new_tokens: int) -> list[Any]:
    """``rows`` rows, 64 per task, task ``t`` on adapter ``t % len(refs)``; distinct prompts."""
    out = []
    for r in range(rows):
        task, row = divmod(r, ROWS_PER_TASK)
        prompt = f"Q: {task + 2} + {row % 8 + 1} = ? A: The answer is "
        sampling = SamplingParams(temperature=0.8, max_new_tokens=new_tokens, stop=["\n"], seed=r)
        ids = tuple(tokenizer(prompt).input_ids)
        out.append(
            GenerateRequest(input_ids=ids, adapter=refs[task % len(refs)], sampling=sampling)
        )
    return out


def profile_table(engine: Engine, batch: list[Any], device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.generate(batch)
        sync(device)
    averages = prof.key_averages()
    parts = [averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    if device == "cuda":
        parts.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m"))
    p.add_argument("--random", action="store_true", help="random weights of the model's shape")
    p.add_argument("--layers", type=int, default=0, help="fewer layers (random weights)")
    p.add_argument("--rows", default="64,256,512")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default="bench/results/engine_phases.json")
    args = p.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]

    model, tokenizer = build(args)
    loads: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(model, Path(tmp), list(RANKS))  # before the engine wraps it
        engine = Engine(
            model,
            tokenizer,
            max_loras=2 * len(RANKS),
            max_lora_rank=max(RANKS),
            target_modules=TARGETS,
            max_batch_size=max(sizes),
        )
        for version in (1, 2):  # the second round loads into a full table, as in a run
            for i, path in enumerate(paths):
                start = time.perf_counter()
                adapter = read_peft_adapter(path)
                read = time.perf_counter()
                engine.load_adapter(f"a{i}", version, path, adapter=adapter)
                sync(args.device)
                loads.append((1e3 * (read - start), 1e3 * (time.perf_counter() - read)))
    refs = [AdapterRef(f"a{i}", 2) for i in range(len(RANKS))]
    timer = PhaseTimer(engine, args.device)
    rows_out = []
    for rows in sizes:
        batch = requests(tokenizer, refs, rows, args.new_tokens)
        engine.generate(batch)  # warm-up (allocator, kernels)
        runs: list[dict[str, float]] = []
        for _ in range(args.repeats):
            timer.reset()
            sync(args.device)
            start = time.perf_counter()
            results = engine.generate(batch)
            sync(args.device)
            total = 1e3 * (time.perf_counter() - start)
            phases = dict(timer.ms)
            phases["other_ms"] = total - sum(phases.values())
            phases["total_ms"] = total
            phases["forwards"] = timer.forwards
            runs.append(phases)
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        median["rows"] = rows
        median["tokens"] = sum(len(r.completion_ids) for r in results)
        rows_out.append(median)
    table = ""
    if args.profile:
        largest = requests(tokenizer, refs, max(sizes), args.new_tokens)
        table = profile_table(engine, largest, args.device)

    heads = ("total ms", "prefill", "decode", "sample", "other")
    print(f"{'rows':>5} " + " ".join(f"{h:>8}" for h in heads) + f" {'fwds':>5}")
    for r in rows_out:
        print(
            f"{r['rows']:5d} {r['total_ms']:8.1f} {r['prefill_ms']:8.1f} {r['decode_ms']:8.1f} "
            f"{r['sample_ms']:8.1f} {r['other_ms']:8.1f} {r['forwards']:5.0f}"
        )
    steady = loads[len(RANKS) :]
    read_ms = statistics.median(r for r, _ in steady)
    load_ms = statistics.median(lo for _, lo in steady)
    print(f"adapter version: read {read_ms:.1f} ms, load {load_ms:.1f} ms (median, full table)")
    if table:
        print(table)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": args.model + (" (random weights)" if args.random or args.layers else ""),
        "layers": model.config.num_hidden_layers,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "batches": rows_out,
        "read_ms": read_ms,
        "load_ms": load_ms,
        "profile": table,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
