"""The rollout worker's one frozen config: the shared bus config plus the worker's own fields.

Loaded like every process's (:func:`events.config.load`): field defaults < a config file
(``--config worker.yaml``) < ``MULTILORA_ROLLOUT_<FIELD>``, else ``MULTILORA_<FIELD>`` (and
``REDIS_URL``) < command-line flags. In the environment, tuples are comma-separated and
``reward_entry_points`` is ``name=module:fn,name2=module2:fn2``.

Only :func:`rollout.main.main` sees this record; it turns it into flat constructor arguments.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import msgspec

from events.config import BusConfig, Positive, load
from events.errors import ConfigError

Decoder = Literal["auto", "hf", "static", "static-eager"]
"""How the embedded engine decodes after the prefill: ``hf`` the eager Hugging Face loop (exact
on CPU), ``static`` :mod:`rollout.graph_decode` with CUDA graphs (eagerly off CUDA),
``static-eager`` the same without graphs; ``auto``: ``static`` on CUDA for a model it supports,
else ``hf``."""

EntryPoint = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]
"""``package.module:function`` of the operator's own code."""


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


def default_worker_name(index: int = 0) -> str:
    """``rollout.<hostname>.<index>``: stable across restarts on one host, so a restarted worker
    finds the entries it had pending (its consumer name and its control-log group)."""
    return f"rollout.{socket.gethostname()}.{index}"


class RolloutConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of one rollout worker process (``multilora rollout``).

    Bus (``bus``): the consumer name is also the worker id in ``adapter.synced`` and
    ``rollout.group`` (empty: :func:`default_worker_name` of ``index``); ``bus.claim_idle_ms``
    is how long a task held by a silent worker waits before another takes it over. ``prefetch``
    is how many tasks are read ahead while a batch generates (1 keeps the load balanced across
    replicas); ``batch_tasks`` how many tasks, of any adapters, one engine batch may take (the
    tasks waiting when the engine is free, up to this many: see :mod:`rollout.worker`).

    Engine: ``backend="embedded"`` runs the model in this process from ``model_path`` on
    ``device``/``dtype`` with ``max_slots`` LoRA slots of rank ``max_rank``, keeping the newest
    ``keep_versions`` versions of each adapter (max staleness + 1); ``backend="http"`` sends
    requests to ``engine_url`` (``python -m rollout.server`` or SGLang with ``--enable-lora``),
    and ``model_path`` is then only read for the tokenizer. ``torch_threads`` > 0 caps intra-op
    threads (several CPU workers on one host).

    Data and rewards: ``allowed_roots`` are the directories dataset files may live under.
    ``reward_entry_points`` maps extra reward names to ``"module:function"`` of the operator's
    own code (imported at boot, never from an event). ``remote_rewards`` names built-in rewards
    scored on RQ ``rewards`` workers with a deadline of ``reward_timeout_s`` per batch; every
    other reward call runs in-process with a deadline of ``reward_call_timeout_s`` per call (a
    call past it fails its sample, see :class:`rollout.rewards.RewardDeadline`).
    ``max_prompt_tokens``: longer prompts are not truncated; their samples come back failed.
    ``max_batch_rows``: a batch of more rows decodes in turns of this many (the KV cache of one
    turn must fit the device: raise it for small models and short sequences).
    ``decoder``: the embedded engine's decode loop (:mod:`rollout.graph_decode`): ``auto``
    takes the static CUDA-graph decoder on CUDA for the model families it covers and the HF
    eager loop otherwise; ``hf`` forces the eager loop off the fast path. ``static_cache_gb``
    caps the K/V buffers the static decoder keeps between batches (0: half the device memory
    free at start).
    ``weights_cache``: where versions published to a remote store (``s3://`` ...) are copied
    (empty: a folder per worker under the system temp dir).
    """

    bus: BusConfig = BusConfig()
    index: Annotated[int, msgspec.Meta(ge=0, description="replica index on this host")] = 0
    model_path: Annotated[str, _doc("local Hugging Face model directory", "--model")]
    device: Annotated[str, _doc("torch device")] = "cpu"
    dtype: Annotated[str, _doc("model dtype")] = "float32"
    max_slots: Annotated[Positive, _doc("LoRA slots in the engine")] = 8
    max_rank: Annotated[Positive, _doc("largest LoRA rank a slot holds")] = 64
    keep_versions: Annotated[Positive, _doc("versions kept per adapter")] = 2
    backend: Annotated[Literal["embedded", "http"], _doc("generation backend")] = "embedded"
    engine_url: Annotated[str, _doc("SGLang-compatible server (backend=http)")] = ""
    allowed_roots: Annotated[
        tuple[str, ...], _doc("directories dataset files may live under", "--allowed-root")
    ] = ()
    reward_entry_points: Annotated[
        dict[str, EntryPoint], _doc("extra reward NAME=module:function", "--reward")
    ] = msgspec.field(default_factory=dict)
    remote_rewards: Annotated[
        tuple[str, ...], _doc("rewards scored on RQ workers", "--remote-reward")
    ] = ()
    reward_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="deadline of a remote reward batch, s")
    ] = 60.0
    reward_call_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="deadline of one in-process reward call, s")
    ] = 5.0
    prefetch: Annotated[Positive, _doc("tasks read ahead")] = 1
    batch_tasks: Annotated[
        Positive, _doc("tasks generated together in one mixed batch (1: one at a time)")
    ] = 8
    max_prompt_tokens: Annotated[Positive, _doc("longer prompts fail their samples")] = 1024
    max_batch_rows: Annotated[
        Positive, _doc("rows the embedded engine decodes at once (more run in turns)")
    ] = 256
    torch_threads: Annotated[
        int, msgspec.Meta(ge=0, description="intra-op threads (0: torch's default)")
    ] = 0
    weights_cache: Annotated[str, _doc("local copy of remote versions")] = ""
    decoder: Annotated[
        Decoder, _doc("embedded decode loop (auto: CUDA-graph static on CUDA, HF eager otherwise)")
    ] = "auto"
    static_cache_gb: Annotated[
        float,
        msgspec.Meta(ge=0, description="most GB the static decoder keeps cached (0: half free)"),
    ] = 0.0

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ConfigError("model_path is empty; pass --model with a local HF model directory")
        if self.backend == "http" and not self.engine_url:
            raise ConfigError("backend='http' needs engine_url, e.g. http://127.0.0.1:30000")

    @property
    def worker_name(self) -> str:
        """The consumer name: ``bus.name``, or :func:`default_worker_name` of ``index``."""
        return self.bus.name or default_worker_name(self.index)

    @property
    def max_block_ms(self) -> int:
        """The longest blocking Redis read this process issues (sets the socket timeout)."""
        return max(self.bus.block_ms, int(self.reward_timeout_s * 1000))


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RolloutConfig:
    """File < env < flags into a validated :class:`RolloutConfig`, the worker name resolved.

    Raises :class:`ConfigError` naming the bad field or value.
    """
    config = load(
        RolloutConfig,
        role="rollout",
        argv=argv,
        environ=environ,
        prog="multilora rollout",
        description="Rollout worker: turns rollout.task events into scored rollout.group events.",
    )
    bus = msgspec.structs.replace(config.bus, name=config.worker_name)
    return msgspec.structs.replace(config, bus=bus)
