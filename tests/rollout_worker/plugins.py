"""An operator's own reward, for ``--reward always_one=tests.rollout_worker.plugins:always_one``."""

from __future__ import annotations

from rollout.data import PromptItem


def always_one(completion: str, item: PromptItem) -> float:
    return 1.0
