"""The checkpoint process: promotes published versions to durable checkpoints.

A state machine over the control log, read through the consumer group ``checkpoint`` (start
``"0"``; several processes may share the group):

- ``adapter.admitted`` → remember the registration's policy (``checkpoint_interval``,
  ``keep_checkpoints``, epoch, admission time) in memory and in the hash
  ``<ns>:checkpoint:registrations`` (written with the ack, so a restarted process, or another
  process of the group, finds what it did not see). ``adapter.retired`` forgets it.
- ``adapter.step_done`` with ``step % checkpoint_interval == 0`` → promote the version at the
  event's ``state_uri`` (else its version directory in the artifact store) to
  ``{checkpoints}/{adapter}/{registration_id}/step_{step:06d}/``.
- ``adapter.completed`` (budget or cancel) → promote version ``event.version`` as the final
  checkpoint (``final=True``: retention never deletes it).

Every promotion moves the ``latest`` pointers, applies retention, and returns as effects,
committed atomically with the ack: ``adapter.checkpoint_saved(step, uri, final)``,
``adapter.exported(step, uri)`` (the step directory is itself the PEFT export), and the status
fields ``checkpoint`` and ``export`` (:func:`orchestrator.status.checkpoint_effects`; only when
the adapter's ``latest`` pointer names this checkpoint, so a redelivered old event or a late
final of a previous registration never rolls status back).

Failure policy: a crash after the rename but before the ack is redelivered, finds the verified
step directory and only publishes (promotion is idempotent). A missing or inconsistent source
version raises :class:`~events.errors.HandlerError` (retried, then dead-lettered with the reason).
Events of an epoch older than the registration's current one, or whose source was rewritten by
a newer epoch, are fenced: acknowledged with no effect. A registration whose ``admitted`` event
this process never saw (log trimmed before the group existed) is learned from the ``spec`` in
the source's ``training_state.json``.
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
from events.config import BusConfig, load
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import ConfigError, HandlerError
from events.schema import (
    Admitted,
    CheckpointSaved,
    Completed,
    ControlEvent,
    Exported,
    Retired,
    StepDone,
)
from events.streams import Streams
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoint_store import CheckpointRef, CheckpointStore
from orchestrator.metrics import AdapterMetrics
from orchestrator.status import checkpoint_effects
from orchestrator.storage import ArtifactError, StaleSource

log = logging.getLogger(__name__)

GROUP = "checkpoint"
"""Consumer group of every checkpoint process on the control log."""


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """What the checkpointer keeps per registration (persisted as JSON in the hash)."""

    interval: int
    keep: int
    epoch: int
    registered_at: float

    def due(self, step: int) -> bool:
        """Whether ``step`` is a checkpoint step (never when ``interval <= 0``)."""
        return self.interval > 0 and step > 0 and step % self.interval == 0


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
        self._known: dict[str, Registration] = {}

    def subscription(self) -> Subscription:
        return Subscription(self.streams.control, GROUP, Decoder(ControlEvent), start_id="0")

    def handle(self, delivery: Delivery) -> Effects:
        event = delivery.event
        if isinstance(event, Admitted):
            return self._on_admitted(event)
        if isinstance(event, StepDone):
            return self._on_step_done(event)
        if isinstance(event, Completed):
            if event.epoch == 0:  # cancelled while waiting for a slot: it never trained
                return Effects()
            source = self._version_dir(event.adapter, event.registration_id, event.version)
            return self._promote(event, event.step, event.version, source, final=True)
        if isinstance(event, Retired):
            self._known.pop(event.registration_id, None)
            return Effects().command("HDEL", self.registrations_key, event.registration_id)
        return Effects()

    # --- registrations -----------------------------------------------------------------------

    def _on_admitted(self, event: Admitted) -> Effects:
        old = self._lookup(event.registration_id)
        reg = Registration(
            interval=event.spec.checkpoint_interval,
            keep=event.spec.keep_checkpoints,
            epoch=max(event.epoch, old.epoch) if old else event.epoch,
            registered_at=old.registered_at if old else event.time,
        )
        self._known[event.registration_id] = reg
        value = msgspec.json.encode(reg)
        return Effects().hset(self.registrations_key, {event.registration_id: value})

    def _lookup(self, registration_id: str) -> Registration | None:
        if registration_id in self._known:
            return self._known[registration_id]
        raw = self.client.hget(self.registrations_key, registration_id)
        if raw is None:
            return None
        reg = msgspec.json.decode(raw, type=Registration)
        self._known[registration_id] = reg
        return reg

    def _registration(self, event: StepDone | Completed, source: str) -> Registration:
        """The registration's policy: known, stored, or read from the source's training state."""
        reg = self._lookup(event.registration_id)
        if reg is not None:
            return reg
        try:
            raw = self.artifacts.read_file(source, STATE_JSON)
            spec = decode_training_state(raw, where=f"{source}/{STATE_JSON}").spec
        except (ArtifactError, AdapterFormatError) as exc:
            raise HandlerError(
                f"no adapter.admitted seen for {event.adapter}/{event.registration_id} and its "
                f"policy cannot be read from {source}/{STATE_JSON}: {exc}"
            ) from exc
        reg = Registration(
            interval=spec.checkpoint_interval,
            keep=spec.keep_checkpoints,
            epoch=event.epoch,
            registered_at=event.time,
        )
        self._known[event.registration_id] = reg
        return reg

    # --- promotion ---------------------------------------------------------------------------

    def _on_step_done(self, event: StepDone) -> Effects:
        source = event.state_uri or self._version_dir(
            event.adapter, event.registration_id, event.version
        )
        reg = self._registration(event, source)
        if not reg.due(event.step):
            return Effects()
        return self._promote(event, event.step, event.version, source, final=False)

    def _version_dir(self, adapter: str, registration_id: str, version: int) -> str:
        try:
            return self.artifacts.version_dir(adapter, registration_id, version)
        except ConfigError as exc:
            raise HandlerError(str(exc)) from exc

    def _promote(
        self, event: StepDone | Completed, step: int, version: int, source: str, *, final: bool
    ) -> Effects:
        reg = self._registration(event, source)
        name = f"{event.adapter}/{event.registration_id} step {step}"
        if event.epoch < reg.epoch:
            log.info("%s: epoch %d is older than %d; fenced", name, event.epoch, reg.epoch)
            return Effects()
        t0 = time.perf_counter()
        try:
            ref = self.checkpoints.promote(
                source,
                event.adapter,
                event.registration_id,
                step=step,
                version=version,
                epoch=event.epoch,
                final=final,
                registered_at=reg.registered_at,
            )
        except StaleSource as exc:
            log.info("%s: fenced (%s)", name, exc)
            return Effects()
        except (ArtifactError, ConfigError) as exc:
            raise HandlerError(f"cannot checkpoint {name} from {source}: {exc}") from exc
        newest = self.checkpoints.set_latest(ref)
        removed = self.checkpoints.retain(event.adapter, event.registration_id, keep=reg.keep)
        log.info("%s: checkpoint %s%s in %.2f s (retention removed %s)", name, ref.uri,
                 " (final)" if final else "", time.perf_counter() - t0, removed)  # fmt: skip
        return self._effects(event, ref, final=final, newest=newest)

    def _effects(
        self, event: StepDone | Completed, ref: CheckpointRef, *, final: bool, newest: bool
    ) -> Effects:
        step, reg_id = ref.manifest.step, event.registration_id
        saved = CheckpointSaved(adapter=event.adapter, registration_id=reg_id, epoch=event.epoch,
                                step=step, uri=ref.uri, final=final)  # fmt: skip
        exported = Exported(adapter=event.adapter, registration_id=reg_id, epoch=event.epoch,
                            step=step, uri=ref.uri)  # fmt: skip
        saved, exported = stamp(saved, source=self.source), stamp(exported, source=self.source)
        effects = Effects()
        effects.publish(self.streams.control, saved).publish(self.streams.control, exported)
        if newest:
            effects.extend(checkpoint_effects(self.streams, saved))
            effects.extend(checkpoint_effects(self.streams, exported))
        return effects


# --- process entry point ---------------------------------------------------------------------


class CheckpointConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of ``multilora checkpoint``: the bus plus the two stores.

    ``artifacts`` is the trainer's version store (read), ``checkpoints`` where durable checkpoints
    and PEFT exports are written (local directories or fsspec URLs). Both are required: they must
    be the trainer's, so a deployment names them once for both, in ``MULTILORA_ARTIFACTS`` /
    ``MULTILORA_CHECKPOINTS`` (or the same flags as the trainer's). With
    ``bus.metrics_port`` it serves the bus and per-adapter series (``docs/OBSERVABILITY.md``).
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
    adapters = AdapterMetrics(bus.registry)
    subscriptions = [process.subscription()]
    return bus.consumer(
        subscriptions, process.handle, observers=[adapters.observer(bus.streams.control)]
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
