"""The rollout worker's one frozen configuration, built at the edge from a file, env and flags.

Precedence, lowest to highest: field defaults < a config file (``--config worker.yaml``; JSON,
YAML or TOML by suffix) < environment variables < command-line flags. Environment variables are
``MULTILORA_ROLLOUT_<FIELD>`` (e.g. ``MULTILORA_ROLLOUT_MAX_SLOTS=4``); ``redis_url`` and
``namespace`` also fall back to the deployment-wide ``MULTILORA_REDIS_URL`` /
``MULTILORA_NAMESPACE``. In the environment, tuple fields are comma-separated and
``reward_entry_points`` is ``name=module:fn,name2=module2:fn2``.

Only :func:`rollout.worker.main` sees this record; it turns it into flat constructor arguments.
Unknown keys in a file are errors that name the key (``forbid_unknown_fields``).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from events.errors import ConfigError

ENV_PREFIX = "MULTILORA_ROLLOUT_"
SHARED_ENV = {"redis_url": "MULTILORA_REDIS_URL", "namespace": "MULTILORA_NAMESPACE"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def default_worker_name(index: int = 0) -> str:
    """``rollout.<hostname>.<index>``: stable across restarts on one host, so a restarted worker
    finds the entries it had pending (its consumer name and its control-log group)."""
    return f"rollout.{socket.gethostname()}.{index}"


class RolloutConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of one rollout worker process (``python -m rollout.worker``).

    Bus: ``redis_url``, ``namespace`` (key prefix), ``name`` (consumer name, also the worker id
    in ``adapter.synced`` and ``rollout.group``; empty = :func:`default_worker_name` of
    ``index``), ``block_ms`` (longest blocking read), ``claim_idle_ms`` (a task held this long
    by a silent worker is taken over by another), ``max_deliveries`` (then dead-lettered),
    ``lease_ttl_ms``, ``prefetch`` (tasks read ahead while one is generating; 1 keeps the load
    balanced across replicas), ``unsafe_redis`` (run against a server that can lose
    acknowledged events; throwaway use only), ``burst`` (drain the streams, then exit).

    Engine: ``backend="embedded"`` runs the model in this process from ``model_path`` on
    ``device``/``dtype`` with ``max_slots`` LoRA slots of rank ``max_rank``, keeping the newest
    ``keep_versions`` versions of each adapter (max staleness + 1); ``backend="http"`` sends
    requests to ``engine_url`` (``python -m rollout.server`` or SGLang with ``--enable-lora``),
    and ``model_path`` is then only read for the tokenizer. ``torch_threads`` > 0 caps intra-op
    threads (several CPU workers on one host).

    Data and rewards: ``allowed_roots`` are the directories dataset files may live under.
    ``reward_entry_points`` maps extra reward names to ``"module:function"`` of the operator's
    own code (imported at boot, never from an event). ``remote_rewards`` names built-in rewards
    scored on RQ ``rewards`` workers with a deadline of ``reward_timeout_s`` per batch.
    ``max_prompt_tokens``: longer prompts are not truncated; their samples come back failed.
    ``weights_cache``: where versions published to a remote store (``s3://`` ...) are copied
    (empty: a folder per worker under the system temp dir).

    ``metrics_port`` serves Prometheus metrics on that port (0: none; by convention
    ``9410 + index``, see ``docs/OBSERVABILITY.md``).
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "multilora"
    name: str = ""
    index: int = 0
    model_path: str
    device: str = "cpu"
    dtype: str = "float32"
    max_slots: int = 8
    max_rank: int = 64
    keep_versions: int = 2
    backend: Literal["embedded", "http"] = "embedded"
    engine_url: str = ""
    allowed_roots: tuple[str, ...] = ()
    reward_entry_points: dict[str, str] = msgspec.field(default_factory=dict)
    remote_rewards: tuple[str, ...] = ()
    reward_timeout_s: float = 60.0
    block_ms: int = 2_000
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    lease_ttl_ms: int = 15_000
    prefetch: int = 1
    unsafe_redis: bool = False
    max_prompt_tokens: int = 1024
    torch_threads: int = 0
    weights_cache: str = ""
    burst: bool = False
    log_level: str = "INFO"
    metrics_port: int = 0

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ConfigError("model_path is empty; pass --model with a local HF model directory")
        if self.name and not _NAME_RE.match(self.name):
            raise ConfigError(
                f"worker name {self.name!r} is invalid; use letters, digits and '_.:-' "
                "(at most 128 characters)"
            )
        positive = {
            "max_slots": self.max_slots,
            "max_rank": self.max_rank,
            "keep_versions": self.keep_versions,
            "block_ms": self.block_ms,
            "claim_idle_ms": self.claim_idle_ms,
            "max_deliveries": self.max_deliveries,
            "lease_ttl_ms": self.lease_ttl_ms,
            "prefetch": self.prefetch,
            "max_prompt_tokens": self.max_prompt_tokens,
        }
        for field, value in positive.items():
            if value < 1:
                raise ConfigError(f"{field} must be >= 1, got {value}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535 (0: none), got {self.metrics_port}")
        if self.index < 0 or self.torch_threads < 0:
            raise ConfigError(
                f"index and torch_threads must be >= 0, got {self.index}, {self.torch_threads}"
            )
        if not self.reward_timeout_s > 0:
            raise ConfigError(f"reward_timeout_s must be > 0, got {self.reward_timeout_s}")
        if self.backend == "http" and not self.engine_url:
            raise ConfigError("backend='http' needs engine_url, e.g. http://127.0.0.1:30000")
        for reward, target in self.reward_entry_points.items():
            if not _ENTRY_POINT_RE.match(target):
                raise ConfigError(
                    f"reward entry point {reward}={target!r} must look like 'package.module:fn'"
                )

    @property
    def worker_name(self) -> str:
        """The consumer name: ``name``, or :func:`default_worker_name` of ``index``."""
        return self.name or default_worker_name(self.index)

    @property
    def max_block_ms(self) -> int:
        """The longest blocking Redis read this process issues (sets the socket timeout)."""
        return max(self.block_ms, int(self.reward_timeout_s * 1000))


_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--redis-url", "redis_url", {}),
    ("--namespace", "namespace", {}),
    ("--name", "name", {}),
    ("--index", "index", {"type": int}),
    ("--model", "model_path", {"help": "local HF model directory"}),
    ("--device", "device", {}),
    ("--dtype", "dtype", {}),
    ("--max-slots", "max_slots", {"type": int}),
    ("--max-rank", "max_rank", {"type": int}),
    ("--keep-versions", "keep_versions", {"type": int}),
    ("--backend", "backend", {"choices": ("embedded", "http")}),
    ("--engine-url", "engine_url", {}),
    ("--allowed-root", "allowed_roots", {"action": "append"}),
    ("--reward", "reward_entry_points", {"action": "append", "metavar": "NAME=MODULE:FN"}),
    ("--remote-reward", "remote_rewards", {"action": "append"}),
    ("--reward-timeout-s", "reward_timeout_s", {"type": float}),
    ("--block-ms", "block_ms", {"type": int}),
    ("--claim-idle-ms", "claim_idle_ms", {"type": int}),
    ("--max-deliveries", "max_deliveries", {"type": int}),
    ("--lease-ttl-ms", "lease_ttl_ms", {"type": int}),
    ("--prefetch", "prefetch", {"type": int}),
    ("--unsafe-redis", "unsafe_redis", {"action": "store_true"}),
    ("--max-prompt-tokens", "max_prompt_tokens", {"type": int}),
    ("--torch-threads", "torch_threads", {"type": int}),
    ("--weights-cache", "weights_cache", {}),
    ("--burst", "burst", {"action": "store_true"}),
    ("--log-level", "log_level", {}),
    ("--metrics-port", "metrics_port", {"type": int, "help": "Prometheus port (0: none)"}),
)


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rollout.worker`` (unset flags are absent, not defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m rollout.worker",
        description="Rollout worker: turns rollout.task events into scored rollout.group events.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="JSON, YAML or TOML file with RolloutConfig fields")
    for flag, dest, kwargs in _FLAGS:
        p.add_argument(flag, dest=dest, **kwargs)
    return p


def _split_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{what} entry {item!r} must look like NAME=module:function")
        out[key.strip()] = value.strip()
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in RolloutConfig.__struct_fields__:
        raw = environ.get(ENV_PREFIX + field.upper())
        if raw is None and field in SHARED_ENV:
            raw = environ.get(SHARED_ENV[field])
        if raw is None:
            continue
        if field in ("allowed_roots", "remote_rewards"):
            out[field] = [x.strip() for x in raw.split(",") if x.strip()]
        elif field == "reward_entry_points":
            out[field] = _split_pairs([x for x in raw.split(",") if x.strip()], "env reward")
        else:
            out[field] = raw
    return out


def _from_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found")
    decoders = {
        ".json": msgspec.json.decode,
        ".yaml": msgspec.yaml.decode,
        ".yml": msgspec.yaml.decode,
        ".toml": msgspec.toml.decode,
    }
    decode = decoders.get(file.suffix.lower())
    if decode is None:
        raise ConfigError(f"config file {path!r}: use a .json, .yaml/.yml or .toml file")
    try:
        data = decode(file.read_bytes())
    except msgspec.DecodeError as err:
        raise ConfigError(f"config file {path!r} does not parse: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of RolloutConfig fields")
    return data


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RolloutConfig:
    """Merge file < env < flags into a validated :class:`RolloutConfig`; ``name`` is resolved.

    Raises :class:`ConfigError` naming the bad field or value.
    """
    flags = vars(parser().parse_args(argv))
    env = _from_env(os.environ if environ is None else environ)
    file_path = flags.pop("config", None)
    merged: dict[str, Any] = _from_file(file_path) if file_path else {}
    if "reward_entry_points" in flags:
        flags["reward_entry_points"] = _split_pairs(flags["reward_entry_points"], "--reward")
    merged.update(env)
    merged.update(flags)
    try:
        config = msgspec.convert(merged, RolloutConfig, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"invalid rollout worker configuration: {err}") from None
    if not config.name:
        config = msgspec.structs.replace(config, name=default_worker_name(config.index))
    return config
