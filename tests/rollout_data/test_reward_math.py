"""The math reward on real GSM8K / MATH-style strings: right, wrong and malformed answers."""

from __future__ import annotations

import pytest

from rollout.data import PromptItem
from rollout.reward_builtins import builtin_registry
from rollout.reward_math import answers_match, extract_answer, last_boxed, parse_number
from tests.rollout_data.conftest import GSM8K_LABEL

GSM8K_RIGHT = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def math_score(completion: str, label: str, **params: object) -> float:
    entry = builtin_registry().get("math")
    entry.validate(params)  # type: ignore[arg-type]
    return entry.fn(completion, PromptItem(index=0, prompt="q", label=label), **params)


@pytest.mark.parametrize(
    ("completion", "label", "expected"),
    [
        # GSM8K: the label is a full solution ending in "#### 72"
        (GSM8K_RIGHT, GSM8K_LABEL, 1.0),
        ("She sold 24 in May, so 48 + 24 = 72 in total.\n#### 72", GSM8K_LABEL, 1.0),
        ("#### 72.00", GSM8K_LABEL, 1.0),
        ("#### $72", GSM8K_LABEL, 1.0),
        ("48 + 24 = 73\n#### 73", GSM8K_LABEL, 0.0),
        ("#### 72 clips", GSM8K_LABEL, 1.0),
        # \boxed with nested braces; fractions vs decimals
        ("So the probability is \\boxed{\\frac{3}{4}}.", "0.75", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
        ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),
        ("\\boxed{\\frac{2}{3}}", "0.75", 0.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("first \\boxed{1} then corrected: \\boxed{2}", "2", 1.0),
        ("\\boxed{x + 1}", "x+1", 1.0),
        # last-number fallback with commas, trailing zeros, signs, dollars, percents
        ("The answer is 1,234.50", "1234.5", 1.0),
        ("The answer is 1,234.50.", "1,234.5", 1.0),
        ("The answer is 1,234.51", "1234.5", 0.0),
        ("It is 5.0", "5", 1.0),
        ("The temperature fell to -12 degrees", "-12", 1.0),
        ("The temperature fell to 12 degrees", "-12", 0.0),
        ("It costs $1,000 in total", "1000", 1.0),
        ("The discount is 50%", "50", 1.0),
        ("From 2 to 3 and finally 7/8", "0.875", 1.0),
        # malformed: a marker that cannot be read, or no answer at all
        ("\\boxed{3/4", "3/4", 0.0),
        ("#### ", "5", 0.0),
        ("####", "5", 0.0),
        ("I don't know.", "5", 0.0),
        ("", "5", 0.0),
        ("\\boxed{}", "5", 0.0),
        ("ünïcødé ✓ 🙂", "5", 0.0),
    ],
)
def test_math_reward_cases(completion: str, label: str, expected: float) -> None:
    assert math_score(completion, label) == expected


def test_fallback_off_needs_a_marker() -> None:
    assert math_score("The answer is 72", GSM8K_LABEL, fallback=False) == 0.0
    assert math_score("The answer is \\boxed{72}", GSM8K_LABEL, fallback=False) == 1.0


def test_rel_tol() -> None:
    assert math_score("\\boxed{0.3333}", "1/3") == 0.0
    assert math_score("\\boxed{0.3333}", "1/3", rel_tol=1e-3) == 1.0


def test_last_boxed_balances_nested_braces() -> None:
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed 42 is it") == "42"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("no box") is None


def test_extract_prefers_box_then_gsm8k_then_last_number() -> None:
    assert extract_answer("#### 5\n\\boxed{6}") == "6"
    assert extract_answer("1 then 2\n#### 3\n and 4") == "3"
    assert extract_answer("1 then 2, finally 3.") == "3"
    assert extract_answer("no digits") is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234.50", "2469/2"),
        ("-0.75", "-3/4"),
        ("\\frac{3}{4}", "3/4"),
        ("-\\frac34", "-3/4"),
        ("$5", "5"),
        ("5.", "5"),
        ("50\\%", "50"),
        ("+7", "7"),
        ("1{,}000", "1000"),
    ],
)
def test_parse_number(text: str, value: str) -> None:
    from fractions import Fraction

    assert parse_number(text) == Fraction(value)


@pytest.mark.parametrize("text", ["abc", "1.2.3", "1/0", "\\frac{1}{0}", "", "-", "x/2"])
def test_parse_number_rejects(text: str) -> None:
    assert parse_number(text) is None


def test_text_answers_compare_without_spacing_or_dollars() -> None:
    assert answers_match("$\\left( 1, 2 \\right)$", "(1,2)")
    assert not answers_match("(1,3)", "(1,2)")
    assert not answers_match("", "")
