"""The trainer process's one frozen config, built at the edge (CLI flags / env / TOML)."""

from __future__ import annotations

from typing import Literal

import msgspec


class TrainerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the trainer process needs; only :func:`trainer.process.main` reads it.

    ``base_model`` is the name registrations must match (default: the model folder's name).
    ``num_slots`` adapters train at once, each at rank ≤ ``max_rank``. ``max_batch_wait_s`` is how
    long a ready adapter waits for others to fill their batch so they share one forward/backward.
    ``max_failures`` consecutive skipped steps (non-finite loss) fail an adapter.
    """

    redis_url: str
    namespace: str = "multilora"
    name: str = "trainer"
    model_path: str
    base_model: str = ""
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    num_slots: int = 4
    max_rank: int = 64
    artifacts: str = "runs/artifacts"
    checkpoints: str = "runs/checkpoints"
    allowed_roots: tuple[str, ...] = (".",)
    max_batch_wait_s: float = 2.0
    prompts_per_task: int = 0
    max_failures: int = 3
    keep_versions: int = 4
    block_ms: int = 1_000
    claim_idle_ms: int = 30_000
    lease_wait_s: float = 0.0
    unsafe_redis: bool = False
    metrics_port: int = 0
