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
are deleted only by :meth:`ArtifactStore.gc`; checkpoints are copies, never links into this
store, so gc never breaks one. The checkpoint store is :mod:`orchestrator.checkpoint_store`.
"""

from __future__ import annotations

import logging
import re
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
