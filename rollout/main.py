"""The rollout worker's entry point: its config, its wiring, the shared bootstrap.

Kept apart from :mod:`rollout.worker` (the state machine): ``multilora rollout`` (and
``python -m rollout.main``) loads a :class:`~rollout.config.RolloutConfig`, builds the backend,
the reward registry and the worker from it, and runs them under
:func:`events.bootstrap.run_process`.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from events.bootstrap import EXIT_CONFIG, Bus, run_process
from events.consumer import Consumer
from events.errors import ConfigError
from orchestrator.compaction import READER_SLOTS, load_fleet
from rollout.backend import GenerationBackend, WeightsFetcher
from rollout.config import RolloutConfig, load_config
from rollout.metrics import RolloutMetrics
from rollout.reward_builtins import builtin_registry
from rollout.rewards import RemoteScorer, RewardRegistry
from rollout.worker import RolloutWorker


def build_backend(config: RolloutConfig) -> GenerationBackend:
    """The generation backend the config names (loads the model or the tokenizer)."""
    if config.backend == "http":
        from transformers import AutoTokenizer

        from rollout.backend import HttpBackend
        from rollout.client import SGLangClient

        tokenizer = AutoTokenizer.from_pretrained(config.model_path, local_files_only=True)
        client = SGLangClient(config.engine_url)
        return HttpBackend(client, tokenizer, keep_versions=config.keep_versions)
    from rollout.backend import EmbeddedBackend
    from rollout.engine import Engine

    engine = Engine.from_pretrained(
        config.model_path,
        dtype=config.dtype,
        device=config.device,
        max_loras=config.max_slots,
        max_lora_rank=config.max_rank,
        keep_versions=config.keep_versions,
        max_batch_size=config.max_batch_rows,
        decoder=config.decoder,
        static_cache_bytes=int(config.static_cache_gb * 2**30) or None,
    )
    return EmbeddedBackend(engine)


def default_cache(name: str) -> Path:
    """Where a worker copies versions published to remote stores (one folder per worker)."""
    return Path(tempfile.gettempdir()) / "multilora-weights" / name


def build_rewards(config: RolloutConfig) -> RewardRegistry:
    """Built-in rewards plus the operator's entry points (imported here, at boot)."""
    registry = builtin_registry(remote=config.remote_rewards)
    for reward, target in sorted(config.reward_entry_points.items()):
        registry.register_entry_point(reward, target)
    return registry


def build(config: RolloutConfig, bus: Bus) -> Consumer:
    """The worker and its consumer: tasks in batches (held until the engine is free), the
    control log read ahead in bulk."""
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    remote: RemoteScorer | None = None
    if config.remote_rewards:
        from rollout.reward_queue import RQRewardRunner

        remote = RQRewardRunner(bus.client, bus.streams.key("rewards"), config.reward_timeout_s)
    fleet, history_until = load_fleet(bus.client, bus.streams, READER_SLOTS)
    worker = RolloutWorker(
        name=bus.name,
        streams=bus.streams,
        backend=build_backend(config),
        weights=WeightsFetcher(Path(config.weights_cache or default_cache(bus.name))),
        registry=build_rewards(config),
        remote=remote,
        allowed_roots=[Path(r) for r in config.allowed_roots],
        max_prompt_tokens=config.max_prompt_tokens,
        reward_call_timeout_s=config.reward_call_timeout_s,
        history_until=history_until,
        metrics=RolloutMetrics(bus.registry),
        batch_tasks=config.batch_tasks,
    )
    worker.seed(fleet)
    consumer = bus.consumer(
        worker.subscriptions(),
        worker.handle,
        count=1,
        max_in_flight=config.batch_tasks + config.prefetch,
        on_idle=worker.flush,
        on_stop=worker.flush,
    )
    worker.consumer = consumer
    return consumer


def main(argv: Sequence[str] | None = None) -> int:
    """Consume until SIGTERM (warm shutdown) or, with ``--burst``, until drained."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"multilora rollout: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_process(
        "rollout",
        config.bus,
        lambda bus: build(config, bus),
        default_name=config.worker_name,
        max_block_ms=config.max_block_ms,
    )


if __name__ == "__main__":
    raise SystemExit(main())
