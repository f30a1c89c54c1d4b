"""A two-node Ray cluster simulated on one machine, and the ``multilora cluster`` command line.

Two ``ray start`` processes share the host: a head with the custom resource ``node_a`` and a
second node with ``node_b`` (2 CPUs each, no dashboard), so a test pins roles to "nodes" with
``--<role>-resources '{"node_b": 0.01}'``. Teardown runs ``multilora cluster down`` and then
``ray stop --force`` (which stops every Ray process on the host: these tests own the host's Ray).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ops.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
NEEDS_RAY = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: the cluster tests need `pip install 'multilora[cluster]'`",
)


def cluster_env() -> dict[str, str]:
    """The commands' environment: no operator Redis, Ray without token auth, 1 thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTILORA_")}
    env.pop("REDIS_URL", None)
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    return env


@pytest.fixture
def ray_nodes() -> Iterator[str]:
    """The address of a started two-node Ray cluster (``node_a`` head, ``node_b`` worker)."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    env = cluster_env()
    head = ["--head", "--port", str(port), "--include-dashboard=false"]
    nodes = [
        [*head, *common, "--resources", json.dumps({"node_a": 1})],
        ["--address", address, *common, "--resources", json.dumps({"node_b": 1})],
    ]
    try:
        for flags in nodes:
            start = [str(RAY), "start", *flags]
            done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{' '.join(start)}:\n{done.stdout}{done.stderr}"
        yield address
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def cluster_cli(ray_nodes: str) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``cli(*args)``: run ``multilora cluster ARGS --address <the test cluster>``; fails the
    test with its output when it exits non-zero. Every namespace used is brought down at the end."""
    namespaces: list[str] = []

    def cli(
        *args: str, check: bool = True, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ops.cli", "cluster", *args, "--address", ray_nodes]
        if args[0] == "up" and "--namespace" in args:
            namespaces.append(args[args.index("--namespace") + 1])
        done = subprocess.run(
            command, cwd=ROOT, env=cluster_env(), capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            output = done.stdout + done.stderr
            raise AssertionError(f"cluster {args[0]} exited {done.returncode}:\n{output}")
        return done

    yield cli
    for namespace in namespaces:
        cli("down", "--namespace", namespace, check=False, timeout=120)
