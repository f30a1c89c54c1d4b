"""Operator reward functions for the end-to-end tests, registered through the extension point.

The rollout workers get them with ``--reward NAME=tests.e2e.rewards:FN`` and the trainer is told
the names with ``--extra-reward NAME`` (the operator allow-list; nothing is imported from an event).

The learnable rewards are dense on purpose: a tiny random model learns them from scratch within
a few dozen steps, so a CI run shows learning, not luck. :func:`hangs` and :func:`explodes` are
broken on purpose, for the failure-isolation tests (:mod:`tests.e2e.test_tenant_failures`).
"""

from __future__ import annotations

import threading

from rollout.data import PromptItem


def char_fraction(completion: str, item: PromptItem, *, char: str = "a") -> float:
    """The fraction of the completion's characters equal to ``char``, in [0, 1] (0 when empty).

    An adapter rewarded this way learns to emit ``char``; two adapters rewarded for two different
    characters show isolation in *behaviour*: each one's samples fill with its own character.
    """
    if len(char) != 1:
        raise ValueError(f"char must be one character, got {char!r}")
    if not completion:
        return 0.0
    return sum(c == char for c in completion) / len(completion)


def hangs(completion: str, item: PromptItem) -> float:
    """Never returns: the rollout worker's per-call deadline must fail its samples and move on
    (the call's thread is abandoned; it ends with the worker process)."""
    threading.Event().wait()
    raise AssertionError("unreachable: the event is never set")


def explodes(completion: str, item: PromptItem) -> float:
    """Raises on every call: every sample of the adapter fails with this reason."""
    raise ZeroDivisionError("verifier divided by zero")
