"""Admission: checks that need the trainer, its fleet or I/O; reasons name the value and the fix."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from events.errors import ConfigError
from events.schema import RegisterRequested
from events.specs import DatasetSpec, RewardSpec
from orchestrator.admission import Admission, Admit, Reject
from orchestrator.fleet import Fleet
from tests.orchestrator import builders as b
from tests.orchestrator.conftest import FileProbe


def check(admission: Admission, event: RegisterRequested, fleet: Fleet | None = None) -> Any:
    return admission.check(event, fleet or Fleet(2))


def test_a_valid_registration_is_admitted_with_its_dataset_size(
    admission: Admission, probe: FileProbe
) -> None:
    event = b.register("math-a.v2_0", "r1", base_model="smollm2-135m", rank=32)
    assert check(admission, event) == Admit(5)
    assert probe.calls == 1
    gym = b.register("gym", "r2", dataset=DatasetSpec(kind="reasoning_gym", name="chain_sum"))
    assert check(admission, gym) == Admit(1000)
    assert check(admission, b.register("x" * 63, "r3")) == Admit(5)


# What a registration can get wrong on its own (names, ranges, the payload size) is refused by
# the ingress decoder before admission sees it: tests/orchestrator/test_ingress.py. Admission
# checks only what needs this trainer, its fleet or I/O.
SPEC_CASES = [
    ({"base_model": "qwen3-8b"}, "spec.base_model", ["'qwen3-8b'", "'smollm2-135m'"]),
    ({"rank": 64}, "spec.rank", ["64", "1 <= rank <= 32"]),
    (
        {"rewards": (RewardSpec(name="math"), RewardSpec(name="os.system"))},
        "spec.rewards[1].name",
        ["'os.system'", "'exact_match'", "'length_penalty'", "'math'"],
    ),
]


@pytest.mark.parametrize(("overrides", "field", "parts"), SPEC_CASES)
def test_bad_spec_fields(
    admission: Admission,
    probe: FileProbe,
    overrides: dict[str, object],
    field: str,
    parts: list[str],
) -> None:
    verdict = check(admission, b.register("a", "r1", **overrides))
    assert isinstance(verdict, Reject), verdict
    assert verdict.field == field
    for part in parts:
        assert part in verdict.reason
    assert probe.calls == 0


def test_the_spec_is_checked_before_the_fleet_and_the_probe(
    admission: Admission, probe: FileProbe
) -> None:
    fleet = Fleet(1).apply(b.register("a", "r1"))
    verdict = check(admission, b.register("a", "r2", rank=33), fleet)
    assert isinstance(verdict, Reject) and verdict.field == "spec.rank"
    assert probe.calls == 0


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.jsonl", "does not exist"),
        ("../outside.jsonl", "outside the allowed root"),
    ],
)
def test_unreadable_dataset(admission: Admission, path: str, message: str) -> None:
    event = b.register("a", "r1", dataset=DatasetSpec(kind="jsonl", path=path))
    verdict = check(admission, event)
    assert isinstance(verdict, Reject) and verdict.field == "spec.dataset"
    assert verdict.reason.startswith("dataset is not readable:") and message in verdict.reason
    assert repr(path) in verdict.reason


def test_empty_dataset(admission: Admission) -> None:
    event = b.register("a", "r1", dataset=DatasetSpec(kind="jsonl", path="empty.jsonl"))
    verdict = check(admission, event)
    assert isinstance(verdict, Reject) and "no prompts" in verdict.reason


def test_a_probe_bug_propagates() -> None:
    def broken(dataset: DatasetSpec) -> int:
        raise KeyError("bug")

    admission = Admission(
        base_model="m", known_rewards=frozenset({"exact_match"}), probe_dataset=broken, max_rank=8
    )
    with pytest.raises(KeyError):
        check(admission, b.register("a", "r1"))
    with pytest.raises(ConfigError, match="max_rank"):
        Admission(base_model="m", known_rewards=frozenset(), probe_dataset=broken, max_rank=0)


def test_duplicate_active_name_until_it_retires(admission: Admission) -> None:
    fleet = Fleet(1).apply(b.register("a", "r1"))
    verdict = check(admission, b.register("a", "r2"), fleet)
    assert isinstance(verdict, Reject) and verdict.field == "adapter"
    assert "'a' is already registered (registered)" in verdict.reason
    assert "deregister it" in verdict.reason
    state = fleet.get("r1")
    assert state is not None
    fleet = fleet.apply(b.deregister(state))  # cancelled before admission: ended
    assert check(admission, b.register("a", "r2"), fleet) == Admit(5)


def test_registration_ids(admission: Admission) -> None:
    fleet = Fleet(1).apply(b.register("a", "r1"))
    reused = check(admission, b.register("b", "r1"), fleet)
    assert isinstance(reused, Reject) and reused.field == "registration_id"
    assert "'r1' is already used by adapter 'a'" in reused.reason
    # malformed ids ("has space", ...) are refused by the decoder: test_ingress.py
    unnamed = msgspec.structs.replace(b.register("b", ""), id="e1")
    assert check(admission, unnamed, fleet) == Admit(5)
