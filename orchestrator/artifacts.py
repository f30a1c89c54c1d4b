"""The artifact store: adapter versions, written by the trainer, read by rollout and checkpointer.

``root`` is a local directory or an fsspec URL (see :mod:`orchestrator.storage` for the URIs
handed out and the atomic primitives). Layout::

    {root}/{adapter}/{registration_id}/v{version:06d}/
        adapter_config.json  adapter_model.safetensors    PEFT LoRA at the adapter's true rank
        training_state.safetensors                        Adam moments
        training_state.json                               TrainingState: step, version, epoch,
                                                          cursor, spec, slot scalars

The files and their readers and writers are :mod:`events.adapter_format`'s; this module moves
them as opaque bytes. A version directory is written under a temporary name and renamed, with
``adapter_config.json`` as the marker file on object stores, so a listed version is complete. A
version written again (a trainer redoing a step after a crash) replaces the old directory; a
crash between the two renames leaves the version missing, which readers see as gc'd. Versions
are deleted only by :meth:`ArtifactStore.delete_version` (the policy is
:mod:`orchestrator.retention`'s, run by the checkpoint process); checkpoints are copies, never
links into this store, so deleting a version never breaks one. The checkpoint store is
:mod:`orchestrator.checkpoint_store`.

Deleting is safe against a reader mid-load: on a local disk the version directory is first
renamed to a temporary name (so it is no longer listed and its path no longer resolves) and
then removed; a reader that opened its files before keeps reading them (POSIX), one that comes
after finds nothing and fails with a clear "not found" (the rollout worker's load error, a
failed task, retried by the trainer at a newer version). On object stores the marker file
``adapter_config.json`` goes first, so the version stops being complete before its weights go.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

from events.adapter_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from events.errors import ConfigError
from orchestrator.storage import ArtifactError, Fs, digest_bytes, is_name, numbered

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"v(\d{6,})")


class PublishedVersion(msgspec.Struct, frozen=True, kw_only=True):
    """A written version: ``uri`` of its directory; sha256/size of ``adapter_model.safetensors``."""

    uri: str
    version: int
    sha256: str
    bytes: int


class ArtifactStore:
    """Versions of every adapter under ``root`` (see the module doc for the layout).

    ``storage_options`` go to fsspec for ``root`` and for URIs read through this store.
    """

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.storage_options = storage_options
        self._fs = Fs(root, storage_options)

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
        bad = [n for n in files if not is_name(n)]
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
        digest = digest_bytes(files[ADAPTER_WEIGHTS])
        return PublishedVersion(
            uri=self._fs.uri(final), version=version, sha256=digest.sha256, bytes=digest.bytes
        )

    def describe(self, uri: str) -> PublishedVersion:
        """The :class:`PublishedVersion` of the existing version directory ``uri``."""
        loc = Fs(uri, self.storage_options)
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
        loc = Fs(uri, self.storage_options)
        return loc.read(f"{loc.root}/{name}")

    def list_versions(self, adapter: str, registration_id: str) -> list[int]:
        """Complete versions of the registration, ascending (temporary directories excluded)."""
        return numbered(self._fs.names(self._fs.reg_dir(adapter, registration_id)), _VERSION_DIR)

    def registrations(self) -> list[tuple[str, str]]:
        """Every ``(adapter, registration_id)`` with a directory in the store, sorted (names
        that are not safe names, and temporary directories, are skipped)."""
        found = []
        for adapter in self._fs.names(self._fs.root):
            if not is_name(adapter) or adapter.startswith("."):
                continue
            for registration in self._fs.names(self._fs.join(adapter)):
                if is_name(registration) and not registration.startswith("."):
                    found.append((adapter, registration))
        return found

    def version_bytes(self, adapter: str, registration_id: str, version: int) -> int:
        """Bytes the version's directory holds (0 when it does not exist)."""
        path = f"{self._fs.reg_dir(adapter, registration_id)}/v{version:06d}"
        return self._bytes(path)

    def delete_version(self, adapter: str, registration_id: str, version: int) -> int:
        """Delete one version (safe against readers: see the module doc); returns the bytes
        freed, 0 when it was already gone (another process deleted it: idempotent)."""
        parent = self._fs.reg_dir(adapter, registration_id)
        path = f"{parent}/v{version:06d}"
        size = self._bytes(path)
        if self._fs.local:
            doomed = f"{parent}/.tmp-gc-v{version:06d}-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                return 0
            self._fs.remove(doomed)
            return size
        if not self._fs.fs.exists(path):
            return 0
        marker = f"{path}/{ADAPTER_CONFIG}"
        if self._fs.fs.exists(marker):
            self._fs.fs.rm(marker)
        self._fs.remove(path)
        return size

    def delete_registration(self, adapter: str, registration_id: str) -> int:
        """Delete the registration's whole directory (every version and any temporary one);
        returns the bytes freed. Only for a registration nobody writes to any more (ended)."""
        path = self._fs.reg_dir(adapter, registration_id)
        if not self._fs.fs.isdir(path):
            return 0
        freed = sum(
            self.delete_version(adapter, registration_id, v)
            for v in self.list_versions(adapter, registration_id)
        )
        rest = self._bytes(path)
        self._fs.remove(path)
        return freed + rest

    def _bytes(self, path: str) -> int:
        try:
            return int(self._fs.fs.du(path, total=True)) if self._fs.fs.isdir(path) else 0
        except FileNotFoundError:  # deleted meanwhile by another process
            return 0

    def gc(
        self,
        adapter: str,
        registration_id: str,
        *,
        keep_last: int,
        protect: frozenset[int] | set[int] = frozenset(),
    ) -> list[int]:
        """Delete all but the newest ``keep_last`` versions and ``protect``; returns deleted ones.

        A plain count rule for tools and tests; the service's rule (staleness, checkpoints,
        workers, saved paths) is :mod:`orchestrator.retention`'s.
        """
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
        versions = self.list_versions(adapter, registration_id)
        doomed = [v for v in versions[:-keep_last] if v not in protect]
        for v in doomed:
            self.delete_version(adapter, registration_id, v)
        return doomed
