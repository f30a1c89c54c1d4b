"""Engine.prompt_logprobs: teacher-forced prompt log-probs under a row's adapter, at T = 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rollout.adapter_slots import AdapterNotLoadedError, AdapterRef, RequestError
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParams


@pytest.fixture
def engine(make_engine: Callable[..., Engine], adapter_dirs: dict[str, Path]) -> Engine:
    eng = make_engine()
    for name, path in adapter_dirs.items():
        eng.load_adapter(name, 1, path)
    return eng


def reference(model, ids: tuple[int, ...]) -> list[float]:
    """``log_softmax(logits_{t-1})[ids[t]]`` for t >= 1 from one plain forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_prompt_logprobs_equal_hf_and_peft_teacher_forcing(
    engine: Engine, tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompt = tuple(engine.tokenizer.encode("The quick brown fox"))
    rows = [None, "a", "b", "c"]
    got = engine.prompt_logprobs(
        [
            GenerateRequest(
                input_ids=prompt,
                adapter=None if name is None else AdapterRef(name, 1),
                sampling=SamplingParams(temperature=0.3),  # not used: T = 1
            )
            for name in rows
        ]
    )
    for name, scored in zip(rows, got, strict=True):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        if name is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dirs[name]))
        assert scored[0] is None and len(scored) == len(prompt)
        want = reference(model.eval(), prompt)
        torch.testing.assert_close(torch.tensor(scored[1:]), torch.tensor(want), rtol=0, atol=1e-5)
    assert len({tuple(s[1:]) for s in got}) == len(rows)  # each adapter scores differently


def test_one_generated_token_scores_as_the_next_prompt_token(engine: Engine) -> None:
    """The log-prob of a token sampled at T = 1 (``max_new_tokens=1``) is the prompt log-prob
    of that token appended to the prompt: generation and scoring agree."""
    prompt = tuple(engine.tokenizer.encode("abc"))
    adapter = AdapterRef("b", 1)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=1, seed=4)
    (out,) = engine.generate(
        [GenerateRequest(input_ids=prompt, adapter=adapter, sampling=sampling)]
    )
    assert len(out.completion_ids) == 1
    (scored,) = engine.prompt_logprobs(
        [GenerateRequest(input_ids=prompt + out.completion_ids, adapter=adapter)]
    )
    assert scored[-1] == pytest.approx(out.logprobs[0], abs=1e-5)


def test_bad_prompt_logprob_requests(engine: Engine) -> None:
    assert engine.prompt_logprobs([]) == []
    assert engine.prompt_logprobs([GenerateRequest(input_ids=(5,))]) == [(None,)]
    with pytest.raises(RequestError, match=r"input_ids\[0\]"):
        engine.prompt_logprobs([GenerateRequest(input_ids=(engine.vocab_size,))])
    too_long = (1,) * (engine.max_positions + 1)
    with pytest.raises(RequestError, match="max_position_embeddings"):
        engine.prompt_logprobs([GenerateRequest(input_ids=too_long)])
    with pytest.raises(AdapterNotLoadedError):
        engine.prompt_logprobs([GenerateRequest(input_ids=(1, 2), adapter=AdapterRef("zz", 1))])
