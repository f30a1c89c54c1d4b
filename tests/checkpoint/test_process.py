"""The checkpoint process on a real Redis: promotion at the interval and at completion, events
and status once, idempotent redelivery, fencing, dead letters, policy recovery, configuration."""

from __future__ import annotations

import json

import msgspec
import pytest

from events.codec import Decoder, encode, stamp
from events.config import BusConfig
from events.connection import connect
from events.consumer import Consumer, Delivery
from events.errors import ConfigError
from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    ControlEvent,
    DeregisterRequested,
    Exported,
    Retired,
    StepDone,
)
from ops.redis_server import RedisServer
from orchestrator.checkpoint import CheckpointConfig, CheckpointProcess, load_config, main
from orchestrator.checkpoint_store import CheckpointStore, verify
from orchestrator.lifecycle import AdapterState, Phase
from orchestrator.status import read_status
from tests.checkpoint.conftest import make_spec, write_fake_version

pytestmark = pytest.mark.bus


@pytest.fixture
def ckpts(tmp_path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "checkpoints"))


def publish(rclient, streams, *events) -> None:
    for event in events:
        rclient.xadd(streams.control, encode(stamp(event, source="trainer")))


def run(redis_url, streams, artifacts, ckpts, **kw):
    process = CheckpointProcess(connect(redis_url), streams, artifacts, ckpts)
    max_events = kw.pop("max_events", None)
    kw.setdefault("block_ms", 200)
    consumer = Consumer(
        lambda: connect(redis_url),
        streams,
        "checkpoint",
        [process.subscription()],
        process.handle,
        **kw,
    )
    return consumer.run(burst=max_events is None, max_events=max_events)


def outputs(rclient, streams, kind):
    events = [Decoder(ControlEvent).decode(f) for _, f in rclient.xrange(streams.control)]
    return [e for e in events if isinstance(e, kind)]


def admitted(spec, *, epoch: int = 1, reg: str = "r1") -> Admitted:
    return Admitted(adapter="ad", registration_id=reg, epoch=epoch, slot=0, spec=spec)


def step_done(step: int, *, epoch: int = 1, reg: str = "r1", state_uri: str = "") -> StepDone:
    return StepDone(
        adapter="ad",
        registration_id=reg,
        epoch=epoch,
        step=step,
        version=step,
        state_uri=state_uri,
    )


def test_interval_and_final_checkpoints_published_once(
    redis_url, streams, rclient, artifacts, ckpts
) -> None:
    publish(rclient, streams, admitted(make_spec(interval=2, keep=2)))
    for step in range(1, 7):
        uri = write_fake_version(artifacts, "ad", "r1", step).uri
        publish(rclient, streams, step_done(step, state_uri=uri if step == 4 else ""))
    run(redis_url, streams, artifacts, ckpts)
    saved = outputs(rclient, streams, CheckpointSaved)
    assert [(e.step, e.final) for e in saved] == [(2, False), (4, False), (6, False)]
    assert [e.uri for e in saved] == [ckpts.step_dir("ad", "r1", s) for s in (2, 4, 6)]
    assert [(e.step, e.uri) for e in outputs(rclient, streams, Exported)] == [
        (e.step, e.uri) for e in saved
    ]
    assert all(e.registration_id == "r1" and e.source == "checkpoint" for e in saved)
    assert ckpts.list_steps("ad", "r1") == [4, 6]  # keep_checkpoints=2
    rclient.hset(streams.status("ad"), "registration_id", "r1")  # the trainer's field
    (row,) = read_status(rclient, streams)
    assert (row.last_checkpoint_step, row.last_checkpoint_uri) == (6, saved[-1].uri)
    assert row.export_uri == saved[-1].uri

    write_fake_version(artifacts, "ad", "r1", 7)
    publish(
        rclient,
        streams,
        DeregisterRequested(adapter="ad", registration_id="r1"),
        Completed(
            adapter="ad", registration_id="r1", epoch=1, step=7, version=7, reason="cancelled"
        ),
        Retired(adapter="ad", registration_id="r1", epoch=1, slot=0),
    )
    run(redis_url, streams, artifacts, ckpts)
    final = outputs(rclient, streams, CheckpointSaved)[-1]
    assert (final.step, final.final) == (7, True)
    assert verify(final.uri).final and ckpts.list_steps("ad", "r1") == [6, 7]
    assert read_status(rclient, streams)[0].last_checkpoint_step == 7
    assert not rclient.hexists(streams.key("checkpoint", "registrations"), "r1")
    assert rclient.xpending(streams.control, "checkpoint")["pending"] == 0

    before = rclient.xlen(streams.control)
    run(redis_url, streams, artifacts, ckpts)  # everything acknowledged: nothing happens again
    assert rclient.xlen(streams.control) == before


