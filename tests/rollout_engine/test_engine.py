"""Engine generation: mixed-adapter batches equal solo runs, PEFT's and HF's generate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rollout.adapter_slots import AdapterRef, RequestError
from rollout.engine import Engine, GenerateRequest
from rollout.sampling import SamplingParams

PROMPTS = ["Hello world", "abc", "The quick brown fox", "x", "Hello world", "zz top", "abc"]
ROW_ADAPTERS = ["a", "b", None, "c", None, "a", "c"]
EOS = 2
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _requests(engine: Engine, sampling: SamplingParams = GREEDY) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            input_ids=tuple(engine.tokenizer.encode(p)),
            adapter=None if a is None else AdapterRef(a, 1),
            sampling=sampling,
        )
        for p, a in zip(PROMPTS, ROW_ADAPTERS, strict=True)
    ]


@pytest.fixture
def engine(make_engine: Callable[..., Engine], adapter_dirs: dict[str, Path]) -> Engine:
    eng = make_engine()
    for name, path in adapter_dirs.items():
        eng.load_adapter(name, 1, path)
    return eng


def _hf_new_tokens(out: torch.Tensor, prompt_width: int) -> list[tuple[int, ...]]:
    """HF generate output rows -> new tokens, cut after the first EOS (the rest is padding)."""
    rows = []
    for row in out[:, prompt_width:].tolist():
        rows.append(tuple(row[: row.index(EOS) + 1] if EOS in row else row))
    return rows


def test_mixed_batch_equals_solo_rows(engine: Engine) -> None:
    requests = _requests(engine)
    mixed = engine.generate(requests)
    for request, got in zip(requests, mixed, strict=True):
        solo = engine.generate([request])[0]
        assert got.completion_ids == solo.completion_ids
        assert got.finish_reason == solo.finish_reason
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(solo.logprobs), rtol=0, atol=1e-5
        )
    # same prompt, adapter vs base: the adapter really changes the policy
    assert mixed[0].completion_ids != mixed[4].completion_ids


def test_mixed_batch_equals_peft_mixed_generate(
    engine: Engine, tiny_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dirs["a"], adapter_name="a"
    )
    for name in ("b", "c"):
        peft.load_adapter(adapter_dirs[name], adapter_name=name)
    tokenizer = engine.tokenizer
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = peft.generate(
        **enc,
        adapter_names=[a or "__base__" for a in ROW_ADAPTERS],
        do_sample=False,
        max_new_tokens=GREEDY.max_new_tokens,
    )
    want = _hf_new_tokens(out, enc["input_ids"].shape[1])
    got = [r.completion_ids for r in engine.generate(_requests(engine))]
    assert got == want


def test_base_rows_equal_plain_hf_generate(engine: Engine, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = engine.tokenizer
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=GREEDY.max_new_tokens)
    want = _hf_new_tokens(out, enc["input_ids"].shape[1])
    base_only = [
        GenerateRequest(input_ids=tuple(tokenizer.encode(p)), sampling=GREEDY) for p in PROMPTS
    ]
    got = [r.completion_ids for r in engine.generate(base_only)]
    assert got == want
    # and the base rows of the mixed batch too
    mixed = engine.generate(_requests(engine))
    for i, adapter in enumerate(ROW_ADAPTERS):
        if adapter is None:
            assert mixed[i].completion_ids == want[i]


def test_sampling_is_deterministic_per_seed_whatever_the_batch(engine: Engine) -> None:
    sampled = SamplingParams(
        temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234, ignore_eos=True
    )
    row = GenerateRequest(
        input_ids=tuple(engine.tokenizer.encode("seeded")),
        adapter=AdapterRef("b", 1),
        sampling=sampled,
    )
    alone = engine.generate([row])[0]
    others = _requests(engine, SamplingParams(temperature=0.7, top_k=5, max_new_tokens=5))
    in_batch = engine.generate([*others[:3], row, *others[3:]])[3]
    assert in_batch.completion_ids == alone.completion_ids
    torch.testing.assert_close(
        torch.tensor(in_batch.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5
    )
    assert alone.seed == 1234
    other_seed = engine.generate(
        [
            GenerateRequest(
                input_ids=row.input_ids,
                adapter=row.adapter,
                sampling=SamplingParams(
                    temperature=1.0, top_p=0.95, max_new_tokens=16, seed=99, ignore_eos=True
                ),
            )
        ]
    )[0]
    assert other_seed.completion_ids != alone.completion_ids


def test_group_rows_share_one_prefill_row_and_equal_solo_rows(engine: Engine) -> None:
    """A GRPO group's samples (one prompt, one adapter version, their own seeds) are prefilled
    as one row; each still draws exactly what it draws alone. The same prompt on another
    adapter, or on the base model, is a prefill row of its own."""
    prefill_rows: list[int] = []
    forward = engine._forward

    def counted(ids_B_T: torch.Tensor, *args: Any) -> torch.Tensor:
        if ids_B_T.shape[1] > 1 or not prefill_rows:
            prefill_rows.append(ids_B_T.shape[0])
        return forward(ids_B_T, *args)

    engine._forward = counted  # type: ignore[method-assign]
    hello, fox = (tuple(engine.tokenizer.encode(p)) for p in ("Hello world", "The quick fox"))
    rows = [
        GenerateRequest(
            input_ids=prompt,
            adapter=adapter,
            sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed, ignore_eos=True),
        )
        for seed, (prompt, adapter) in enumerate(
            [(hello, AdapterRef("a", 1))] * 4
            + [(fox, AdapterRef("a", 1))] * 3
            + [(hello, AdapterRef("b", 1))] * 2
            + [(hello, None)] * 2
        )
    ]
    grouped = engine.generate(rows)
    assert prefill_rows == [4]  # hello@a, fox@a, hello@b, hello on the base model
    assert len({r.completion_ids for r in grouped[:4]}) > 1  # the seeds differ, so do the draws
    for request, got in zip(rows, grouped, strict=True):
        solo = engine.generate([request])[0]
        assert got.completion_ids == solo.completion_ids
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(solo.logprobs), rtol=0, atol=1e-5
        )


def test_sampled_logprobs_are_temperature_scaled_policy(engine: Engine, tiny_dir: Path) -> None:
    """The returned log-prob equals log_softmax(logits / T) of a teacher-forced HF forward."""
    from transformers import AutoModelForCausalLM

    sp = SamplingParams(temperature=0.7, max_new_tokens=6, seed=3, ignore_eos=True)
    prompt = tuple(engine.tokenizer.encode("temperature"))
    res = engine.generate([GenerateRequest(input_ids=prompt, sampling=sp)])[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    full = torch.tensor([prompt + res.completion_ids])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1]
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(res.completion_ids)[:, None])
    torch.testing.assert_close(torch.tensor(res.logprobs), want[:, 0], rtol=0, atol=1e-5)


def test_max_new_tokens_and_stop_string(engine: Engine) -> None:
    prompt = tuple(engine.tokenizer.encode("Hello world"))
    free = engine.generate(
        [
            GenerateRequest(
                input_ids=prompt,
                adapter=AdapterRef("a", 1),
                sampling=SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True),
            )
        ]
    )[0]
    assert (free.finish_reason, free.matched, len(free.completion_ids)) == ("length", None, 10)
    stop = free.text[4:6]  # char tokenizer: one character per token
    cut = free.text.index(stop)
    hit = engine.generate(
        [
            GenerateRequest(
                input_ids=prompt,
                adapter=AdapterRef("a", 1),
                sampling=SamplingParams(
                    temperature=0, max_new_tokens=10, ignore_eos=True, stop=(stop,)
                ),
            )
        ]
    )[0]
    assert (hit.finish_reason, hit.matched) == ("stop", stop)
    assert hit.text == free.text[:cut]
    assert hit.completion_ids == free.completion_ids[: cut + len(stop)]
    assert hit.logprobs == pytest.approx(free.logprobs[: cut + len(stop)], abs=1e-5)


def test_stop_token_ids_and_eos(engine: Engine, make_engine: Callable[..., Engine]) -> None:
    prompt = tuple(engine.tokenizer.encode("abc"))
    free = engine.generate(
        [
            GenerateRequest(
                input_ids=prompt,
                sampling=SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True),
            )
        ]
    )[0]
    stop_id = free.completion_ids[2]
    first = free.completion_ids.index(stop_id)
    hit = engine.generate(
        [
            GenerateRequest(
                input_ids=prompt,
                sampling=SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(stop_id,)),
            )
        ]
    )[0]
    assert (hit.finish_reason, hit.matched) == ("stop", stop_id)
    assert hit.completion_ids == free.completion_ids[: first + 1]

    eos_engine = make_engine()
    model: Any = eos_engine.model
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[EOS] = 100.0  # EOS becomes the most likely token at every step
    model.lm_head = biased
    ended = eos_engine.generate([GenerateRequest(input_ids=prompt, sampling=GREEDY)])[0]
    assert (ended.finish_reason, ended.matched, ended.completion_ids, ended.text) == (
        "stop",
        EOS,
        (EOS,),
        "",
    )
    ignored = eos_engine.generate(
        [
            GenerateRequest(
                input_ids=prompt,
                sampling=SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True),
            )
        ]
    )[0]
    assert (ignored.finish_reason, ignored.completion_ids) == ("length", (EOS, EOS, EOS))


def test_bad_requests_name_the_field(engine: Engine) -> None:
    with pytest.raises(RequestError, match=r"input_ids\[0\]"):
        engine.generate([GenerateRequest(input_ids=())])
    with pytest.raises(RequestError, match=r"input_ids\[1\].*\[0, 104\)"):
        engine.generate([GenerateRequest(input_ids=(5,)), GenerateRequest(input_ids=(104,))])


def test_fixed_target_modules_reject_other_targets(
    make_engine: Callable[..., Engine], adapter_dirs: dict[str, Path]
) -> None:
    from rollout.lora import AdapterFormatError

    engine = make_engine(target_modules=["q_proj", "v_proj"])
    assert engine.load_adapter("a", 1, adapter_dirs["a"]).modules == 4
    with pytest.raises(AdapterFormatError, match="add them to target_modules"):
        engine.load_adapter("b", 1, adapter_dirs["b"])
    assert engine.loaded_adapters() == [AdapterRef("a", 1)]


def test_prompt_plus_new_tokens_beyond_positions_is_refused(engine: Engine) -> None:
    long = GenerateRequest(input_ids=(5,) * 500, sampling=SamplingParams(max_new_tokens=20))
    with pytest.raises(RequestError, match="max_position_embeddings 512"):
        engine.generate([long])
