"""Admission: decide whether a registration may train here, before it reaches the control log.

The trainer reads ``adapter.register_requested`` from ingress and calls :meth:`Admission.check`.
:class:`Admit` means republish it on the control log (then admit or queue it); :class:`Reject`
means publish ``adapter.rejected`` with ``reason`` and ``field`` instead (plus a dead letter:
:func:`orchestrator.ingress.dead_letter_effects`). Every reason names the bad value and the fix,
because the tenant reads it in ``multilora status``.

Everything a registration can get wrong on its own (the adapter name and registration id
patterns, every value range, the payload size) was already refused by the ingress decoder: the
rules live on the event and spec structs (:mod:`events.specs`), so the published JSON Schema
carries them. Admission trusts the decoded event and checks only what needs this trainer, its
fleet or I/O, cheapest first, the first failure wins:

1. the registration id is not already used (a retried registration must be dropped by the caller
   before admission; this refuses a reused id of another adapter), and it can name a directory
   of the stores (an empty ``registration_id`` falls back to the event ``id``, which the schema
   does not constrain: ``"../x"`` is refused here, on ``registration_id``);
2. ``base_model`` (if set) equals the trainer's, and ``rank <= max_rank`` (the slot layers');
3. every reward name is one the rollout registry knows (names are compared, never imported);
4. the name has no live registration (deregister it or wait until it retires);
5. the producer (``spec.producer``; ``""`` for all anonymous registrations together) has fewer
   than ``max_waiting_per_producer`` registrations waiting for a slot, so one producer's flood
   cannot fill the queue (the queue itself is fair across producers:
   :mod:`orchestrator.fleet`);
6. the dataset can be read: ``probe_dataset(spec.dataset)`` returns its size or raises
   :class:`~events.errors.ConfigError` with the reason (the rollout package provides the probe,
   which knows the operator's allowed roots; the orchestrator never imports rollout). A path
   outside those roots (``..``, absolute, a symlink or symlinked directory pointing out, a URL,
   ``~``) raises :class:`~orchestrator.storage.PathEscape`, reported on ``spec.dataset.path``.

A probe raising anything but ``ConfigError`` is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from events.errors import ConfigError
from events.schema import RegisterRequested
from events.specs import AdapterSpec, DatasetSpec
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import registration_key
from orchestrator.storage import PathEscape, is_name

DEFAULT_MAX_WAITING_PER_PRODUCER = 256
"""Registrations one producer may keep waiting for a slot unless configured (0: no limit)."""

ProbeDataset = Callable[[DatasetSpec], int]
"""Returns the dataset's number of prompts, or raises ConfigError naming why it is unreadable."""


class Admit(msgspec.Struct, frozen=True):
    """The registration may train; ``dataset_size`` prompts were found (> 0; 0 for a
    client-driven adapter, which has no dataset)."""

    dataset_size: int


class Reject(msgspec.Struct, frozen=True):
    """The registration is refused: ``reason`` names the bad value and the fix; ``field`` is its
    JSON path (``"adapter"``, ``"spec.rank"``, ``"spec.rewards[1].name"``, ...)."""

    reason: str
    field: str


Verdict = Admit | Reject


class Admission:
    """Admission checks of one trainer; its limits are flat constructor parameters."""

    def __init__(
        self,
        *,
        base_model: str,
        known_rewards: frozenset[str],
        probe_dataset: ProbeDataset,
        max_rank: int,
        max_waiting_per_producer: int = DEFAULT_MAX_WAITING_PER_PRODUCER,
    ) -> None:
        """``base_model``: the trainer's base model name; ``known_rewards``: the reward registry's
        names; ``max_rank``: the slot layers' rank; ``max_waiting_per_producer``: how many
        registrations one producer may keep waiting (0: no limit)."""
        if max_rank < 1:
            raise ConfigError(f"max_rank must be >= 1, got {max_rank}")
        if max_waiting_per_producer < 0:
            raise ConfigError(
                f"max_waiting_per_producer must be >= 0 (0: no limit), got "
                f"{max_waiting_per_producer}"
            )
        self.base_model = base_model
        self.known_rewards = known_rewards
        self.probe_dataset = probe_dataset
        self.max_rank = max_rank
        self.max_waiting_per_producer = max_waiting_per_producer

    def check(self, event: RegisterRequested, fleet: Fleet) -> Verdict:
        """Admit or reject the decoded ``event`` given the trainer's ``fleet``."""
        name = event.adapter
        key = registration_key(event)
        if not is_name(key):
            reason = (
                f"registration id {key!r} cannot name a directory (it comes from the event "
                "id when registration_id is empty); set registration_id to 1-128 characters "
                "from [A-Za-z0-9._-], starting with a letter or digit"
            )
            return Reject(reason, "registration_id")
        known = fleet.get(key)
        if known is not None:
            reason = (
                f"registration_id {known.registration_id!r} is already used by adapter "
                f"{known.name!r} ({known.phase}); use a new registration_id"
            )
            return Reject(reason, "registration_id")
        problem = self.check_spec(event.spec)
        if problem is not None:
            return problem
        if fleet.is_active_name(name):
            live = fleet.current(name)
            phase = live.phase if live is not None else "live"
            reason = (
                f"adapter {name!r} is already registered ({phase}); deregister it or wait until "
                "it retires, or choose another name"
            )
            return Reject(reason, "adapter")
        flood = self.flood_problem(event.spec.producer, fleet)
        if flood is not None:
            return flood
        if event.spec.dataset is None:
            return Admit(0)  # a client-driven adapter: its client brings the data
        try:
            size = self.probe_dataset(event.spec.dataset)
        except PathEscape as exc:
            return Reject(f"dataset path is not allowed: {exc}", "spec.dataset.path")
        except ConfigError as exc:
            return Reject(f"dataset is not readable: {exc}", "spec.dataset")
        if size < 1:
            return Reject("dataset has no prompts; point it at a non-empty file", "spec.dataset")
        return Admit(size)

    def flood_problem(self, producer: str, fleet: Fleet) -> Reject | None:
        """The rejection of one more waiting registration of ``producer``, or None."""
        limit = self.max_waiting_per_producer
        waiting = fleet.waiting_of(producer) if limit else 0
        if not limit or waiting < limit:
            return None
        who = f"producer {producer!r}" if producer else "anonymous producers (spec.producer '')"
        reason = (
            f"{who} already has {waiting} waiting registrations (limit {limit}); wait for one "
            "to be admitted or cancel one"
        )
        if not producer:
            reason += ", or register under your own spec.producer name"
        return Reject(reason, "spec.producer")

    def check_spec(self, spec: AdapterSpec) -> Reject | None:
        """The first problem of ``spec`` for this trainer (no fleet, no I/O), or None."""
        if spec.base_model and spec.base_model != self.base_model:
            reason = (
                f"base_model {spec.base_model!r} does not match this trainer's "
                f"{self.base_model!r}; register with the matching trainer or leave it empty"
            )
            return Reject(reason, "spec.base_model")
        if spec.rank > self.max_rank:
            reason = f"rank = {spec.rank} is invalid; use 1 <= rank <= {self.max_rank}"
            return Reject(reason, "spec.rank")
        for index, term in enumerate(spec.rewards):
            if term.name not in self.known_rewards:
                reason = f"reward {term.name!r} is unknown; use one of {sorted(self.known_rewards)}"
                return Reject(reason, f"spec.rewards[{index}].name")
        return None
