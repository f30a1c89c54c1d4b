"""Operator-style reward functions, registered in tests through entry points ("module:fn")."""

from __future__ import annotations

from rollout.data import PromptItem


def mentions_label(completion: str, item: PromptItem, *, bonus: float = 1.0) -> float:
    """``bonus`` if the label appears in the completion, else 0."""
    return bonus if item.label and item.label in completion else 0.0


def explodes(completion: str, item: PromptItem) -> float:
    raise ZeroDivisionError("verifier divided by zero")


def not_a_number(completion: str, item: PromptItem) -> float:
    return float("nan")


def returns_text(completion: str, item: PromptItem) -> float:
    return "1.0"  # type: ignore[return-value]


class Namespace:
    """Entry points may name an attribute path inside a module."""

    @staticmethod
    def always_half(completion: str, item: PromptItem) -> float:
        return 0.5
