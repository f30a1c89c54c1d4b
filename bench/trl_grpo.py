"""The peer baseline of ``bench/experiments.py``: one of its experiments trained with Hugging Face
TRL's ``GRPOTrainer`` and a PEFT LoRA adapter, timed.

The experiment is the service's own spec (``experiment()`` of ``bench/experiments.py``, decoded
as an :class:`events.specs.AdapterSpec`), so task, reasoning-gym config, dataset size and seed,
prompt template, learning rate, rank, ``alpha = 2 * rank``, temperature and stop are the ones the
service trains with. The pieces that have a home in the project are called, not rewritten:

* prompts: the service's data source (``rollout.data.open_source``: ``reasoning_gym.create_dataset
  (name, size=, seed=, **config)``, each question formatted with the template; plain text, no chat
  template, as the service);
* reward: the service's reward (``RewardComposite`` over the built-in registry): ``reasoning_gym``
  is the dataset's own ``score_answer(answer, entry)`` on the completion's first line (stripped,
  minus one trailing period), ``math`` is :mod:`rollout.reward_math` plus the spec's weighted
  length penalty. The completion is cut before its first stop string first, as the engine cuts.

TRL settings and where they differ from the service:

* one optimizer step per generation batch: ``per_device_train_batch_size = generation_batch_size
  = prompts_per_step * group_size`` completions, ``num_generations = group_size``,
  ``gradient_accumulation_steps = 1``, ``num_iterations = 1`` (on-policy, as ``max_staleness``
  allows at most);
* ``beta = 0`` (no reference model), ``epsilon``/``epsilon_high`` = the spec's ``clip_low`` /
  ``clip_high``; TRL's loss is its default (``loss_type="dapo"``, group-scaled advantages), the
  service's dual clip has no TRL counterpart (moot on-policy: every ratio is 1);
* AdamW with a constant learning rate (TRL's trainer defaults to linear decay), clip norm 1.0,
  no gradient checkpointing (TRL defaults it on), no checkpoints saved;
* stop: ``transformers.generate`` without a tokenizer cannot match stop strings, so every
  vocabulary token whose text holds a stop string is made an end-of-sequence token. Generation
  then ends, and TRL's loss mask closes, on the token that completes the stop, as the engine's
  does (exact for one-character stops such as ``"\\n"``);
* prompt order: TRL's shuffled sampler (seed: the spec's), not the service's order.

``trl_s`` is the wall time of ``trainer.train()`` alone (CUDA synchronised on both sides); model
and tokenizer loading (``load_s``) and building the trainer (``setup_s``) are kept apart. Learning
is read from TRL's per-step ``reward`` (the mean total reward of that step's completions):
``start_reward`` is the mean over the first 20 % of steps, ``end_reward`` over the last 20 %.

TRL is not a project dependency; put a copy on the path::

    PYTHONPATH=/tmp/trlsite python bench/trl_grpo.py --model models/smollm2-135m --steps 2 \\
        --group-size 4 --prompts-per-step 2 --out /tmp/trl_test.json      # CPU, a quick check
    PYTHONPATH=$TRL python bench/trl_grpo.py --device cuda --dtype bfloat16 \\
        --model /tmp/smollm2-135m --experiment sums --out $OUT/trl_grpo.json   # the GPU run
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import BOOK, experiment, tail_stats
from report import write_json

from events.specs import AdapterSpec
from ops.specfile import adapter_from_data
from rollout.data import DataSource, open_source
from rollout.reward_builtins import builtin_registry
from rollout.rewards import RewardComposite
from rollout.sampling import find_stop

NAMES = tuple(row[0] for row in BOOK)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before its earliest stop string (unchanged when none occurs)."""
    hit = find_stop(text, stops)
    return text if hit is None else text[: hit[0]]


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """Ids of the vocabulary tokens whose decoded text holds one of ``stops``."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if any(s in text for s in stops)]


def service_reward(
    source: DataSource, composite: RewardComposite, stops: Sequence[str], failures: list[str]
) -> Callable[..., list[float | None]]:
    """A TRL reward function scoring completions with the service's reward.

    TRL calls it with one entry per completion: the completions' text and the dataset's
    ``index`` column. A sample whose reward fails (the service drops it) gives ``None`` (TRL:
    no reward) and its reason is appended to ``failures``.
    """

    def reward(completions: list[str], index: list[int], **_: Any) -> list[float | None]:
        totals: list[float | None] = []
        for text, i in zip(completions, index, strict=True):
            result = composite.score(cut_at_stop(text, stops), source[i])
            if result.failed:
                failures.append(result.reason)
            totals.append(None if result.failed else result.total)
        return totals

    return reward


def train(name: str, spec: AdapterSpec, args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    """Train ``spec`` with TRL on ``args.device``; the result record (module doc)."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    stops = list(spec.sampling.stop)

    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, use_safetensors=True
    )
    model.to(args.device)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop_ids = stop_token_ids(tokenizer, stops)
    model.generation_config.eos_token_id = [*eos, *stop_ids]

    source = open_source(spec.dataset_spec, allowed_roots=[])
    items = [source[i] for i in range(len(source))]
    columns = {"prompt": [it.prompt for it in items], "index": [it.index for it in items]}
    # a fingerprint of our own: datasets 5.2 hashes the table with dill otherwise, which fails on
    # pyarrow 26 ("Can't pickle <class 'MonthDayNano'>")
    fingerprint = hashlib.sha256(msgspec.json.encode(spec.dataset_spec)).hexdigest()[:16]
    train_set = datasets.Dataset(
        datasets.table.InMemoryTable.from_pydict(columns), fingerprint=fingerprint
    )
    composite = RewardComposite.from_specs(spec.rewards, builtin_registry())
    failures: list[str] = []
    batch = spec.prompts_per_step * spec.group_size
    grpo = trl.GRPOConfig(
        output_dir=scratch,  # TRL's trainer wants one; nothing is saved there
        use_cpu=not cuda,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        seed=spec.seed,
        learning_rate=spec.optim.lr,
        adam_beta1=spec.optim.betas[0],
        adam_beta2=spec.optim.betas[1],
        adam_epsilon=spec.optim.eps,
        weight_decay=spec.optim.weight_decay,
        max_grad_norm=spec.optim.max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=spec.steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        generation_batch_size=batch,
        num_generations=spec.group_size,
        num_iterations=1,
        max_completion_length=spec.sampling.max_new_tokens,
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        top_k=0 if spec.sampling.top_k < 0 else spec.sampling.top_k,
        beta=0.0,
        epsilon=spec.loss.clip_low,
        epsilon_high=spec.loss.clip_high,
        use_vllm=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=service_reward(source, composite, stops, failures),
        args=grpo,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=lora,
    )
    setup_s = time.perf_counter() - t0

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    trl_s = time.perf_counter() - t0

    logs = [h for h in trainer.state.log_history if "reward" in h]
    rewards = [float(h["reward"]) for h in logs]
    start, end, end_se = tail_stats(rewards)
    return {
        "experiment": name,
        "device": args.device,
        "model": args.model,
        "dtype": args.dtype,
        "steps": spec.steps,
        "group_size": spec.group_size,
        "prompts_per_step": spec.prompts_per_step,
        "max_new_tokens": spec.sampling.max_new_tokens,
        "task": spec.dataset_spec.name,
        "rewards_terms": [r.name for r in spec.rewards],
        "lr": spec.optim.lr,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "load_s": load_s,
        "setup_s": setup_s,
        "trl_s": trl_s,
        "step_s": trl_s / spec.steps,
        "start_reward": start,
        "end_reward": end,
        "end_reward_se": None if math.isnan(end_se) else end_se,
        "rewards": [round(r, 4) for r in rewards],
        "losses": [h.get("loss") for h in logs],
        "step_times": [h.get("step_time") for h in logs],
        "completion_mean_length": [h.get("completions/mean_length") for h in logs],
        "reward_failures": len(failures),
        "stop_tokens": len(stop_ids),
        "trl_version": trl.__version__,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"TRL GRPO: {result['experiment']} ({result['task']}, r{result['rank']}, "
        f"lr {result['lr']:g}) x {result['steps']} steps on {result['model']} ({result['device']})"
    )
    print(f"load         {result['load_s']:8.1f} s")
    print(f"setup        {result['setup_s']:8.1f} s")
    print(f"train        {result['trl_s']:8.1f} s  ({result['step_s']:.2f} s/step)")
    print(f"reward       {result['start_reward']:8.3f} -> {result['end_reward']:.3f}")
    print(f"{'step':>4}{'reward':>9}{'loss':>10}{'len':>6}")
    rows = zip(result["rewards"], result["losses"], result["completion_mean_length"], strict=True)
    for step, (reward, loss, length) in enumerate(rows, start=1):
        loss_s = "-" if loss is None else f"{loss:.4f}"
        length_s = "-" if length is None else f"{length:.1f}"
        print(f"{step:>4}{reward:>9.3f}{loss_s:>10}{length_s:>6}")
    print(
        f"trl {result['trl_version']}, peft {result['peft_version']}, "
        f"transformers {result['transformers_version']}, torch {result['torch_version']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/trl_grpo.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--model", required=True, help="local HF model folder (nothing is downloaded)")
    p.add_argument("--experiment", default="sums", help=f"one of {', '.join(NAMES)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--out", default="bench/results/trl_grpo.json")
    args = p.parse_args(argv)
    if args.experiment not in NAMES:
        p.error(f"--experiment {args.experiment!r} is not in BOOK; use one of {', '.join(NAMES)}")
    if not (Path(args.model) / "config.json").is_file():
        p.error(
            f"--model {args.model!r} is not a local HF model folder (no config.json there); "
            "pass the folder holding config.json, tokenizer and weights (bench/carry.py copies it)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import trl
    except ImportError as exc:
        p.error(f"cannot import trl ({exc}); put TRL 1.16 on PYTHONPATH (e.g. /tmp/trlsite)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch sees no CUDA device; use --device cpu")
    print(f"[trl_grpo] trl {trl.__version__}: training {args.experiment}", flush=True)

    name, spec = adapter_from_data(experiment(NAMES.index(args.experiment), args), "BOOK")
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as scratch:
        result = train(name, spec, args, scratch)
    print_table(result)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
