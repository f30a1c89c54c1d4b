"""Every process of the Procfile honours ``REDIS_URL``: started as written, against a server on a
non-default port, each one registers there (a consumer lease, or an RQ worker entry)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from events.connection import connect
from events.streams import Streams
from ops.models import write_tiny_model
from ops.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.bus, pytest.mark.slow]


def procfile_commands() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    pairs = (line.split(":", 1) for line in lines if line and not line.startswith("#"))
    return {name.strip(): command.strip() for name, command in pairs}


def test_procfile_processes_connect_where_redis_url_points(tmp_path: Path) -> None:
    commands = procfile_commands()
    assert set(commands) == {"redis", "trainer", "rollout", "checkpoint", "rewards", "gateway"}
    model = write_tiny_model(tmp_path / "model")
    streams = Streams()  # the Procfile's processes use the default namespace
    with RedisServer(tmp_path / "redis") as server:
        assert not server.url.endswith(":6379/0")
        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "MODEL": str(model),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
        }
        # metrics ports (and the gateway's port) as written would collide with a stack running
        # on this host; the gateway holds no lease: it is checked by staying up (a gateway that
        # cannot reach its Redis at boot exits 2)
        procs = {
            name: subprocess.Popen(
                ["bash", "-c", re.sub(r"--(metrics-)?port \d+", r"--\1port 0", command)],
                cwd=tmp_path,
                env=env,
                stdout=(tmp_path / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for name, command in commands.items()
            if name != "redis"
        }
        client = connect(server.url)
        expected = {"trainer", "checkpoint"}
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                leases = {k.decode().split(":", 2)[2] for k in client.keys(streams.lease("*"))}
                workers = client.smembers("rq:workers")
                if expected <= leases and any(n.startswith("rollout.") for n in leases) and workers:
                    break
                for name, proc in procs.items():
                    log = (tmp_path / f"{name}.log").read_text(errors="replace")[-2000:]
                    assert proc.poll() is None, f"{name} exited: {shlex.quote(log)}"
                time.sleep(0.5)
            else:
                pytest.fail(f"not every process registered on {server.url}: leases {leases}")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
