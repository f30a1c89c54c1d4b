"""``multilora storage`` on a real artifact store, checkpoint store and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from events.codec import encode
from events.streams import Streams
from ops.cli import main
from ops.storage_report import human, storage_report
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointStore
from tests.checkpoint.conftest import version_files
from tests.orchestrator import builders as b


def _stores(tmp_path: Path) -> tuple[str, str, int, int]:
    """Two versions of ``ad`` and one of ``bd``, one checkpoint of ``ad``; returns the roots
    and the bytes of ``ad``'s versions and checkpoint."""
    artifacts, checkpoints = str(tmp_path / "artifacts"), str(tmp_path / "checkpoints")
    store = ArtifactStore(artifacts)
    for v in (1, 2):
        store.write_version("ad", "r1", v, version_files(step=v, version=v))
    store.write_version("bd", "r2", 0, version_files(step=0, version=0, adapter="bd"))
    ckpt = CheckpointStore(checkpoints)
    ref = ckpt.promote(store.version_dir("ad", "r1", 2), "ad", "r1", step=2, version=2, epoch=0)
    ckpt.set_latest(ref)
    sizes = [
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in (tmp_path / "artifacts" / "ad", tmp_path / "checkpoints" / "ad" / "r1")
    ]
    return artifacts, checkpoints, sizes[0], sizes[1]


def test_report_counts_bytes_per_adapter_and_redis(
    rclient: redis.Redis, streams: Streams, tmp_path: Path
) -> None:
    artifacts, checkpoints, version_bytes, checkpoint_bytes = _stores(tmp_path)
    for i in range(3):
        rclient.xadd(streams.control, encode(b.register("ad", f"r{i}")))
    report = storage_report(rclient, streams, artifacts=artifacts, checkpoints=checkpoints)
    ad, bd = report.adapters
    assert (ad.adapter, ad.versions, ad.checkpoints, ad.exports) == ("ad", 2, 1, 1)
    assert ad.version_bytes == version_bytes > 0
    assert ad.checkpoint_bytes == checkpoint_bytes > 0
    assert ad.bytes == version_bytes + checkpoint_bytes
    assert (bd.adapter, bd.versions, bd.checkpoints) == ("bd", 1, 0)
    assert report.total_bytes == ad.bytes + bd.bytes
    assert report.redis_used_memory > 0
    lengths = {s.stream: s.length for s in report.streams}
    assert lengths[streams.control] == 3 and lengths[streams.dead] == 0


def test_the_command_prints_a_table_and_json(
    redis_url: str, streams: Streams, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, checkpoints, _, _ = _stores(tmp_path)
    bus = ["--redis-url", redis_url, "--namespace", streams.namespace]
    roots = ["--artifacts-root", artifacts, "--checkpoints-root", checkpoints]
    assert main(["storage", *bus, *roots]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and "redis used_memory" in table
    row = next(line.split() for line in table.splitlines() if line.startswith("ad "))
    assert row[0:2] == ["ad", "2"] and row[4] == "1"  # 2 versions (size, unit), 1 checkpoint
    assert main(["storage", "--json", *bus, *roots]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["adapter"] for a in data["adapters"]] == ["ad", "bd"]
    assert data["total_bytes"] == sum(a["bytes"] for a in data["adapters"])


def test_human_sizes() -> None:
    assert human(0) == "0 B" and human(1023) == "1023 B"
    assert human(1536) == "1.5 KiB" and human(5 * 1024**3) == "5.0 GiB"
