"""Unit tests of the pure sampling math on hand-written logits."""

from __future__ import annotations

import math

import pytest
import torch

from events.specs import SamplingSpec
from rollout.sampling import (
    SamplingParamError,
    SamplingParams,
    find_stop,
    keep_mask_B_V,
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
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # ranks: 1, 0, 3, 2
    logp = probs.log()
    keep = keep_mask_B_V(logp, torch.tensor([2]), torch.tensor([1.0]))
    assert keep[0].tolist() == [False, True, False, True]
    # top_p=0.8: the mass before 0.15 is 0.8 -> dropped; 0.3 (mass before 0.5) kept.
    keep = keep_mask_B_V(logp, torch.tensor([-1]), torch.tensor([0.8]))
    assert keep[0].tolist() == [False, True, False, True]
    # a tiny top_p still keeps the most likely token; no filter keeps everything
    keep = keep_mask_B_V(logp, torch.tensor([-1]), torch.tensor([1e-9]))
    assert keep[0].tolist() == [False, True, False, False]
    assert keep_mask_B_V(logp, torch.tensor([-1]), torch.tensor([1.0])).all()


def test_inverse_cdf_draw_follows_uniform() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    picks = []
    for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999):
        tokens, logprobs = sample_tokens_B(logits, **_one_row(), uniform_B=torch.tensor([u]))
        token = int(tokens.item())
        picks.append(token)
        assert logprobs.item() == pytest.approx(math.log([0.5, 0.3, 0.2][token]), 1e-6)
    assert picks == [0, 0, 1, 1, 2, 2]


def test_a_rows_draw_does_not_depend_on_its_batch_mates() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3))
    uniform = torch.tensor([0.37, 0.81])
    mixed, _ = sample_tokens_B(
        logits, torch.tensor([1.0, 0.8]), torch.tensor([-1, 4]), torch.tensor([1.0, 0.9]), uniform
    )
    alone, _ = sample_tokens_B(
        logits[:1], torch.tensor([1.0]), torch.tensor([-1]), torch.tensor([1.0]), uniform[:1]
    )
    assert mixed[0] == alone[0]


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
        ("max_new_tokens", {"max_new_tokens": -1}),
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
