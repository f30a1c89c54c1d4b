"""``multilora gateway`` as a process: the ready line, a warm stop on SIGTERM, exit codes."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest

from events.streams import Streams

pytestmark = pytest.mark.bus


def test_the_process_serves_until_sigterm(redis_url: str, streams: Streams) -> None:
    argv = [
        sys.executable,
        "-m",
        "ops.cli",
        "gateway",
        "--redis-url",
        redis_url,
        "--namespace",
        streams.namespace,
        "--base-model",
        "tiny",
        "--port",
        "0",
        "--api-key",
        "tml-k=alice",
        "--sweep-interval-s",
        "0.2",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = re.search(r"gateway gateway ready: .* serving (http://\S+) for tiny", line)
            if match:
                break
        else:
            pytest.fail("no ready line")
        url = match.group(1)
        assert httpx.get(url + "/api/v1/healthz").json() == {"status": "ok"}
        session = httpx.post(
            url + "/api/v1/create_session", json={}, headers={"X-API-Key": "tml-k"}
        )
        assert session.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_bad_configuration_exits_2(redis_url: str) -> None:
    argv = [sys.executable, "-m", "ops.cli", "gateway", "--redis-url", redis_url, "--port", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "base_model is empty; pass --base-model" in done.stderr
