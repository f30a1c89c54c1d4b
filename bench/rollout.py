"""Rollout engine benchmark: mixed-adapter decode throughput and adapter load latency.

Measures, on the same prompts in one run:

* decode tokens/s of the embedded engine with 8 distinct adapters mixed row by row, divided by
  the same engine with no adapter (``mixed8_vs_base``: the cost of multi-LoRA), and divided by
  PEFT's mixed-batch ``generate(adapter_names=...)`` on the same model (``mixed8_vs_peft``);
* the latency of loading one published PEFT directory into the engine (``adapter_load_ms``:
  median of steady-state loads of new versions into a full slot table, file read included);
* loads into a live engine (``adapter_load_ms_live``, ``load_stall_ms``): new versions of one
  adapter loaded from another thread while a batch of the other adapters decodes, and how much
  longer that batch took per load (the stall a worker's syncs cause to the rows in flight).

Every row generates exactly ``--new-tokens`` tokens (greedy, EOS ignored; PEFT gets
``min_new_tokens``), so tokens/s = rows x new tokens / wall time (prefill included). The three
variants run interleaved ``--repeats`` times and each reports its median. On a shared CPU pass
``--threads 1``: OpenMP threads spinning against other processes distort small-op timings.

Usage::

    python bench/rollout.py --device cpu --model models/smollm2-135m \\
        --out bench/results/rollout_cpu.json
    python bench/rollout.py --device cuda --out $OUT/rollout.json   # random-init Qwen3-0.6B bf16
    python bench/rollout.py --device cpu --small                     # tiny model, quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# run as a script, sys.path[0] is bench/, where this file would shadow the `rollout` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import write_json  # noqa: E402
from rollout.adapter_slots import AdapterRef  # noqa: E402
from rollout.decode_attention import supported  # noqa: E402
from rollout.engine import Engine, GenerateRequest  # noqa: E402
from rollout.sampling import SamplingParams  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = ROOT / "models" / "smollm2-135m"
RANDOM_QWEN3 = "random-qwen3-0.6b"


def qwen3_0p6b_config() -> Any:
    """Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, vocab 151936)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def build_model(args: argparse.Namespace, tmp: Path) -> tuple[Any, str]:
    """The base model for this run and a label naming it."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.small:
        from ops.models import write_tiny_model

        path = write_tiny_model(tmp / "tiny", "qwen3", hidden_size=64, num_layers=2)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device), "tiny-qwen3"
    model_path = args.model or (str(SMOLLM2) if args.device == "cpu" and SMOLLM2.exists() else "")
    if model_path and model_path != RANDOM_QWEN3:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
        return model.to(args.device), model_path
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(qwen3_0p6b_config(), dtype=dtype)
    return model, "random-init Qwen3-0.6B shape"


def write_adapters(model: Any, root: Path, count: int, rank: int) -> tuple[Any, list[Path]]:
    """A PEFT model holding ``count`` random LoRAs on a copy of ``model``, each also saved as a
    PEFT directory ``root/a<i>`` (the published form the engine loads)."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    peft_model = get_peft_model(copy.deepcopy(model), config, adapter_name="a0")
    for i in range(1, count):
        peft_model.add_adapter(f"a{i}", config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    names = [f"a{i}" for i in range(count)]
    peft_model.save_pretrained(str(root), selected_adapters=names)
    return peft_model.eval(), [root / n for n in names]


def timed(device: str, fn: Any) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_batch(
    args: argparse.Namespace,
    engine: Engine,
    peft_model: Any,
    decoders: list[str],
    prompts: list[tuple[int, ...]],
    batch: int,
) -> dict[str, Any]:
    """Time every decoder on base and mixed rows (and PEFT), interleaved; medians and ratios."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    adapters = [AdapterRef(f"a{b % args.adapters}", 2) for b in range(batch)]
    base_rows = [GenerateRequest(input_ids=p, sampling=sp) for p in prompts]
    mixed_rows = [
        GenerateRequest(input_ids=p, adapter=a, sampling=sp)
        for p, a in zip(prompts, adapters, strict=True)
    ]
    ids = torch.tensor(prompts, device=args.device)
    names = [f"a{b % args.adapters}" for b in range(batch)]

    def peft_generate(new_tokens: int) -> None:
        with torch.no_grad():
            peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=names,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=engine.pad_id,
            )

    def on(decoder: str, rows: list[GenerateRequest]) -> Any:
        def run() -> None:
            use(engine, decoder)
            engine.generate(rows)

        return run

    runs: dict[str, Any] = {}
    for decoder in decoders:
        runs[f"{decoder}_base"] = on(decoder, base_rows)
        runs[f"{decoder}_mixed8"] = on(decoder, mixed_rows)
    if batch <= args.peft_max_rows:
        runs["peft_mixed8"] = lambda: peft_generate(args.new_tokens)
    for key, run in runs.items():  # warm-up at the timed shapes (graphs are captured here)
        print(f"{batch:>5}  warm-up {key:<22}{timed(args.device, run):>8.2f} s", flush=True)
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for key, run in runs.items():
            samples[key].append(timed(args.device, run))
            print(f"{batch:>5}  {key:<30}{samples[key][-1]:>8.2f} s", flush=True)
    seconds = {key: statistics.median(values) for key, values in samples.items()}
    tps = {k: batch * args.new_tokens / v for k, v in seconds.items()}
    out: dict[str, Any] = {"tokens_per_s": tps, "seconds": seconds, "samples": samples}
    main = decoders[-1]
    out["mixed8_vs_base"] = tps[f"{main}_mixed8"] / tps[f"{main}_base"]
    for decoder in decoders:
        out[f"{decoder}_mixed8_vs_base"] = tps[f"{decoder}_mixed8"] / tps[f"{decoder}_base"]
    if "peft_mixed8" in tps:
        out["mixed8_vs_peft"] = tps[f"{main}_mixed8"] / tps["peft_mixed8"]
    if len(decoders) > 1 and "hf" in decoders:
        for kind in ("base", "mixed8"):
            out[f"{main}_{kind}_vs_hf"] = tps[f"{main}_{kind}"] / tps[f"hf_{kind}"]
    return out


def use(engine: Engine, decoder: str) -> None:
    """Switch ``engine`` to ``decoder``: ``hf``, ``static``, or ``static`` with options after
    ``+``: ``sdpa`` (SDPA over the whole buffer, not the Triton kernel), ``prologue`` (the
    Triton q/k-norm, RoPE and cache-write kernel)."""
    kind, *options = decoder.split("+")
    unknown = set(options) - {"sdpa", "prologue"}
    if unknown or (options and kind != "static"):
        raise SystemExit(f"--decoders {decoder!r}: options are static+sdpa and static+prologue")
    engine.use_decoder(kind)  # type: ignore[arg-type]
    if engine.static is None:
        return
    fast = supported(next(engine.model.parameters()), engine.static.head_dim)
    if "prologue" in options and not fast:
        raise SystemExit(f"{decoder}: the Triton prologue needs CUDA, Triton and bf16")
    engine.static.attention = "sdpa" if "sdpa" in options or not fast else "triton"
    engine.static.prologue = "triton" if "prologue" in options else "torch"


def live_loads(
    args: argparse.Namespace,
    engine: Engine,
    decoder: str,
    prompts: list[tuple[int, ...]],
    path: Path,
) -> dict[str, Any]:
    """Adapter loads into a live engine: one batch of mixed rows (adapters ``a0..a{n-2}``)
    timed alone and with new versions of ``a{n-1}`` loaded from another thread meanwhile, as
    a worker's syncs do. ``load_stall_ms``: how much longer the batch took per load."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    users = max(1, args.adapters - 1)
    rows = [
        GenerateRequest(input_ids=p, adapter=AdapterRef(f"a{b % users}", 2), sampling=sp)
        for b, p in enumerate(prompts)
    ]
    loaded = f"a{args.adapters - 1}"
    use(engine, decoder)
    engine.generate(rows)  # warm-up: buffers and graphs for this shape
    alone = [timed(args.device, lambda: engine.generate(rows)) for _ in range(3)]
    version, latencies, spans = 10, [], []
    for _ in range(3):
        start = time.perf_counter()
        worker = threading.Thread(target=engine.generate, args=(rows,))
        worker.start()
        time.sleep(statistics.median(alone) * 0.1)  # the batch is decoding
        while worker.is_alive():
            version += 1
            latencies.append(engine.load_adapter(loaded, version, path).load_ms)
            time.sleep(statistics.median(alone) * 0.1)
        worker.join()
        if args.device == "cuda":
            torch.cuda.synchronize()
        spans.append(time.perf_counter() - start)
    loads = len(latencies) / len(spans)
    extra_s = statistics.median(spans) - statistics.median(alone)
    return {
        "rows": len(rows),
        "batch_s_alone": statistics.median(alone),
        "batch_s_with_loads": statistics.median(spans),
        "loads_per_batch": loads,
        "adapter_load_ms_live": statistics.median(latencies) if latencies else None,
        "load_stall_ms": 1e3 * extra_s / loads if loads else None,
    }


def profile_batch(
    args: argparse.Namespace, engine: Engine, decoder: str, prompts: list[tuple[int, ...]]
) -> None:
    """One mixed batch under the profiler: the kernels that take the GPU's time, and how many."""
    from torch.profiler import ProfilerActivity, profile

    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = [
        GenerateRequest(input_ids=p, adapter=AdapterRef(f"a{b % args.adapters}", 2), sampling=sp)
        for b, p in enumerate(prompts)
    ]
    use(engine, decoder)
    engine.generate(rows)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(rows)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    launches = sum(e.count for e in events)
    print(
        f"profile: {len(rows)} rows, {launches} kernels ({launches / args.new_tokens:.0f} a token)"
    )
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model",
        default="",
        help=f"local HF model dir or {RANDOM_QWEN3!r} (default: SmolLM2 on cpu, random on cuda)",
    )
    parser.add_argument("--small", action="store_true", help="tiny model, few tokens (smoke run)")
    parser.add_argument("--dtype", default="")
    parser.add_argument(
        "--batch", default="", help="rows, comma-separated sizes (default 16 cpu / 64,256 cuda)"
    )
    parser.add_argument(
        "--decoders",
        default="",
        help="engine decoders to time side by side (default hf on cpu, hf,static on cuda); "
        "static+sdpa: with SDPA over the whole buffer; static+prologue: with the Triton "
        "q/k-norm, RoPE and cache-write kernel",
    )
    parser.add_argument("--peft-max-rows", type=int, default=64, help="time PEFT up to this")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=4300.0, help="memory bandwidth for the bound"
    )
    parser.add_argument("--new-tokens", type=int, default=0, help="default 32 cpu / 128 cuda")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-backend", default="auto", choices=["auto", "gather", "grouped"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--profile", action="store_true", help="print the top CUDA kernels of one mixed batch"
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    default_batch = "8" if args.small else "64,256" if cuda else "16"
    args.batch = [int(b) for b in (args.batch or default_batch).split(",")]
    args.decoders = args.decoders or ("hf,static" if cuda else "hf")
    args.new_tokens = args.new_tokens or (8 if args.small else 128 if cuda else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    base, label = build_model(args, tmp)
    peft_model, dirs = write_adapters(base, tmp / "adapters", args.adapters, args.rank)
    engine = Engine(
        base,
        None,
        max_loras=args.adapters,
        max_lora_rank=args.rank,
        keep_versions=2,
        lora_backend=args.lora_backend,
        model_path=label,
    )
    cold = [engine.load_adapter(f"a{i}", 1, d).load_ms for i, d in enumerate(dirs)]
    steady = [engine.load_adapter(f"a{i}", 2, d).load_ms for i, d in enumerate(dirs)]

    vocab = engine.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    decoders = [d for d in args.decoders.split(",") if d]
    gen = torch.Generator().manual_seed(1)
    per_batch: dict[str, Any] = {}
    per_batch_prompts: list[list[tuple[int, ...]]] = []
    for batch in args.batch:
        prompts = [
            tuple(torch.randint(10, min(vocab, 30000), (args.prompt_len,), generator=gen).tolist())
            for _ in range(batch)
        ]
        per_batch[str(batch)] = run_batch(args, engine, peft_model, decoders, prompts, batch)
        per_batch_prompts.append(prompts)
    live = live_loads(args, engine, decoders[-1], per_batch_prompts[0], dirs[-1])
    if args.profile and cuda:
        try:
            profile_batch(args, engine, decoders[-1], per_batch_prompts[-1])
        except Exception as exc:  # the profile is a diagnostic; the timings stand without it
            print(f"profile failed: {exc!r}")
    for batch, res in per_batch.items():
        # decode reads every weight once per step: rows / (weight bytes / bandwidth) tokens/s
        res["weight_bound_tokens_per_s"] = int(batch) * args.bandwidth_gbs * 1e9 / weight_bytes
    first = per_batch[str(args.batch[0])]
    main = decoders[-1]
    headline: dict[str, float] = {}  # the last decoder's numbers at each batch size, by name
    for batch, res in per_batch.items():
        headline[f"base_tok_s_{batch}"] = res["tokens_per_s"][f"{main}_base"]
        headline[f"mixed8_tok_s_{batch}"] = res["tokens_per_s"][f"{main}_mixed8"]
        headline[f"bound_tok_s_{batch}"] = res["weight_bound_tokens_per_s"]
        headline[f"mixed8_vs_base_{batch}"] = res["mixed8_vs_base"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mixed8_vs_base": first["mixed8_vs_base"],
        "mixed8_vs_peft": first.get("mixed8_vs_peft"),
        "adapter_load_ms": statistics.median(steady),
        "adapter_load_ms_live": live["adapter_load_ms_live"],
        "load_stall_ms": live["load_stall_ms"],
        "live_loads": live,
        **headline,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "model": label,
        "dtype": args.dtype,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "adapters": args.adapters,
        "rank": args.rank,
        "lora_backend": engine.lora.backend,
        "decoders": decoders,
        "weight_bytes": weight_bytes,
        "bandwidth_gbs": args.bandwidth_gbs,
        "per_batch": per_batch,
        "repeats": args.repeats,
        "adapter_load_ms_cold": cold,
        "adapter_load_ms_steady": steady,
        "adapter_mb": sum(f.stat().st_size for f in dirs[0].iterdir()) / 2**20,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(
        f"model {label}  device {result['device']}  dtype {args.dtype}  "
        f"new tokens {args.new_tokens}  rank {args.rank}  lora backend {engine.lora.backend}"
    )
    print(f"{'rows':>5}  {'run':<22}{'tokens/s':>12}{'seconds':>10}{'of bound':>10}")
    for batch, res in per_batch.items():
        bound = res["weight_bound_tokens_per_s"]
        for key, tps in res["tokens_per_s"].items():
            print(
                f"{batch:>5}  {key:<22}{tps:>12.1f}{res['seconds'][key]:>10.2f}{tps / bound:>10.3f}"
            )
        print(f"{batch:>5}  weight-bandwidth bound {bound:,.0f} tokens/s")
        for key, value in res.items():
            if key.endswith(("_vs_base", "_vs_peft", "_vs_hf")):
                print(f"{batch:>5}  {key:<22}{value:>12.3f}")
    print(
        f"adapter load    {result['adapter_load_ms']:.1f} ms median (steady), "
        f"{cold[0]:.1f} ms first load, {result['adapter_mb']:.2f} MiB per adapter"
    )
    print(
        f"live loads      {live['adapter_load_ms_live'] or 0:.1f} ms median while a "
        f"{live['rows']}-row batch decodes; the batch took {live['batch_s_with_loads']:.2f} s "
        f"with {live['loads_per_batch']:.1f} loads vs {live['batch_s_alone']:.2f} s alone: "
        f"{live['load_stall_ms'] or 0:.1f} ms longer per load"
    )
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
