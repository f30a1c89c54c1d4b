"""Event builders for the orchestrator tests: what a well-behaved trainer would publish.

Each builder takes the registration's current state, so events carry consistent envelopes
(name, registration id, epoch) and the next step, version or epoch.
"""

from __future__ import annotations

from events.schema import (
    Admitted,
    Completed,
    DeregisterRequested,
    Failed,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    StepDone,
    SyncRequested,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec
from orchestrator.lifecycle import AdapterState


def make_spec(**overrides: object) -> AdapterSpec:
    """A valid small spec; keyword arguments override fields."""
    fields: dict[str, object] = {
        "dataset": DatasetSpec(kind="jsonl", path="prompts.jsonl"),
        "rewards": (RewardSpec(name="exact_match"),),
        "rank": 8,
        "steps": 3,
    }
    fields.update(overrides)
    return AdapterSpec(**fields)  # type: ignore[arg-type]


def register(name: str, reg: str, *, t: float = 1.0, **spec: object) -> RegisterRequested:
    return RegisterRequested(
        id=f"ev-{reg}", adapter=name, registration_id=reg, time=t, spec=make_spec(**spec)
    )


def rejected(name: str, reg: str, reason: str = "bad", *, t: float = 1.0) -> Rejected:
    return Rejected(adapter=name, registration_id=reg, reason=reason, time=t)


def _env(state: AdapterState, t: float) -> dict[str, object]:
    return {
        "adapter": state.name,
        "registration_id": state.registration_id,
        "epoch": state.epoch,
        "time": t,
    }


def queued(state: AdapterState, position: int = 0, *, t: float = 2.0) -> Queued:
    spec = state.spec or make_spec()
    return Queued(**_env(state, t), position=position, spec=spec)  # type: ignore[arg-type]


def admitted(state: AdapterState, slot: int, *, start_step: int = 0, t: float = 3.0) -> Admitted:
    env = _env(state, t) | {"epoch": state.epoch + 1}
    spec = state.spec or make_spec()
    return Admitted(**env, slot=slot, spec=spec, start_step=start_step)  # type: ignore[arg-type]


def sync(state: AdapterState, version: int | None = None, *, t: float = 4.0) -> SyncRequested:
    v = state.version if version is None else version
    return SyncRequested(  # type: ignore[misc]
        **_env(state, t), version=v, step=state.step, uri=f"mem://{v}", sha256="0", bytes=1
    )


def step_done(state: AdapterState, *, reward: float = 0.5, t: float = 5.0) -> StepDone:
    return StepDone(  # type: ignore[misc]
        **_env(state, t),
        step=state.step + 1,
        version=state.version + 1,
        metrics={"reward_mean": reward},
        state_uri=f"mem://{state.registration_id}/{state.step + 1}",
    )


def completed(state: AdapterState, *, cancelled: bool = False, t: float = 6.0) -> Completed:
    reason = "cancelled" if cancelled else "budget"
    return Completed(**_env(state, t), step=state.step, reason=reason, version=state.version)  # type: ignore[misc]


def retired(state: AdapterState, *, t: float = 7.0) -> Retired:
    assert state.slot is not None
    return Retired(**_env(state, t), slot=state.slot)  # type: ignore[misc]


def failed(state: AdapterState, reason: str = "non-finite loss", *, t: float = 6.0) -> Failed:
    return Failed(**_env(state, t), reason=reason, step=state.step)  # type: ignore[misc]


def deregister(state: AdapterState, *, t: float = 6.0) -> DeregisterRequested:
    return DeregisterRequested(
        adapter=state.name, registration_id=state.registration_id, reason="user stop", time=t
    )
