"""The supervisor of ``multilora up`` on real child processes (small Python scripts that exit,
crash or ignore signals) and a real Redis server: restart with back-off, the reset after a
healthy run, the give-up rules, warm stop in tiers, no restart after stop, and the records
(Prometheus counter, Redis hash) that ``status`` reads."""

from __future__ import annotations

import io
import signal
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from events.connection import connect
from events.streams import Streams
from ops.redis_server import RedisServer
from ops.supervise import (
    ChildProcess,
    RedisRecorder,
    RedisUnit,
    RestartCounter,
    RestartPolicy,
    Supervisor,
    SupervisorError,
    UnitRecord,
    read_supervisor,
)

READY = "import signal, sys, time; print('ready', flush=True); "


class Notes:
    """An observer keeping every change with the monotonic time it was seen."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, UnitRecord, bool]] = []

    def changed(self, record: UnitRecord, *, restarted: bool) -> None:
        self.seen.append((time.monotonic(), record, restarted))

    def restarts(self) -> list[float]:
        return [t for t, _, restarted in self.seen if restarted]

    def scheduled(self) -> list[float]:
        return [t for t, r, restarted in self.seen if r.state == "restarting" and not restarted]


def child(tmp_path: Path, name: str, code: str) -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def back(sup: Supervisor, name: str, restarts: int) -> bool:
    record = sup.record(name)
    return record.state == "running" and record.restarts == restarts


def poll_until(sup: Supervisor, done, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        sup.poll()
        time.sleep(0.01)


def wait_log(path: Path, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never reached {path}"
        time.sleep(0.02)


def test_a_crashing_child_is_restarted_with_doubling_back_off_and_each_restart_logged(
    tmp_path: Path,
) -> None:
    policy = RestartPolicy(initial_delay_s=0.2, max_delay_s=0.8, max_restarts=10, window_s=60)
    notes, registry, out = Notes(), CollectorRegistry(), io.StringIO()
    sup = Supervisor(policy, observers=[notes, RestartCounter(registry, ["crash"])], out=out)
    unit = child(tmp_path, "crash", "import sys; print('boom', flush=True); sys.exit(3)")
    first = sup.add(unit)
    poll_until(sup, lambda: len(notes.restarts()) == 4)
    waits = [r - s for s, r in zip(notes.scheduled(), notes.restarts(), strict=False)]
    for waited, expected in zip(waits, (0.2, 0.4, 0.8, 0.8), strict=True):
        assert expected <= waited < expected + 0.4, waits
    assert sup.processes["crash"].pid != first.pid
    assert registry.get_sample_value("multilora_up_restarts_total", {"process": "crash"}) == 4
    text = unit.log_path.read_text()
    assert "boom" in text and "[supervisor]" in text
    assert "crash exit code 3" in text and "restart 1 in 0.2 s" in text
    assert "restart 3 in 0.8 s" in text and "restarted (attempt 4" in text
    assert "restart 1 in 0.2 s" in out.getvalue()
    assert sup.record("crash").restarts == 4
    sup.stop(timeout_s=5)


def test_a_child_that_stayed_up_restarts_with_the_initial_delay_again(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_delay_s=0.1, max_delay_s=5, reset_after_s=0.3, window_s=60)
    notes = Notes()
    sup = Supervisor(policy, observers=[notes], out=io.StringIO())
    unit = child(tmp_path, "slow", "import time, sys; time.sleep(0.5); sys.exit(1)")
    sup.add(unit)
    poll_until(sup, lambda: len(notes.restarts()) == 3)
    text = unit.log_path.read_text()
    assert text.count("in 0.1 s") == 3 and "in 0.2 s" not in text, text
    sup.stop(timeout_s=5)


def test_a_crash_loop_is_given_up_with_its_name_and_log_tail(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_delay_s=0.05, max_restarts=2, window_s=60)
    notes = Notes()
    sup = Supervisor(policy, observers=[notes], out=io.StringIO())
    sup.add(child(tmp_path, "loop", "import sys; print('kaput', flush=True); sys.exit(1)"))
    with pytest.raises(SupervisorError, match=r"(?s)process loop exit code 1.*2 restarts.*kaput"):
        poll_until(sup, lambda: False)
    assert len(notes.restarts()) == 2
    assert sup.record("loop").state == "gave_up"
    sup.poll()  # given up: not restarted, not raised again
    assert len(notes.restarts()) == 2
    sup.stop(timeout_s=5)


def test_a_refused_configuration_is_given_up_at_once_and_zero_restarts_means_none(
    tmp_path: Path,
) -> None:
    sup = Supervisor(RestartPolicy(), out=io.StringIO())
    sup.add(child(tmp_path, "bad", "import sys; print('error: bad flag'); sys.exit(2)"))
    with pytest.raises(SupervisorError, match=r"(?s)exit code 2 means.*error: bad flag"):
        poll_until(sup, lambda: False)
    assert sup.record("bad").restarts == 0
    never = Supervisor(RestartPolicy(max_restarts=0), out=io.StringIO())
    never.add(child(tmp_path, "once", "import sys; sys.exit(0)"))
    with pytest.raises(SupervisorError, match="once exit code 0"):
        poll_until(never, lambda: False)
    assert never.record("once").restarts == 0


def test_stop_is_warm_in_tiers_then_kills_and_never_restarts(tmp_path: Path) -> None:
    notes = Notes()
    sup = Supervisor(RestartPolicy(initial_delay_s=0.01), observers=[notes], out=io.StringIO())
    stamp = tmp_path / "order.txt"
    warm = child(
        tmp_path,
        "warm",
        READY + "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), "
        f"open({str(stamp)!r}, 'a').write('warm\\n'), sys.exit(0))); time.sleep(60)",
    )
    base = child(
        tmp_path,
        "base",
        READY + "signal.signal(signal.SIGTERM, lambda *a: ("
        f"open({str(stamp)!r}, 'a').write('base\\n'), sys.exit(0))); time.sleep(60)",
    )
    stubborn = child(
        tmp_path,
        "stubborn",
        READY + "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
    )
    sup.add(base, tier=0)
    sup.add(warm)
    sup.add(stubborn)
    for unit in (base, warm, stubborn):
        wait_log(unit.log_path, "ready")
    pids = {name: p.pid for name, p in sup.processes.items()}
    t0 = time.monotonic()
    sup.stop(timeout_s=1.5)
    assert time.monotonic() - t0 < 5
    assert stamp.read_text().split() == ["warm", "base"], "tier 0 stopped before tier 1"
    assert sup.processes["warm"].returncode == 0
    assert sup.processes["stubborn"].returncode == -signal.SIGKILL
    sup.poll()
    time.sleep(0.1)
    sup.poll()
    assert {name: p.pid for name, p in sup.processes.items()} == pids
    assert not notes.restarts()
    assert {r.state for r in sup.records()} == {"stopped"}


def test_the_embedded_redis_is_restarted_on_its_port_and_records_reach_it(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = connect(server.url)
        streams = Streams("sup")
        recorder = RedisRecorder(client, streams)
        recorder.reset()
        sup = Supervisor(
            RestartPolicy(initial_delay_s=0.05), observers=[recorder], out=io.StringIO()
        )
        assert server.process is not None
        sup.add(RedisUnit(server), tier=0, process=server.process)
        client.set("kept", "1")
        server.process.send_signal(signal.SIGKILL)  # a crash: the supervisor must notice
        server.process.wait()
        poll_until(sup, lambda: back(sup, "redis", 1))
        recorder.flush()
        assert client.get("kept") == b"1", "the AOF did not replay on the same port"
        (record,) = read_supervisor(client, streams).values()
        assert record.process == "redis" and record.restarts == 1
        assert record.last_exit == "signal SIGKILL" and record.pid == server.process.pid
        assert "[supervisor]" in (tmp_path / "redis" / "server.log").read_text()
        # while Redis is down, records wait in memory and are written once it is back
        server.kill()
        recorder.changed(UnitRecord(process="trainer", state="running", restarts=7), restarted=True)
        assert "trainer" in recorder.pending
        poll_until(
            sup,
            lambda: sup.record("redis").restarts == 2 and sup.record("redis").state == "running",
        )
        recorder.flush()
        assert not recorder.pending
        assert read_supervisor(client, streams)["trainer"].restarts == 7
        sup.stop(timeout_s=10)
        assert server.process is not None and server.process.returncode == 0, "not a warm stop"
    finally:
        server.close()
