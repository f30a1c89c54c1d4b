"""Filesystem primitives under the artifact and checkpoint stores: one root, atomic publishing.

A root is a local directory or an fsspec URL (``file://``, ``memory://``, ``s3://`` ...). URIs
handed out are plain absolute paths for local roots (so PEFT, vLLM and SGLang open them
directly) and protocol URLs otherwise. Both stores lay their directories out as
``{root}/{adapter}/{registration_id}/...`` (:meth:`Fs.reg_dir`), each name checked by
:func:`check_name`.

Atomicity: a directory is written under a hidden temporary name (``.tmp-...``) in its final
parent (:meth:`Fs.temp_dir`) and then renamed (:meth:`Fs.publish_dir`), so a reader never sees
half of it; a crash leaves only a hidden temporary directory, which listings skip. Small files
such as pointers are replaced by write-to-temp + rename (:meth:`Fs.write_atomic`). On local disks
files and directories are fsynced before the rename. Object stores have no directory rename:
files are moved one by one with a marker file last, and readers trust a directory only through
its marker. :meth:`Fs.replace_dir` puts a new directory in place of an existing one with two
renames (old one aside, new one in), so a crash between them leaves no directory at the final
name; each caller says what its readers do then.

Containment: :func:`is_under` is the one rule for "this path lies under that root", used by
every process that opens a path a producer (or a file) named: the stores, dataset paths, saved
states named by ``init_from``, the rollout server's ``lora_path``. Local paths (plain or
``file://``) are compared after :func:`os.path.realpath` of both sides (``..`` collapsed, every
symlink followed, a symlinked parent directory included) and by whole path components, so
``/root/abc`` is not under ``/root/ab``; other URLs (``s3://``, ``memory://``) have no symlinks
and are compared by protocol and components, with any ``.`` or ``..`` segment refused.
:func:`check_under` raises :class:`PathEscape` naming the value and the roots. :meth:`Fs.reg_dir`
and :meth:`Fs.inside` apply it to the stores' own directories, so a symlink planted inside a
store cannot redirect a write or a read outside it.

Also here: the one error hierarchy of both stores (:class:`ArtifactError` and its subclasses)
and :class:`FileDigest`, the sha256 and size of a file. Pure I/O (no Redis, no torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import msgspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from events.errors import ConfigError, MultiLoraError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20


class ArtifactError(MultiLoraError):
    """An artifact or checkpoint is missing, inconsistent or corrupt."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    """A version directory or one of its files does not exist (never written, or gc'd)."""


class ChecksumError(ArtifactError):
    """A checkpoint file's size or sha256 differs from its manifest."""


class StaleSource(ArtifactError):
    """The source or existing checkpoint belongs to a newer epoch than the request (fenced)."""


class PathEscape(ConfigError):
    """A path resolves outside every root it may use (``..``, an absolute path, a symlink, a
    URL of another filesystem). ``value`` is the path as given, ``roots`` the allowed roots."""

    def __init__(self, message: str, *, value: str, roots: Sequence[str]) -> None:
        super().__init__(message)
        self.value = value
        self.roots = tuple(roots)


class FileDigest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sha256: str
    bytes: int


def is_name(value: str) -> bool:
    """True when ``value`` is a safe single path component (1-128 of ``[A-Za-z0-9._-]``)."""
    return _NAME.fullmatch(value) is not None


def check_name(kind: str, value: str) -> str:
    """``value`` if it is a safe single path component, else :class:`ConfigError`."""
    if not is_name(value):
        raise ConfigError(
            f"{kind} {value!r} cannot name a directory: use 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


def local_path(value: str) -> str | None:
    """The local filesystem path ``value`` names (a plain path or a ``file://`` URL), or None
    for a URL of another protocol."""
    if value.startswith("file://"):
        return value.removeprefix("file://")
    return None if "://" in value else value


def is_under(path: str, root: str) -> bool:
    """Whether ``path`` lies under ``root`` (or is it): see the module doc for the rule.

    Local paths are compared after ``realpath`` of both (a relative path is relative to the
    working directory), by components; a local path is never under a URL root nor the reverse.
    """
    local, local_root = local_path(path), local_path(root)
    if local is not None and local_root is not None:
        real, base = os.path.realpath(local), os.path.realpath(local_root)
        return real == base or os.path.commonpath([real, base]) == base
    if local is not None or local_root is not None:
        return False
    proto, _, rest = path.partition("://")
    root_proto, _, root_rest = root.partition("://")
    parts = rest.split("/")
    if proto != root_proto or any(p in (".", "..") for p in parts):
        return False
    want = [p for p in root_rest.split("/") if p]
    return [p for p in parts if p][: len(want)] == want


def check_under(path: str, roots: Sequence[str], *, what: str, fix: str) -> str:
    """``path`` resolved (the real path of a local one, the URL itself otherwise) when it lies
    under one of ``roots`` (:func:`is_under`), else :class:`PathEscape` naming ``what`` (e.g.
    ``"dataset path"``), the value, the roots and ``fix``."""
    for root in roots:
        if is_under(path, root):
            local = local_path(path)
            return os.path.realpath(local) if local is not None else path
    local = local_path(path)
    seen = f" (it resolves to {os.path.realpath(local)!r})" if local is not None else ""
    raise PathEscape(
        f"{what} {path!r}{seen} is outside the allowed roots {list(roots)}; {fix} "
        "('..', symlinks and symlinked parent directories are resolved before this check)",
        value=path,
        roots=roots,
    )


def numbered(names: list[str], pattern: re.Pattern[str]) -> list[int]:
    """The numbers (group 1) of the ``names`` that fully match ``pattern``, ascending."""
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


def digest_bytes(data: bytes | bytearray) -> FileDigest:
    """sha256 and size of ``data`` held in memory."""
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


class Fs:
    """One filesystem location: local paths get os-level atomic renames and fsync."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs, path = url_to_fs(url, **dict(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def reg_dir(self, adapter: str, registration_id: str) -> str:
        """``{root}/{adapter}/{registration_id}`` after checking both are safe names and the
        directory (through any symlink) stays under the root (:meth:`inside`)."""
        return self.inside(
            self.join(
                check_name("adapter name", adapter),
                check_name("registration id", registration_id),
            )
        )

    def inside(self, path: str) -> str:
        """``path`` if it lies under this root (:func:`is_under`), else :class:`PathEscape`.

        For local roots the check follows symlinks, so a link planted in the store that points
        outside it is refused before anything is read or written through it.
        """
        target = path if self.local else self.uri(path)
        check_under(
            target,
            [self.uri(self.root)],
            what="store path",
            fix="remove the symlink or name a directory inside the store",
        )
        return path

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

    def copy_from(self, src: Fs, src_path: str, dst_path: str) -> FileDigest:
        """Stream ``src_path`` of ``src`` to ``dst_path`` here; the digest of the bytes copied.

        A source file that is gone raises :class:`ArtifactNotFound`.
        """
        h, n = hashlib.sha256(), 0
        try:
            fin = src.fs.open(src_path, "rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"{src.uri(src_path)} vanished while being copied") from None
        with fin, self.open_write(dst_path) as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
        return FileDigest(h.hexdigest(), n)

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