def test_crash_after_rename_before_ack_only_publishes(
    redis_url, streams, rclient, artifacts, ckpts
) -> None:
    publish(rclient, streams, admitted(make_spec(interval=3)))
    write_fake_version(artifacts, "ad", "r1", 3)
    publish(rclient, streams, step_done(3))
    # the previous life of the process renamed the step directory, then died before its ack
    source = artifacts.version_dir("ad", "r1", 3)
    done = ckpts.promote(source, "ad", "r1", step=3, version=3, epoch=0)
    run(redis_url, streams, artifacts, ckpts)
    (saved,) = outputs(rclient, streams, CheckpointSaved)
    assert saved.uri == done.uri
    assert verify(done.uri).created == done.manifest.created  # not redone
    assert len(outputs(rclient, streams, Exported)) == 1


def test_policy_survives_restarts_and_missing_admissions(
    redis_url, streams, rclient, artifacts, ckpts
) -> None:
    publish(rclient, streams, admitted(make_spec(interval=5)))
    run(redis_url, streams, artifacts, ckpts)  # this process life sees only the admission
    for step in (4, 5):
        write_fake_version(artifacts, "ad", "r1", step)
        publish(rclient, streams, step_done(step))
    run(redis_url, streams, artifacts, ckpts)  # a new life: the policy comes from Redis
    assert [e.step for e in outputs(rclient, streams, CheckpointSaved)] == [5]

    # never admitted here (log trimmed before the group existed): policy from training_state.json
    for step in (3, 4):
        write_fake_version(artifacts, "ad", "r2", step, spec=make_spec(interval=4))
        publish(rclient, streams, step_done(step, reg="r2"))
    run(redis_url, streams, artifacts, ckpts)
    assert [(e.registration_id, e.step) for e in outputs(rclient, streams, CheckpointSaved)] == [
        ("r1", 5),
        ("r2", 4),
    ]


def test_the_registration_is_stored_as_its_lifecycle_state(
    redis_url, streams, rclient, artifacts, ckpts
) -> None:
    """The hash holds the AdapterState of the latest admission; a replica of the group whose
    memory predates a re-admission reads it when a step of the newer epoch arrives; a value of
    an older layout is learned again from the training state."""
    key = streams.key("checkpoint", "registrations")
    a = CheckpointProcess(connect(redis_url), streams, artifacts, ckpts)
    b = CheckpointProcess(connect(redis_url), streams, artifacts, ckpts)
    subscription = a.subscription()

    def handle(process: CheckpointProcess, event) -> None:
        effects = process.handle(Delivery(subscription, "1-0", event, deliveries=1))
        pipe = rclient.pipeline(transaction=True)
        for command in effects.commands:
            pipe.execute_command(*command)
        pipe.execute()

    handle(a, admitted(make_spec(interval=2, keep=1), epoch=1))
    stored = msgspec.json.decode(rclient.hget(key, "r1"), type=AdapterState)
    assert stored == a.stored("r1")
    assert (stored.phase, stored.epoch, stored.slot) == (Phase.ADMITTED, 1, 0)
    assert stored.spec == make_spec(interval=2, keep=1)
    write_fake_version(artifacts, "ad", "r1", 1)
    handle(b, step_done(1, epoch=1))  # b learns epoch 1 from the hash
    handle(a, admitted(make_spec(interval=2, keep=1), epoch=2))  # the trainer restarted
    write_fake_version(artifacts, "ad", "r1", 2, epoch=2)
    handle(b, step_done(2, epoch=2))  # b's memory says epoch 1: it reads epoch 2 from the hash
    write_fake_version(artifacts, "ad", "r1", 4, epoch=1)
    handle(b, step_done(4, epoch=1))  # a late step of the old epoch: fenced
    assert [(e.step, e.epoch) for e in outputs(rclient, streams, CheckpointSaved)] == [(2, 2)]
    assert ckpts.list_steps("ad", "r1") == [2]

    old = {"interval": 3, "keep": 1, "epoch": 1, "registered_at": 0.0}  # the layout before
    rclient.hset(key, "r3", json.dumps(old))
    write_fake_version(artifacts, "ad", "r3", 4, spec=make_spec(interval=4))
    handle(b, step_done(4, reg="r3"))
    assert ckpts.list_steps("ad", "r3") == [4]


