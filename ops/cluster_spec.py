"""What each ``multilora cluster`` actor runs: the options, and one :class:`Launch` per process.

Pure functions of :class:`ClusterOptions` (no ray): :func:`launch` builds the command line of
``trainer``, ``checkpoint``, ``rollout.<i>``, ``rewards.<i>`` and ``redis`` the same way every
time, so ``up`` and a later ``scale`` (from the :class:`Deployment` kept on the bus) start the
same processes. Every process gets its consumer name (``--name``, also its actor's name), the
namespace, and ``--lease-wait-s`` long enough to outwait a dead predecessor's lease on another
host; the Redis URL travels in the child's environment (``MULTILORA_REDIS_URL``), not on its
command line, so a password never shows in ``ps``.
"""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path
from typing import Annotated

import msgspec

from events.config import DEFAULT_NAMESPACE, Namespace, NonNegative, Port, Positive
from events.errors import ConfigError
from ops.redis_server import free_port

ROLES = ("trainer", "checkpoint", "rollout", "rewards", "redis")
SCALABLE = ("rollout", "rewards")
LEASE_WAIT_S = 20.0
"""A restarted process waits this long for its dead predecessor's lease (TTL 15 s) when it lands
on another host; on the same host the dead holder's lease is taken over at once."""
REDIS_PASSWORD = "MULTILORA_CLUSTER_REDIS_PASSWORD"
"""The Redis the cluster starts takes a random password, kept in its actor's launch record."""


def _doc(text: str, *flags: str) -> msgspec.Meta:
    return msgspec.Meta(description=text, extra={"flags": flags} if flags else {})


