"""Fixtures for the orchestrator tests: a dataset probe over real files and an Admission.

The probe stands in for the rollout package's (which the orchestrator never imports): it
accepts JSONL files under one allowed root and returns their number of rows, raising
ConfigError with the reason otherwise, as the real probe's contract says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from events.errors import ConfigError
from events.specs import DatasetSpec
from orchestrator.admission import Admission

KNOWN_REWARDS = frozenset({"exact_match", "math", "length_penalty"})


class FileProbe:
    """Counts the rows of a JSONL dataset under ``root``; records how often it was called."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.calls = 0

    def __call__(self, dataset: DatasetSpec) -> int:
        self.calls += 1
        if dataset.kind == "reasoning_gym":
            return dataset.size
        path = (self.root / dataset.path).resolve()
        if not path.is_relative_to(self.root):
            raise ConfigError(f"dataset path {dataset.path!r} is outside the allowed root")
        if not path.is_file():
            raise ConfigError(f"dataset file {dataset.path!r} does not exist under {self.root}")
        return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "prompts.jsonl").write_text(
        "".join(f'{{"prompt": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(5))
    )
    (root / "empty.jsonl").write_text("")
    return root


@pytest.fixture
def probe(data_root: Path) -> FileProbe:
    return FileProbe(data_root)


@pytest.fixture
def admission(probe: FileProbe) -> Admission:
    return Admission(
        base_model="smollm2-135m",
        known_rewards=KNOWN_REWARDS,
        probe_dataset=probe,
        max_rank=32,
    )
