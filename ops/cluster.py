"""``multilora cluster``: the same process entry points, placed on a Ray cluster as Ray actors.

Ray places processes; Redis stays the bus. Each actor runs one process entry point as its child
(``python -m ops.cli trainer|rollout|checkpoint|rewards <flags>``, the command ``multilora up``
and the Procfile run) and watches it; nothing routes work through an actor, and no actor knows
another. The processes still coordinate only through events on Redis Streams::

    multilora cluster up --address auto --workers 4 --run-dir /shared/run   # on the head node
    multilora cluster scale rollout 8
    multilora cluster status [--json]
    multilora cluster down

Actors are detached and named in the Ray namespace ``multilora.<namespace>`` after their
consumer names — ``trainer``, ``checkpoint``, ``rollout.<i>``, ``rewards.<i>``, ``redis`` — so
any later ``multilora cluster`` invocation finds them by name. Resources: the trainer takes
``trainer_gpus x trainer_ranks`` GPUs in one bundle of a detached ``STRICT_PACK`` placement group
(its ranks share one node, and a restarted trainer is placed in the same bundle, on the same
node); a rollout worker takes ``rollout_gpus`` GPUs; every role takes its own CPU share and
optional custom resources (``--rollout-resources '{"node_b": 0.01}'``), which is how an operator
(or a test) pins roles to nodes.

Restarts (what restarts what; :mod:`ops.cluster_actor`): an actor whose child crashes ends its
own process, and Ray restarts the actor (``max_restarts``; -1: always), which starts the child
again with the same command line and consumer name; the process resumes through the bus's own
recovery (the dead holder's lease taken over, its pending entries redelivered, the trainer's
resume under a bumped epoch). A warm stop (exit 0) or a refusal at boot (exit 2) is not restarted.
The Redis the cluster starts (no ``--redis-url``) is the ``redis`` actor on the head node, with a
random password (the full URL is written to ``<run_dir>/redis.url``, mode 600); its AOF lives in
``<run_dir>/redis`` and a restart replays it on the same port.

This module, :mod:`ops.cluster_spec` (what each actor runs) and :mod:`ops.cluster_actor` (the
actor) import ray only inside functions: importing them, or anything on the local path
(``multilora up``), never imports ray. See docs/CLUSTER.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis

from events.bootstrap import redact
from events.config import load
from events.connection import connect
from events.errors import ConfigError
from events.lease import pid_alive
from events.streams import Streams
from ops.cluster_actor import ActorInfo, ProcessActor
from ops.cluster_spec import (
    REDIS_PASSWORD,
    SCALABLE,
    ClusterOptions,
    Deployment,
    Launch,
    launch,
    ray_namespace,
    resolve,
)
from ops.redis_server import free_port

URL_FILE = "redis.url"
"""In ``run_dir`` (mode 600): the URL, password included, of the Redis the cluster started."""
HEAD_FILE = "ray-head.json"
"""In ``run_dir``: the pid and address of the local Ray head ``up --address local`` started."""
HEAD = "node:__internal_head__"
"""The resource Ray gives the head node only (pins the Redis the cluster starts)."""


class Cluster:
    """A CLI invocation's connection to one deployment: Ray (as a driver in the deployment's Ray
    namespace) and, once known, its Redis. Every method is a step an operator could do by hand."""

    def __init__(self, options: ClusterOptions, *, start_local: bool = True) -> None:
        import ray

        self.ray = ray
        self.options = options
        self.streams = Streams(options.namespace)
        self.local_head_pid = 0
        self.address = self._ray_address(start_local)
        ray.init(
            address=self.address,
            namespace=ray_namespace(options.namespace),
            logging_level=logging.WARNING,
            log_to_driver=False,
        )

    def _ray_address(self, start_local: bool) -> str:
        if self.options.address != "local":
            return self.options.address
        record = Path(self.options.run_dir).resolve() / HEAD_FILE
        if record.exists():
            head = json.loads(record.read_text())
            if pid_alive(head["pid"]):
                self.local_head_pid = int(head["pid"])
                return str(head["address"])
        if not start_local:
            raise ConfigError(f"no local Ray head runs for {record} (start one with `cluster up`)")
        self.local_head_pid, address = start_local_head(record, self.options.ray_start_args)
        return address

    def close(self) -> None:
        self.ray.shutdown()

    # --- actors

    def names(self) -> list[str]:
        return sorted(self.ray.util.list_named_actors(all_namespaces=False))

    def actor(self, name: str) -> Any:
        return self.ray.get_actor(name)

    def start(self, o: ClusterOptions, job: Launch) -> Any:
        """Create the detached actor of ``job`` with its role's resources."""
        ray = self.ray
        gpus = {"trainer": o.trainer_gpus * o.trainer_ranks, "rollout": o.rollout_gpus}
        num_gpus = gpus.get(job.role, 0)
        cpus = 0.0 if job.role == "redis" else float(getattr(o, f"{job.role}_cpus"))
        resources = {HEAD: 0.001} if job.role == "redis" else o.resources(job.role)
        options: dict[str, Any] = {}
        if job.role == "trainer":
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # Ray warns that removing the group kills the actor: only `down` removes it, after
            logging.getLogger("ray.actor").setLevel(logging.ERROR)  # killing the actor itself
            bundle = {"CPU": cpus, "GPU": float(num_gpus), **resources}
            pg = ray.util.placement_group(
                [{k: v for k, v in bundle.items() if v}],
                strategy="STRICT_PACK",
                name="trainer",
                lifetime="detached",
            )
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, 0)
        return (
            ray.remote(ProcessActor)
            .options(
                name=job.name,
                lifetime="detached",
                max_restarts=o.max_restarts,
                max_task_retries=-1,
                max_concurrency=4,
                num_cpus=cpus,
                num_gpus=num_gpus,
                resources=resources,
                **options,
            )
            .remote(job)
        )

    def infos(self, names: Sequence[str], timeout_s: float = 5.0) -> dict[str, ActorInfo | None]:
        """Each named actor's :class:`ActorInfo`; None for one that does not answer in time
        (being placed or restarted)."""
        refs = {name: self.actor(name).info.remote() for name in names}
        ready, _ = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        done = set(ready)
        return {n: self.ray.get(r) if r in done else None for n, r in refs.items()}

    def stop(self, names: Sequence[str], timeout_s: float) -> None:
        """Warm-stop the children of ``names`` (in parallel), then kill the actors."""
        handles = {name: self.actor(name) for name in names}
        refs = [h.stop.remote(timeout_s) for h in handles.values()]
        self.ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 10)
        for handle in handles.values():
            self.ray.kill(handle, no_restart=True)

    def restarts(self) -> dict[str, int]:
        """Restart count by actor name, from Ray's state API (empty without the dashboard)."""
        from ray.util.state import list_actors
        from ray.util.state.exception import RayStateApiException, ServerUnavailable

        try:
            rows = list_actors(
                filters=[("ray_namespace", "=", ray_namespace(self.options.namespace))],
                detail=True,
                timeout=5,
                raise_on_missing_output=False,
            )
        except (ServerUnavailable, RayStateApiException, ConnectionError):
            return {}
        return {r.name: int(r.num_restarts) for r in rows if r.name and r.state != "DEAD"}

    # --- the bus

    def redis_url(self) -> tuple[str, bool]:
        """(URL, started by the cluster): the ``redis`` actor's, else the operator's."""
        if "redis" in self.names():
            info = self.infos(["redis"], timeout_s=30)["redis"]
            if info is None:
                raise ConfigError("the redis actor does not answer; see `multilora cluster status`")
            job = self.ray.get(self.actor("redis").job.remote())
            password = job.env[REDIS_PASSWORD]
            return f"redis://:{password}@{info.node_ip}:{job.args[1]}/0", True
        if not self.options.redis_url:
            raise ConfigError("this deployment has no redis actor: pass --redis-url (or REDIS_URL)")
        return self.options.redis_url, False

    def deployment(self, client: redis.Redis) -> Deployment:
        raw = client.get(self.streams.key("cluster"))
        if raw is None:
            raise ConfigError(
                f"no cluster deployment is recorded under namespace {self.options.namespace!r}; "
                "start one with `multilora cluster up`"
            )
        return msgspec.json.decode(raw, type=Deployment)