Cpus = Annotated[float, msgspec.Meta(ge=0)]
Gpus = Annotated[int, msgspec.Meta(ge=0, le=1)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class ClusterOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``multilora cluster`` starts (loaded like every process config: file < env < flags).

    ``address``: a Ray cluster address (``auto``: the one started on this machine with ``ray
    start``), or ``local`` to start a head here (``ray start --head --block`` plus
    ``ray_start_args``; ``down`` stops it). ``redis_url`` (or ``REDIS_URL``): an operator's Redis;
    empty, the ``redis`` actor starts one on the head node on ``redis_port`` (0: a port free on
    the machine running ``up``, which should be the head). ``run_dir`` is a path every node
    reaches (a shared file system): logs, the tiny model, the started Redis's AOF, and by default
    ``artifacts`` and ``checkpoints``, which may instead be fsspec URLs. ``allowed_roots``
    (default ``run_dir``) are the dataset roots of trainer and workers alike; children run in
    ``run_dir``. ``<role>_args`` are extra flags appended to a role's command line (``shlex``
    syntax), ``env`` extra environment of every child. ``remote_rewards`` are scored by
    ``rewards_workers`` RQ workers (none without it).
    """

    address: Annotated[str, _doc("Ray address, 'auto', or 'local' (start a head here)")] = "auto"
    redis_url: Annotated[str, _doc("an operator's Redis (empty: start one on the head)")] = ""
    redis_port: Annotated[Port, _doc("port of the Redis started on the head (0: free)")] = 0
    namespace: Annotated[Namespace, _doc("key prefix of the deployment")] = DEFAULT_NAMESPACE
    run_dir: Annotated[str, _doc("shared path: logs, model, Redis data, stores")] = "runs/cluster"
    artifacts: Annotated[str, _doc("version store (default run_dir/artifacts)")] = ""
    checkpoints: Annotated[str, _doc("checkpoint store (default run_dir/checkpoints)")] = ""
    model: Annotated[str, _doc("HF model dir every node reaches (empty: a tiny one)")] = ""
    allowed_roots: Annotated[
        tuple[str, ...], _doc("dataset roots (default run_dir)", "--allowed-root")
    ] = ()
    workers: Annotated[Count, _doc("rollout workers")] = 1
    num_slots: Annotated[Positive, _doc("trainer slots")] = 4
    max_rank: Annotated[Positive, _doc("largest LoRA rank")] = 64
    max_batch_wait_s: Annotated[NonNegative, _doc("the trainer's wait to share a step")] = 2.0
    torch_threads: Annotated[Count, _doc("intra-op threads per process (0: default)")] = 0
    trainer_ranks: Annotated[Positive, _doc("trainer ranks (data parallel, one node)")] = 1
    trainer_gpus: Annotated[Gpus, _doc("GPUs per trainer rank (0: CPU)")] = 0
    rollout_gpus: Annotated[Gpus, _doc("GPUs per rollout worker (0: CPU)")] = 0
    trainer_cpus: Annotated[Cpus, _doc("CPUs reserved for the trainer")] = 1.0
    rollout_cpus: Annotated[Cpus, _doc("CPUs reserved per rollout worker")] = 1.0
    checkpoint_cpus: Annotated[Cpus, _doc("CPUs reserved for the checkpointer")] = 0.5
    rewards_cpus: Annotated[Cpus, _doc("CPUs reserved per rewards worker")] = 0.5
    trainer_resources: Annotated[str, _doc("custom Ray resources, JSON")] = ""
    rollout_resources: Annotated[str, _doc("custom Ray resources, JSON")] = ""
    checkpoint_resources: Annotated[str, _doc("custom Ray resources, JSON")] = ""
    rewards_resources: Annotated[str, _doc("custom Ray resources, JSON")] = ""
    remote_rewards: Annotated[
        tuple[str, ...], _doc("rewards scored on RQ workers", "--remote-reward")
    ] = ()
    rewards_workers: Annotated[Count, _doc("RQ rewards workers (with remote rewards)")] = 1
    trainer_args: Annotated[str, _doc("extra trainer flags")] = ""
    rollout_args: Annotated[str, _doc("extra rollout worker flags")] = ""
    checkpoint_args: Annotated[str, _doc("extra checkpointer flags")] = ""
    rewards_args: Annotated[str, _doc("extra rewards worker flags")] = ""
    env: Annotated[dict[str, str], _doc("extra child environment NAME=VALUE")] = msgspec.field(
        default_factory=dict
    )
    metrics_port_base: Annotated[Port, _doc("trainer /metrics port (0: off)")] = 0
    max_restarts: Annotated[int, msgspec.Meta(ge=-1, description="per actor (-1: no bound)")] = -1
    stop_timeout_s: Annotated[NonNegative, _doc("warm-stop wait before SIGKILL, s")] = 30.0
    start_timeout_s: Annotated[NonNegative, _doc("wait for every process's lease, s")] = 300.0
    ray_start_args: Annotated[str, _doc("extra `ray start` flags (address=local)")] = ""
    json: Annotated[bool, _doc("status: print JSON")] = False

    def __post_init__(self) -> None:
        for role in ("trainer", "rollout", "checkpoint", "rewards"):
            self.resources(role)

    def resources(self, role: str) -> dict[str, float]:
        """The custom resources of ``role`` (``--<role>-resources '{"node_b": 0.01}'``)."""
        raw = getattr(self, f"{role}_resources", "")
        try:
            return msgspec.json.decode(raw, type=dict[str, float]) if raw else {}
        except msgspec.DecodeError as err:
            raise ConfigError(
                f"--{role}-resources {raw!r} is not a JSON object of numbers ({err}); "
                """write it like '{"node_b": 0.01}'"""
            ) from None


class Launch(msgspec.Struct, frozen=True):
    """One process an actor runs: its consumer (and actor) name, its role, its flags after
    ``ops.cli <role>`` (for ``redis``: the data dir and port), extra environment, log file, cwd."""

    name: str
    role: str
    args: tuple[str, ...]
    env: dict[str, str]
    log: str
    cwd: str


class Deployment(msgspec.Struct, frozen=True):
    """What ``up`` started, kept on the bus (``<ns>:cluster``) for ``scale``/``status``/``down``:
    the resolved options, the Redis URL, whether the cluster started that Redis and a local Ray
    head (its pid)."""

    options: ClusterOptions
    redis_url: str
    started_redis: bool
    local_head_pid: int = 0


def resolve(options: ClusterOptions, model: str) -> ClusterOptions:
    """Options with absolute paths (children run on other nodes, in ``run_dir``) and a model."""
    run_dir = Path(options.run_dir).resolve()

    def store(value: str, default: str) -> str:
        return value if "://" in value else str(Path(value or run_dir / default).resolve())

    return msgspec.structs.replace(
        options,
        run_dir=str(run_dir),
        artifacts=store(options.artifacts, "artifacts"),
        checkpoints=store(options.checkpoints, "checkpoints"),
        model=model,
        allowed_roots=tuple(str(Path(r).resolve()) for r in options.allowed_roots)
        or (str(run_dir),),
    )


def launch(o: ClusterOptions, role: str, index: int = 0, *, redis_url: str = "") -> Launch:
    """The process of ``role`` (replica ``index``) of the resolved options ``o``."""
    name = f"{role}.{index}" if role in SCALABLE else role
    run_dir = Path(o.run_dir)
    if role == "redis":  # reachable from every node, so a password (never on a command line)
        port = o.redis_port or free_port()
        env = {REDIS_PASSWORD: secrets.token_hex(16)}
        return Launch(
            name, role, (str(run_dir / "redis"), str(port)), env, _log(o, name), o.run_dir
        )
    env = {"MULTILORA_REDIS_URL": redis_url, **o.env}  # in the environment: no password in ps
    if o.torch_threads:
        env["OMP_NUM_THREADS"] = str(o.torch_threads)
    args = ["--namespace", o.namespace, "--name", name, "--lease-wait-s", str(LEASE_WAIT_S)]
    roots = [a for r in o.allowed_roots for a in ("--allowed-root", r)]
    threads = ["--torch-threads", str(o.torch_threads)] if o.torch_threads else []
    stores = ["--artifacts", o.artifacts, "--checkpoints", o.checkpoints]
    metrics = {"trainer": 0, "checkpoint": 1, "rollout": 10 + index}.get(role)
    if o.metrics_port_base and metrics is not None:
        args += ["--metrics-port", str(o.metrics_port_base + metrics)]
    if role == "trainer":
        args += ["--model", o.model, "--num-slots", str(o.num_slots), "--max-rank", str(o.max_rank)]
        args += [*stores, *roots, *threads, "--max-batch-wait-s", str(o.max_batch_wait_s)]
        args += ["--device", "cuda"] if o.trainer_gpus else []
        args += ["--ranks", str(o.trainer_ranks)] if o.trainer_ranks > 1 else []
    elif role == "rollout":
        args += ["--model", o.model, "--index", str(index), "--max-rank", str(o.max_rank)]
        args += ["--max-slots", str(2 * o.num_slots), *roots, *threads]
        args += [a for r in o.remote_rewards for a in ("--remote-reward", r)]
        args += ["--device", "cuda"] if o.rollout_gpus else []
    elif role == "checkpoint":
        args += stores
    elif role == "rewards":
        if not o.remote_rewards:
            raise ConfigError("rewards workers serve --remote-reward NAME; none was given")
        args += [a for r in o.remote_rewards for a in ("--reward", r)]
    else:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    args += shlex.split(getattr(o, f"{role}_args"))
    return Launch(name, role, tuple(args), env, _log(o, name), o.run_dir)


def _log(o: ClusterOptions, name: str) -> str:
    return str(Path(o.run_dir) / "logs" / f"{name}.log")


def ray_namespace(namespace: str) -> str:
    return f"multilora.{namespace}"
