"""The checkpoint process: promotes published versions to durable checkpoints.

A state machine over the control log, read through the consumer group ``checkpoint`` (start
``"0"``; several processes may share the group):

- ``adapter.admitted`` → remember the registration's lifecycle state
  (:class:`~orchestrator.lifecycle.AdapterState`, folded with
  :func:`~orchestrator.lifecycle.transition`; :func:`~orchestrator.registrations.adopt` starts it
  at the admission, which carries the spec) in memory and, as msgspec JSON, in the hash
  ``<ns>:checkpoint:registrations`` (written with the ack, so a restarted process, or another
  process of the group, finds what it did not see). What this process needs of the state: the
  policy (``spec.checkpoint_interval``, ``spec.keep_checkpoints``), the ``epoch`` (fencing) and
  ``registered_at`` (the admission's time: it orders checkpoints of registrations of one name).
  ``adapter.retired`` forgets it.
- ``adapter.step_done`` with ``step % checkpoint_interval == 0`` → promote the version at the
  event's ``state_uri`` (else its version directory in the artifact store) to
  ``{checkpoints}/{adapter}/{registration_id}/step_{step:06d}/``.
- ``adapter.completed`` (budget or cancel) → promote version ``event.version`` as the final
  checkpoint (``final=True``: retention never deletes it).
- ``adapter.save_requested`` (a client's ``save_state``, from the trainer) → promote the version
  at its ``state_uri`` the same way, kept like a final one (retention never deletes a checkpoint
  a client named), record the client's ``tinker://`` path for it
  (:func:`events.futures.record_path`) and answer the client's future, all with the ack.

Every promotion moves the ``latest`` pointers, applies retention, and returns as effects,
committed atomically with the ack: ``adapter.checkpoint_saved(step, uri, final)``,
``adapter.exported(step, uri)`` (the step directory is itself the PEFT export), and the status
fields ``checkpoint`` and ``export`` (:func:`orchestrator.status.checkpoint_effects`; only when
the adapter's ``latest`` pointer names this checkpoint, so a redelivered old event or a late
final of a previous registration never rolls status back).

Bounded storage: the process's idle hook runs :class:`~orchestrator.housekeeping.Housekeeper`
every ``housekeeping_interval_s``: it deletes the versions nothing needs any more
(:mod:`orchestrator.retention`; this group's unacknowledged entries pin the versions they
name), expires the status of ended registrations, caps the dead-letter stream, and snapshots
and trims the control log (:mod:`orchestrator.compaction`). 1..N processes may run it.

Failure policy: a crash after the rename but before the ack is redelivered, finds the verified
step directory and only publishes (promotion is idempotent). A missing or inconsistent source
version raises :class:`~events.errors.HandlerError` (retried, then dead-lettered with the reason).
Events of an epoch older than the registration's current one, or whose source was rewritten by
a newer epoch, are fenced: acknowledged with no effect. A ``step_done`` or ``completed`` of an
epoch newer than the state in memory reads the stored state (another process of the group
handled the re-admission). A registration whose ``admitted`` event no process of the group saw
(log trimmed before the group existed) is learned from the source's ``training_state.json``: its
spec, step and version, under the event's epoch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec
import redis

from events.adapter_format import STATE_JSON, AdapterFormatError, decode_training_state
from events.bootstrap import EXIT_CONFIG, Bus, run_process
from events.codec import Decoder, stamp
from events.config import BusConfig, NonNegative, Positive, load
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import ConfigError, HandlerError
from events.futures import PathRecord, SaveWeightsResult, complete, record_path, state_path
from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    ControlEvent,
    Exported,
    Retired,
    SaveRequested,
    StepDone,
)
from events.specs import AdapterSpec
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointRef, CheckpointStore
from orchestrator.housekeeping import Housekeeper
from orchestrator.lifecycle import AdapterState, Phase, transition
from orchestrator.metrics import AdapterMetrics, StorageMetrics
from orchestrator.registrations import adopt
from orchestrator.status import checkpoint_effects
from orchestrator.storage import ArtifactError, StaleSource

log = logging.getLogger(__name__)

GROUP = "checkpoint"
"""Consumer group of every checkpoint process on the control log."""


class CheckpointProcess:
    """The handler of the checkpoint process; see the module doc.

    ``client`` is used for reads only (the registrations hash); every write is an effect.
    """

    def __init__(
        self,
        client: redis.Redis,
        streams: Streams,
        artifacts: ArtifactStore,
        checkpoints: CheckpointStore,
        *,
        source: str = "checkpoint",
    ) -> None:
        self.client = client
        self.streams = streams
        self.artifacts = artifacts
        self.checkpoints = checkpoints
        self.source = source
        self.registrations_key = streams.key("checkpoint", "registrations")
        self._states: dict[str, AdapterState] = {}  # registration id -> state

    def subscription(self) -> Subscription:
        return Subscription(self.streams.control, GROUP, Decoder(ControlEvent), start_id="0")

    def handle(self, delivery: Delivery[ControlEvent]) -> Effects:
        match delivery.event:
            case Admitted() as event:
                return self._on_admitted(event)
            case StepDone() as event:
                return self._on_step_done(event)
            case Completed() as event:
                return self._on_completed(event)
            case SaveRequested() as event:
                return self._on_save(event)
            case Retired(registration_id=registration_id):
                self._states.pop(registration_id, None)
                return Effects().command("HDEL", self.registrations_key, registration_id)
            case _:
                return Effects()

    # --- registrations -----------------------------------------------------------------------

    def stored(self, registration_id: str) -> AdapterState | None:
        """The registration's state as of its latest admission, as the process of the group
        that handled it stored it (None: none did, or it is a layout this version cannot read,
        e.g. an older one; the registration is then learned again)."""
        raw = self.client.hget(self.registrations_key, registration_id)
        if raw is None:
            return None
        try:
            return msgspec.json.decode(raw, type=AdapterState)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            log.warning("registration %s: stored state unreadable (%s)", registration_id, exc)
            return None

    def _on_admitted(self, event: Admitted) -> Effects:
        key = event.registration_id
        before = _newer(self._states.get(key), self.stored(key))
        state = adopt(event) if before is None else transition(before, event)
        if state is None:
            log.warning("%s/%s: admission of epoch %d ignored", event.adapter, key, event.epoch)
            return Effects()
        self._states[key] = state
        # written on every delivery, changed or not: a redelivery may follow a failed commit
        return Effects().hset(self.registrations_key, {key: msgspec.json.encode(state)})

    def _state(self, event: StepDone | Completed, source: str) -> AdapterState:
        """The registration's state after ``event``, from the one in memory, else the stored
        one (also when the event's epoch is newer), else learned from ``source``."""
        key = event.registration_id
        before = self._states.get(key)
        if before is None or event.epoch > before.epoch:
            before = _newer(before, self.stored(key))
        state = transition(before or self._learn(event, source), event)
        self._states[key] = state
        return state

    def _learn(self, event: StepDone | Completed, source: str) -> AdapterState:
        """A registration no admission was seen of, from the source's training state: its spec,
        step and version under the event's epoch (its slot is not recorded there, and this
        process needs none)."""
        try:
            raw = self.artifacts.read_file(source, STATE_JSON)
            saved = decode_training_state(raw, where=f"{source}/{STATE_JSON}")
        except (ArtifactError, AdapterFormatError) as exc:
            raise HandlerError(
                f"no adapter.admitted seen for {event.adapter}/{event.registration_id} and its "
                f"policy cannot be read from {source}/{STATE_JSON}: {exc}"
            ) from exc
        return AdapterState(
            name=event.adapter,
            registration_id=event.registration_id,
            phase=Phase.RUNNING,
            epoch=event.epoch,
            step=saved.step,
            version=saved.version,
            spec=saved.spec,
            priority=saved.spec.priority,
            registered_at=event.time,
            updated_at=event.time,
        )

    # --- promotion ---------------------------------------------------------------------------

    def _on_step_done(self, event: StepDone) -> Effects:
        source = event.state_uri or self._version_dir(
            event.adapter, event.registration_id, event.version
        )
        state = self._state(event, source)
        if event.step <= 0 or event.step % _spec(state).checkpoint_interval != 0:
            return Effects()
        return self._promote(event, state, source, final=False)

    def _on_completed(self, event: Completed) -> Effects:
        if event.epoch == 0:  # cancelled while waiting for a slot: it never trained
            return Effects()
        source = self._version_dir(event.adapter, event.registration_id, event.version)
        return self._promote(event, self._state(event, source), source, final=True)

    def _on_save(self, event: SaveRequested) -> Effects:
        """A client's ``save_state``: its version promoted and kept, its path, its answer."""
        state = _newer(self._states.get(event.registration_id), self.stored(event.registration_id))
        try:
            ref = self.checkpoints.promote(
                event.state_uri,
                event.adapter,
                event.registration_id,
                step=event.step,
                version=event.version,
                epoch=event.epoch,
                final=True,
                registered_at=state.registered_at if state is not None else event.time,
            )
        except (ArtifactError, ConfigError) as exc:  # StaleSource too: the trainer moved on
            raise HandlerError(
                f"cannot save state {event.name!r} of {event.adapter} from {event.state_uri}: {exc}"
            ) from exc
        newest = self.checkpoints.set_latest(ref)
        path = state_path(event.adapter, event.name)
        log.info("%s: state %r saved as %s (%s)", event.adapter, event.name, ref.uri, path)
        record = PathRecord(
            path=path,
            kind="state",
            model=event.adapter,
            registration_id=event.registration_id,
            version=event.version,
            step=event.step,
            uri=ref.uri,
        )
        effects = self._effects(event, ref, final=True, newest=newest)
        record_path(effects, self.streams, record)
        answer = SaveWeightsResult(path=path, version=event.version)
        complete(effects, self.streams, event.request_id, answer)
        return effects

    def _version_dir(self, adapter: str, registration_id: str, version: int) -> str:
        try:
            return self.artifacts.version_dir(adapter, registration_id, version)
        except ConfigError as exc:
            raise HandlerError(str(exc)) from exc

    def _promote(
        self, event: StepDone | Completed, state: AdapterState, source: str, *, final: bool
    ) -> Effects:
        name = f"{event.adapter}/{event.registration_id} step {event.step}"
        if event.epoch < state.epoch:
            log.info("%s: epoch %d is older than %d; fenced", name, event.epoch, state.epoch)
            return Effects()
        t0 = time.perf_counter()
        try:
            ref = self.checkpoints.promote(
                source,
                event.adapter,
                event.registration_id,
                step=event.step,
                version=event.version,
                epoch=event.epoch,
                final=final,
                registered_at=state.registered_at,
            )
        except StaleSource as exc:
            log.info("%s: fenced (%s)", name, exc)
            return Effects()
        except (ArtifactError, ConfigError) as exc:
            raise HandlerError(f"cannot checkpoint {name} from {source}: {exc}") from exc
        newest = self.checkpoints.set_latest(ref)
        keep = _spec(state).keep_checkpoints
        removed = self.checkpoints.retain(event.adapter, event.registration_id, keep=keep)
        log.info(
            "%s: checkpoint %s%s in %.2f s (retention removed %s)",
            name,
            ref.uri,
            " (final)" if final else "",
            time.perf_counter() - t0,
            removed,
        )
        return self._effects(event, ref, final=final, newest=newest)

    def _effects(
        self,
        event: StepDone | Completed | SaveRequested,
        ref: CheckpointRef,
        *,
        final: bool,
        newest: bool,
    ) -> Effects:
        adapter, reg_id, epoch = event.adapter, event.registration_id, event.epoch
        step, uri = ref.manifest.step, ref.uri
        saved = CheckpointSaved(
            adapter=adapter, registration_id=reg_id, epoch=epoch, step=step, uri=uri, final=final
        )
        exported = Exported(
            adapter=adapter, registration_id=reg_id, epoch=epoch, step=step, uri=uri
        )
        saved, exported = stamp(saved, source=self.source), stamp(exported, source=self.source)
        effects = Effects()
        effects.publish(self.streams.control, saved).publish(self.streams.control, exported)
        if newest:
            effects.extend(checkpoint_effects(self.streams, saved))
            effects.extend(checkpoint_effects(self.streams, exported))
        return effects


def _newer(state: AdapterState | None, other: AdapterState | None) -> AdapterState | None:
    """The state of the later admission (``state`` when the epochs are equal)."""
    if state is None or (other is not None and other.epoch > state.epoch):
        return other
    return state


def _spec(state: AdapterState) -> AdapterSpec:
    """The spec of an admitted registration (only a registration rejected before its spec
    decoded has none, and it is never admitted)."""
    if state.spec is None:
        raise HandlerError(f"registration {state.registration_id!r} has no spec to checkpoint")
    return state.spec


# --- process entry point ---------------------------------------------------------------------


class CheckpointConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of ``multilora checkpoint``: the bus plus the two stores.

    ``artifacts`` is the trainer's version store (read), ``checkpoints`` where durable checkpoints
    and PEFT exports are written (local directories or fsspec URLs). Both are required: they must
    be the trainer's, so a deployment names them once for both, in ``MULTILORA_ARTIFACTS`` /
    ``MULTILORA_CHECKPOINTS`` (or the same flags as the trainer's). With
    ``bus.metrics_port`` it serves the bus and per-adapter series (``docs/OBSERVABILITY.md``).

    Storage housekeeping (:mod:`orchestrator.housekeeping`; ``docs/ARCHITECTURE.md``,
    "Storage"): a pass every ``housekeeping_interval_s`` (0: never); the control log is
    compacted after ``compact_entries`` new entries or every ``compact_interval_s``; ended
    registrations' status lives ``status_ttl_s``; the dead-letter stream keeps about
    ``dead_maxlen`` letters; a control-log consumer group with no live consumer for
    ``group_retention_s`` is destroyed; in the control-log snapshot an ended registration
    becomes a tombstone (its spec dropped) ``tombstone_after_s`` after its last change and is
    forgotten after ``ended_retention_s`` (:mod:`orchestrator.compaction`); a process that
    stopped beating leaves the heartbeat registry after ``process_retention_s``.
    """

    bus: BusConfig = BusConfig()
    artifacts: Annotated[
        str,
        msgspec.Meta(description="version store to read", extra={"flags": ("--artifacts-root",)}),
    ]
    checkpoints: Annotated[
        str,
        msgspec.Meta(description="where checkpoints go", extra={"flags": ("--checkpoints-root",)}),
    ]
    housekeeping_interval_s: Annotated[
        NonNegative, msgspec.Meta(description="seconds between storage passes (0: none)")
    ] = 60.0
    compact_entries: Annotated[
        Positive, msgspec.Meta(description="compact the control log after this many entries")
    ] = 10_000
    compact_interval_s: Annotated[
        NonNegative, msgspec.Meta(description="compact the control log at least this often")
    ] = 600.0
    status_ttl_s: Annotated[
        Positive, msgspec.Meta(description="seconds an ended registration's status is kept")
    ] = 7 * 24 * 3600
    dead_maxlen: Annotated[
        Positive, msgspec.Meta(description="dead letters kept (approximately)")
    ] = 10_000
    group_retention_s: Annotated[
        Annotated[float, msgspec.Meta(gt=0)],
        msgspec.Meta(description="seconds a control-log group may have no live consumer"),
    ] = 24 * 3600.0
    tombstone_after_s: Annotated[
        NonNegative,
        msgspec.Meta(description="seconds an ended registration keeps its spec in the snapshot"),
    ] = 3600.0
    ended_retention_s: Annotated[
        Annotated[float, msgspec.Meta(gt=0)],
        msgspec.Meta(description="seconds an ended registration stays in the snapshot"),
    ] = 30 * 24 * 3600.0
    process_retention_s: Annotated[
        Annotated[float, msgspec.Meta(gt=0)],
        msgspec.Meta(description="seconds a process that stopped beating stays in status"),
    ] = 24 * 3600.0


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> CheckpointConfig:
    """File < environment < flags (see :mod:`events.config`)."""
    return load(
        CheckpointConfig,
        role="checkpoint",
        argv=argv,
        environ=environ,
        prog="multilora checkpoint",
        description=__doc__,
    )


def build(config: CheckpointConfig, bus: Bus) -> Consumer:
    """The checkpoint process's consumer; it also hosts the per-adapter metrics (it reads the
    whole control log)."""
    process = CheckpointProcess(
        bus.client,
        bus.streams,
        ArtifactStore(config.artifacts),
        CheckpointStore(config.checkpoints),
        source=bus.name,
    )
    adapters = AdapterMetrics(bus.registry, known=process.stored)
    subscriptions = [process.subscription()]
    idle = None
    if config.housekeeping_interval_s > 0:
        keeper = Housekeeper(
            bus.client,
            bus.streams,
            process.artifacts,
            checkpoint_group=GROUP,
            interval_s=config.housekeeping_interval_s,
            compact_interval_s=config.compact_interval_s,
            compact_entries=config.compact_entries,
            status_ttl_s=config.status_ttl_s,
            dead_maxlen=config.dead_maxlen,
            group_retention_s=config.group_retention_s,
            tombstone_after_s=config.tombstone_after_s,
            ended_retention_s=config.ended_retention_s,
            process_retention_s=config.process_retention_s,
            metrics=StorageMetrics(bus.registry),
        )
        idle = keeper.on_idle
    return bus.consumer(
        subscriptions,
        process.handle,
        observers=[adapters.observer(bus.streams.control)],
        on_idle=idle,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one checkpoint process until SIGTERM (warm shutdown) or, with ``--burst``, drained."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"multilora checkpoint: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_process("checkpoint", config.bus, lambda bus: build(config, bus))


if __name__ == "__main__":
    raise SystemExit(main())
