"""An adapter's versions on the artifact store: written, announced, restored.

Every published version is a complete resume point (the four files of
:mod:`events.adapter_format`, built by :mod:`trainer.publish`). The trainer writes a run's
version *before* any event refers to it: ``admitted`` publishes version 0 (or the resumed
checkpoint), each trained step the next one, and only then are ``step_done`` and
``sync_requested`` published, with the acks of the groups the step used. A crash in between
leaves at most a version nobody refers to; the step is redone and the version written again.

A trained step's versions are written *behind* the step (:meth:`VersionPublisher.write_behind`):
the slot is copied off the device at once, and the files are encoded and written on writer
threads while the next step trains; :meth:`PendingVersion.durable` says when a version is on
the store, and only then may the process announce it (:meth:`AdapterRun.announce
<trainer.runs.AdapterRun.announce>`) and commit the step. Admission and client requests write
synchronously (:meth:`VersionPublisher.publish`): their answer waits for the version anyway.

The training state stored with the version of step ``s`` holds the data cursor from before the
tasks of step ``s + 1`` were issued (:attr:`~trainer.runs.AdapterRun.cursor_before`), so a
restore from it issues the same prompts again.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from events.adapter_format import (
    ADAPTER_WEIGHTS,
    STATE_JSON,
    STATE_TENSORS,
    AdapterFormatError,
    decode_training_state,
)
from events.schema import SyncRequested
from events.specs import AdapterSpec
from orchestrator.artifacts import ArtifactStore, PublishedVersion
from orchestrator.cursor import DataCursor
from orchestrator.storage import ArtifactError, is_under
from trainer.inject import MultiLoraModel
from trainer.optim import SlotAdamW
from trainer.publish import CapturedSlot, VersionInfo, capture_slot, encode_version, restore_slot
from trainer.runs import AdapterRun

GATE_MAX_S = 0.25
"""Longest a captured version waits for :meth:`VersionPublisher.release` before it is encoded
anyway (a safety net: the trainer releases every write within a step or when it goes idle)."""


@dataclass(frozen=True)
class PendingVersion:
    """A run's version being written: the step and version it holds, the write, and the gate
    the write waits at before it encodes (see :meth:`VersionPublisher.write_behind`)."""

    run: AdapterRun
    step: int
    version: int
    write: Future[PublishedVersion]
    gate: threading.Event

    def durable(self) -> bool:
        """The write has finished (successfully or not: :meth:`announce` raises its error)."""
        return self.write.done()

    def announce(self) -> PublishedVersion:
        """Wait for the write (opening its gate); make it the run's announced version; return
        it."""
        self.gate.set()
        published = self.write.result()
        self.run.announce(
            self.step, self.version, published.uri, (published.sha256, published.bytes)
        )
        return published


class VersionPublisher:
    """Writes runs' versions to ``artifacts`` and restores runs from them.

    ``writers`` threads write the versions of one step concurrently (each write ends in fsyncs,
    which wait on the disk, not on Python); the files are built one after another first (each a
    few device-to-host copies of the slot).
    """

    def __init__(
        self,
        *,
        model: MultiLoraModel,
        optimizer: SlotAdamW,
        artifacts: ArtifactStore,
        base_model: str,
        writers: int = 4,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.artifacts = artifacts
        self.base_model = base_model
        self._writers = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="publish")
        self._gates: list[threading.Event] = []  # of captured versions not released yet
        self._lock = threading.Lock()

    def write_behind(
        self, runs: Sequence[AdapterRun], captured: Mapping[int, CapturedSlot] | None = None
    ) -> list[PendingVersion]:
        """Capture the current version of each run now (device-to-host copies of its slot;
        ``captured``: already copied, by slot — the compute thread copies a step's slots before
        the next step may move them) and encode and write it on the writer threads; the runs
        may train on at once.

        Encoding is Python work that would compete with the trainer loop's own (packing the
        next step, launching its kernels) for the interpreter, so each write first waits at a
        gate until :meth:`release` (the loop calls it once the next step's device work runs,
        or when it goes idle), :meth:`PendingVersion.announce`, or :data:`GATE_MAX_S`."""
        pending = []
        for run in runs:
            info = self._info(run)
            slot = (
                captured[run.slot]
                if captured is not None and run.slot in captured
                else capture_slot(self.model, self.optimizer, run.slot, run.spec, run.name)
            )
            gate = threading.Event()
            write = self._writers.submit(self._write, info, slot, gate)
            pending.append(PendingVersion(run, run.step, run.version, write, gate))
            with self._lock:
                self._gates.append(gate)
        return pending

    def capture(self, runs: Sequence[AdapterRun]) -> dict[int, CapturedSlot]:
        """The runs' slots copied off the device now, by slot (for :meth:`write_behind`)."""
        return {
            run.slot: capture_slot(self.model, self.optimizer, run.slot, run.spec, run.name)
            for run in runs
        }

    def release(self) -> None:
        """Let every captured version waiting at its gate be encoded and written now (safe from
        any thread: the compute thread calls it while the device computes)."""
        with self._lock:
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.set()

    def publish(self, runs: Sequence[AdapterRun]) -> list[str]:
        """Write the current version of each run and wait for it; announce it; return the URIs
        (in order)."""
        return [p.announce().uri for p in self.write_behind(runs)]

    def _write(
        self, info: VersionInfo, captured: CapturedSlot, gate: threading.Event
    ) -> PublishedVersion:
        gate.wait(GATE_MAX_S)
        files = encode_version(self.model, captured, info, self.base_model)
        return self.artifacts.write_version(info.adapter, info.registration_id, info.version, files)

    def close(self) -> None:
        """Wait for writes in flight; stop the writer threads."""
        self.release()
        self._writers.shutdown(wait=True)

    def sync_requested(self, run: AdapterRun) -> SyncRequested:
        """The ``sync_requested`` of the run's newest version (hashed from the store when the
        run was restored and has not published since)."""
        if run.published is None:
            data = self.artifacts.read_file(run.uri, ADAPTER_WEIGHTS)
            run.published = (hashlib.sha256(data).hexdigest(), len(data))
        sha256, size = run.published
        return SyncRequested(
            adapter=run.name,
            registration_id=run.registration_id,
            epoch=run.epoch,
            version=run.announced_version,
            step=run.announced_step,
            uri=run.uri,
            sha256=sha256,
            bytes=size,
        )

    def restore(self, name: str, registration_id: str, slot: int, uri: str) -> AdapterRun:
        """Load the version at ``uri`` into ``slot`` exactly; the run continues from it.

        The run's epoch and spec are the version's; a caller resuming under a new epoch or a
        new registration sets them.
        """
        info = restore_slot(
            self.model,
            self.optimizer,
            slot,
            self.artifacts.read_file(uri, STATE_TENSORS),
            self.artifacts.read_file(uri, STATE_JSON),
            self.artifacts.read_file(uri, ADAPTER_WEIGHTS),
        )
        return AdapterRun(
            name=name,
            registration_id=registration_id,
            epoch=info.epoch,
            slot=slot,
            spec=info.spec,
            cursor=DataCursor.restore(info.cursor),
            step=info.step,
            version=info.version,
            uri=uri,
            issued_through=info.step,
            announced_step=info.step,
            announced_version=info.version,
        )

    def start_from(self, slot: int, uri: str, spec: AdapterSpec) -> None:
        """Start ``slot`` from the checkpoint at ``uri`` (``spec.init_from``): its weights and,
        with ``spec.init_optimizer``, its Adam moments and update count (else fresh ones); then
        ``spec``'s optimizer settings. The slot's rank and alpha become the checkpoint's (the
        trainer admits only a spec of the same rank: :meth:`init_problem`)."""
        restore_slot(
            self.model,
            self.optimizer,
            slot,
            self.artifacts.read_file(uri, STATE_TENSORS),
            self.artifacts.read_file(uri, STATE_JSON),
            self.artifacts.read_file(uri, ADAPTER_WEIGHTS),
        )
        if not spec.init_optimizer:
            self.optimizer.reset(slot)
        self.optimizer.update_settings(slot, spec.optim, spec.steps)

    def init_problem(self, spec: AdapterSpec, root: str) -> str:
        """Why ``spec.init_from`` cannot be loaded (``""``: it can): it must lie under the
        checkpoint ``root`` (no escape through ``..`` or a symlink), be readable, and hold a
        training state of ``spec.rank``."""
        uri = spec.init_from
        if not _under(uri, root):
            return (
                f"init_from {uri!r} is not under the checkpoint root {root!r}; name a saved state"
            )
        try:
            saved = decode_training_state(self.artifacts.read_file(uri, STATE_JSON))
        except (ArtifactError, AdapterFormatError) as exc:
            return f"init_from {uri!r} holds no readable training state: {exc}"
        if saved.slot.rank != spec.rank:
            rank = saved.slot.rank
            return f"init_from {uri!r} has rank {rank}; register it with rank = {rank}"
        return ""

    def _info(self, run: AdapterRun) -> VersionInfo:
        return VersionInfo(
            adapter=run.name,
            registration_id=run.registration_id,
            step=run.step,
            version=run.version,
            epoch=run.epoch,
            cursor=run.cursor_before.get(run.next_step, run.cursor.state()),
            spec=run.spec,
        )


def _under(uri: str, root: str) -> bool:
    """``uri`` lies inside ``root`` (the store's one containment rule: symlinks and ``..``
    resolved, compared by path components)."""
    return is_under(uri, root)
