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

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Annotated

import msgspec
import redis

from events.codec import Decoder, stamp
from events.connection import check_durability, connect
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import ConfigError, HandlerError, UnsafeRedisError
from events.metrics import FanOut, instrument_consumer, metrics_registry, start_metrics_server
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
from orchestrator.artifacts import (
    STATE_JSON,
    ArtifactError,
    ArtifactStore,
    CheckpointRef,
    CheckpointStore,
    StaleSource,
)
from orchestrator.metrics import AdapterMetrics
from orchestrator.status import checkpoint_effects

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


class _SpecPolicy(msgspec.Struct, frozen=True):
    """The two :class:`~events.specs.AdapterSpec` fields this process needs (others ignored)."""

    checkpoint_interval: int
    keep_checkpoints: int


class _StateSpec(msgspec.Struct, frozen=True):
    """The part of ``training_state.json`` that tells the policy: its embedded ``spec``."""

    spec: _SpecPolicy | None = None


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
            spec = msgspec.json.decode(raw, type=_StateSpec).spec
        except (ArtifactError, msgspec.DecodeError) as exc:
            raise HandlerError(
                f"no adapter.admitted seen for {event.adapter}/{event.registration_id} and its "
                f"policy cannot be read from {source}/{STATE_JSON}: {exc}"
            ) from exc
        if spec is None:
            raise HandlerError(
                f"no adapter.admitted seen for {event.adapter}/{event.registration_id} and "
                f"{source}/{STATE_JSON} has no 'spec'; the trainer must write the spec there"
            )
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

Positive = Annotated[int, msgspec.Meta(gt=0)]


class CheckpointConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Configuration of ``python -m orchestrator.checkpoint`` (flags, else environment).

    ``unsafe_redis`` runs against a Redis that can lose acknowledged events (throwaway use).
    ``lease_wait_s`` waits for the consumer name's lease (a predecessor on another host that
    died holds it until its TTL runs out).
    ``burst`` returns once the control log is drained (tests, one-shot catch-up).
    ``metrics_port`` serves Prometheus metrics (bus and per-adapter series, see
    ``docs/OBSERVABILITY.md``) on that port; 0 serves none.
    """

    redis_url: str
    artifacts_root: str
    checkpoints_root: str
    namespace: str = "multilora"
    consumer: str = "checkpoint"
    block_ms: Positive = 2_000
    claim_idle_ms: Positive = 30_000
    max_deliveries: Positive = 5
    lease_wait_s: float = 0.0
    unsafe_redis: bool = False
    burst: bool = False
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


_ENV = {
    "redis_url": "REDIS_URL",
    "namespace": "MULTILORA_NAMESPACE",
    "artifacts_root": "MULTILORA_ARTIFACTS",
    "checkpoints_root": "MULTILORA_CHECKPOINTS",
    "consumer": "MULTILORA_CHECKPOINT_CONSUMER",
}


def load_config(argv: Sequence[str] | None, env: Mapping[str, str]) -> CheckpointConfig:
    """Flags override the environment variables in ``_ENV``; a missing root is an error."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field, var in _ENV.items():
        flags = ["--" + field.replace("_", "-")]
        if field.endswith("_root"):
            flags.append("--" + field.removesuffix("_root"))  # the trainer's flag names
        parser.add_argument(*flags, dest=field, default=env.get(var), help=f"(env {var})")
    parser.add_argument("--block-ms", type=int, default=2_000)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--lease-wait-s", type=float, default=0.0)
    unsafe = env.get("MULTILORA_UNSAFE_REDIS", "").lower() in ("1", "true", "yes")
    parser.add_argument("--unsafe-redis", action="store_true", default=unsafe)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: none)")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return msgspec.convert(args, CheckpointConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(
            f"checkpoint process configuration: {exc} (flags: --redis-url, --artifacts-root, "
            "--checkpoints-root; or env REDIS_URL, MULTILORA_ARTIFACTS, MULTILORA_CHECKPOINTS)"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one checkpoint process until SIGTERM (warm shutdown) or, with ``--burst``, drained."""
    try:
        config = load_config(argv, os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    client = connect(config.redis_url, max_block_ms=config.block_ms, name=config.consumer)
    try:
        check_durability(client, allow_unsafe=config.unsafe_redis)
    except UnsafeRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    streams = Streams(config.namespace)
    process = CheckpointProcess(
        client,
        streams,
        ArtifactStore(config.artifacts_root),
        CheckpointStore(config.checkpoints_root),
        source=config.consumer,
    )
    registry = metrics_registry()
    bus = instrument_consumer(registry, client, [process.subscription()], dead_stream=streams.dead)
    adapters = AdapterMetrics(registry)  # the checkpoint process reads the whole control log
    consumer = Consumer(
        lambda: connect(config.redis_url, max_block_ms=config.block_ms),
        streams,
        config.consumer,
        [process.subscription()],
        process.handle,
        block_ms=config.block_ms,
        claim_idle_ms=config.claim_idle_ms,
        max_deliveries=config.max_deliveries,
        lease_wait_s=config.lease_wait_s,
        observer=FanOut([bus, adapters.observer(streams.control)]),
    )
    if config.metrics_port:
        try:
            start_metrics_server(config.metrics_port, registry)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    consumer.install_signal_handlers()
    log.info("checkpoint process %s: reading %s as group %s; checkpoints in %s",
             config.consumer, streams.control, GROUP, process.checkpoints.root)  # fmt: skip
    stats = consumer.run(burst=config.burst)
    log.info("checkpoint process %s stopped: %s", config.consumer, stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
