"""Version GC on a real artifact store and a real Redis, with a fake trainer and fake workers.

The trainer writes versions and publishes their events (numerics-free: small real tensors from
the checkpoint fixtures), a worker reports the version it serves, the checkpoint group lags
behind on some entries, a client saved a sampler path: a sweep deletes exactly the version
directories nothing needs, frees their bytes, and is idempotent.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import redis

from events.codec import encode
from events.effects import COMMIT_LUA, Effects
from events.futures import PathRecord, record_path, sampler_path
from events.lease import Lease
from events.schema import Synced
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint import GROUP
from orchestrator.compaction import READER_SLOTS, load_fleet
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import AdapterState
from orchestrator.retention import VersionGC
from orchestrator.status import sync_effects
from tests.checkpoint.conftest import version_files
from tests.orchestrator import builders as b

pytestmark = pytest.mark.bus


class FakeTrainer:
    """Writes each version, then publishes it (the trainer's order), on one registration."""

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        store: ArtifactStore,
        name: str,
        reg: str,
        slot: int = 0,
    ) -> None:
        self.client, self.streams, self.store = client, streams, store
        self.name, self.reg = name, reg
        self.fleet = Fleet(READER_SLOTS)
        self.publish(b.register(name, reg, t=1.0, steps=50, max_staleness=1, checkpoint_interval=2))
        self.publish(b.admitted(self.state, slot, t=2.0))
        self.write(0)
        self.publish(b.sync(self.state, 0, t=3.0))

    @property
    def state(self) -> AdapterState:
        state = self.fleet.get(self.reg)
        assert state is not None
        return state

    def publish(self, event: Any) -> str:
        self.fleet = self.fleet.apply(event)
        return self.client.xadd(self.streams.control, encode(event)).decode()

    def write(self, version: int) -> None:
        files = version_files(step=version, version=version, adapter=self.name)
        self.store.write_version(self.name, self.reg, version, files)

    def step(self) -> str:
        state = self.state
        self.write(state.version + 1)
        event = b.step_done(state, t=10.0 + state.step)
        return self.publish(event)

    def end(self) -> None:
        for _ in range(50 - self.state.step):
            self.step()
        self.publish(b.completed(self.state, t=90.0))
        self.publish(b.retired(self.state, t=91.0))


def _commit(client: redis.Redis, effects: Effects) -> None:
    client.register_script(COMMIT_LUA)(args=["w", effects.plan([])])


def _serve(
    client: redis.Redis, streams: Streams, worker: str, trainer: FakeTrainer, v: int
) -> None:
    synced = Synced(
        adapter=trainer.name,
        registration_id=trainer.reg,
        epoch=1,
        worker=worker,
        version=v,
        latency_s=0.1,
        time=50.0,
    )
    client.xadd(streams.control, encode(synced))
    _commit(client, sync_effects(streams, synced))


def _checkpointer_reads(client: redis.Redis, streams: Streams, *, leave: set[str]) -> None:
    """The checkpoint group reads everything and acknowledges all but ``leave``."""
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists
        client.xgroup_create(streams.control, GROUP, id="0")
    resp = client.xreadgroup(GROUP, "checkpoint", {streams.control: ">"}, count=100_000)
    ids = [eid.decode() for _, entries in resp or [] for eid, _ in entries]
    done = [i for i in ids if i not in leave]
    if done:
        client.xack(streams.control, GROUP, *done)


