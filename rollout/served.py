"""The adapter versions one rollout worker serves: fetched, verified, loaded, forgotten.

A worker serves each registration under its :func:`~rollout.groups.served_name`. A version is
loaded when a task or a sync needs it: :class:`~rollout.backend.WeightsFetcher` turns the
published URI into a local PEFT directory and the sha256 of its weights, which is checked
against the one the trainer announced (when known), and the
:class:`~rollout.backend.GenerationBackend` loads it. Recorded per served version:

- the sha256 of its weights. A version published again with other content (a trainer that redid
  a step after a crash) is unloaded and loaded again: versions are immutable in engines.
- when it began serving (``clock()`` at the load), the end of the latency a sync reports.

The backend may evict old versions (``keep_versions``) on its own; the records follow it.
Errors: :class:`~rollout.backend.WeightsError` (unreadable URI, checksum mismatch) and
:class:`~rollout.backend.AdapterLoadError` (files the backend cannot serve) are properties of
the artifact; :class:`~rollout.backend.BackendUnavailableError` is transient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollout.backend import GenerationBackend, WeightsError, WeightsFetcher
from rollout.metrics import RolloutMetrics


@dataclass(frozen=True)
class Fetched:
    """A version fetched and read ahead (:meth:`ServedVersions.fetch_ahead`): its local
    directory, the sha256 of its weights, and what the backend read from it."""

    uri: str
    path: Path
    sha256: str
    read: Any


class ServedVersions:
    """The versions ``backend`` serves for this worker, with their sha256 and load time.

    ``loaded_sha`` and ``serving_since`` are keyed by ``(served name, version)``.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        weights: WeightsFetcher,
        metrics: RolloutMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.weights = weights
        self.metrics = metrics
        self.clock = clock
        self.loaded_sha: dict[tuple[str, int], str] = {}
        self.serving_since: dict[tuple[str, int], float] = {}

    def versions(self, name: str) -> tuple[int, ...]:
        """The versions of ``name`` new batches may use, ascending."""
        return self.backend.versions(name)

    def serves(self, name: str, version: int, sha256: str) -> bool:
        """Whether ``name@version`` is served with exactly these weights."""
        key = (name, version)
        return self.loaded_sha.get(key) == sha256 and version in self.versions(name)

    def since(self, name: str, version: int) -> float:
        """When ``name@version`` began serving (now, if it is not recorded)."""
        return self.serving_since.get((name, version), self.clock())

    def usable(self, name: str, version: int, uri: str, *, expect_sha256: str = "") -> int:
        """Serve ``version`` or a newer loaded one; returns the version to generate with.

        A newer version already loaded is as good (the trainer allows some staleness and the
        group reports the version used); otherwise ``version`` is loaded from ``uri``.
        """
        served = self.versions(name)
        if version in served:
            return version
        newer = [v for v in served if v > version]
        if newer:
            return max(newer)
        self.load(name, version, uri, expect_sha256=expect_sha256)
        return version

    def fetch_ahead(self, name: str, version: int, uri: str) -> Fetched:
        """Fetch ``name@version`` and read its files, touching nothing this object serves: the
        part of a load a consumer's reader thread can do while the handler generates."""
        path, sha256 = self.weights.fetch(uri, name, version)
        return Fetched(uri, path, sha256, self.backend.read(str(path)))

    def load(
        self,
        name: str,
        version: int,
        uri: str,
        *,
        expect_sha256: str = "",
        fetched: Fetched | None = None,
    ) -> None:
        """Fetch, verify (when ``expect_sha256`` is given) and serve ``name@version``
        (``fetched``: fetched and read ahead from ``uri``)."""
        with self.metrics.load_timer():
            if fetched is not None and fetched.uri == uri:
                path, sha256, read = fetched.path, fetched.sha256, fetched.read
            else:
                (path, sha256), read = self.weights.fetch(uri, name, version), None
            if expect_sha256 and sha256 != expect_sha256:
                raise WeightsError(
                    f"sha256 of {path}/adapter_model.safetensors is {sha256}, the sync event says "
                    f"{expect_sha256}; the artifact is corrupt or was overwritten"
                )
            if self.loaded_sha.get((name, version), sha256) != sha256:
                self.backend.unload(name, version)
            self.backend.load(name, version, str(path), read=read)
        self.loaded_sha[(name, version)] = sha256
        self.serving_since[(name, version)] = self.clock()
        self._forget_unserved(name)

    def drop(self, name: str) -> None:
        """Stop serving every version of ``name`` and delete its cached copies."""
        self.backend.unload(name)
        self.weights.forget(name)
        self._forget_unserved(name)

    def _forget_unserved(self, name: str) -> None:
        """Drop the records of ``name``'s versions the backend no longer serves."""
        served = set(self.versions(name))  # older versions may have been evicted
        self.loaded_sha = {
            k: v for k, v in self.loaded_sha.items() if k[0] != name or k[1] in served
        }
        self.serving_since = {
            k: v for k, v in self.serving_since.items() if k[0] != name or k[1] in served
        }
        self.metrics.adapters_loaded(len(self.loaded_sha))
