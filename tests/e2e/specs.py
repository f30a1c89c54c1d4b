"""Adapter specs of the end-to-end suite: tasks a tiny random model learns from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from events.specs import (
    AdapterSpec,
    DatasetSpec,
    LossSpec,
    OptimSpec,
    RewardSpec,
    SamplingSpec,
)
from tests.e2e.harness import CHAR_REWARD


def char_reward(char: str) -> RewardSpec:
    """Dense: the fraction of completion characters equal to ``char`` (tests.e2e.rewards)."""
    return RewardSpec(name=CHAR_REWARD, params={"char": char})


def digit_reward() -> RewardSpec:
    """The built-in regex reward: 1 when the completion holds a digit (about 40 % at start)."""
    return RewardSpec(name="regex", params={"pattern": "[0-9]", "mode": "search"})


def adapter_spec(
    data_dir: Path,
    reward: RewardSpec,
    *,
    steps: int = 40,
    lr: float = 3e-2,
    checkpoint_interval: int = 10,
    keep_checkpoints: int = 3,
    seed: int = 0,
    max_staleness: int = 1,
    kl_coef: float = 0.0,
    schedule: Literal["constant", "cosine"] = "constant",
) -> AdapterSpec:
    """Rank 8, 4 prompts x 8 samples of at most 5 tokens at temperature 1 per step."""
    return AdapterSpec(
        rank=8,
        alpha=16.0,
        dataset=DatasetSpec(kind="jsonl", path=str(data_dir / "prompts.jsonl")),
        rewards=(reward,),
        sampling=SamplingSpec(temperature=1.0, max_new_tokens=5),
        optim=OptimSpec(lr=lr, schedule=schedule),
        loss=LossSpec(kl_coef=kl_coef),
        group_size=8,
        prompts_per_step=4,
        steps=steps,
        max_staleness=max_staleness,
        checkpoint_interval=checkpoint_interval,
        keep_checkpoints=keep_checkpoints,
        seed=seed,
    )
