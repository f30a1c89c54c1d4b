"""Train-step benchmark: multi-LoRA slot training on a randomly initialised Qwen3-shaped model.

Measures, in one run on one device (CUDA events on GPU, ``perf_counter`` on CPU; ``--warmup``
untimed iterations, then the median of ``--iters``):

* ``n8_vs_n1`` / ``n32_vs_n1``: train-step tokens/s with N adapters of mixed ranks {8, 16, 32}
  divided by tokens/s with one rank-16 adapter, at equal total tokens (the same ``rows x seq``
  batch; rows are dealt round-robin to the N adapters). One step = forward, backward, per-slot
  clipping and AdamW (:func:`trainer.step.train_step`).
* ``lora_vs_frozen``: the N=8 train step divided by a frozen-base forward+backward on the same
  batch. The frozen baseline is the untouched HF model (before slot injection) fed with
  ``inputs_embeds`` that require grad, so the backward runs through every activation exactly as
  LoRA's does, but computes no weight gradients and runs no optimizer. Same log-prob loss.
  ``lora_fwd_bwd_vs_frozen`` is the same ratio without the optimizer.
* ``together_vs_peft_sequential``: the speed-up of the N=8 train step over training the same 8
  adapters (same ranks, same rows) one after another with PEFT (PEFT time ÷ ours):
  ``set_adapter``, forward+backward on that adapter's rows, ``torch.optim.AdamW`` step (fused
  on CUDA). PEFT keeps its adapters in the model dtype (``autocast_adapter_dtype=False``), its
  fastest setting.
* ``export_ms_per_adapter``: median wall time of :func:`trainer.peft_io.export_slot` (device to
  host copy plus safetensors write to a local temp dir) over the 8 adapters.
* ``max_slots_r16``: how many rank-16 adapters fit with full training state. Method: the
  persistent bytes per slot-rank row (weights + grads + 2 Adam moments) are *measured* as the
  memory the slot store and optimizer allocate, divided by ``num_slots x max_rank``; per rank-16
  slot that times 16, plus the per-step bf16 copy of the weights when adapters are fp32
  (computed). The rest of the budget is the N=8 step's peak memory minus all slot memory
  (model weights + activations + logits). ``max_slots_r16 = (total - rest) // per_slot``.

Usage::

    python bench/train_step.py --device cuda --out $OUT/train_step.json            # Qwen3-4B
    python bench/train_step.py --device cuda --shape 8b --out $OUT/train_step_8b.json
    python bench/train_step.py --device cpu --small --out bench/results/train_step_cpu_small.json

Gradient checkpointing is off. Adapter weights are fp32 (compute in the model dtype) unless
they would not fit, then bf16 (``--adapter-dtype auto``); the JSON records which.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from events.specs import OptimSpec
from trainer.batch import TrainBatch
from trainer.inject import MultiLoraModel, token_logprobs
from trainer.lora import grouped_mm_supported
from trainer.losses import weighted_nll
from trainer.optim import SlotAdamW
from trainer.peft_io import export_slot
from trainer.step import train_step


def qwen3_dims(
    hidden: int,
    layers: int,
    inter: int,
    vocab: int,
    tie: bool,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
) -> dict[str, int | bool]:
    """Qwen3Config keyword arguments for a model of this shape."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
    }


