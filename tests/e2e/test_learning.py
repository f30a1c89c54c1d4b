"""The CI learning run: three adapters with three rewards train at once on one tiny random model.

``alpha`` and ``beta`` are rewarded for emitting one letter each — the two letters the random
model already emits most often, see :func:`likely_letters` — through the operator reward
:func:`tests.e2e.rewards.char_fraction`; ``digits`` for any digit (the built-in ``regex``).
All three share the slots of one trainer, one rollout worker and the same prompts. Each must
reach its target within 90 s of its registration (process start-up included), and each must learn
*its own* behaviour: after training, alpha's samples are mostly its letter and hardly beta's,
beta's the reverse, digits' hold digits; greedy decoding with each exported PEFT adapter (loaded
by PEFT itself, outside the service) shows the same.

Every adapter has a small KL penalty to the base model (``kl_coef`` 0.05) and a cosine learning
rate schedule. With neither, about one run in ten failed, in two ways: GRPO gets no signal from a
prompt whose samples all score 0, so the policy on such a prompt drifted freely (to ``"....."``,
say) while the adapter learned its letter on the others; and a near-deterministic policy at a
constant learning rate sometimes collapsed within a step or two, long after reaching its target.
The penalty keeps every prompt's distribution near the base model's, where the rewarded letter
still has mass; the schedule lets the policy settle once it has learned. Targets are reached a few
steps later (well inside the budget); 16 of 16 runs passed with both, against 3 failures in 27
without.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from events.schema import Completed, Exported, RegisterRequested, RolloutGroup, StepDone
from tests.e2e.harness import LiveStack
from tests.e2e.specs import adapter_spec, char_reward, digit_reward

pytestmark = [pytest.mark.bus]

TARGET_S = 90.0
WINDOW = 3  # steps averaged when deciding that a target is reached
STEPS = 60
LR = 1e-2  # 3e-2 learned faster but sometimes collapsed a policy onto empty completions
KL = 0.05  # see the module docstring


def reached_at(steps: list[StepDone], target: float) -> StepDone | None:
    """The first step whose reward mean, averaged over the last WINDOW steps, is >= target."""
    for i in range(WINDOW - 1, len(steps)):
        window = steps[i - WINDOW + 1 : i + 1]
        if sum(s.metrics["reward_mean"] for s in window) / WINDOW >= target:
            return steps[i]
    return None


def char_share(groups: list[RolloutGroup], chars: str) -> float:
    """Fraction of all completion characters in ``groups`` that are in ``chars``."""
    text = "".join(s.text for g in groups for pg in g.groups for s in pg.samples)
    return sum(c in chars for c in text) / max(1, len(text))


def digit_share(groups: list[RolloutGroup]) -> float:
    """Fraction of samples holding at least one digit."""
    samples = [s.text for g in groups for pg in g.groups for s in pg.samples]
    return sum(any(c.isdigit() for c in t) for t in samples) / max(1, len(samples))


def greedy(model_dir: Path, adapter_dir: str, prompts: list[str], new_tokens: int = 5) -> list[str]:
    """Greedy completions of ``prompts`` by the base model with the exported PEFT adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def likely_letters(model_dir: Path, k: int) -> list[str]:
    """The ``k`` lowercase letters the random model already emits most often after the prompts.

    The test is about learning and isolation, not about exploring a token the model samples
    once in 500 draws: targets the policy can find in its first steps make it deterministic
    enough for CI (with ``a``/``b`` at ~0.2 % a run occasionally never found its letter).
    """
    import string

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.e2e.harness import PROMPTS

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probs_V = torch.zeros(len(tokenizer))
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            probs_V += model(ids).logits[0, -1].softmax(-1)
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in string.ascii_lowercase}
    return sorted(ids, key=lambda c: -float(probs_V[ids[c]]))[:k]


def test_three_adapters_learn_their_own_behaviour(
    live_stack: Callable[..., LiveStack], data_dir: Path, e2e_model: Path
) -> None:
    live = live_stack()
    a, b = likely_letters(e2e_model, 2)
    adapters = {
        "alpha": (char_reward(a), 0.7),
        "beta": (char_reward(b), 0.7),
        "digits": (digit_reward(), 0.9),
    }
    reg = {
        name: live.register(
            name,
            adapter_spec(
                data_dir, reward, steps=STEPS, lr=LR, seed=i, kl_coef=KL, schedule="cosine"
            ),
        )
        for i, (name, (reward, _)) in enumerate(adapters.items())
    }
    live.wait_for(
        "all three adapters to complete",
        lambda: len(live.events(Completed)) == 3,
        timeout_s=150,
    )

    for name, (_, target) in adapters.items():
        (completed,) = live.events(Completed, reg[name])
        assert completed.reason == "budget" and completed.step == STEPS, completed
        steps = live.events(StepDone, reg[name])
        assert [s.step for s in steps] == list(range(1, STEPS + 1)), name
        (registered,) = live.events(RegisterRequested, reg[name])
        hit = reached_at(steps, target)
        curve = [round(s.metrics["reward_mean"], 2) for s in steps]
        assert hit is not None, f"{name} never reached {target}: {curve}"
        took = hit.time - registered.time
        assert took <= TARGET_S, f"{name} reached {target} after {took:.0f} s: {curve}"
        print(f"{name}: target {target} at step {hit.step}, {took:.1f} s after registration")

    # Behaviour, from the samples each adapter's own policy generated in its last 5 steps.
    groups = live.groups()
    last = {
        name: [g for g in groups if g.registration_id == reg[name] and g.step > STEPS - 5]
        for name in adapters
    }
    assert all(len(g) >= 5 for g in last.values()), {n: len(g) for n, g in last.items()}
    shares = {n: (char_share(g, a), char_share(g, b), digit_share(g)) for n, g in last.items()}
    print(f"{a}-share, {b}-share, digit-share of the last samples:", shares)
    assert char_share(last["alpha"], a) >= 0.75 and char_share(last["alpha"], b) <= 0.05
    assert char_share(last["beta"], b) >= 0.75 and char_share(last["beta"], a) <= 0.05
    assert digit_share(last["digits"]) >= 0.8  # the KL penalty holds it a little below 1
    assert char_share(last["digits"], a + b) <= 0.1

    # The exported adapters carry the behaviour outside the service (plain PEFT + transformers).
    exports = {e.adapter: e.uri for e in live.events(Exported)}
    prompts = ["x:", "y:", "z:", "w:"]
    for name, char, other in (("alpha", a, b), ("beta", b, a)):
        texts = greedy(e2e_model, exports[name], prompts)
        joined = "".join(texts)
        print(f"{name} greedy: {texts}")
        assert joined.count(char) >= 0.8 * len(joined) and other not in joined, (name, texts)
