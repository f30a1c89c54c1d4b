"""The trainer process's entry point: build it from its config, recover, run.

Kept apart from :mod:`trainer.process` (the state machine) so that module holds only the logic;
``multilora trainer`` (in ``ops``) parses flags into a :class:`~trainer.config.TrainerConfig` and
calls :func:`build` and :func:`run`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from events.consumer import Consumer
from events.specs import DatasetSpec
from events.streams import Streams
from orchestrator.admission import Admission
from orchestrator.artifacts import ArtifactStore
from trainer.config import TrainerConfig
from trainer.inject import MultiLoraModel
from trainer.metrics import TrainerMetrics
from trainer.optim import SlotAdamW
from trainer.process import TrainerProcess


def build(
    config: TrainerConfig,
    *,
    probe_dataset: Callable[[DatasetSpec], int],
    known_rewards: frozenset[str],
) -> tuple[TrainerProcess, Consumer]:
    """Construct the trainer process and its consumer from ``config`` (no I/O on the bus yet).

    ``probe_dataset`` and ``known_rewards`` come from the rollout package; the entry point in
    ``ops`` passes them in, so the trainer never imports rollout code.
    """
    import torch

    from events.connection import check_durability, connect
    from events.metrics import instrument_consumer, metrics_registry, start_metrics_server

    client = connect(config.redis_url, max_block_ms=config.block_ms, name=config.name)
    check_durability(client, allow_unsafe=config.unsafe_redis)
    streams = Streams(config.namespace)
    model = MultiLoraModel.from_pretrained(
        config.model_path, config.num_slots, config.max_rank,
        dtype=getattr(torch, config.dtype), device=config.device,
    )  # fmt: skip
    optimizer = SlotAdamW(model.store, model.table)
    base_model = config.base_model or Path(config.model_path).name
    admission = Admission(
        base_model=base_model,
        max_rank=config.max_rank,
        known_rewards=known_rewards,
        probe_dataset=probe_dataset,
    )
    pad_id = int(getattr(model.hf_model.config, "pad_token_id", None) or 0)
    registry = metrics_registry()
    trainer_metrics = TrainerMetrics(registry)
    process = TrainerProcess(
        client=client, streams=streams, model=model, optimizer=optimizer, admission=admission,
        artifacts=ArtifactStore(config.artifacts), checkpoints=config.checkpoints,
        base_model=base_model, pad_id=pad_id, max_batch_wait_s=config.max_batch_wait_s,
        prompts_per_task=config.prompts_per_task, max_failures=config.max_failures,
        metrics=trainer_metrics,
    )  # fmt: skip
    observer = instrument_consumer(
        registry, client, process.subscriptions(), dead_stream=streams.dead
    )
    if config.metrics_port:
        start_metrics_server(config.metrics_port, registry)
    consumer = Consumer(
        lambda: connect(config.redis_url, max_block_ms=config.block_ms),
        streams, config.name, process.subscriptions(), process.handle,
        block_ms=config.block_ms, claim_idle_ms=config.claim_idle_ms,
        lease_wait_s=config.lease_wait_s, on_idle=process.on_idle, idle_s=0.05,
        observer=observer,
    )  # fmt: skip
    process.consumer = consumer
    return process, consumer


def run(process: TrainerProcess, consumer: Consumer, *, max_events: int | None = None) -> None:
    """Recover from the control log, then process events until stopped."""
    consumer.lease.acquire(wait_s=consumer.lease_wait_s)
    try:
        consumer.ensure_groups()
        consumer.commit(process.recover(), [])
    finally:
        consumer.lease.release()
    consumer.install_signal_handlers()
    consumer.run(max_events=max_events)
