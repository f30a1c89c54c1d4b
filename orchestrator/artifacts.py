"""The artifact store and checkpoint layout: the on-disk contract between trainer and checkpointer.

Both roots are a local directory or an fsspec URL (``file://``, ``memory://``, ``s3://`` ...).
URIs handed out are plain absolute paths for local roots (so PEFT, vLLM and SGLang open them
directly) and protocol URLs otherwise.

Artifact store (written by the trainer, read by rollout workers and the checkpointer)::

    {root}/{adapter}/{registration_id}/v{version:06d}/
        adapter_config.json  adapter_model.safetensors    PEFT LoRA at the adapter's true rank
        training_state.safetensors                        Adam moments
        training_state.json                               TrainingState: step, version, epoch,
                                                          cursor, spec, slot scalars

The files and their readers and writers are :mod:`events.adapter_format`'s; this module moves
them as opaque bytes and reads only the training state's step, version, epoch and cursor.

Checkpoints (written by the checkpoint process, read by the trainer on resume)::

    {ckpt_root}/{adapter}/latest                          "registration_id/step_000120"
    {ckpt_root}/{adapter}/{registration_id}/latest        "step_000120"
    {ckpt_root}/{adapter}/{registration_id}/step_000120/  the version's files + manifest.json

A step directory is itself a PEFT export (loads unchanged in PEFT, vLLM and SGLang).
``manifest.json`` (:class:`Manifest`) lists the sha256 and size of every other file.

Atomicity: every directory is written under a hidden temporary name (``.tmp-...``) in its final
parent and then renamed, so a reader never sees half of it; a crash leaves only a hidden temporary
directory, swept by :meth:`CheckpointStore.retain` once older than ``stale_temp_s``. Pointer files
are replaced by write-to-temp + rename. On local disks files and directories are fsynced before
the rename. Object stores have no directory rename: files are moved one by one with the marker
file (``manifest.json``, ``adapter_config.json``) last, and readers trust a directory only through
its marker. Pointers are written only after their target is complete and retention never deletes a
pointer's target, so ``latest`` never names a missing directory. One exception, documented where
it happens: replacing a step directory that holds another version (possible only after a resume
from an older checkpoint) swaps two directories with two renames; a crash between them leaves a
dangling pointer, and :func:`load_latest` then falls back to a scan of the valid step directories.

This module is pure I/O (no Redis, no torch). It passes 600 lines because it is one contract:
the two stores, the pointer and retention rules and the atomic local/fsspec primitives they rest
on must agree with each other, and trainer and checkpointer import them from one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

import msgspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    STATE_JSON,
    STATE_TENSORS,
    AdapterFormatError,
    CursorState,
    TrainingState,
    decode_training_state,
)
from events.errors import ConfigError, MultiLoraError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, STATE_TENSORS, STATE_JSON)
"""Files a version must hold to become a checkpoint."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_STEP_DIR = re.compile(r"step_(\d{6,})")
_VERSION_DIR = re.compile(r"v(\d{6,})")
_CHUNK = 1 << 20


class ArtifactError(MultiLoraError):
    """An artifact or checkpoint is missing, inconsistent or corrupt."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    """A version directory or one of its files does not exist (never written, or gc'd)."""


class ChecksumError(ArtifactError):
    """A checkpoint file's size or sha256 differs from its manifest."""


class StaleSource(ArtifactError):
    """The source or existing checkpoint belongs to a newer epoch than the request (fenced)."""


class FileDigest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sha256: str
    bytes: int


class PublishedVersion(msgspec.Struct, frozen=True, kw_only=True):
    """A written version: ``uri`` of its directory; sha256/size of ``adapter_model.safetensors``."""

    uri: str
    version: int
    sha256: str
    bytes: int


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


def check_name(kind: str, value: str) -> str:
    """``value`` if it is a safe single path component, else :class:`ConfigError`."""
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} cannot name a directory: use 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