SHAPES = {
    "4b": qwen3_dims(2560, 36, 9728, 151936, tie=True),  # Qwen3-4B
    "8b": qwen3_dims(4096, 36, 12288, 151936, tie=False),  # Qwen3-8B
    "small": qwen3_dims(64, 2, 128, 512, tie=False, heads=4, kv_heads=2, head_dim=16),
}
RANKS = (8, 16, 32)
NUM_SLOTS, MAX_RANK = 32, 32
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Timer:
    """Median wall time (ms) of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)


def build_hf_model(shape: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    return model.eval()


def make_batch(
    rows: int, seq: int, vocab: int, slots: list[int], device: torch.device
) -> TrainBatch:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (rows, seq), generator=gen)
    ones = torch.ones(rows, seq, dtype=torch.long)
    return TrainBatch(
        slot_ids_B=torch.tensor([slots[i % len(slots)] for i in range(rows)]),
        tokens_B_T=tokens,
        attention_mask_B_T=ones,
        loss_mask_B_T=ones,
        advantages_B_T=torch.ones(rows, seq),
    ).to(device)


def frozen_step(hf: torch.nn.Module, batch: TrainBatch) -> Callable[[], None]:
    embed = hf.get_input_embeddings()

    def run() -> None:
        embeds = embed(batch.tokens_B_T).detach().requires_grad_(True)
        logits = hf(inputs_embeds=embeds, attention_mask=batch.attention_mask_B_T).logits
        (-token_logprobs(logits, batch.tokens_B_T).mean()).backward()

    return run


def peft_sequential(hf: torch.nn.Module, batch: TrainBatch, device: torch.device):
    """PEFT with 8 adapters; returns (run one round of 8 sequential steps, unload)."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(8)]

    def config(i: int) -> LoraConfig:
        rank = RANKS[i % 3]
        return LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=PEFT_TARGETS, task_type="CAUSAL_LM"
        )

    peft_model = get_peft_model(hf, config(0), adapter_name=names[0], autocast_adapter_dtype=False)
    for i, name in enumerate(names[1:], start=1):
        peft_model.add_adapter(name, config(i))
    for name, param in peft_model.named_parameters():  # add_adapter autocasts to fp32: undo
        if ".lora_" in name:
            param.data = param.data.to(hf.dtype)
    optimizers, rows = {}, {}
    for i, name in enumerate(names):
        params = [p for n, p in peft_model.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        optimizers[name] = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        rows[name] = torch.nonzero(batch.slot_ids_B == i).flatten()

    def run() -> None:
        for name in names:
            peft_model.set_adapter(name)
            sub = batch.select(rows[name])
            logits = peft_model(
                input_ids=sub.tokens_B_T, attention_mask=sub.attention_mask_B_T
            ).logits
            (-token_logprobs(logits, sub.tokens_B_T).mean()).backward()
            torch.nn.utils.clip_grad_norm_(optimizers[name].param_groups[0]["params"], 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

    def unload() -> torch.nn.Module:
        base = peft_model.unload()
        base.requires_grad_(False)
        return base

    return run, unload


def slot_width(hf: torch.nn.Module) -> int:
    """Sum of in+out features over the projections that get slots (the store's Q, unpadded)."""
    return sum(
        m.in_features + m.out_features
        for name, m in hf.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PEFT_TARGETS
    )


def kernel_check(model: MultiLoraModel, batch: TrainBatch) -> dict[str, float]:
    """The default kernel against the per-slot loop on one batch: log-probs and gradients."""
    out = {}
    for kernel in ("loop", "auto"):
        for _, layer in model.slot_layers():
            layer.kernel = kernel
        model.store.zero_grad()
        lp = model.logprobs(batch.tokens_B_T, batch.attention_mask_B_T, batch.slot_ids_B)
        (-lp.mean()).backward()
        out[kernel] = (lp.detach(), model.store.grad_S_R_Q[:3].float())  # slots 0-2: r 8/16/32
    (lp_loop, g_loop), (lp_auto, g_auto) = out["loop"], out["auto"]
    grad_rel = float((g_loop - g_auto).norm() / g_loop.norm())
    model.store.zero_grad()
    return {
        "kernel_check_logprob_max_abs_diff": float((lp_loop - lp_auto).abs().max()),
        "kernel_check_grad_rel_diff": grad_rel,
    }


def mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["4b", "8b"], default="4b")
    parser.add_argument("--small", action="store_true", help="tiny shape for a CPU check")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq", type=int, default=None, help="default 128 (32 with --small)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--adapter-dtype", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = "small" if args.small else args.shape
    args.seq = args.seq or (32 if args.small else 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: a functional check
    warnings.filterwarnings("ignore", message=".*gradient layout contract.*")  # see SlotStore
    timer = Timer(device, args.warmup, args.iters)
    if args.rows < NUM_SLOTS:
        parser.error(f"--rows must be >= {NUM_SLOTS} so that 32 adapters each get a row")
    tokens = args.rows * args.seq
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_shape": f"qwen3-{shape}" if shape != "small" else "qwen3-small(test)",
        "batch": f"{args.rows} rows x {args.seq} tokens = {tokens} tokens",
        "torch": torch.__version__,
        "model_dtype": str(dtype).removeprefix("torch."),
    }
    t0 = time.perf_counter()
    hf = build_hf_model(shape, dtype, device)
    vocab = hf.config.vocab_size
    batch8 = make_batch(args.rows, args.seq, vocab, list(range(8)), device)

    # 1. frozen base: forward + backward through activations, no weight grads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    frozen_ms = timer(frozen_step(hf, batch8))
    result["frozen_fwd_bwd_ms"] = frozen_ms
    frozen_activation_bytes = 0
    if device.type == "cuda":
        frozen_activation_bytes = torch.cuda.max_memory_allocated() - mem()
        result["frozen_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # 2. PEFT, 8 adapters one after another on the same rows
    run_peft, unload = peft_sequential(hf, batch8, device)
    peft_ms = timer(run_peft)
    result["peft_sequential_8_ms"] = peft_ms
    hf = unload()
    del run_peft, unload
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. our slot model: 32 slots of max rank 32, ranks cycling 8/16/32
    before = mem()
    store_rows = NUM_SLOTS * MAX_RANK
    adapter_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.adapter_dtype)
    if adapter_dtype is None:  # fp32 master weights unless they would crowd out activations
        adapter_dtype = torch.float32
        if device.type == "cuda":
            width = slot_width(hf)
            free, _ = torch.cuda.mem_get_info(device)
            need = (
                store_rows * width * 18 + 1.3 * frozen_activation_bytes
            )  # fp32 w,g,m,v + bf16 copy
            result["adapter_dtype_rule"] = (
                f"fp32 if 32x32 slot rows x {width} x 18 B + 1.3 x frozen activations "
                f"({need / 2**30:.1f} GiB) <= 0.9 x free ({free / 2**30:.1f} GiB), else bf16"
            )
            if need > 0.9 * free:
                adapter_dtype = torch.bfloat16
    model = MultiLoraModel.wrap(hf, NUM_SLOTS, MAX_RANK, adapter_dtype=adapter_dtype)
    optimizer = SlotAdamW(model.store, model.table)
    slot_bytes_per_rank_row = (mem() - before) / store_rows
    for slot in range(NUM_SLOTS):
        rank = RANKS[slot % 3]
        model.configure_slot(slot, rank, 2.0 * rank, seed=slot)
        optimizer.configure(slot, OptimSpec(lr=1e-4), total_steps=1000)
    x_probe = torch.zeros(16, 16, dtype=dtype, device=device)
    result["adapter_dtype"] = str(adapter_dtype).removeprefix("torch.")
    result["grouped_mm_kernel"] = grouped_mm_supported(x_probe, x_probe.view(1, 16, 16))
    result["num_slots"], result["max_rank"] = NUM_SLOTS, MAX_RANK

    result |= kernel_check(model, make_batch(args.rows, args.seq, vocab, list(range(32)), device))
    step_ms: dict[int, float] = {}
    for n, slots in ((1, [1]), (8, list(range(8))), (32, list(range(32)))):
        batch = make_batch(args.rows, args.seq, vocab, slots, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_ms[n] = timer(lambda b=batch: train_step(model, optimizer, b, weighted_nll))
        if n == 8 and device.type == "cuda":
            result["peak_mem_n8_gib"] = torch.cuda.max_memory_allocated() / 2**30
            peak_n8 = torch.cuda.max_memory_allocated()

    def fwd_bwd() -> None:
        optimizer.zero_grad()
        lp = model.logprobs(batch8.tokens_B_T, batch8.attention_mask_B_T, batch8.slot_ids_B)
        (-lp.mean()).backward()

    lora_fwd_bwd_ms = timer(fwd_bwd)
    tps = {n: tokens / (ms / 1000) for n, ms in step_ms.items()}
    result.update(
        {f"train_step_n{n}_ms": ms for n, ms in step_ms.items()}
        | {f"tokens_per_s_n{n}": t for n, t in tps.items()}
    )
    result["n8_vs_n1"] = tps[8] / tps[1]
    result["n32_vs_n1"] = tps[32] / tps[1]
    result["lora_vs_frozen"] = step_ms[8] / frozen_ms
    result["lora_fwd_bwd_vs_frozen"] = lora_fwd_bwd_ms / frozen_ms
    result["together_vs_peft_sequential"] = peft_ms / step_ms[8]  # speed-up, higher is better

    # 4. export
    export_ms = []
    with tempfile.TemporaryDirectory() as tmp:
        for slot in range(8):
            t = time.perf_counter()
            export_slot(model, slot, Path(tmp) / f"a{slot}", base_model_path=f"qwen3-{shape}")
            export_ms.append(1000 * (time.perf_counter() - t))
    result["export_ms_per_adapter"] = statistics.median(export_ms)

    # 5. capacity at rank 16
    cast_bytes = 2 if adapter_dtype != dtype else 0
    per_slot_r16 = 16 * (slot_bytes_per_rank_row + model.store.width * cast_bytes)
    result["slot_bytes_per_rank_row"] = slot_bytes_per_rank_row
    result["bytes_per_r16_slot"] = per_slot_r16
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        all_slots = store_rows * (slot_bytes_per_rank_row + model.store.width * cast_bytes)
        rest = peak_n8 - all_slots
        result["max_slots_r16"] = int((0.95 * total - rest) // per_slot_r16)
        result["max_slots_r16_method"] = (
            "measured store+optimizer bytes per rank row x16 (+bf16 weight copy), budget = "
            "0.95 x device memory minus (N=8 step peak minus all slot memory)"
        )
    else:
        result["max_slots_r16"] = None
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["command"] = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    result["wall_s"] = time.perf_counter() - t0

    print(f"train step benchmark: {result['model_shape']} on {result['device']}, {result['batch']}")
    rows = [
        ("frozen fwd+bwd", f"{frozen_ms:.1f} ms"),
        ("PEFT 8 adapters sequential", f"{peft_ms:.1f} ms"),
        *[(f"train step, N={n}", f"{step_ms[n]:.1f} ms  {tps[n]:,.0f} tok/s") for n in step_ms],
        ("n8_vs_n1 / n32_vs_n1", f"{result['n8_vs_n1']:.3f} / {result['n32_vs_n1']:.3f}"),
        (
            "lora_vs_frozen (fwd+bwd only)",
            f"{result['lora_vs_frozen']:.3f} ({result['lora_fwd_bwd_vs_frozen']:.3f})",
        ),
        ("together_vs_peft_sequential", f"{result['together_vs_peft_sequential']:.3f}"),
        ("export_ms_per_adapter", f"{result['export_ms_per_adapter']:.1f}"),
        ("max_slots_r16", str(result["max_slots_r16"])),
        (
            "adapter dtype / grouped_mm",
            f"{result['adapter_dtype']} / {result['grouped_mm_kernel']}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
