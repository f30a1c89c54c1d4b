"""The checkpoint store: durable step directories, ``latest`` pointers, retention, verification.

Written by the checkpoint process (:mod:`orchestrator.checkpoint`), read by the trainer on
resume (:func:`load_latest`, then :func:`verify`). ``root`` is a local directory or an fsspec URL
(see :mod:`orchestrator.storage` for the URIs handed out and the atomic primitives). Layout::

    {ckpt_root}/{adapter}/latest                          "registration_id/step_000120"
    {ckpt_root}/{adapter}/{registration_id}/latest        "step_000120"
    {ckpt_root}/{adapter}/{registration_id}/step_000120/  the version's files + manifest.json

A step directory is a copy of one version of the artifact store (:mod:`orchestrator.artifacts`)
and is itself a PEFT export (loads unchanged in PEFT, vLLM and SGLang). ``manifest.json``
(:class:`Manifest`) lists the sha256 and size of every other file. Of the version's files this
module reads only the training state's step, version, epoch and cursor.

Atomicity: a step directory is written under a temporary name and renamed, with
``manifest.json`` as the marker file on object stores; a crash leaves only a hidden temporary
directory, swept by :meth:`CheckpointStore.retain` once older than ``stale_temp_s``. Pointer
files are replaced atomically. Pointers are written only after their target is complete and
retention never deletes a pointer's target, so ``latest`` never names a missing directory. One
exception: replacing a step directory that holds another version (possible only after a resume
from an older checkpoint) swaps two directories with two renames; a crash between them leaves a
dangling pointer, and :func:`load_latest` then falls back to a scan of the valid step directories.

Containment (defence in depth; the names were checked at admission): every directory is built
by :meth:`~orchestrator.storage.Fs.reg_dir` (safe names, no symlink out of the store); a
``latest`` pointer must name ``step_NNNNNN`` (or ``<registration>/step_NNNNNN``), a manifest
may list only plain file names, and a URI handed to :meth:`CheckpointStore.read_manifest` must
lie under the store root; with ``source_roots`` set, :meth:`CheckpointStore.promote` copies only
from under them (the artifact store). Anything else raises :class:`ArtifactError` or
:class:`~orchestrator.storage.PathEscape` naming the value. Only safetensors files are
restored: :func:`verify` refuses a step directory holding a pickle
(:func:`events.adapter_format.refuse_pickles`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_JSON,
    STATE_TENSORS,
    AdapterFormatError,
    CursorState,
    TrainingState,
    decode_training_state,
    is_pickle_name,
    refuse_pickles,
)
from orchestrator.storage import (
    ArtifactError,
    ArtifactNotFound,
    ChecksumError,
    FileDigest,
    Fs,
    PathEscape,
    StaleSource,
    check_name,
    check_under,
    is_name,
    numbered,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON)
"""Files a version must hold to become a checkpoint."""

_STEP_DIR = re.compile(r"step_(\d{6,})")
_POINTER = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}/)?step_\d{6,}")
"""What a ``latest`` pointer may hold: a step directory, optionally under a registration."""


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """``manifest.json`` of a step directory. ``files`` covers every file but the manifest.

    ``registered_at`` (when the registration was admitted) orders checkpoints of different
    registrations of one adapter name; within a registration ``step`` orders them.
    """

    format: int = 1
    adapter: str
    registration_id: str
    step: int
    version: int
    epoch: int
    final: bool = False
    cursor: CursorState | None = None
    source_uri: str
    created: float
    registered_at: float = 0.0
    files: dict[str, FileDigest]


class CheckpointRef(msgspec.Struct, frozen=True, kw_only=True):
    """A complete checkpoint: its directory ``uri`` (a PEFT export) and its manifest."""

    uri: str
    manifest: Manifest

    @property
    def order(self) -> tuple[float, int]:
        return (self.manifest.registered_at, self.manifest.step)


class CheckpointStore:
    """Checkpoints under ``root``: promotion, ``latest`` pointers, retention, lookup.

    ``source_roots``: where :meth:`promote` may copy versions from (the artifact store's root);
    empty: anywhere (the caller vouches for its source URIs).
    """

    def __init__(
        self,
        root: str,
        *,
        stale_temp_s: float = 3600.0,
        source_roots: Sequence[str] = (),
        **storage_options: Any,
    ) -> None:
        self.storage_options = storage_options
        self.stale_temp_s = stale_temp_s
        self.source_roots = tuple(source_roots)
        self._fs = Fs(root, storage_options)

    @property
    def root(self) -> str:
        return self._fs.uri(self._fs.root)

    def step_dir(self, adapter: str, registration_id: str, step: int) -> str:
        """URI of ``{root}/{adapter}/{registration_id}/step_{step:06d}``."""
        return self._fs.uri(f"{self._fs.reg_dir(adapter, registration_id)}/step_{step:06d}")

    def list_steps(self, adapter: str, registration_id: str) -> list[int]:
        """Steps with a (renamed, hence complete) step directory, ascending."""
        return numbered(self._fs.names(self._fs.reg_dir(adapter, registration_id)), _STEP_DIR)

    def registrations(self, adapter: str) -> list[str]:
        names = self._fs.names(self._fs.join(check_name("adapter name", adapter)))
        return [n for n in names if is_name(n) and n != LATEST]

    def read_manifest(self, checkpoint_uri: str) -> Manifest:
        """The manifest of the step directory ``checkpoint_uri``, which must lie under the root
        (:class:`~orchestrator.storage.PathEscape` otherwise)."""
        check_under(
            checkpoint_uri,
            [self.root],
            what="checkpoint",
            fix="name a step directory of this checkpoint store",
        )
        loc = Fs(checkpoint_uri, self.storage_options)
        return _decode_manifest(loc.read(f"{loc.root}/{MANIFEST}"), checkpoint_uri)

    def promote(
        self,
        source_uri: str,
        adapter: str,
        registration_id: str,
        *,
        step: int,
        version: int,
        epoch: int,
        final: bool = False,
        registered_at: float = 0.0,
    ) -> CheckpointRef:
        """Copy the version at ``source_uri`` to the step directory (atomic; idempotent).

        If the step directory exists and verifies with the same ``version``, it is reused without
        reading the source (which may be gc'd by now): ``final`` is added to its manifest if
        asked. One holding another version is replaced if its epoch is not newer than ``epoch``,
        else :class:`StaleSource`. The source's ``training_state.json`` must name ``step`` and
        ``version`` (else :class:`ArtifactError`) and an epoch not newer than ``epoch`` (else
        :class:`StaleSource`: the version was rewritten after a resume; an older epoch is fine, a
        resumed trainer re-announces versions it did not rewrite). Missing source files raise
        :class:`ArtifactNotFound`. Versions identify content: the trainer never publishes two
        different versions under one number for one step of a registration.
        """
        final_path = f"{self._fs.reg_dir(adapter, registration_id)}/step_{step:06d}"
        existing = self._reusable(final_path, epoch, version)
        if isinstance(existing, CheckpointRef):
            return self._reuse(final_path, existing.manifest, final)
        if self.source_roots:
            check_under(
                source_uri,
                self.source_roots,
                what="version to checkpoint",
                fix="promote only versions of the artifact store",
            )
        src = Fs(source_uri, self.storage_options)
        listed = src.names(src.root, files_only=True)
        _no_pickles(listed, source_uri)
        header = _check_header(
            src.read(f"{src.root}/{STATE_JSON}"), source_uri, step, version, epoch
        )
        # a pickle beside the safetensors files is never copied into a checkpoint (an export)
        names = [n for n in listed if not n.startswith(".") and not is_pickle_name(n)]
        missing = [n for n in CHECKPOINT_FILES if n not in names]
        if missing:
            raise ArtifactNotFound(f"version {source_uri} lacks {missing}; it cannot be restored")
        parent = final_path.rsplit("/", 1)[0]
        self._fs.fs.makedirs(parent, exist_ok=True)
        tmp = self._fs.temp_dir(parent, f"step_{step:06d}")
        files = {n: self._fs.copy_from(src, f"{src.root}/{n}", f"{tmp}/{n}") for n in names}
        manifest = Manifest(
            adapter=adapter,
            registration_id=registration_id,
            step=step,
            version=version,
            epoch=epoch,
            final=final,
            cursor=header.cursor,
            source_uri=source_uri,
            created=time.time(),
            registered_at=registered_at,
            files=files,
        )
        self._fs.write(f"{tmp}/{MANIFEST}", _encode_manifest(manifest))
        if existing is not None:
            log.warning("replacing %s: %s", self._fs.uri(final_path), existing)
            self._fs.replace_dir(tmp, final_path, last=MANIFEST)
        elif not self._fs.publish_dir(tmp, final_path, last=MANIFEST):
            self._fs.remove(tmp)  # a concurrent promoter of the same event won the rename
            won = self._reusable(final_path, epoch, version)
            if not isinstance(won, CheckpointRef):
                raise ArtifactError(f"{self._fs.uri(final_path)} appeared during promotion: {won}")
            return self._reuse(final_path, won.manifest, final)
        return CheckpointRef(uri=self._fs.uri(final_path), manifest=manifest)

    def _reusable(self, path: str, epoch: int, version: int) -> CheckpointRef | str | None:
        """The existing, verified checkpoint at ``path`` of ``version``; else None when there is
        none, or a string saying why the existing one must be replaced.

        Raises :class:`StaleSource` when it holds another version from a newer epoch.
        """
        if not self._fs.fs.exists(path):
            return None
        uri = self._fs.uri(path)
        try:
            manifest = verify(uri, **self.storage_options)
        except ArtifactError as exc:
            return f"it is not a valid checkpoint ({exc})"
        if manifest.version == version:
            return CheckpointRef(uri=uri, manifest=manifest)
        if manifest.epoch > epoch:
            raise StaleSource(f"{uri} holds epoch {manifest.epoch}; the request is epoch {epoch}")
        return f"it holds version {manifest.version} of epoch {manifest.epoch}"

    def _reuse(self, path: str, manifest: Manifest, final: bool) -> CheckpointRef:
        if final and not manifest.final:
            manifest = msgspec.structs.replace(manifest, final=True)
            self._fs.write_atomic(f"{path}/{MANIFEST}", _encode_manifest(manifest))
        return CheckpointRef(uri=self._fs.uri(path), manifest=manifest)

    def _valid_manifest(self, path: str) -> Manifest | None:
        try:
            return _decode_manifest(self._fs.read(f"{path}/{MANIFEST}"), self._fs.uri(path))
        except ArtifactError:
            return None

    def set_latest(self, ref: CheckpointRef) -> bool:
        """Point the registration's and the adapter's ``latest`` at ``ref`` unless they already
        name something newer; True when the adapter-level pointer names ``ref`` afterwards.

        Newer means a larger step within a registration, a larger ``(registered_at, step)``
        across registrations, so redelivered old events never move a pointer back.
        """
        m = ref.manifest
        reg_dir = self._fs.reg_dir(m.adapter, m.registration_id)
        current = self._pointer_target(reg_dir, m.adapter)
        if current is None or current.manifest.step <= m.step:
            self._fs.write_atomic(f"{reg_dir}/{LATEST}", f"step_{m.step:06d}".encode())
        adapter_dir = self._fs.join(m.adapter)
        current = self._pointer_target(adapter_dir, m.adapter)
        if current is None or current.order <= ref.order:
            target = f"{m.registration_id}/step_{m.step:06d}"
            self._fs.write_atomic(f"{adapter_dir}/{LATEST}", target.encode())
            return True
        return False

    def _pointer_target(self, directory: str, adapter: str) -> CheckpointRef | None:
        try:
            name = self._fs.read(f"{directory}/{LATEST}").decode(errors="replace").strip()
        except ArtifactNotFound:
            return None
        if not _POINTER.fullmatch(name):
            log.warning(
                "pointer %s/%s holds %r, not 'step_NNNNNN' or '<registration>/step_NNNNNN'; "
                "ignoring it",
                self._fs.uri(directory),
                LATEST,
                name,
            )
            return None
        try:
            path = self._fs.inside(f"{directory}/{name}")
        except PathEscape as exc:
            log.warning("pointer %s/%s: %s", self._fs.uri(directory), LATEST, exc)
            return None
        manifest = self._valid_manifest(path)
        if manifest is None or manifest.adapter != adapter:
            log.warning(
                "pointer %s/%s names %r, which is not a valid checkpoint",
                self._fs.uri(directory),
                LATEST,
                name,
            )
            return None
        return CheckpointRef(uri=self._fs.uri(path), manifest=manifest)

    def latest(self, adapter: str, registration_id: str = "") -> CheckpointRef | None:
        """The newest checkpoint of ``adapter`` (of one registration if given), or None.

        Follows the ``latest`` pointer; if it is missing or dangling, scans the step directories
        and returns the newest valid one.
        """
        reg_ids = [registration_id] if registration_id else self.registrations(adapter)
        top = self._fs.join(check_name("adapter name", adapter))
        pointer_dir = self._fs.reg_dir(adapter, registration_id) if registration_id else top
        ref = self._pointer_target(pointer_dir, adapter)
        if ref is not None:
            return ref
        found: list[CheckpointRef] = []
        for reg in reg_ids:
            reg_dir = self._fs.reg_dir(adapter, reg)
            for step in reversed(self.list_steps(adapter, reg)):
                manifest = self._valid_manifest(f"{reg_dir}/step_{step:06d}")
                if manifest is not None:
                    path = f"{reg_dir}/step_{step:06d}"
                    found.append(CheckpointRef(uri=self._fs.uri(path), manifest=manifest))
                    break
        return max(found, key=lambda r: r.order, default=None)

    def retain(self, adapter: str, registration_id: str, *, keep: int) -> list[int]:
        """Delete step directories beyond the newest ``keep``; returns the deleted steps.

        Never deletes the ``latest`` target, a final checkpoint, or a directory whose manifest
        cannot be read (it may be mid-move on an object store). Also sweeps temporary
        directories older than ``stale_temp_s`` (left by crashed writers).
        """
        reg_dir = self._fs.reg_dir(adapter, registration_id)
        steps = self.list_steps(adapter, registration_id)
        latest = self._pointer_target(reg_dir, adapter)
        protected = set(steps[-max(keep, 1) :])
        if latest is not None:
            protected.add(latest.manifest.step)
        deleted = []
        for step in steps:
            path = f"{reg_dir}/step_{step:06d}"
            manifest = self._valid_manifest(path) if step not in protected else None
            if manifest is None or manifest.final:
                continue
            self._fs.remove(path)
            deleted.append(step)
        for directory in (reg_dir, reg_dir.rsplit("/", 1)[0]):
            for name in self._fs.names(directory):
                path = f"{directory}/{name}"
                age = self._fs.age_s(path) if name.startswith(".tmp-") else None
                if age is not None and age > self.stale_temp_s:
                    self._fs.remove(path)
        return deleted


def _encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest)) + b"\n"


def _decode_manifest(data: bytes, uri: str) -> Manifest:
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ArtifactError(f"manifest of {uri} is unreadable: {exc}") from None
    bad = sorted(n for n in manifest.files if not is_name(n) or n == MANIFEST)
    if bad:
        raise ArtifactError(
            f"manifest of {uri} lists {bad}, which are not plain file names of the directory; "
            "the manifest is corrupt or forged: resume from another step directory"
        )
    return manifest


def _no_pickles(names: list[str], uri: str) -> None:
    """:func:`~events.adapter_format.refuse_pickles` as this store's :class:`ArtifactError`."""
    try:
        refuse_pickles(names, where=uri)
    except AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None


def _check_header(
    data: bytes, source_uri: str, step: int, version: int, epoch: int
) -> TrainingState:
    try:
        header = decode_training_state(data, where=f"{source_uri}/{STATE_JSON}")
    except AdapterFormatError as exc:
        raise ArtifactError(str(exc)) from None
    if header.epoch > epoch:
        raise StaleSource(
            f"{source_uri} was rewritten under epoch {header.epoch}; the request is epoch {epoch}"
        )
    if (header.step, header.version) != (step, version):
        raise ArtifactError(
            f"{source_uri}/{STATE_JSON} holds step {header.step}, version {header.version}; "
            f"expected step {step}, version {version}"
        )
    return header


def verify(checkpoint_uri: str, **storage_options: Any) -> Manifest:
    """Check every file of a step directory against its manifest; return the manifest.

    Raises :class:`ChecksumError` naming the first file whose size or sha256 differs,
    :class:`ArtifactNotFound` for a missing file, :class:`ArtifactError` for a bad manifest
    (one naming a file outside the directory included), and
    :class:`ArtifactError` for a directory holding a pickle instead of safetensors.
    """
    loc = Fs(checkpoint_uri, storage_options)
    manifest = _decode_manifest(loc.read(f"{loc.root}/{MANIFEST}"), checkpoint_uri)
    _no_pickles(loc.names(loc.root, files_only=True), checkpoint_uri)
    missing = [n for n in CHECKPOINT_FILES if n not in manifest.files]
    if missing:
        raise ArtifactError(f"manifest of {checkpoint_uri} does not list {missing}")
    for name, want in sorted(manifest.files.items()):
        got = loc.digest(f"{loc.root}/{name}")
        if got != want:
            raise ChecksumError(
                f"{checkpoint_uri}/{name}: {got.bytes} bytes, sha256 {got.sha256[:16]}…; manifest "
                f"says {want.bytes} bytes, sha256 {want.sha256[:16]}…. The checkpoint is corrupt; "
                "resume from an older step directory"
            )
    return manifest


def load_latest(
    ckpt_root: str, adapter: str, registration_id: str = "", **storage_options: Any
) -> CheckpointRef | None:
    """The newest checkpoint of ``adapter`` under ``ckpt_root`` (None if it has none).

    The trainer calls this for a ``resume: true`` registration, then :func:`verify`.
    """
    return CheckpointStore(ckpt_root, **storage_options).latest(adapter, registration_id)