class _Fs:
    """One filesystem location: local paths get os-level atomic renames and fsync."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs, path = url_to_fs(url, **dict(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def reg_dir(self, adapter: str, registration_id: str) -> str:
        """``{root}/{adapter}/{registration_id}`` after checking both are safe names."""
        return self.join(
            check_name("adapter name", adapter), check_name("registration id", registration_id)
        )

    def uri(self, path: str) -> str:
        return path if self.local else str(self.fs.unstrip_protocol(path))

    def names(self, path: str, *, files_only: bool = False) -> list[str]:
        if not self.fs.isdir(path):
            return []
        entries = self.fs.ls(path, detail=True)
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in entries
            if not files_only or e["type"] == "file"
        )

    def digest(self, path: str) -> FileDigest:
        """sha256 and size of the file at ``path``, streamed."""
        h, n = hashlib.sha256(), 0
        try:
            f = self.fs.open(path, "rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"{self.uri(path)} does not exist") from None
        with f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                n += len(chunk)
        return FileDigest(h.hexdigest(), n)

    def read(self, path: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise ArtifactNotFound(f"{self.uri(path)} does not exist") from None

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        """A file opened for writing; on local disks flushed and fsynced on close."""
        if not self.local:
            with self.fs.open(path, "wb") as f:
                yield f
            return
        with open(path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def write(self, path: str, data: bytes | bytearray) -> None:
        with self.open_write(path) as f:
            f.write(data)

    def write_atomic(self, path: str, data: bytes | bytearray) -> None:
        """Replace ``path`` so readers see the old or the new content, never a mix."""
        if not self.local:
            self.fs.pipe_file(path, data)  # one object PUT: atomic on object stores
            return
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:12]}"
        self.write(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(parent)

    def temp_dir(self, parent: str, name: str) -> str:
        path = f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(path, exist_ok=True)
        return path

    def publish_dir(self, tmp: str, final: str, *, last: str) -> bool:
        """Rename ``tmp`` to ``final``; False (``tmp`` kept) if ``final`` already exists."""
        if self.local:
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if os.path.isdir(final):
                    return False
                raise ArtifactError(f"cannot rename {tmp} to {final}: {exc}") from exc
            _fsync_dir(final.rsplit("/", 1)[0])
            return True
        if self.fs.exists(final):
            return False
        names = self.names(tmp)
        for name in [n for n in names if n != last] + [n for n in names if n == last]:
            self.fs.mv(f"{tmp}/{name}", f"{final}/{name}")
        self.remove(tmp)
        return True

    def replace_dir(self, tmp: str, final: str, *, last: str) -> None:
        """Put ``tmp`` in place of an existing ``final`` (two renames; see the module doc)."""
        trash = f"{final.rsplit('/', 1)[0]}/.tmp-old-{uuid.uuid4().hex[:12]}"
        if self.local:
            os.rename(final, trash)
        else:
            self.fs.mv(final, trash, recursive=True)
        if not self.publish_dir(tmp, final, last=last):
            raise ArtifactError(f"{self.uri(final)} reappeared while being replaced")
        self.remove(trash)

    def remove(self, path: str) -> None:
        if self.local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def age_s(self, path: str) -> float | None:
        """Seconds since ``path`` (or, for object-store pseudo-directories, its newest file)
        changed; None when the filesystem cannot tell."""
        try:
            return time.time() - self.fs.modified(path).timestamp()
        except (NotImplementedError, FileNotFoundError, IsADirectoryError):
            pass
        try:
            stamps = [self.fs.modified(p).timestamp() for p in self.fs.find(path)]
        except (NotImplementedError, FileNotFoundError):
            return None
        return time.time() - max(stamps) if stamps else None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(data: bytes | bytearray) -> FileDigest:
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


def _numbered(names: list[str], pattern: re.Pattern[str]) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


class ArtifactStore:
    """Versions of every adapter under ``root`` (see the module doc for the layout).

    ``storage_options`` go to fsspec for ``root`` and for URIs read through this store.
    """

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.storage_options = storage_options
        self._fs = _Fs(root, storage_options)

    @property
    def root(self) -> str:
        return self._fs.uri(self._fs.root)

    def version_dir(self, adapter: str, registration_id: str, version: int) -> str:
        """URI of ``{root}/{adapter}/{registration_id}/v{version:06d}`` (no trailing slash)."""
        if version < 0:
            raise ConfigError(f"version must be >= 0, got {version}")
        return self._fs.uri(f"{self._fs.reg_dir(adapter, registration_id)}/v{version:06d}")

    def write_version(
        self,
        adapter: str,
        registration_id: str,
        version: int,
        files: Mapping[str, bytes | bytearray],
    ) -> PublishedVersion:
        """Write ``files`` (name → content) as the version's directory, atomically.

        ``files`` must hold ``adapter_config.json`` and ``adapter_model.safetensors``. A version
        written again (a trainer redoing a step after a crash) replaces the old directory.
        """
        missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if n not in files]
        if missing:
            raise ConfigError(f"a version needs {missing}; got files {sorted(files)}")
        bad = [n for n in files if not _NAME.fullmatch(n)]
        if bad:
            raise ConfigError(f"file names {bad} are not plain names; use [A-Za-z0-9._-]")
        parent = self._fs.reg_dir(adapter, registration_id)
        final = f"{parent}/v{version:06d}"
        self._fs.fs.makedirs(parent, exist_ok=True)
        tmp = self._fs.temp_dir(parent, f"v{version:06d}")
        for name, data in files.items():
            self._fs.write(f"{tmp}/{name}", data)
        if not self._fs.publish_dir(tmp, final, last=ADAPTER_CONFIG):
            log.warning("version %s is written again; replacing it", self._fs.uri(final))
            self._fs.replace_dir(tmp, final, last=ADAPTER_CONFIG)
        digest = _digest(files[ADAPTER_WEIGHTS])
        return PublishedVersion(
            uri=self._fs.uri(final), version=version, sha256=digest.sha256, bytes=digest.bytes
        )

    def describe(self, uri: str) -> PublishedVersion:
        """The :class:`PublishedVersion` of the existing version directory ``uri``."""
        loc = _Fs(uri, self.storage_options)
        match = _VERSION_DIR.fullmatch(loc.root.rsplit("/", 1)[-1])
        if match is None:
            raise ArtifactError(f"{uri} is not a version directory (…/v000123)")
        digest = loc.digest(f"{loc.root}/{ADAPTER_WEIGHTS}")
        return PublishedVersion(
            uri=loc.uri(loc.root),
            version=int(match.group(1)),
            sha256=digest.sha256,
            bytes=digest.bytes,
        )

    def read_file(self, uri: str, name: str) -> bytes:
        """The bytes of file ``name`` in the directory ``uri`` (:class:`ArtifactNotFound`)."""
        loc = _Fs(uri, self.storage_options)
        return loc.read(f"{loc.root}/{name}")

    def list_versions(self, adapter: str, registration_id: str) -> list[int]:
        """Complete versions of the registration, ascending (temporary directories excluded)."""
        return _numbered(self._fs.names(self._fs.reg_dir(adapter, registration_id)), _VERSION_DIR)

    def gc(
        self,
        adapter: str,
        registration_id: str,
        *,
        keep_last: int,
        protect: frozenset[int] | set[int] = frozenset(),
    ) -> list[int]:
        """Delete all but the newest ``keep_last`` versions and ``protect``; returns deleted ones.

        Safe against the checkpointer: checkpoints are copies, never links into this store.
        """
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
        versions = self.list_versions(adapter, registration_id)
        doomed = [v for v in versions[:-keep_last] if v not in protect]
        parent = self._fs.reg_dir(adapter, registration_id)
        for v in doomed:
            self._fs.remove(f"{parent}/v{v:06d}")
        return doomed


class CheckpointStore:
    """Checkpoints under ``root``: promotion, ``latest`` pointers, retention, lookup."""

    def __init__(self, root: str, *, stale_temp_s: float = 3600.0, **storage_options: Any) -> None:
        self.storage_options = storage_options
        self.stale_temp_s = stale_temp_s
        self._fs = _Fs(root, storage_options)

    @property
    def root(self) -> str:
        return self._fs.uri(self._fs.root)

    def step_dir(self, adapter: str, registration_id: str, step: int) -> str:
        """URI of ``{root}/{adapter}/{registration_id}/step_{step:06d}``."""
        return self._fs.uri(f"{self._fs.reg_dir(adapter, registration_id)}/step_{step:06d}")

    def list_steps(self, adapter: str, registration_id: str) -> list[int]:
        """Steps with a (renamed, hence complete) step directory, ascending."""
        return _numbered(self._fs.names(self._fs.reg_dir(adapter, registration_id)), _STEP_DIR)

    def registrations(self, adapter: str) -> list[str]:
        names = self._fs.names(self._fs.join(check_name("adapter name", adapter)))
        return [n for n in names if _NAME.fullmatch(n) and n != LATEST]

    def read_manifest(self, checkpoint_uri: str) -> Manifest:
        loc = _Fs(checkpoint_uri, self.storage_options)
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
        src = _Fs(source_uri, self.storage_options)
        header = _check_header(
            src.read(f"{src.root}/{STATE_JSON}"), source_uri, step, version, epoch
        )
        names = [n for n in src.names(src.root, files_only=True) if not n.startswith(".")]
        missing = [n for n in CHECKPOINT_FILES if n not in names]
        if missing:
            raise ArtifactNotFound(f"version {source_uri} lacks {missing}; it cannot be restored")
        parent = final_path.rsplit("/", 1)[0]
        self._fs.fs.makedirs(parent, exist_ok=True)
        tmp = self._fs.temp_dir(parent, f"step_{step:06d}")
        files = {n: self._copy(src, f"{src.root}/{n}", f"{tmp}/{n}") for n in names}
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

    def _copy(self, src: _Fs, src_path: str, dst_path: str) -> FileDigest:
        h, n = hashlib.sha256(), 0
        try:
            fin = src.fs.open(src_path, "rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"{src.uri(src_path)} vanished while being copied") from None
        with fin, self._fs.open_write(dst_path) as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
        return FileDigest(h.hexdigest(), n)

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
            name = self._fs.read(f"{directory}/{LATEST}").decode().strip()
        except ArtifactNotFound:
            return None
        path = f"{directory}/{name}"
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
        return msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        raise ArtifactError(f"manifest of {uri} is unreadable: {exc}") from None


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
    :class:`ArtifactNotFound` for a missing file, :class:`ArtifactError` for a bad manifest.
    """
    loc = _Fs(checkpoint_uri, storage_options)
    manifest = _decode_manifest(loc.read(f"{loc.root}/{MANIFEST}"), checkpoint_uri)
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
