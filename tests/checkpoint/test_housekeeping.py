"""The checkpoint process's storage pass (orchestrator.housekeeping) on a real store and Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from events.heartbeat import Heartbeat, registry_key
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint import GROUP, load_config
from orchestrator.compaction import READER_SLOTS, load_fleet
from orchestrator.fleet import Fleet, fleet_snapshot, restore_fleet
from orchestrator.housekeeping import Housekeeper
from orchestrator.metrics import StorageMetrics
from tests.checkpoint.test_gc import FakeTrainer, _checkpointer_reads

pytestmark = pytest.mark.bus


def test_a_pass_deletes_compacts_and_counts(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    store = ArtifactStore(str(tmp_path / "artifacts"))
    trainer = FakeTrainer(rclient, streams, store, "ad", "r1")
    for _ in range(10):
        trainer.step()
    _checkpointer_reads(rclient, streams, leave=set())
    registry = CollectorRegistry()
    now = [0.0]
    keeper = Housekeeper(
        rclient,
        streams,
        store,
        checkpoint_group=GROUP,
        interval_s=60.0,
        compact_entries=5,
        metrics=StorageMetrics(registry),
        clock=lambda: now[0],
    )
    keeper.on_idle()  # not due yet: the first pass comes 10 s after start
    assert store.list_versions("ad", "r1") == list(range(11))
    now[0] = 60.0
    keeper.on_idle()
    assert store.list_versions("ad", "r1") == [8, 9, 10]
    assert registry.get_sample_value("multilora_gc_versions_deleted_total") == 8
    assert registry.get_sample_value("multilora_gc_bytes_deleted_total") > 0  # type: ignore[operator]
    assert (
        rclient.xlen(streams.control) == 0
    )  # compacted (13 entries >= 5) and trimmed: the group acknowledged all
    assert registry.get_sample_value("multilora_control_log_trimmed_total") == 13
    assert load_fleet(rclient, streams, READER_SLOTS)[0] == trainer.fleet
    trainer.step()
    assert load_fleet(rclient, streams, 4)[0] == restore_onto(trainer.fleet, 4)
    now[0] = 90.0
    keeper.on_idle()  # within the interval: nothing
    assert store.list_versions("ad", "r1") == [8, 9, 10, 11]


def test_a_pass_forgets_processes_gone_past_the_retention(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    gone = Heartbeat(streams, "rollout", "rollout.old-host.0", ttl_ms=200)
    gone.beat(rclient)
    time.sleep(0.3)  # its beat key expired: dead
    store = ArtifactStore(str(tmp_path / "artifacts"))
    keep = Housekeeper(rclient, streams, store, checkpoint_group=GROUP)
    assert keep.run_once().processes_forgotten == ()  # dead for less than a day: still shown
    assert rclient.hexists(registry_key(streams), "rollout:rollout.old-host.0")
    prune = Housekeeper(rclient, streams, store, checkpoint_group=GROUP, process_retention_s=0.1)
    assert prune.run_once().processes_forgotten == ("rollout:rollout.old-host.0",)
    assert not rclient.hexists(registry_key(streams), "rollout:rollout.old-host.0")


def test_housekeeping_settings_have_defaults() -> None:
    config = load_config(["--artifacts-root", "a", "--checkpoints-root", "c"], environ={})
    assert config.housekeeping_interval_s == 60.0
    assert config.status_ttl_s == 7 * 24 * 3600 and config.dead_maxlen == 10_000
    assert config.group_retention_s == 24 * 3600.0 == config.process_retention_s
    tuned = load_config(
        ["--artifacts-root", "a", "--checkpoints-root", "c", "--dead-maxlen", "50"], environ={}
    )
    assert tuned.dead_maxlen == 50


def restore_onto(fleet: Fleet, slots: int) -> Fleet:
    return restore_fleet(fleet_snapshot(fleet), slots)
