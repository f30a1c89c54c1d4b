"""Trainer and rollout agree on the policy: the log-probs the engine reports for sampled tokens
equal the trainer's log-probs of the same tokens under the same adapter and temperature, so the
PPO importance ratio starts at exactly 1 on fresh samples."""

from __future__ import annotations

import pytest
import torch

from events.specs import OptimSpec
from ops.models import write_tiny_model
from rollout.adapter_slots import AdapterRef
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParams
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.peft_io import export_slot

ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


@pytest.mark.parametrize(
    ("decoder", "device"),
    [("hf", "cpu"), ("static-eager", "cpu"), pytest.param("static", "cuda", marks=ON_CUDA)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_trainer_logprobs(
    tmp_path, temperature: float, decoder: str, device: str
) -> None:
    """Both decoders: the eager loop and the static one (fused projections, the run's rank;
    CUDA graphs on a GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = write_tiny_model(tmp_path / "m", "qwen2")
    model = MultiLoraModel.from_pretrained(model_dir, num_slots=2, max_rank=8)
    SlotAdamW(model.store, model.table).configure(1, OptimSpec(), 1)
    model.configure_slot(1, rank=4, alpha=8.0, seed=3)
    with torch.no_grad():  # make the adapter matter: B starts at zero
        torch.manual_seed(0)
        model.store.weight_S_R_Q[1].normal_(0, 0.5)
    export_slot(model, 1, tmp_path / "adapter", model_dir)

    engine = Engine.from_pretrained(
        model_dir, max_loras=2, max_lora_rank=8, decoder=decoder, device=device
    )
    assert engine.decoder == ("hf" if decoder == "hf" else "static")
    engine.load_adapter("a", 1, tmp_path / "adapter")
    prompt = (5, 6, 7, 8)
    requests = [
        GenerateRequest(
            input_ids=prompt,
            adapter=AdapterRef("a", 1),
            sampling=SamplingParams(
                temperature=temperature, max_new_tokens=6, ignore_eos=True, seed=s
            ),
        )
        for s in range(4)
    ]
    results = engine.generate(requests)
    for result in results:
        tokens_B_T = torch.tensor([list(prompt) + list(result.completion_ids)])
        mask_B_T = torch.ones_like(tokens_B_T)
        with torch.no_grad():
            trainer_lp = model.logprobs(
                tokens_B_T, mask_B_T, torch.tensor([1]), temperature_B=torch.tensor([temperature])
            )[0, len(prompt) - 1 :]
        engine_lp = torch.tensor(result.logprobs)
        torch.testing.assert_close(trainer_lp, engine_lp, rtol=0, atol=1e-4)


def test_fresh_samples_train_at_ratio_one(tmp_path) -> None:
    """Through batching, slot sorting and time padding, the first step on fresh samples sees an
    importance ratio of exactly 1 and clips nothing (the temperature survives every transform)."""
    from events.schema import PromptGroup, Sample
    from events.specs import LossSpec
    from trainer.batching import AdapterRows, build_batch
    from trainer.rl_loss import PPOClipLoss
    from trainer.step import train_step

    model_dir = write_tiny_model(tmp_path / "m", "llama")
    model = MultiLoraModel.from_pretrained(model_dir, num_slots=2, max_rank=8)
    optimizer = SlotAdamW(model.store, model.table)
    optimizer.configure(0, OptimSpec(lr=1e-3), 5)
    model.configure_slot(0, rank=4, alpha=8.0, seed=1)
    with torch.no_grad():
        torch.manual_seed(1)
        model.store.weight_S_R_Q[0].normal_(0, 0.5)
    export_slot(model, 0, tmp_path / "adapter", model_dir)
    engine = Engine.from_pretrained(model_dir, max_loras=2, max_lora_rank=8)
    engine.load_adapter("a", 1, tmp_path / "adapter")
    groups = []
    for prompt in ((5, 6, 7), (9, 10, 11, 12, 13)):  # odd lengths: T is padded to 8
        sampling = SamplingParams(temperature=0.6, max_new_tokens=5, stop_token_ids=(40, 41))
        reqs = [
            GenerateRequest(
                input_ids=prompt,
                adapter=AdapterRef("a", 1),
                sampling=msgspec_replace(sampling, seed=s),
            )
            for s in range(4)
        ]
        results = engine.generate(reqs)
        samples = tuple(
            Sample(
                completion_ids=tuple(r.completion_ids),
                logprobs=tuple(r.logprobs),
                text="",
                reward=float(i % 2),
            )
            for i, r in enumerate(results)
        )
        groups.append(PromptGroup(prompt_index=0, prompt_ids=prompt, samples=samples))
    batch, _ = build_batch([AdapterRows(0, LossSpec(), groups, temperature=0.6)], pad_id=0)
    assert batch is not None
    metrics = train_step(model, optimizer, batch, PPOClipLoss.from_specs({0: LossSpec()}, 2))
    assert metrics[0].extras["ratio"] == pytest.approx(1.0, abs=1e-4)
    assert metrics[0].extras["clip_frac"] == 0.0


def msgspec_replace(sampling: SamplingParams, **changes: object) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(sampling, **changes)
