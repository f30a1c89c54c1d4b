"""A recorded control log for the operator views: what a trainer publishes for five adapters."""

from __future__ import annotations

import msgspec
import redis

from events.codec import encode, stamp
from events.schema import (
    Admitted,
    Completed,
    Failed,
    Queued,
    RegisterRequested,
    Rejected,
    Retired,
    StepDone,
    Synced,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec
from events.streams import Streams

SPEC = AdapterSpec(
    dataset=DatasetSpec(kind="reasoning_gym", name="basic_arithmetic"),
    rewards=(RewardSpec(name="exact_match"),),
    steps=10,
)


def publish(client: redis.Redis, stream: str, *events: msgspec.Struct) -> None:
    for event in events:
        client.xadd(stream, encode(stamp(event, source="test")))


def lifecycle(client: redis.Redis, streams: Streams) -> None:
    """alpha trains 2 steps, beta is queued, gamma is rejected, delta completes and retires, eps
    resumes at step 4 and fails."""
    alpha = {"adapter": "alpha", "registration_id": "ra"}
    delta = {"adapter": "delta", "registration_id": "rd", "epoch": 1}
    eps = {"adapter": "eps", "registration_id": "re", "epoch": 1}
    publish(
        client,
        streams.control,
        RegisterRequested(**alpha, spec=SPEC),
        Admitted(**alpha, epoch=1, slot=1, spec=SPEC),
        StepDone(**alpha, epoch=1, step=1, version=1, metrics={"reward_mean": 0.25, "loss": 0.9}),
        Synced(**alpha, epoch=1, worker="w1", version=1, latency_s=0.42),
        StepDone(**alpha, epoch=1, step=2, version=2, metrics={"reward_mean": 0.5, "loss": 0.7}),
        RegisterRequested(adapter="beta", registration_id="rb", spec=SPEC),
        Queued(adapter="beta", registration_id="rb", position=0, spec=SPEC),
        Rejected(adapter="gamma", reason="rank 999 exceeds max_rank 64", field="rank"),
        Admitted(**delta, slot=2, spec=SPEC),
        StepDone(**delta, step=10, version=10, metrics={"reward_mean": 0.875, "loss": 0.1}),
        Completed(**delta, step=10, version=10),
        Retired(**delta, slot=2),
        Admitted(**eps, slot=3, spec=SPEC, start_step=4),
        Failed(**eps, reason="non-finite loss 3 times", step=4),
    )
