"""Unit tests of the pure sampling math on hand-written logits."""

from __future__ import annotations

import math

import pytest
import torch

from events.specs import SamplingSpec
from rollout.sampling import (
    SamplingParamError,
    SamplingParams,
    filtered_sorted_probs,
    find_stop,
    policy_logprobs_B_V,
    sample_tokens_B,
    trim_at_stop,
)


def _one_row(**kw: float) -> dict[str, torch.Tensor]:
    return {
        "temperature_B": torch.tensor([kw.get("temperature", 1.0)]),
        "top_k_B": torch.tensor([int(kw.get("top_k", -1))]),
        "top_p_B": torch.tensor([kw.get("top_p", 1.0)]),
    }


def test_policy_logprobs_are_temperature_scaled_and_greedy_uses_raw_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    lp = policy_logprobs_B_V(logits, torch.tensor([0.5, 0.0]))
    assert torch.allclose(lp[0], torch.log_softmax(logits[0] / 0.5, -1))
    assert torch.allclose(lp[1], torch.log_softmax(logits[1], -1))


def test_top_k_and_top_p_keep_the_expected_sets() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logp = probs.log()
    kept, order = filtered_sorted_probs(logp, torch.tensor([2]), torch.tensor([1.0]))
    assert order[0].tolist() == [0, 1, 2, 3]
    assert (kept[0] > 0).tolist() == [True, True, False, False]
    # top_p=0.8: mass before token 2 is 0.8 -> dropped; token 1 (mass before 0.5) kept.
    kept, _ = filtered_sorted_probs(logp, torch.tensor([-1]), torch.tensor([0.8]))
    assert (kept[0] > 0).tolist() == [True, True, False, False]
    # a tiny top_p still keeps the most likely token
    kept, _ = filtered_sorted_probs(logp, torch.tensor([-1]), torch.tensor([1e-9]))
    assert (kept[0] > 0).tolist() == [True, False, False, False]


def test_inverse_cdf_draw_follows_uniform() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    picks = []
    for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999):
        tokens, logprobs = sample_tokens_B(logits, **_one_row(), uniform_B=torch.tensor([u]))
        token = int(tokens.item())
        picks.append(token)
        assert logprobs.item() == pytest.approx(math.log([0.5, 0.3, 0.2][token]), 1e-6)
    assert picks == [0, 0, 1, 1, 2, 2]


def test_filtered_tokens_are_never_drawn() -> None:
    logits = torch.randn(64, 50)
    tokens, _ = sample_tokens_B(
        logits,
        temperature_B=torch.full((64,), 1.0),
        top_k_B=torch.full((64,), 3),
        top_p_B=torch.ones(64),
        uniform_B=torch.rand(64),
    )
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == tokens[:, None]).any(dim=-1).all()


def test_greedy_rows_take_argmax_whatever_the_uniform() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [0.1, 3.0, 0.2]])
    tokens, logprobs = sample_tokens_B(
        logits,
        temperature_B=torch.tensor([0.0, 0.0]),
        top_k_B=torch.tensor([-1, -1]),
        top_p_B=torch.tensor([1.0, 1.0]),
        uniform_B=torch.tensor([0.0, 0.999]),
    )
    assert tokens.tolist() == [1, 1]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[:, 1])


def test_stop_detection_and_trim() -> None:
    assert find_stop("abc STOP def END", ["END", "STOP"]) == (4, "STOP")
    assert find_stop("abcab", ["ab", "abc"]) == (0, "abc")
    assert find_stop("abc", ["x"]) is None
    assert trim_at_stop("hello###world", "###") == "hello"
    assert trim_at_stop("hello", "###") == "hello"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": -0.1}),
        ("top_p", {"top_p": 0.0}),
        ("top_k", {"top_k": 0}),
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("stop", {"stop": ("",)}),
        ("stop_token_ids", {"stop_token_ids": (-1,)}),
    ],
)
def test_bad_params_name_their_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert field in str(err.value)


def test_from_spec_and_sglang_wire_form() -> None:
    spec = SamplingSpec(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop=("\n\n",))
    params = SamplingParams.from_spec(spec, seed=5)
    assert params.to_sglang() == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 16,
        "stop": ["\n\n"],
        "sampling_seed": 5,
    }
