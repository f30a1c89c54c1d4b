"""Pure value types shared by every layer: what an adapter registration asks for.

These records travel inside events (see :mod:`events.schema`) and are read by the trainer
(hyper-parameters, data cursor), by rollout workers (dataset, reward, sampling) and by admission.
They are frozen msgspec Structs that forbid unknown fields, so a typo in a producer's JSON is a
validation error naming the field, never a silently ignored setting. New fields always get defaults.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Scalar = str | int | float | bool
"""A JSON scalar: the only values allowed in reward parameter maps."""
ConfigValue = Scalar | list[Scalar]
"""A dataset config value: a scalar or a list of scalars (e.g. reasoning-gym's ``operators``)."""


class DatasetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an adapter's prompts come from.

    ``kind="jsonl"`` / ``"parquet"``: a file under one of the operator's allowed roots; each row
    gives the prompt text under ``input_key``, the reference answer under ``label_key`` and,
    optionally, a JSON object under ``metadata_key`` handed to the reward function.
    ``kind="reasoning_gym"``: a procedurally generated reasoning-gym dataset built offline from
    ``name``, ``size``, ``seed`` and ``config`` (keyword arguments of the dataset's config).

    ``prompt_template`` is applied to the raw input (``{input}`` is replaced); with
    ``chat_template=True`` the result is wrapped as one user turn through the model tokenizer's chat
    template. ``shuffle_seed`` fixes the sample order of the data cursor (epochs reshuffle
    deterministically from it).
    """

    kind: Literal["jsonl", "parquet", "reasoning_gym"]
    path: str = ""
    name: str = ""
    size: int = 1000
    seed: int = 0
    config: dict[str, ConfigValue] = msgspec.field(default_factory=dict)
    input_key: str = "prompt"
    label_key: str = "answer"
    metadata_key: str = ""
    prompt_template: str = "{input}"
    chat_template: bool = False
    shuffle_seed: int = 0


class RewardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One term of an adapter's reward: a registry key, its weight and its parameters.

    An adapter's reward is the weighted sum of its terms, e.g. correctness plus a small length
    penalty. ``name`` is only ever looked up in the rollout process's closed reward registry;
    nothing named here is ever imported.
    """

    name: str
    weight: float = 1.0
    params: dict[str, Scalar] = msgspec.field(default_factory=dict)


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sampling parameters for an adapter's rollouts (SGLang's ``sampling_params`` subset)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()


class OptimSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-adapter AdamW and schedule settings (the trainer keeps one optimizer state per slot)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


class LossSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-adapter RL loss settings (GRPO family).

    ``advantage="grpo"`` normalises rewards by the group's mean and std; ``"drgrpo"`` only
    subtracts the mean. ``clip_low``/``clip_high`` are DAPO's asymmetric PPO clip range.
    ``clip_ratio_c`` is dual-clip PPO's bound for negative advantages: a token whose ratio is
    above it contributes ``clip_ratio_c · A`` and no gradient (0 turns the bound off).
    ``kl_coef > 0`` adds a KL penalty to the base model (the same forward with the adapter off).
    ``filter_zero_variance`` drops groups whose rewards are all equal (no learning signal).
    """

    advantage: Literal["grpo", "drgrpo"] = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float = 3.0
    kl_coef: float = 0.0
    filter_zero_variance: bool = False


class AdapterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a tenant asks for when registering an adapter (the registration payload).

    The adapter's name travels in the event envelope (``adapter``), not here. ``base_model``, when
    set, must equal the trainer's base model name or admission rejects the registration.
    ``prompts_per_step`` prompts with ``group_size`` samples each make one optimizer step;
    ``steps`` is the step budget; ``max_staleness`` bounds how many versions old the policy that
    generated a sample may be when it is trained on (flow control on task issue).
    ``checkpoint_interval`` (steps) and ``keep_checkpoints`` drive the checkpoint process.
    ``resume=True`` continues the adapter's latest checkpoint under the same name.
    """

    base_model: str = ""
    rank: int = 16
    alpha: float = 32.0
    dataset: DatasetSpec
    rewards: tuple[RewardSpec, ...]
    sampling: SamplingSpec = SamplingSpec()
    optim: OptimSpec = OptimSpec()
    loss: LossSpec = LossSpec()
    group_size: int = 8
    prompts_per_step: int = 4
    steps: int = 100
    max_staleness: int = 1
    checkpoint_interval: int = 10
    keep_checkpoints: int = 3
    priority: int = 0
    resume: bool = False
    seed: int = 0