def test_stale_epochs_are_fenced(redis_url, streams, rclient, artifacts, ckpts) -> None:
    write_fake_version(artifacts, "ad", "r1", 2, epoch=2)
    write_fake_version(artifacts, "ad", "r1", 4, epoch=2)
    publish(
        rclient,
        streams,
        admitted(make_spec(interval=2), epoch=1),
        admitted(make_spec(interval=2), epoch=2),  # resumed
        step_done(2, epoch=1),  # late event of the previous epoch
        step_done(4, epoch=2),
    )
    run(redis_url, streams, artifacts, ckpts)
    assert [(e.step, e.epoch) for e in outputs(rclient, streams, CheckpointSaved)] == [(4, 2)]
    assert ckpts.list_steps("ad", "r1") == [4]
    assert rclient.xpending(streams.control, "checkpoint")["pending"] == 0


def test_missing_source_is_retried_then_dead_lettered(
    redis_url, streams, rclient, artifacts, ckpts
) -> None:
    publish(rclient, streams, admitted(make_spec(interval=2)), step_done(2))
    stats = run(
        redis_url, streams, artifacts, ckpts, claim_idle_ms=100, max_deliveries=2, max_events=3
    )
    assert stats.retried == 1 and stats.dead_lettered == 1
    (letter,) = [json.loads(f[b"dead"]) for _, f in rclient.xrange(streams.dead)]
    assert "cannot checkpoint ad/r1 step 2" in letter["reason"]
    assert "v000002" in letter["reason"] and "does not exist" in letter["reason"]
    assert outputs(rclient, streams, CheckpointSaved) == []
    assert ckpts.list_steps("ad", "r1") == []


def test_config_from_flags_and_environment(tmp_path, capsys) -> None:
    env = {"REDIS_URL": "redis://h:1/0", "MULTILORA_ARTIFACTS": "/a", "MULTILORA_CHECKPOINTS": "/c"}
    config = load_config(["--namespace", "ns", "--checkpoints-root", "memory://c"], env)
    assert config == CheckpointConfig(
        bus=BusConfig(redis_url="redis://h:1/0", namespace="ns"),
        artifacts="/a",
        checkpoints="memory://c",
    )
    with pytest.raises(ConfigError, match="checkpoints"):
        load_config([], {"REDIS_URL": "redis://h:1/0", "MULTILORA_ARTIFACTS": "/a"})
    with pytest.raises(ConfigError, match="block_ms"):
        load_config(["--block-ms", "0"], env)
    with pytest.raises(msgspec.ValidationError, match="unknown"):
        msgspec.convert({**msgspec.to_builtins(config), "unknown": 1}, CheckpointConfig)
    assert main(["--redis-url", "redis://h:1/0"]) == 2
    assert "artifacts" in capsys.readouterr().err


def test_main_refuses_an_unsafe_redis_unless_told(tmp_path, capsys) -> None:
    with RedisServer(tmp_path / "redis") as server:
        connect(server.url).config_set("appendonly", "no")
        argv = [
            *("--redis-url", server.url),
            *("--artifacts", str(tmp_path / "a")),
            *("--checkpoints", str(tmp_path / "c")),
            "--burst",
        ]
        assert main(argv) == 2
        assert "appendonly" in capsys.readouterr().err
        assert main([*argv, "--unsafe-redis"]) == 0


def test_a_process_profiles_its_handler_thread_when_asked(tmp_path, monkeypatch) -> None:
    import pstats

    from events.bootstrap import PROFILE_ENV

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "prof"))
    with RedisServer(tmp_path / "redis") as server:
        argv = [
            *("--redis-url", server.url),
            *("--artifacts", str(tmp_path / "a")),
            *("--checkpoints", str(tmp_path / "c")),
            *("--name", "ck.1"),
            "--burst",
        ]
        assert main(argv) == 0
    (path,) = (tmp_path / "prof").iterdir()
    assert path.name == "checkpoint.ck.1.prof"
    functions = {name for _file, _line, name in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]
    assert "run" in functions and "on_idle" in functions  # the consumer loop and its idle hook
