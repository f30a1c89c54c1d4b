"""The trainer process's one frozen config: the shared bus config plus the trainer's own fields.

Loaded like every process's (:func:`events.config.load`: file < ``MULTILORA_TRAINER_<FIELD>`` /
``MULTILORA_<FIELD>`` < flags); only :func:`trainer.main.main` reads it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from events.config import DEFAULT_ARTIFACTS, DEFAULT_CHECKPOINTS, BusConfig, Positive
from orchestrator.admission import DEFAULT_MAX_WAITING_PER_PRODUCER


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


class TrainerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the trainer process needs.

    ``base_model`` is the name registrations must match (default: the model folder's name).
    ``num_slots`` adapters train at once, each at rank ≤ ``max_rank``. ``max_batch_wait_s`` is how
    long a ready adapter waits for others to fill their batch so they share one forward/backward.
    ``max_failures`` consecutive skipped steps (non-finite loss) fail an adapter.
    ``extra_rewards`` are reward names the rollout workers' operators registered as entry points
    (admission accepts them besides the built-ins). The bus consumer name defaults to ``trainer``.
    ``ranks`` > 1 trains data-parallel over that many processes (:mod:`trainer.ranks`; on CUDA
    rank ``r`` uses device ``base + r``, on CPU give each a share of the cores with
    ``torch_threads``); 1 is a single process without ``torch.distributed``. ``overlap_steps``
    computes each step on a compute thread while the loop goes on (:mod:`trainer.compute`);
    ``false`` runs it inline: the same decisions, without the overlap.
    """

    bus: BusConfig = BusConfig()
    model_path: Annotated[str, _doc("local Hugging Face model directory", "--model")]
    base_model: Annotated[str, _doc("name registrations must match (default: folder name)")] = ""
    device: Annotated[str, _doc("torch device")] = "cpu"
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], _doc("base dtype")] = "float32"
    num_slots: Annotated[Positive, _doc("adapters trained at once")] = 4
    max_rank: Annotated[Positive, _doc("largest LoRA rank a slot holds")] = 64
    artifacts: Annotated[str, _doc("version store (dir or fsspec URL)")] = DEFAULT_ARTIFACTS
    checkpoints: Annotated[str, _doc("checkpoint store, for resume")] = DEFAULT_CHECKPOINTS
    allowed_roots: Annotated[
        tuple[str, ...], _doc("directories dataset files may live under", "--allowed-root")
    ] = (".",)
    extra_rewards: Annotated[
        tuple[str, ...], _doc("reward names the workers' operators registered", "--extra-reward")
    ] = ()
    max_batch_wait_s: Annotated[
        float, msgspec.Meta(ge=0, description="wait for other adapters to share a step, s")
    ] = 2.0
    prompts_per_task: Annotated[
        int, msgspec.Meta(ge=0, description="prompts per rollout task (0: a step's all)")
    ] = 0
    max_failures: Annotated[Positive, _doc("skipped steps in a row that fail an adapter")] = 3
    max_waiting_per_producer: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="registrations one producer may have waiting for a slot (0: no limit)",
        ),
    ] = DEFAULT_MAX_WAITING_PER_PRODUCER
    torch_threads: Annotated[
        int, msgspec.Meta(ge=0, description="intra-op threads (0: torch's default)")
    ] = 0
    ranks: Annotated[Positive, _doc("data-parallel ranks (processes; on CUDA one device each)")] = 1
    overlap_steps: Annotated[
        bool,
        _doc("compute each step on its own thread while the loop reads, decides and commits"),
    ] = True
