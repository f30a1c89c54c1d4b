"""kill -9 of the checkpoint process, repeatedly, while the trainer publishes steps: after a
restart every due checkpoint exists once, was announced once, and nothing is left pending."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from events.codec import Decoder, encode, stamp
from events.connection import connect
from events.schema import Admitted, CheckpointSaved, ControlEvent, Exported, StepDone
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointStore, verify
from tests.checkpoint.conftest import make_spec, write_fake_version

pytestmark = pytest.mark.bus
ROOT = Path(__file__).resolve().parents[2]
STEPS, INTERVAL = 36, 3


def start(redis_url: str, namespace: str, tmp_path: Path, life: int) -> subprocess.Popen[bytes]:
    cmd = [
        *(sys.executable, "-m", "orchestrator.checkpoint"),
        *("--redis-url", redis_url, "--namespace", namespace),
        *("--artifacts-root", str(tmp_path / "artifacts")),
        *("--checkpoints-root", str(tmp_path / "checkpoints")),
        *("--block-ms", "200", "--claim-idle-ms", "1000", "--unsafe-redis"),
    ]
    log = open(tmp_path / f"checkpoint.{life}.log", "wb")  # noqa: SIM115  (owned by the child)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def trainer(redis_url: str, streams, artifacts: ArtifactStore) -> None:
    """Publishes one step every 60 ms, each after its version is durable (as the trainer does).

    Due versions are large (~8 MB) so that kills often land in the middle of a promotion.
    """
    client = connect(redis_url)
    for step in range(1, STEPS + 1):
        width = 1 << 17 if step % INTERVAL == 0 else 1 << 10
        write_fake_version(artifacts, "ad", "r1", step, width=width)
        event = StepDone(adapter="ad", registration_id="r1", epoch=1, step=step, version=step)
        client.xadd(streams.control, encode(stamp(event, source="trainer")))
        time.sleep(0.06)


def saved_events(rclient, streams) -> list:
    events = [Decoder(ControlEvent).decode(f) for _, f in rclient.xrange(streams.control)]
    return [e for e in events if isinstance(e, CheckpointSaved | Exported)]


def test_sigkill_and_restart_lose_and_duplicate_nothing(
    redis_url, streams, rclient, tmp_path
) -> None:
    rng = random.Random(3)
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    spec = make_spec(interval=INTERVAL, keep=100)
    admitted = Admitted(adapter="ad", registration_id="r1", epoch=1, slot=0, spec=spec)
    rclient.xadd(streams.control, encode(stamp(admitted, source="trainer")))
    due = list(range(INTERVAL, STEPS + 1, INTERVAL))
    publisher = threading.Thread(target=trainer, args=(redis_url, streams, artifacts))
    life = 0
    proc = start(redis_url, streams.namespace, tmp_path, life)
    publisher.start()
    kills = 0
    try:
        while publisher.is_alive() or kills < 3:
            time.sleep(rng.uniform(0.5, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            life += 1
            proc = start(redis_url, streams.namespace, tmp_path, life)
        publisher.join()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = {e.step for e in saved_events(rclient, streams)} >= set(due)
            if done and rclient.xpending(streams.control, "checkpoint")["pending"] == 0:
                break
            time.sleep(0.2)
        log = tmp_path / f"checkpoint.{life}.log"
        while b"reading" not in log.read_bytes() and time.monotonic() < deadline + 10:
            time.sleep(0.05)  # SIGTERM is warm once the handlers are installed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    events = saved_events(rclient, streams)
    counts = Counter((type(e).__name__, e.step) for e in events)
    assert sorted(s for kind, s in counts if kind == "CheckpointSaved") == due, "lost or extra"
    assert sorted(s for kind, s in counts if kind == "Exported") == due
    assert set(counts.values()) == {1}, f"duplicates: {[k for k, v in counts.items() if v > 1]}"
    ckpts = CheckpointStore(str(tmp_path / "checkpoints"))
    assert ckpts.list_steps("ad", "r1") == due
    for step in due:
        assert verify(ckpts.step_dir("ad", "r1", step)).step == step
    assert ckpts.latest("ad").manifest.step == due[-1]
    checkpoint = json.loads(rclient.hget(streams.status("ad"), "checkpoint"))
    assert checkpoint["step"] == due[-1]
    assert rclient.xpending(streams.control, "checkpoint")["pending"] == 0
    assert kills >= 3
