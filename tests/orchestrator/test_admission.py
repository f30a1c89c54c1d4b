"""Admission: every rejection reason names the bad value and the fix; probes run last."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from events.codec import encode
from events.errors import ConfigError
from events.schema import RegisterRequested
from events.specs import DatasetSpec, LossSpec, OptimSpec, RewardSpec, SamplingSpec
from orchestrator.admission import Admission, Admit, Reject
from orchestrator.fleet import Fleet
from tests.orchestrator import builders as b
from tests.orchestrator.conftest import FileProbe


def size_of(event: RegisterRequested) -> int:
    return len(encode(event)["event"])


def check(admission: Admission, event: RegisterRequested, fleet: Fleet | None = None) -> Any:
    return admission.check(event, fleet or Fleet(2), size_of(event))


def test_a_valid_registration_is_admitted_with_its_dataset_size(
    admission: Admission, probe: FileProbe
) -> None:
    event = b.register("math-a.v2_0", "r1", base_model="smollm2-135m", rank=32)
    assert check(admission, event) == Admit(5)
    assert probe.calls == 1
    gym = b.register("gym", "r2", dataset=DatasetSpec(kind="reasoning_gym", name="chain_sum"))
    assert check(admission, gym) == Admit(1000)
    assert check(admission, b.register("x" * 63, "r3")) == Admit(5)


@pytest.mark.parametrize(
    "name", ["", "Math", "-a", ".a", "a b", "a/b", "a:b", "x" * 64, "é", "a\n"]
)
def test_bad_names(admission: Admission, probe: FileProbe, name: str) -> None:
    verdict = check(admission, b.register(name, "r1"))
    assert isinstance(verdict, Reject) and verdict.field == "adapter"
    assert repr(name) in verdict.reason and "lowercase letters" in verdict.reason
    assert probe.calls == 0  # cheap checks first


SPEC_CASES = [
    ({"base_model": "qwen3-8b"}, "spec.base_model", ["'qwen3-8b'", "'smollm2-135m'"]),
    ({"rank": 64}, "spec.rank", ["64", "1 <= rank <= 32"]),
    ({"rank": 0}, "spec.rank", ["0", "1 <= rank <= 32"]),
    ({"alpha": 0.0}, "spec.alpha", ["alpha = 0.0", "alpha > 0"]),
    ({"alpha": float("nan")}, "spec.alpha", ["nan"]),
    ({"group_size": 1}, "spec.group_size", ["group_size = 1", "2 <= group_size"]),
    ({"prompts_per_step": 0}, "spec.prompts_per_step", ["prompts_per_step = 0"]),
    ({"steps": 0}, "spec.steps", ["steps = 0", "steps >= 1"]),
    ({"max_staleness": -1}, "spec.max_staleness", ["-1"]),
    ({"optim": OptimSpec(lr=0.0)}, "spec.optim.lr", ["optim.lr = 0.0", "lr > 0"]),
    ({"optim": OptimSpec(lr=float("inf"))}, "spec.optim.lr", ["inf", "finite"]),
    ({"optim": OptimSpec(betas=(0.9, 1.0))}, "spec.optim.betas", ["(0.9, 1.0)"]),
    ({"loss": LossSpec(clip_ratio_c=0.5)}, "spec.loss.clip_ratio_c", ["0.5", "> 1, or 0"]),
    ({"sampling": SamplingSpec(top_p=0.0)}, "spec.sampling.top_p", ["top_p in (0, 1]"]),
    ({"sampling": SamplingSpec(top_k=0)}, "spec.sampling.top_k", ["top_k = 0"]),
    ({"sampling": SamplingSpec(max_new_tokens=0)}, "spec.sampling.max_new_tokens", ["= 0"]),
    ({"rewards": ()}, "spec.rewards", ["at least one reward"]),
    (
        {"rewards": (RewardSpec(name="math"), RewardSpec(name="os.system"))},
        "spec.rewards[1].name",
        ["'os.system'", "'exact_match'", "'length_penalty'", "'math'"],
    ),
    (
        {"rewards": (RewardSpec(name="math", weight=float("inf")),)},
        "spec.rewards[0].weight",
        ["inf", "finite"],
    ),
    ({"dataset": DatasetSpec(kind="jsonl")}, "spec.dataset.path", ["needs a path"]),
    ({"dataset": DatasetSpec(kind="reasoning_gym")}, "spec.dataset.name", ["reasoning-gym"]),
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


def test_oversize_payload(admission: Admission, probe: FileProbe) -> None:
    event = b.register(
        "a",
        "r1",
        dataset=DatasetSpec(kind="jsonl", path="prompts.jsonl", prompt_template="x" * 5000),
    )
    verdict = check(admission, event)
    assert isinstance(verdict, Reject) and verdict.field == "spec"
    assert f"{size_of(event)} bytes" in verdict.reason and "4096" in verdict.reason
    assert probe.calls == 0


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
    for bad in ("has space", "r1\n", "x" * 129):
        verdict = check(admission, b.register("b", bad), fleet)
        assert isinstance(verdict, Reject) and verdict.field == "registration_id"
    unnamed = msgspec.structs.replace(b.register("b", ""), id="e1")
    assert check(admission, unnamed, fleet) == Admit(5)
