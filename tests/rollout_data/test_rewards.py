"""Reward registry, built-in rewards, contract tests over the registry, and composition."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.specs import DatasetSpec, RewardSpec
from rollout.data import PromptItem, open_source
from rollout.reward_builtins import builtin_registry, extract_gym_answer
from rollout.rewards import RewardComposite, RewardError, RewardRegistry
from tests.rollout_data.conftest import GSM8K_LABEL

REASONING_GYM = DatasetSpec(kind="reasoning_gym", name="chain_sum", size=8, seed=3)

# Valid parameters for every built-in; the contract test fails for a built-in missing here.
CONTRACT_PARAMS: dict[str, dict[str, Any]] = {
    "math": {},
    "exact": {"case_sensitive": False},
    "regex": {"pattern": r"\d+", "mode": "search"},
    "format": {"style": "think_answer"},
    "length_penalty": {"max_chars": 40, "buffer_chars": 10},
    "reasoning_gym": {},
}
NASTY = [
    "",
    " ",
    "\n\n",
    "ünïcødé ✓ 🙂",
    "\\boxed{",
    "\\boxed{}}}",
    "#### ####",
    "<answer></answer>",
    "\x00\x01",
    "9" * 400,
    "-",
    "1/0",
    "\\frac{1}{0}",
    "<think>",
    "NaN",
    "inf",
]


def rg_item(index: int = 0, name: str = "chain_sum") -> PromptItem:
    spec = DatasetSpec(kind="reasoning_gym", name=name, size=8, seed=3)
    return open_source(spec, allowed_roots=[])[index]


def contract_item(name: str) -> PromptItem:
    if name == "reasoning_gym":
        return rg_item()
    return PromptItem(index=0, prompt="How many clips?", label=GSM8K_LABEL)


# --- contract: every registered reward -----------------------------------------------------------


def test_contract_params_cover_the_registry() -> None:
    assert set(CONTRACT_PARAMS) == set(builtin_registry().names())


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200) | st.sampled_from(NASTY))
def test_reward_contract_on_arbitrary_text(name: str, text: str) -> None:
    entry = builtin_registry().get(name)
    params = CONTRACT_PARAMS[name]
    entry.validate(params)  # type: ignore[arg-type]
    value = entry.fn(text, contract_item(name), **params)
    lo, hi = entry.value_range
    assert isinstance(value, float)
    assert math.isfinite(value) and lo <= value <= hi


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
def test_documented_ranges_are_bounded(name: str) -> None:
    lo, hi = builtin_registry().get(name).value_range
    assert math.isfinite(lo) and math.isfinite(hi)


@pytest.mark.parametrize("name", sorted(CONTRACT_PARAMS))
@pytest.mark.parametrize("bad", [{"no_such_param": 1}])
def test_unknown_params_fail_validation(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(RewardError, match="no_such_param"):
        RewardComposite.from_specs(
            [RewardSpec(name=name, params={**CONTRACT_PARAMS[name], **bad})], builtin_registry()
        )


# --- built-ins -----------------------------------------------------------------------------------


def item(label: str) -> PromptItem:
    return PromptItem(index=0, prompt="q", label=label)


def score(name: str, completion: str, label: str = "", **params: Any) -> float:
    composite = RewardComposite.from_specs(
        [RewardSpec(name=name, params=params)],
        builtin_registry(),  # type: ignore[arg-type]
    )
    result = composite.score(completion, item(label))
    assert not result.failed, result.reason
    return result.total


def test_exact() -> None:
    assert score("exact", "  Paris\n", "Paris") == 1.0
    assert score("exact", "paris", "Paris") == 0.0
    assert score("exact", "paris", "Paris", case_sensitive=False) == 1.0
    assert score("exact", "Paris, France", "Paris") == 0.0


def test_regex_search_and_fullmatch() -> None:
    assert score("regex", "the answer: 42", pattern=r"\d+") == 1.0
    assert score("regex", "the answer: 42", pattern=r"\d+", mode="fullmatch") == 0.0
    assert score("regex", "42", pattern=r"\d+", mode="fullmatch") == 1.0
    assert score("regex", "ABC", pattern="abc", ignore_case=True) == 1.0
    assert score("regex", "a\nb", pattern="a.b") == 1.0  # DOTALL


@pytest.mark.parametrize(
    ("params", "completion", "expected"),
    [
        ({"style": "think_answer"}, "<think>2+2 is 4</think>\n<answer>4</answer>", 1.0),
        ({"style": "think_answer"}, "<answer>4</answer>", 0.0),
        ({"style": "think_answer"}, "<think>x</think><answer> </answer>", 0.0),
        ({}, "reasoning...\n<answer>4</answer>\n", 1.0),
        ({}, "<answer>4</answer> and then more text", 0.0),
        ({"style": "boxed"}, "so \\boxed{4}.", 1.0),
        ({"style": "boxed"}, "so 4.", 0.0),
        ({"style": "gsm8k"}, "2+2=4\n#### 4", 1.0),
        ({"style": "gsm8k"}, "2+2=4\n#### ", 0.0),
        ({"pattern": r"[A-D]"}, " B ", 1.0),
        ({"pattern": r"[A-D]"}, "B because", 0.0),
    ],
)
def test_format(params: dict[str, Any], completion: str, expected: float) -> None:
    assert score("format", completion, **params) == expected


@pytest.mark.parametrize(
    ("length", "expected"), [(0, 0.0), (30, 0.0), (35, -0.5), (40, -1.0), (41, -1.0), (999, -1.0)]
)
def test_length_penalty_is_dapo_soft_overlong(length: int, expected: float) -> None:
    assert score("length_penalty", "x" * length, max_chars=40, buffer_chars=10) == expected


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("regex", {}, "missing required params"),
        ("regex", {"pattern": "("}, "does not compile"),
        ("regex", {"pattern": "a", "mode": "prefix"}, "must be one of"),
        ("format", {"style": "xml"}, "must be one of"),
        ("format", {"style": "boxed", "pattern": "x"}, "not both"),
        ("length_penalty", {"max_chars": 10, "buffer_chars": 20}, "buffer_chars"),
        ("length_penalty", {"max_chars": True}, "must be int"),
        ("math", {"rel_tol": -1.0}, "rel_tol"),
        ("math", {"fallback": "yes"}, "must be bool"),
        ("reasoning_gym", {"extract": "last_word"}, "must be one of"),
        ("no_such_reward", {}, "known rewards: .*'math'"),
    ],
)
def test_bad_specs_fail_at_boot(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(RewardError, match=match):
        RewardComposite.from_specs([RewardSpec(name=name, params=params)], builtin_registry())  # type: ignore[arg-type]


# --- reasoning-gym verifier ----------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["chain_sum", "basic_arithmetic"])
def test_reasoning_gym_right_wrong_malformed(dataset: str) -> None:
    composite = RewardComposite.from_specs([RewardSpec(name="reasoning_gym")], builtin_registry())
    for i in range(4):
        it = rg_item(i, dataset)
        answer = it.label
        wrong = str(int(answer) + 1)
        assert composite.score(answer, it).total == 1.0
        assert composite.score(f"{answer}.\nBecause I added the terms.", it).total == 1.0
        assert composite.score(f"Let me think.\n<answer>{answer}</answer>", it).total == 1.0
        assert composite.score(wrong, it).total == 0.0
        assert composite.score(f"<answer>{wrong}</answer>", it).total == 0.0
        for malformed in ["", "no idea", "<answer></answer>", "ünïcødé"]:
            result = composite.score(malformed, it)
            assert not result.failed and result.total == 0.0


def test_reasoning_gym_entry_from_file_metadata() -> None:
    """A reasoning-gym entry exported to a file scores with its dataset's default verifier."""
    source_item = rg_item(2)
    file_item = PromptItem(
        index=7,
        prompt="q",
        label=source_item.label,
        metadata={"entry": source_item.metadata["entry"]},
    )
    composite = RewardComposite.from_specs([RewardSpec(name="reasoning_gym")], builtin_registry())
    assert composite.score(source_item.label, file_item).total == 1.0
    no_entry = composite.score(source_item.label, item(source_item.label))
    assert no_entry.failed and "no 'reasoning_gym' spec" in no_entry.reason