def _versions(store: ArtifactStore, name: str, reg: str) -> list[int]:
    return store.list_versions(name, reg)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_gc_deletes_exactly_what_nothing_needs(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    live = FakeTrainer(rclient, streams, store, "ad", "r1")
    due = ""
    for _ in range(8):
        entry = live.step()
        if live.state.step == 4:
            due = entry  # step 4's checkpoint is still being taken
    live.write(9)  # written ahead of the log: its step_done is not published yet
    ended = FakeTrainer(rclient, streams, store, "bd", "r2", slot=1)
    ended.end()
    gone = FakeTrainer(rclient, streams, store, "cd", "r3", slot=2)
    gone.end()
    record = PathRecord(
        path=sampler_path("bd", "s1"),
        kind="sampler",
        model="bd",
        registration_id="r2",
        version=7,
        step=7,
        uri=store.version_dir("bd", "r2", 7),
    )
    effects = Effects()
    record_path(effects, streams, record)
    _commit(rclient, effects)
    stray = tmp_path / "artifacts" / "zz" / "r9" / "v000000"
    stray.mkdir(parents=True)  # a registration the log does not know (yet): left alone
    (stray / "adapter_config.json").write_text("{}")
    lease = Lease(rclient, streams.lease("w1"), ttl_ms=60_000)
    lease.acquire()
    try:
        _serve(rclient, streams, "w1", live, 3)  # a live worker serves v3
        _serve(rclient, streams, "w2", live, 2)  # w2 is gone (no lease): pins nothing
        _checkpointer_reads(rclient, streams, leave={due})
        fleet, _ = load_fleet(rclient, streams, READER_SLOTS)
        root = tmp_path / "artifacts"
        doomed_dirs = [root / "ad" / "r1" / f"v{v:06d}" for v in (0, 1, 2, 5)]
        doomed_dirs += [root / "bd" / "r2" / f"v{v:06d}" for v in range(51) if v != 7]
        expected_bytes = sum(_size(d) for d in doomed_dirs) + _size(root / "cd" / "r3")
        gc = VersionGC(rclient, streams, store, checkpoint_group=GROUP)
        swept = gc.sweep(fleet)
        assert _versions(store, "ad", "r1") == [3, 4, 6, 7, 8, 9]
        assert _versions(store, "bd", "r2") == [7]  # the saved sampler path
        assert not (root / "cd" / "r3").exists()  # ended, nothing pinned: the whole directory
        assert stray.is_dir()
        assert swept.bytes == expected_bytes > 0
        assert swept.registrations == (("cd", "r3"),)
        assert len(swept.versions) == 4 + 50 + 51
        assert not [p for p in (root / "ad" / "r1").iterdir() if p.name.startswith(".tmp")]
        assert gc.sweep(fleet).versions == ()  # idempotent

        # the trainer goes on, the checkpoint is taken, the worker moves to v10
        live.step()  # publishes v9
        live.step()  # writes and publishes v10
        _checkpointer_reads(rclient, streams, leave=set())
        rclient.xack(streams.control, GROUP, due)
        _serve(rclient, streams, "w1", live, 10)
        fleet, _ = load_fleet(rclient, streams, READER_SLOTS)
        gc.sweep(fleet)
        assert _versions(store, "ad", "r1") == [8, 9, 10]
    finally:
        lease.release()


def test_a_reader_of_a_deleted_version_gets_a_load_error(tmp_path: Path) -> None:
    """The rollout worker's fetch of a version GC removed fails with WeightsError, one of the
    task failures that become failed samples (retried by the trainer at a newer version)."""
    from rollout.backend import WeightsError, WeightsFetcher
    from rollout.worker import KNOWN_TASK_FAILURES

    store = ArtifactStore(str(tmp_path / "artifacts"))
    published = store.write_version("ad", "r1", 3, version_files(step=3, version=3))
    fetcher = WeightsFetcher(tmp_path / "cache")
    path, _ = fetcher.fetch(published.uri, "ad", 3)
    assert os.path.isdir(path)
    assert store.delete_version("ad", "r1", 3) > 0
    assert store.delete_version("ad", "r1", 3) == 0  # already gone: idempotent
    with pytest.raises(WeightsError, match="not found"):
        fetcher.fetch(published.uri, "ad", 3)
    assert WeightsError in KNOWN_TASK_FAILURES


def test_a_due_checkpoint_step_event_pins_its_version(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    """Until the checkpoint group acknowledges a step_done, even an old version it names stays;
    one the group has not even read yet (it lags) pins too."""
    store = ArtifactStore(str(tmp_path / "artifacts"))
    trainer = FakeTrainer(rclient, streams, store, "ad", "r1")
    rclient.xgroup_create(streams.control, GROUP, id="$")  # created now: reads nothing older
    for _ in range(6):
        trainer.step()
    fleet, _ = load_fleet(rclient, streams, READER_SLOTS)
    VersionGC(rclient, streams, store, checkpoint_group=GROUP).sweep(fleet)
    assert _versions(store, "ad", "r1") == [1, 2, 3, 4, 5, 6]  # every step_done is unread
    _checkpointer_reads(rclient, streams, leave=set())
    VersionGC(rclient, streams, store, checkpoint_group=GROUP).sweep(fleet)
    assert _versions(store, "ad", "r1") == [4, 5, 6]
