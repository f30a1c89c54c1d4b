"""Builders shared by the rollout worker tests: PEFT adapters, events, publishing, reading back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import redis
import torch

from events.codec import Decoder, encode, new_id, stamp
from events.connection import connect
from events.consumer import Consumer
from events.schema import (
    Admitted,
    ControlEvent,
    GroupEvent,
    RegisterRequested,
    RolloutGroup,
    RolloutTask,
    SyncRequested,
)
from events.specs import AdapterSpec, DatasetSpec, RewardSpec, SamplingSpec
from events.streams import Streams

JSONL = DatasetSpec(kind="jsonl", path="arith.jsonl")
CHAIN_SUM = DatasetSpec(kind="reasoning_gym", name="chain_sum", size=20, seed=3)
MATH = (RewardSpec(name="math"),)
GYM = (
    RewardSpec(name="reasoning_gym"),
    RewardSpec(name="length_penalty", weight=0.1, params={"max_chars": 40}),
)
SAMPLING = SamplingSpec(temperature=1.0, max_new_tokens=8)


def write_peft_adapter(base_dir: Path, out_dir: Path, *, seed: int, rank: int = 4) -> Path:
    """Save a real PEFT LoRA (q_proj, v_proj) for the model at ``base_dir``; A and B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


def sha256_of(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()


SPEC = AdapterSpec(dataset=JSONL, rewards=MATH, steps=2)


def registered(adapter: str, registration_id: str, spec: AdapterSpec = SPEC) -> RegisterRequested:
    """A registration as admission republishes it on the control log (``steps=2`` by default)."""
    return RegisterRequested(adapter=adapter, registration_id=registration_id, spec=spec)


def admitted(adapter: str, registration_id: str, epoch: int = 1, slot: int = 0) -> Admitted:
    return Admitted(
        adapter=adapter, registration_id=registration_id, epoch=epoch, slot=slot, spec=SPEC
    )


def sync(adapter: str, registration_id: str, version: int, path: Path, **kw: Any) -> SyncRequested:
    kw.setdefault("sha256", sha256_of(path))
    kw.setdefault("uri", str(path))
    return SyncRequested(
        adapter=adapter,
        registration_id=registration_id,
        version=version,
        step=version,
        bytes=1,
        **kw,
    )


def task(adapter: str, registration_id: str, weights: Path, *, version: int = 0, **kw: Any):
    kw.setdefault("prompt_indices", (0, 1, 2))
    kw.setdefault("group_size", 3)
    kw.setdefault("dataset", JSONL)
    kw.setdefault("rewards", MATH)
    kw.setdefault("sampling", SAMPLING)
    kw.setdefault("seed", 7)
    kw.setdefault("id", new_id())
    return RolloutTask(
        adapter=adapter,
        registration_id=registration_id,
        step=version,
        version=version,
        weights_uri=str(weights),
        **kw,
    )


def publish(client: redis.Redis, stream: str, *events: Any) -> None:
    for event in events:
        client.xadd(stream, encode(stamp(event, source="test")))


def read_groups(client: redis.Redis, streams: Streams) -> list[RolloutGroup]:
    decoder = Decoder(GroupEvent, max_bytes=16 << 20)
    return [decoder.decode(fields, eid.decode()) for eid, fields in client.xrange(streams.groups)]


def read_control(client: redis.Redis, streams: Streams) -> list[Any]:
    decoder = Decoder(ControlEvent)
    return [decoder.decode(fields, eid.decode()) for eid, fields in client.xrange(streams.control)]


def run_burst(redis_url: str, streams: Streams, worker: Any, **kw: Any) -> Consumer:
    """Run ``worker`` through a real consumer until every stream is drained."""
    kw.setdefault("block_ms", 200)
    consumer = Consumer(
        lambda: connect(redis_url),
        streams,
        worker.name,
        worker.subscriptions(),
        worker.handle,
        count=1,
        **kw,
    )
    consumer.run(burst=True)
    return consumer