def test_extract_gym_answer_modes() -> None:
    text = "  \n-4.\nbecause 1 - 5 = -4\n<answer> -4 </answer>"
    assert extract_gym_answer(text) == "-4"
    assert extract_gym_answer("3.5.\nmore") == "3.5"
    assert extract_gym_answer(text, "first_line") == "-4"
    assert extract_gym_answer("no tag", "answer_tag") == ""
    assert extract_gym_answer(" a\nb ", "full") == "a\nb"


# --- registry ------------------------------------------------------------------------------------


def test_registries_are_independent() -> None:
    a, b = builtin_registry(), builtin_registry()
    a.register_entry_point("mentions", "tests.rollout_data.reward_plugins:mentions_label")
    assert "mentions" in a and "mentions" not in b


def test_register_validates() -> None:
    reg = RewardRegistry()
    with pytest.raises(RewardError, match="invalid"):
        reg.register("Bad Name", lambda c, i: 0.0)
    with pytest.raises(RewardError, match="not callable"):
        reg.register("ok", 3)  # type: ignore[arg-type]
    reg.register("ok", lambda c, i: 0.0)
    with pytest.raises(RewardError, match="already registered"):
        reg.register("ok", lambda c, i: 0.0)
    with pytest.raises(RewardError, match="low > high"):
        reg.register("ok2", lambda c, i: 0.0, value_range=(1.0, 0.0))


