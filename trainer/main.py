"""The trainer process's entry point: its config, its wiring, the shared bootstrap.

Kept apart from :mod:`trainer.process` (the state machine) so that module holds only the logic.
``multilora trainer`` (in ``ops``, which may import both trainer and rollout) calls :func:`main`
with the two things admission needs from the rollout side — how to measure a dataset and which
reward names exist — so the trainer never imports rollout code.

With ``--ranks R`` > 1, :func:`main` first starts the other ranks (:mod:`trainer.ranks`; they
build their models while this process builds its own) and stops them when the process ends;
:func:`build` then gives the process the data-parallel step instead of the one-process one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from events.bootstrap import EXIT_CONFIG, Bus, run_process
from events.config import load
from events.consumer import Consumer
from events.errors import ConfigError
from events.specs import DatasetSpec
from orchestrator.admission import Admission
from orchestrator.artifacts import ArtifactStore
from trainer.config import TrainerConfig
from trainer.metrics import TrainerMetrics

if TYPE_CHECKING:
    from trainer.ranks import RankGroup, RankRecipe

log = logging.getLogger(__name__)

DatasetSizer = Callable[[DatasetSpec, Sequence[Path]], int]
"""``(spec, allowed_roots) -> number of prompts``; raises a ConfigError subclass if unreadable."""


def load_config(argv: Sequence[str] | None = None, environ=None) -> TrainerConfig:
    """File < environment < flags (see :mod:`events.config`)."""
    return load(
        TrainerConfig,
        role="trainer",
        argv=argv,
        environ=environ,
        prog="multilora trainer",
        description="The trainer: admits adapters into slots and trains them in mixed steps.",
    )


def rank_recipe(config: TrainerConfig) -> RankRecipe:
    """What every rank needs to build the same slot model as this process."""
    from trainer.ranks import RankRecipe

    return RankRecipe(
        model_path=config.model_path,
        num_slots=config.num_slots,
        max_rank=config.max_rank,
        dtype=config.dtype,
        device=config.device,
        torch_threads=config.torch_threads,
        log_level=config.bus.log_level,
    )


def start_ranks(config: TrainerConfig) -> contextlib.AbstractContextManager[RankGroup | None]:
    """The other ranks, started (``None`` for ``ranks=1``); leaving the context stops them."""
    if config.ranks == 1:
        return contextlib.nullcontext()
    from trainer.ranks import RankGroup

    return RankGroup.start(rank_recipe(config), config.ranks)


def build(
    config: TrainerConfig,
    bus: Bus,
    *,
    dataset_size: DatasetSizer,
    rewards: frozenset[str],
    ranks: RankGroup | None = None,
) -> Consumer:
    """The trainer process and its consumer (recovery runs as the consumer's ``on_start``);
    with ``ranks`` (rank 0's :class:`~trainer.ranks.RankGroup`), its steps are data-parallel."""
    import torch

    from trainer.dist_step import DataParallelStep
    from trainer.inject import MultiLoraModel
    from trainer.mixed_step import StepFn, mixed_step
    from trainer.optim import SlotAdamW
    from trainer.process import TrainerProcess

    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    model = MultiLoraModel.from_pretrained(
        config.model_path,
        config.num_slots,
        config.max_rank,
        dtype=getattr(torch, config.dtype),
        device=config.device if ranks is None else rank_recipe(config).device_of(0),
    )
    step_fn: StepFn = mixed_step
    if ranks is not None:
        ranks.wait_ready()
        step_fn = DataParallelStep(ranks)
    base_model = config.base_model or Path(config.model_path).name
    roots = [Path(r) for r in config.allowed_roots]
    admission = Admission(
        base_model=base_model,
        max_rank=config.max_rank,
        known_rewards=rewards | frozenset(config.extra_rewards),
        probe_dataset=lambda spec: dataset_size(spec, roots),
        max_waiting_per_producer=config.max_waiting_per_producer,
    )
    process = TrainerProcess(
        client=bus.client,
        streams=bus.streams,
        model=model,
        optimizer=SlotAdamW(model.store, model.table),
        admission=admission,
        artifacts=ArtifactStore(config.artifacts),
        checkpoints=config.checkpoints,
        base_model=base_model,
        pad_id=int(getattr(model.hf_model.config, "pad_token_id", None) or 0),
        max_batch_wait_s=config.max_batch_wait_s,
        prompts_per_task=config.prompts_per_task,
        max_failures=config.max_failures,
        metrics=TrainerMetrics(bus.registry),
        step_fn=step_fn,
        client_adapters=ranks is None,
    )
    consumer = bus.consumer(
        process.subscriptions(),
        process.handle,
        on_start=process.recover,
        on_idle=process.on_idle,
        on_stop=process.drain,
        idle_s=0.05,
    )
    process.consumer = consumer
    log.info(
        "trainer: %s on %s/%s x %d ranks, %d slots up to rank %d; versions in %s",
        config.model_path,
        config.device,
        config.dtype,
        config.ranks,
        config.num_slots,
        config.max_rank,
        config.artifacts,
    )
    return consumer


def main(
    argv: Sequence[str] | None = None, *, dataset_size: DatasetSizer, rewards: frozenset[str]
) -> int:
    """Run the trainer until SIGTERM (warm shutdown: the step in progress commits first)."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"multilora trainer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with start_ranks(config) as ranks:
        return run_process(
            "trainer",
            config.bus,
            lambda bus: build(config, bus, dataset_size=dataset_size, rewards=rewards, ranks=ranks),
        )