def start_local_head(record: Path, extra_args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    """``ray start --head --block`` on a free port, detached from this command; returns its pid
    (``down`` stops it) and address, both recorded in ``record``."""
    ray_cli = Path(sys.executable).with_name("ray")
    port = free_port()
    record.parent.mkdir(parents=True, exist_ok=True)
    log_path = record.with_suffix(".log")
    cmd = [str(ray_cli), "start", "--head", "--port", str(port), "--block", "--disable-usage-stats"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*cmd, *shlex.split(extra_args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while "block forever" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ConfigError(f"`ray start --head` failed; see {log_path}")
        time.sleep(0.2)
    address = f"127.0.0.1:{port}"
    record.write_text(json.dumps({"pid": proc.pid, "address": address}))
    return proc.pid, address


def stop_local_head(pid: int, record: Path, timeout_s: float = 60.0) -> None:
    """SIGTERM the ``ray start --block`` of :func:`start_local_head`: it drains and stops the
    head's processes (and only those: not ``ray stop``, which stops every cluster on the host)."""
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):  # our child if this command started it
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
    record.unlink(missing_ok=True)


def tiny_model(run_dir: Path) -> str:
    """The learnable tiny random model ``multilora up`` trains, written once under ``run_dir``."""
    path = run_dir / "tiny-model"
    if not (path / "config.json").exists():
        from ops.models import LEARNABLE_HEAD_SCALE, write_tiny_model

        write_tiny_model(path, head_scale=LEARNABLE_HEAD_SCALE)
    return str(path)


def wait_redis(url: str, timeout_s: float = 60.0) -> redis.Redis:
    client = connect(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return client
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as err:
            if time.monotonic() > deadline:
                raise ConfigError(f"Redis at {redact(url)} does not answer: {err}") from None
        time.sleep(0.2)


def wait_ready(
    cluster: Cluster, client: redis.Redis, names: Sequence[str], timeout_s: float
) -> None:
    """Wait until every process of ``names`` runs: a bus process holds its consumer name's lease
    (it is connected and reading), a rewards worker's child runs. Raises ConfigError naming a
    process refused at boot (with its log tail) or those not up in time."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        infos = cluster.infos(pending, timeout_s=2.0)
        for name, info in infos.items():
            if info is not None and info.state in ("refused", "stopped"):
                tail = _tail(info.log)
                raise ConfigError(f"{name} exited with {info.exit_code} at start:\n{tail}")
            if info is None:
                continue
            leased = lease_holder(client, cluster.streams, name) == info.child_pid
            if leased or (info.role == "rewards" and info.state == "running"):
                print(f"  {name}: running on {info.node_ip} (pid {info.child_pid})", flush=True)
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            raise ConfigError(
                f"not up after {timeout_s:.0f} s: {', '.join(pending)}; an actor that is never "
                "placed asks for resources no node has (see `ray status` and the --*-resources, "
                "--*-cpus and --*-gpus options)"
            )
        time.sleep(0.5)


def lease_holder(client: redis.Redis, streams: Streams, name: str) -> int:
    """The pid holding consumer name ``name``'s lease (0: none): the child that is reading."""
    raw = client.get(streams.lease(name))
    return int(json.loads(raw).get("pid", 0)) if raw else 0


def _tail(path: str, chars: int = 3000) -> str:
    file = Path(path)
    return file.read_text(errors="replace")[-chars:] if file.exists() else f"(no log at {path})"


def up(options: ClusterOptions) -> int:
    cluster = Cluster(options)
    try:
        if cluster.names():
            raise ConfigError(
                f"namespace {options.namespace!r} is already up on this Ray cluster "
                f"({', '.join(cluster.names())}); use `multilora cluster scale` or `down`"
            )
        run_dir = Path(options.run_dir).resolve()
        o = resolve(options, options.model or tiny_model(run_dir))
        print(f"multilora cluster up: ray {cluster.address}, namespace {o.namespace}", flush=True)
        started = not o.redis_url
        if started:
            cluster.start(o, launch(o, "redis"))
        url, _ = cluster.redis_url()
        client = wait_redis(url)
        if started:  # the operator's shell needs the password: a file only they can read
            secret = Path(o.run_dir) / URL_FILE
            secret.touch(mode=0o600)
            secret.write_text(url + "\n")
        print(f"  redis: {redact(url)}{' (started on the head)' if started else ''}", flush=True)
        record = Deployment(o, url, started, cluster.local_head_pid)
        client.set(cluster.streams.key("cluster"), msgspec.json.encode(record))
        _remove_trainer_group(cluster)
        jobs = [launch(o, "trainer", redis_url=url), launch(o, "checkpoint", redis_url=url)]
        jobs += [launch(o, "rollout", i, redis_url=url) for i in range(o.workers)]
        if o.remote_rewards:
            jobs += [launch(o, "rewards", i, redis_url=url) for i in range(o.rewards_workers)]
        for job in jobs:
            cluster.start(o, job)
        try:
            wait_ready(cluster, client, [j.name for j in jobs], o.start_timeout_s)
        except ConfigError as err:
            raise ConfigError(f"{err}\n(`multilora cluster down` stops what did start)") from None
        where = f"$(cat {Path(o.run_dir) / URL_FILE})" if started else redact(url)
        print(f"  logs: {Path(o.run_dir) / 'logs'}; export REDIS_URL={where}", flush=True)
        return 0
    finally:
        cluster.close()


def scale(options: ClusterOptions, role: str, count: int) -> int:
    """Add or remove replicas of ``role`` (highest indices go first, warm-stopped: a removed
    rollout worker finishes or leaves its task, which the others reclaim)."""
    cluster = Cluster(options, start_local=False)
    try:
        url, _ = cluster.redis_url()
        client = connect(url)
        record = cluster.deployment(client)
        o = record.options
        have = {int(n.split(".", 1)[1]) for n in cluster.names() if n.startswith(f"{role}.")}
        remove = [f"{role}.{i}" for i in sorted(have, reverse=True) if i >= count]
        add = [
            launch(o, role, i, redis_url=record.redis_url) for i in range(count) if i not in have
        ]
        if remove:
            cluster.stop(remove, o.stop_timeout_s)
            print(f"multilora cluster scale: stopped {', '.join(remove)}", flush=True)
        for job in add:
            cluster.start(o, job)
        wait_ready(cluster, client, [j.name for j in add], o.start_timeout_s)
        field = "workers" if role == "rollout" else "rewards_workers"
        record = msgspec.structs.replace(
            record, options=msgspec.structs.replace(o, **{field: count})
        )
        client.set(cluster.streams.key("cluster"), msgspec.json.encode(record))
        print(f"multilora cluster scale: {role} x {count}", flush=True)
        return 0
    finally:
        cluster.close()


def status(options: ClusterOptions) -> int:
    cluster = Cluster(options, start_local=False)
    try:
        names = cluster.names()
        infos = cluster.infos(names)
        restarts = cluster.restarts()
        try:
            url, _ = cluster.redis_url()
            client: redis.Redis | None = connect(url)
        except ConfigError:
            url, client = "", None
        leased = {n: lease_holder(client, cluster.streams, n) > 0 for n in names} if client else {}
        nodes = [
            {
                "node_id": n["NodeID"],
                "ip": n["NodeManagerAddress"],
                "alive": n["Alive"],
                "resources": n["Resources"],
            }
            for n in cluster.ray.nodes()
        ]
        actors = [
            {
                "name": name,
                **(msgspec.to_builtins(info) if info else {"state": "unresponsive"}),
                "restarts": restarts.get(name),
                "leased": leased.get(name),
            }
            for name, info in infos.items()
        ]
        report = {
            "address": cluster.address,
            "ray_namespace": ray_namespace(options.namespace),
            "redis_url": redact(url),
            "nodes": nodes,
            "actors": actors,
        }
        print(json.dumps(report, indent=2) if options.json else status_text(report))
        return 0
    finally:
        cluster.close()


def status_text(report: dict[str, Any]) -> str:
    """The ``status`` report as two tables (nodes, actors)."""
    redis_url = report["redis_url"] or "?"
    out = [f"ray {report['address']} namespace {report['ray_namespace']}; redis {redis_url}"]
    out.append(f"{'NODE':10} {'ADDRESS':16} {'STATE':6} RESOURCES")
    for n in report["nodes"]:
        res = ", ".join(
            f"{k} {v:g}"
            for k, v in sorted(n["resources"].items())
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")
        )
        state = "alive" if n["alive"] else "dead"
        out.append(f"{n['node_id'][:8]:10} {n['ip']:16} {state:6} {res}")
    out.append(
        f"{'ACTOR':14} {'STATE':12} {'NODE':10} {'PID':>8} {'CHILD':>8} {'RESTARTS':>8} LEASE"
    )
    for a in report["actors"]:
        restarts = "-" if a["restarts"] is None else str(a["restarts"])
        lease = {True: "held", False: "-", None: "?"}[a["leased"]]
        node = a.get("node_id", "")[:8]
        out.append(
            f"{a['name']:14} {a['state']:12} {node:10} {a.get('pid', 0):>8} "
            f"{a.get('child_pid', 0):>8} {restarts:>8} {lease}"
        )
    return "\n".join(out)


def down(options: ClusterOptions) -> int:
    """Warm-stop every process (SIGTERM, SIGKILL after ``stop_timeout_s``), kill the actors,
    remove the trainer's placement group, forget the deployment, stop the Redis the cluster
    started (last: SIGTERM flushes its AOF) and the local Ray head ``up`` started."""
    cluster = Cluster(options, start_local=False)
    head_pid, run_dir = cluster.local_head_pid, Path(options.run_dir).resolve()
    try:
        names = cluster.names()
        try:
            url, _ = cluster.redis_url()
        except ConfigError:
            url = ""
        client = connect(url) if url else None
        if client is not None:
            raw = client.get(cluster.streams.key("cluster"))
            if raw is not None:
                record = msgspec.json.decode(raw, type=Deployment)
                head_pid = record.local_head_pid or head_pid
                run_dir = Path(record.options.run_dir)
        processes = [n for n in names if n != "redis"]
        cluster.stop(processes, options.stop_timeout_s)
        _remove_trainer_group(cluster)
        if client is not None:
            client.delete(cluster.streams.key("cluster"))
        if "redis" in names:
            cluster.stop(["redis"], options.stop_timeout_s)
            (run_dir / URL_FILE).unlink(missing_ok=True)
        stopped = ", ".join(names) or "nothing"
        print(f"multilora cluster down: stopped {stopped} in {ray_namespace(options.namespace)}")
    finally:
        cluster.close()
    if head_pid:
        stop_local_head(head_pid, run_dir / HEAD_FILE)
        print("multilora cluster down: stopped the local Ray head")
    return 0


def _remove_trainer_group(cluster: Cluster) -> None:
    from ray.util.placement_group import get_placement_group, remove_placement_group

    with contextlib.suppress(ValueError):  # raised when there is none by that name
        remove_placement_group(get_placement_group("trainer"))


USAGE = """usage: multilora cluster up [flags]             start every process as a Ray actor
       multilora cluster scale rollout|rewards N  add or remove replicas
       multilora cluster status [--json]          actors, nodes, state
       multilora cluster down                     stop everything cleanly
(`multilora cluster up --help` lists the flags; every command takes --address and --namespace)"""


def main(argv: Sequence[str]) -> int:
    """``multilora cluster ...``; raises ConfigError (the CLI prints it) on a bad request."""
    argv = list(argv)
    commands: dict[str, Callable[[ClusterOptions], int]] = {
        "up": up,
        "status": status,
        "down": down,
    }
    action = argv[0] if argv else ""
    if action not in (*commands, "scale"):
        print(USAGE, file=sys.stderr if action not in ("-h", "--help") else sys.stdout)
        return 0 if action in ("-h", "--help") else 2
    rest = argv[1:]
    role, count = "", 0
    if action == "scale":
        if len(rest) < 2 or rest[0] not in SCALABLE or not rest[1].isdigit():
            raise ConfigError(f"scale takes ROLE N with ROLE one of {', '.join(SCALABLE)}: {rest}")
        role, count, rest = rest[0], int(rest[1]), rest[2:]
    options = load(
        ClusterOptions,
        role="cluster",
        argv=rest,
        prog=f"multilora cluster {action}",
        description="The process entry points as Ray actors (docs/CLUSTER.md).",
    )
    if action == "scale":
        return scale(options, role, count)
    return commands[action](options)
