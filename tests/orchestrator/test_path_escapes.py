"""Nothing a producer sends makes a process read or write outside its allowed roots.

Each escaping input is refused twice: at the edge (the ingress decoder or admission answers an
``adapter.rejected`` naming the field, the value and the allowed root) and in the store and
reader functions themselves (defence in depth), with the same containment rule
(:func:`orchestrator.storage.is_under`: realpath of both sides, compared by components).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from events.codec import Decoder, encode
from events.errors import ConfigError, SchemaError
from events.schema import IngressEvent, RegisterRequested
from events.specs import DatasetSpec
from orchestrator.admission import Admission, Reject
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import MANIFEST, CheckpointStore, verify
from orchestrator.fleet import Fleet
from orchestrator.ingress import MAX_BYTES, invalid_rejection
from orchestrator.storage import ArtifactError, Fs, PathEscape, check_under, is_under
from rollout.data import PathDataError, open_source, resolve_under_roots
from tests.orchestrator import builders as b
from tests.orchestrator.conftest import KNOWN_REWARDS

ROWS = "".join(f'{{"prompt": "{i}+1", "answer": "{i + 1}"}}\n' for i in range(3))


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """An allowed root ``allowed`` with good data, a prefix sibling ``allowed-evil`` and a
    ``secret`` directory outside it, plus symlinks inside the root that point out."""
    allowed, evil, secret = tmp_path / "allowed", tmp_path / "allowed-evil", tmp_path / "secret"
    for d in (allowed, evil, secret):
        d.mkdir()
    (allowed / "ok.jsonl").write_text(ROWS)
    (evil / "x.jsonl").write_text(ROWS)
    (secret / "t.jsonl").write_text(ROWS)
    (allowed / "passwd.jsonl").symlink_to("/etc/passwd")
    (allowed / "linkdir").symlink_to(secret, target_is_directory=True)
    return {"allowed": allowed, "evil": evil, "secret": secret}


def _escaping_paths(layout: dict[str, Path]) -> list[str]:
    allowed = layout["allowed"]
    return [
        "../secret/t.jsonl",  # ..
        "sub/../../secret/t.jsonl",  # .. through a (missing) subdirectory
        str(layout["secret"] / "t.jsonl"),  # absolute, outside
        "/etc/passwd",  # absolute, outside
        "passwd.jsonl",  # a symlink inside the root to /etc/passwd
        "linkdir/t.jsonl",  # a symlinked directory inside the root pointing out
        str(allowed / "linkdir" / "t.jsonl"),  # the same, absolute
        str(layout["evil"] / "x.jsonl"),  # the prefix sibling /allowed-evil
        "../allowed-evil/x.jsonl",  # the same, relative
        f"file://{allowed / 'ok.jsonl'}",  # a URL (even one naming a file inside)
        "~/ok.jsonl",  # never expanded
    ]


def _admission(roots: list[Path]) -> Admission:
    return Admission(
        base_model="m",
        known_rewards=KNOWN_REWARDS,
        probe_dataset=lambda spec: len(open_source(spec, allowed_roots=roots)),
        max_rank=32,
    )


def _register(path: str, reg: str = "r1") -> RegisterRequested:
    return b.register("a", reg, dataset=DatasetSpec(kind="jsonl", path=path))


# --- the one rule ------------------------------------------------------------------------------


def test_is_under_compares_real_paths_by_components(layout: dict[str, Path]) -> None:
    allowed = str(layout["allowed"])
    assert is_under(f"{allowed}/ok.jsonl", allowed)
    assert is_under(allowed, allowed)
    assert is_under(f"file://{allowed}/ok.jsonl", allowed)
    assert not is_under(f"{allowed}-evil/x.jsonl", allowed)  # a string prefix is not enough
    assert not is_under(f"{allowed}/../secret/t.jsonl", allowed)
    assert not is_under(f"{allowed}/passwd.jsonl", allowed)  # symlink to /etc/passwd
    assert not is_under(f"{allowed}/linkdir/t.jsonl", allowed)  # symlinked parent directory
    assert not is_under(f"file://{allowed}/linkdir/t.jsonl", allowed)
    # other filesystems: same protocol, by components, no '.' or '..' segment
    assert is_under("s3://bucket/root/a/v000001", "s3://bucket/root")
    assert not is_under("s3://bucket/root-evil/a", "s3://bucket/root")
    assert not is_under("s3://bucket/root/../other", "s3://bucket/root")
    assert not is_under("gs://bucket/root/a", "s3://bucket/root")
    assert not is_under("s3://bucket/root/a", allowed)  # a URL is never under a local root
    with pytest.raises(PathEscape) as info:
        check_under(f"{allowed}-evil/x.jsonl", [allowed], what="thing", fix="move it")
    message = str(info.value)
    assert f"{allowed}-evil/x.jsonl" in message and repr([allowed]) in message
    assert info.value.value == f"{allowed}-evil/x.jsonl" and info.value.roots == (allowed,)


# --- dataset paths: at admission and in the reader ------------------------------------------------


def test_every_escaping_dataset_path_is_rejected_at_admission(layout: dict[str, Path]) -> None:
    allowed = layout["allowed"]
    admission = _admission([allowed])
    assert admission.check(_register("ok.jsonl"), Fleet(2)).dataset_size == 3  # type: ignore[union-attr]
    for path in _escaping_paths(layout):
        verdict = admission.check(_register(path), Fleet(2))
        assert isinstance(verdict, Reject), path
        assert verdict.field == "spec.dataset.path", (path, verdict)
        assert repr(path) in verdict.reason, verdict.reason
        assert str(allowed.resolve()) in verdict.reason, verdict.reason


def test_every_escaping_dataset_path_is_refused_by_the_reader(layout: dict[str, Path]) -> None:
    allowed = layout["allowed"]
    assert resolve_under_roots("ok.jsonl", [allowed]) == (allowed / "ok.jsonl").resolve()
    for path in _escaping_paths(layout):
        with pytest.raises(PathDataError) as info:
            resolve_under_roots(path, [allowed])
        assert repr(path) in str(info.value) and str(allowed.resolve()) in str(info.value)
        assert isinstance(info.value, ConfigError)  # what admission's probe contract names


def test_a_symlink_swapped_in_after_admission_is_refused_when_opened(
    layout: dict[str, Path],
) -> None:
    allowed = layout["allowed"]
    (allowed / "later.jsonl").write_text(ROWS)
    assert resolve_under_roots("later.jsonl", [allowed]).name == "later.jsonl"
    (allowed / "later.jsonl").unlink()
    (allowed / "later.jsonl").symlink_to(layout["secret"] / "t.jsonl")
    with pytest.raises(PathDataError):
        open_source(DatasetSpec(kind="jsonl", path="later.jsonl"), allowed_roots=[allowed])


# --- names and ids: at the edge and in the stores -----------------------------------------------


def _raw_with(field: str, value: str) -> str:
    data = json.loads(encode(b.register("a", "r1"))["event"])
    data[field] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("adapter", "../x"),
        ("adapter", "a/../../x"),
        ("adapter", "/etc"),
        ("registration_id", "../x"),
        ("registration_id", "a/../../x"),
        ("registration_id", "/abs"),
        ("registration_id", ".."),
    ],
)
def test_names_that_are_not_one_path_component_are_rejected_at_ingress(
    field: str, value: str
) -> None:
    raw = _raw_with(field, value)
    with pytest.raises(SchemaError) as info:
        Decoder(IngressEvent, max_bytes=MAX_BYTES).decode({"event": raw}, "7-0")
    rejected = invalid_rejection("7-0", {"event": raw}, str(info.value))
    assert rejected.field == field and repr(value) in rejected.reason


def test_an_event_id_standing_in_for_the_registration_id_must_name_a_directory() -> None:
    event = RegisterRequested(id="../../x", adapter="a", spec=b.make_spec())
    verdict = _admission([]).check(event, Fleet(2))
    assert isinstance(verdict, Reject) and verdict.field == "registration_id"
    assert "'../../x'" in verdict.reason and "[A-Za-z0-9._-]" in verdict.reason


@pytest.mark.parametrize(
    ("adapter", "reg"),
    [("../x", "r1"), ("a/../../x", "r1"), ("/abs", "r1"), ("a", "../x"), ("a", ".."), ("..", "r")],
)
def test_store_paths_refuse_names_that_escape(tmp_path: Path, adapter: str, reg: str) -> None:
    fs = Fs(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="cannot name a directory"):
        fs.reg_dir(adapter, reg)
    with pytest.raises(ConfigError, match="cannot name a directory"):
        ArtifactStore(str(tmp_path / "store")).version_dir(adapter, reg, 1)
    with pytest.raises(ConfigError, match="cannot name a directory"):
        CheckpointStore(str(tmp_path / "ckpt")).step_dir(adapter, reg, 1)


def test_a_symlink_planted_in_a_store_cannot_redirect_writes(layout: dict[str, Path]) -> None:
    root = layout["allowed"] / "artifacts"
    root.mkdir()
    (root / "a").symlink_to(layout["secret"], target_is_directory=True)
    store = ArtifactStore(str(root))
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}
    with pytest.raises(PathEscape) as info:
        store.write_version("a", "r1", 1, files)
    assert str(root) in str(info.value) and "store path" in str(info.value)
    assert sorted(os.listdir(layout["secret"])) == ["t.jsonl"]  # nothing was written there


def test_checkpoint_store_refuses_uris_and_pointers_outside_it(
    layout: dict[str, Path],
) -> None:
    root = layout["allowed"] / "ckpt"
    store = CheckpointStore(str(root), source_roots=[str(layout["allowed"] / "artifacts")])
    with pytest.raises(PathEscape, match="checkpoint"):
        store.read_manifest(str(layout["secret"]))
    with pytest.raises(PathEscape, match="checkpoint"):
        store.read_manifest(f"{root}-evil/a/r1/step_000001")
    with pytest.raises(PathEscape, match="version to checkpoint"):
        store.promote(str(layout["secret"]), "a", "r1", step=1, version=1, epoch=1)
    # a forged pointer naming a directory outside is ignored, never followed
    (root / "a" / "r1").mkdir(parents=True)
    for forged in ("../../../secret", "r1/../../../secret", "/etc"):
        (root / "a" / "latest").write_text(forged)
        assert store.latest("a") is None
    # a step directory that is a symlink out of the store is not a checkpoint
    (root / "a" / "r1" / "step_000001").symlink_to(layout["secret"], target_is_directory=True)
    (root / "a" / "latest").write_text("r1/step_000001")
    (root / "a" / "r1" / "latest").write_text("step_000001")
    assert store._pointer_target(str(root / "a"), "a") is None


def test_a_manifest_listing_a_file_outside_its_directory_is_refused(tmp_path: Path) -> None:
    step = tmp_path / "a" / "r1" / "step_000001"
    step.mkdir(parents=True)
    digest = {"sha256": "0" * 64, "bytes": 1}
    manifest = {
        "adapter": "a",
        "registration_id": "r1",
        "step": 1,
        "version": 1,
        "epoch": 1,
        "source_uri": "x",
        "created": 0.0,
        "files": {"../../../../etc/passwd": digest},
    }
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"not plain file names"):
        verify(str(step))