def test_entry_points() -> None:
    reg = RewardRegistry()
    reg.register_entry_point("mentions", "tests.rollout_data.reward_plugins:mentions_label")
    reg.register_entry_point("half", "tests.rollout_data.reward_plugins:Namespace.always_half")
    composite = RewardComposite.from_specs(
        [RewardSpec(name="mentions", params={"bonus": 2.0}), RewardSpec(name="half")], reg
    )
    assert composite.score("it is 72", item("72")).total == 2.5
    with pytest.raises(RewardError, match="rejects params"):
        RewardComposite.from_specs([RewardSpec(name="mentions", params={"bonsu": 2.0})], reg)
    for target, match in [
        ("tests.rollout_data.reward_plugins", "must look like"),
        ("os.path:join; rm -rf", "must look like"),
        ("tests.no_such_module:fn", "cannot import"),
        ("tests.rollout_data.reward_plugins:missing", "no attribute 'missing'"),
    ]:
        with pytest.raises(RewardError, match=match):
            reg.register_entry_point("x", target)


# --- composition and failure ---------------------------------------------------------------------


def plugin_registry() -> RewardRegistry:
    reg = builtin_registry()
    for name in ("explodes", "not_a_number", "returns_text"):
        reg.register_entry_point(name, f"tests.rollout_data.reward_plugins:{name}")
    reg.register_entry_point(
        "half", "tests.rollout_data.reward_plugins:Namespace.always_half", value_range=(0.0, 0.4)
    )
    return reg


def test_weighted_sum_and_per_term_values(gsm8k_item: PromptItem) -> None:
    specs = [
        RewardSpec(name="math", weight=2.0),
        RewardSpec(name="length_penalty", weight=0.5, params={"max_chars": 30, "buffer_chars": 10}),
        RewardSpec(name="format", weight=0.25, params={"style": "gsm8k"}),
        RewardSpec(name="format", weight=-1.0, params={"style": "boxed"}),
    ]
    composite = RewardComposite.from_specs(specs, builtin_registry())
    result = composite("so 72 in total\n#### 72", gsm8k_item)  # 22 chars: penalty -0.2
    assert not result.failed
    assert result.terms == pytest.approx(
        {"math": 1.0, "length_penalty": -0.2, "format": 1.0, "format#2": 0.0}
    )
    assert result.total == pytest.approx(2.0 * 1.0 + 0.5 * -0.2 + 0.25 * 1.0 - 1.0 * 0.0)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("explodes", "explodes: ZeroDivisionError: verifier divided by zero"),
        ("not_a_number", "not_a_number: returned non-finite nan"),
        ("returns_text", "returns_text: returned str, expected a float"),
        ("half", "half: returned 0.5 outside [0.0, 0.4]"),
    ],
)
def test_one_failing_term_fails_the_sample(bad: str, reason: str, gsm8k_item: PromptItem) -> None:
    composite = RewardComposite.from_specs(
        [RewardSpec(name="math"), RewardSpec(name=bad, weight=0.1)], plugin_registry()
    )
    result = composite.score("#### 72", gsm8k_item)
    assert result.failed
    assert result.total == 0.0
    assert result.terms == {"math": 1.0}
    assert result.reason == reason


def test_batch_scores_each_completion_independently(gsm8k_item: PromptItem) -> None:
    composite = RewardComposite.from_specs(
        [RewardSpec(name="math"), RewardSpec(name="exact", weight=0.0)], builtin_registry()
    )
    results = composite.score_batch(["#### 72", "#### 71", ""], [gsm8k_item] * 3)
    assert [r.total for r in results] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 items"):
        composite.score_batch(["a", "b"], [gsm8k_item])


def test_empty_and_non_finite_weights_rejected() -> None:
    with pytest.raises(RewardError, match="at least one term"):
        RewardComposite.from_specs([], builtin_registry())
    with pytest.raises(RewardError, match="weight must be finite"):
        RewardComposite.from_specs([RewardSpec(name="math", weight=math.inf)], builtin_registry())


def test_remote_names_must_be_builtins() -> None:
    assert builtin_registry(remote=["reasoning_gym"]).get("reasoning_gym").remote
    with pytest.raises(RewardError, match="unknown built-ins"):
        builtin_registry(remote=["reasoning-gym"])
