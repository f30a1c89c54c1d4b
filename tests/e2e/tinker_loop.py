"""A GRPO loop written only against the Tinker SDK's public API (tinker-cookbook ``rl_loop``'s
shape): sample groups → rewards centred per group → ``forward_backward`` with
``importance_sampling`` → ``optim_step`` → ``save_weights_and_get_sampling_client`` → sample
again. Nothing here knows multilora; it runs unchanged against any Tinker-compatible server.

The task is synthetic and learnable by a tiny random model: the reward of a completion is the
fraction of its tokens equal to ``target`` (a token the base model already samples, so GRPO has
signal from the first step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tinker
from tinker import types


@dataclass
class LoopLog:
    """Per iteration: the mean reward of its samples, and the server's metrics."""

    rewards: list[float] = field(default_factory=list)
    fwdbwd_metrics: list[dict[str, float]] = field(default_factory=list)
    optim_metrics: list[dict[str, float]] = field(default_factory=list)


def token_reward(target: int) -> Callable[[Sequence[int]], float]:
    def reward(tokens: Sequence[int]) -> float:
        return sum(t == target for t in tokens) / max(1, len(tokens))

    return reward


def datum(prompt: list[int], tokens: list[int], logprobs: list[float], adv: float) -> types.Datum:
    """One sample as an importance-sampling datum: inputs are ``prompt + tokens[:-1]``, targets
    the same shifted by one; advantages and sampler log-probs only on the completion."""
    full = prompt + tokens
    n_prompt = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": full[1:],
            "logprobs": [0.0] * n_prompt + list(logprobs),
            "advantages": [0.0] * n_prompt + [adv] * len(tokens),
        },
    )


def rl_loop(
    training_client: tinker.TrainingClient,
    prompts: Sequence[list[int]],
    reward: Callable[[Sequence[int]], float],
    *,
    iterations: int,
    group_size: int = 4,
    max_tokens: int = 8,
    learning_rate: float = 1e-2,
    on_iteration: Callable[[int], None] | None = None,
) -> LoopLog:
    """Run ``iterations`` GRPO steps; return the per-iteration rewards and metrics."""
    log = LoopLog()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0)
    sampler = training_client.save_weights_and_get_sampling_client().result()
    for it in range(iterations):
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), group_size, params) for p in prompts
        ]
        data: list[types.Datum] = []
        rewards: list[float] = []
        for prompt, future in zip(prompts, futures, strict=True):
            seqs = future.result().sequences
            scores = [reward(s.tokens) for s in seqs]
            rewards += scores
            mean = sum(scores) / len(scores)
            for s, score in zip(seqs, scores, strict=True):
                if s.tokens and score != mean:
                    data.append(datum(prompt, list(s.tokens), list(s.logprobs or []), score - mean))
        log.rewards.append(sum(rewards) / len(rewards))
        if data:
            out = training_client.forward_backward(data, "importance_sampling").result()
            log.fwdbwd_metrics.append(dict(out.metrics))
            step = training_client.optim_step(
                types.AdamParams(learning_rate=learning_rate, grad_clip_norm=1.0)
            )
            log.optim_metrics.append(dict(step.result().metrics or {}))
        if on_iteration is not None:
            on_iteration(it)
        sampler = training_client.save_weights_and_get_sampling_client().result()
    return log
