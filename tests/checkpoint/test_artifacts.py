"""The artifact store and checkpoint layout: atomic writes, manifests, pointers, retention."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import msgspec
import pytest

from events.errors import ConfigError
from orchestrator import storage
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import (
    CHECKPOINT_FILES,
    CheckpointRef,
    CheckpointStore,
    load_latest,
    verify,
)
from orchestrator.cursor import CursorState
from orchestrator.storage import ArtifactError, ArtifactNotFound, ChecksumError, StaleSource
from tests.checkpoint.conftest import version_files, write_fake_version

REG = "r1"


class SimulatedCrash(BaseException):
    """Stands for the process dying at this point (BaseException: nothing catches it)."""


def roots(tmp_path: Path, kind: str) -> tuple[str, str]:
    if kind == "local":
        return str(tmp_path / "artifacts"), str(tmp_path / "checkpoints")
    if kind == "file":
        return f"file://{tmp_path}/artifacts", f"file://{tmp_path}/checkpoints"
    tag = uuid.uuid4().hex[:8]
    return f"memory://art-{tag}", f"memory://ckpt-{tag}"


@pytest.fixture(params=["local", "file", "memory"])
def stores(request, tmp_path) -> tuple[ArtifactStore, CheckpointStore]:
    a, c = roots(tmp_path, request.param)
    return ArtifactStore(a), CheckpointStore(c)


def promote(arts: ArtifactStore, ckpts: CheckpointStore, step: int, **kw) -> CheckpointRef:
    epoch = kw.pop("epoch", 0)
    source = arts.version_dir("ad", kw.pop("reg", REG), step)
    reg = kw.pop("registration_id", REG)
    return ckpts.promote(source, "ad", reg, step=step, version=step, epoch=epoch, **kw)


def test_version_layout_round_trip(stores) -> None:
    arts, _ = stores
    files = version_files(step=3, version=3)
    published = arts.write_version("ad", REG, 3, files)
    assert published.uri == arts.version_dir("ad", REG, 3)
    assert published.uri.endswith("/ad/r1/v000003")
    weights = files["adapter_model.safetensors"]
    assert published.sha256 == hashlib.sha256(weights).hexdigest()
    assert published.bytes == len(weights)
    for name, data in files.items():
        assert arts.read_file(published.uri, name) == data
    with pytest.raises(ArtifactNotFound, match="nope"):
        arts.read_file(published.uri, "nope")
    arts.write_version("ad", REG, 10, version_files(step=10, version=10))
    assert arts.list_versions("ad", REG) == [3, 10]


def test_local_uris_are_plain_paths(tmp_path) -> None:
    arts = ArtifactStore(f"file://{tmp_path}/a")
    published = write_fake_version(arts, "ad", REG, 1)
    assert published.uri == f"{tmp_path}/a/ad/r1/v000001" and os.path.isdir(published.uri)
    assert arts.describe(published.uri) == published
    with pytest.raises(ArtifactError, match="not a version directory"):
        arts.describe(f"{tmp_path}/a/ad/r1")


def test_rewritten_version_replaces_the_old_one(artifacts) -> None:
    write_fake_version(artifacts, "ad", REG, 5, epoch=0)
    second = write_fake_version(artifacts, "ad", REG, 5, epoch=1)
    state = json.loads(artifacts.read_file(second.uri, "training_state.json"))
    assert state["epoch"] == 1
    assert artifacts.list_versions("ad", REG) == [5]
    assert [p.name for p in Path(second.uri).parent.iterdir()] == ["v000005"]


def test_gc_keeps_the_newest_and_protected(artifacts) -> None:
    for v in range(1, 7):
        write_fake_version(artifacts, "ad", REG, v)
    assert artifacts.gc("ad", REG, keep_last=2, protect={2}) == [1, 3, 4]
    assert artifacts.list_versions("ad", REG) == [2, 5, 6]
    with pytest.raises(ConfigError, match="keep_last"):
        artifacts.gc("ad", REG, keep_last=0)


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 200])
def test_unsafe_names_are_refused(artifacts, name) -> None:
    with pytest.raises(ConfigError, match="cannot name a directory"):
        artifacts.version_dir(name, REG, 1)
    with pytest.raises(ConfigError, match="registration id"):
        artifacts.version_dir("ad", name, 1)


def test_promote_writes_a_verified_checkpoint(stores) -> None:
    arts, ckpts = stores
    source = write_fake_version(arts, "ad", REG, 4).uri
    ref = promote(arts, ckpts, 4, registered_at=5.0)
    assert ref.uri == ckpts.step_dir("ad", REG, 4) and ref.uri.endswith("/ad/r1/step_000004")
    m = verify(ref.uri)
    assert m == ref.manifest
    assert (m.step, m.version, m.epoch, m.final, m.source_uri) == (4, 4, 0, False, source)
    assert m.cursor == CursorState(n=100, seed=7, epoch=0, position=16)
    assert sorted(m.files) == sorted(CHECKPOINT_FILES)
    for name in CHECKPOINT_FILES:
        data = arts.read_file(ref.uri, name)
        assert data == arts.read_file(source, name)
        assert m.files[name].sha256 == hashlib.sha256(data).hexdigest()
    assert ckpts.set_latest(ref)
    assert load_latest(ckpts.root, "ad") == ref
    assert load_latest(ckpts.root, "ad", REG) == ref
    assert load_latest(ckpts.root, "other") is None


def test_crashed_writer_leaves_only_a_swept_temporary(stores, monkeypatch) -> None:
    arts, ckpts = stores
    write_fake_version(arts, "ad", REG, 2)
    with monkeypatch.context() as m:
        m.setattr(storage.Fs, "publish_dir", _crash)
        with pytest.raises(SimulatedCrash):
            promote(arts, ckpts, 2)
    assert ckpts.list_steps("ad", REG) == [] and load_latest(ckpts.root, "ad") is None
    loc = storage.Fs(ckpts.root)
    assert [n for n in loc.names(loc.reg_dir("ad", REG)) if n.startswith(".tmp-step_000002")]
    ckpts.retain("ad", REG, keep=1)  # younger than stale_temp_s: kept (may be in progress)
    assert loc.names(loc.reg_dir("ad", REG))
    CheckpointStore(ckpts.root, stale_temp_s=0.0).retain("ad", REG, keep=1)
    assert loc.names(loc.reg_dir("ad", REG)) == []
    ref = promote(arts, ckpts, 2)
    assert verify(ref.uri).step == 2 and ckpts.list_steps("ad", REG) == [2]


def _crash(*args, **kwargs):
    raise SimulatedCrash


def test_corruption_is_detected(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    write_fake_version(artifacts, "ad", REG, 2)
    ref = promote(artifacts, ckpts, 2)
    weights = Path(ref.uri) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, one bit flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"adapter_model\.safetensors"):
        verify(ref.uri)
    weights.write_bytes(bytes(data[:-5]))
    with pytest.raises(ChecksumError, match="bytes"):
        verify(ref.uri)
    weights.unlink()
    with pytest.raises(ArtifactNotFound, match=r"adapter_model\.safetensors"):
        verify(ref.uri)
    (Path(ref.uri) / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest"):
        verify(ref.uri)


def test_crash_between_temp_write_and_rename_leaves_nothing_visible(
    tmp_path, artifacts, monkeypatch
) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"), stale_temp_s=0.0)
    for step in (2, 4):
        write_fake_version(artifacts, "ad", REG, step)
    first = promote(artifacts, ckpts, 2)
    ckpts.set_latest(first)

    def crash(*args, **kwargs):
        raise SimulatedCrash

    with monkeypatch.context() as m:
        m.setattr(storage.Fs, "publish_dir", crash)
        with pytest.raises(SimulatedCrash):
            promote(artifacts, ckpts, 4)
    reg_dir = tmp_path / "ckpt" / "ad" / REG
    assert [p.name for p in reg_dir.iterdir() if p.name.startswith(".tmp-step_000004")]
    assert not (reg_dir / "step_000004").exists()
    assert ckpts.list_steps("ad", REG) == [2]
    assert load_latest(ckpts.root, "ad") == first

    # a crash while replacing a pointer keeps the old pointer
    second = promote(artifacts, ckpts, 4)
    with monkeypatch.context() as m:
        m.setattr(storage.os, "replace", crash)
        with pytest.raises(SimulatedCrash):
            ckpts.set_latest(second)
    assert (reg_dir / "latest").read_text() == "step_000002"
    assert (tmp_path / "ckpt" / "ad" / "latest").read_text() == f"{REG}/step_000002"
    assert load_latest(ckpts.root, "ad") == first
    ckpts.set_latest(second)
    assert load_latest(ckpts.root, "ad") == second
    ckpts.retain("ad", REG, keep=5)  # sweeps the crashed writers' temporaries
    assert sorted(p.name for p in reg_dir.iterdir()) == ["latest", "step_000002", "step_000004"]


def test_latest_never_names_a_missing_directory(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    for step in range(1, 9):
        write_fake_version(artifacts, "ad", REG, step)
        ref = promote(artifacts, ckpts, step)
        if step % 3:  # the pointer sometimes lags (crash after the rename)
            ckpts.set_latest(ref)
        ckpts.retain("ad", REG, keep=1)
        for pointer in (
            tmp_path / "ckpt" / "ad" / "latest",
            tmp_path / "ckpt" / "ad" / REG / "latest",
        ):
            target = pointer.parent / pointer.read_text()
            assert (target / "manifest.json").is_file(), f"{pointer} -> missing {target}"


def test_retention_keeps_newest_latest_and_final(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    for step in (2, 4, 6, 8, 10, 12):
        write_fake_version(artifacts, "ad", REG, step)
        ref = promote(artifacts, ckpts, step, final=step == 4)
        if step <= 8:
            ckpts.set_latest(ref)  # pointer stops at 8
    assert ckpts.retain("ad", REG, keep=2) == [2, 6]
    assert ckpts.list_steps("ad", REG) == [4, 8, 10, 12]
    assert ckpts.retain("ad", REG, keep=0) == [10]  # keep < 1 still keeps the newest
    assert ckpts.list_steps("ad", REG) == [4, 8, 12]


def test_repromotion_is_idempotent_and_marks_final(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    write_fake_version(artifacts, "ad", REG, 6)
    first = promote(artifacts, ckpts, 6)
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(first.uri).iterdir()}
    again = promote(artifacts, ckpts, 6)
    assert again == first  # same manifest (same created time): nothing was redone
    final = promote(artifacts, ckpts, 6, final=True)
    assert final.manifest == msgspec.structs.replace(first.manifest, final=True)
    assert verify(first.uri).final
    assert {
        p.name: p.stat().st_mtime_ns for p in Path(first.uri).iterdir() if p.name != "manifest.json"
    } == {k: v for k, v in mtimes.items() if k != "manifest.json"}
    # even a deleted source does not matter once the checkpoint exists
    write_fake_version(artifacts, "ad", REG, 7)
    artifacts.gc("ad", REG, keep_last=1)
    assert promote(artifacts, ckpts, 6, final=True) == final


def test_epochs_fence_and_replace(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    src3 = write_fake_version(artifacts, "ad", REG, 3, epoch=0).uri
    old = ckpts.promote(src3, "ad", REG, step=3, version=3, epoch=0)
    ckpts.set_latest(old)
    # a resumed trainer (epoch 1) re-announces version 3 without rewriting it: reused as is
    assert ckpts.promote(src3, "ad", REG, step=3, version=3, epoch=1, final=True).manifest == (
        msgspec.structs.replace(old.manifest, final=True)
    )
    # another version for step 3 from a newer epoch replaces the checkpoint ...
    src4 = write_fake_version(artifacts, "ad", REG, 3, version=4, epoch=2).uri
    new = ckpts.promote(src4, "ad", REG, step=3, version=4, epoch=2)
    assert (new.manifest.epoch, new.manifest.version) == (2, 4) and verify(new.uri).version == 4
    assert new.uri == old.uri and load_latest(ckpts.root, "ad").manifest.version == 4
    # ... and a late event of an older epoch is fenced
    with pytest.raises(StaleSource, match="holds epoch 2"):
        ckpts.promote(src3, "ad", REG, step=3, version=3, epoch=0)
    # a source rewritten by a newer epoch is fenced too; one from an older epoch is accepted
    write_fake_version(artifacts, "ad", REG, 5, epoch=1)
    with pytest.raises(StaleSource, match="rewritten under epoch 1"):
        promote(artifacts, ckpts, 5, epoch=0)
    assert promote(artifacts, ckpts, 5, epoch=3).manifest.epoch == 3
    assert ckpts.list_steps("ad", REG) == [3, 5]


def test_missing_or_inconsistent_source(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    with pytest.raises(ArtifactNotFound, match="v000009"):
        promote(artifacts, ckpts, 9)
    files = version_files(step=9, version=9)
    del files["training_state.safetensors"]
    artifacts.write_version("ad", REG, 9, files)
    with pytest.raises(ArtifactNotFound, match=r"training_state\.safetensors"):
        promote(artifacts, ckpts, 9)
    write_fake_version(artifacts, "ad", REG, 9, version=9)
    source = artifacts.version_dir("ad", REG, 9)
    with pytest.raises(ArtifactError, match="holds step 9"):
        ckpts.promote(source, "ad", REG, step=10, version=9, epoch=0)
    assert ckpts.list_steps("ad", REG) == []


def test_adapter_latest_orders_registrations_by_admission(tmp_path, artifacts) -> None:
    ckpts = CheckpointStore(str(tmp_path / "ckpt"))
    write_fake_version(artifacts, "ad", "old", 100)
    write_fake_version(artifacts, "ad", "new", 10)
    new = promote(artifacts, ckpts, 10, reg="new", registration_id="new", registered_at=2.0)
    assert ckpts.set_latest(new)
    old = promote(
        artifacts, ckpts, 100, reg="old", registration_id="old", registered_at=1.0, final=True
    )
    assert not ckpts.set_latest(old)  # a late final of the previous registration
    assert load_latest(ckpts.root, "ad") == new
    assert load_latest(ckpts.root, "ad", "old") == old
    # a dangling adapter pointer (crash mid-replacement) falls back to a scan
    (tmp_path / "ckpt" / "ad" / "latest").write_text("new/step_000099")
    assert load_latest(ckpts.root, "ad") == new
    (tmp_path / "ckpt" / "ad" / "latest").unlink()
    assert load_latest(ckpts.root, "ad") == new
