"""Admission: decide whether a registration may train here, before it reaches the control log.

The trainer reads ``adapter.register_requested`` from ingress and calls :meth:`Admission.check`.
:class:`Admit` means republish it on the control log (then admit or queue it); :class:`Reject`
means publish ``adapter.rejected`` with ``reason`` and ``field`` instead. Every reason names the
bad value and the fix, because the tenant reads it in ``multilora status``.

Checks, cheapest first, the first failure wins:

1. the adapter name matches :data:`NAME_PATTERN` (it becomes part of keys, paths and URLs);
2. the registration id, when given, is at most 128 printable characters without spaces;
3. the JSON payload is at most ``max_payload_bytes``;
4. the registration id is not already used (a retried registration must be dropped by the caller
   before admission; this refuses a reused id of another adapter);
5. the spec: ``base_model`` (if set) equals the trainer's, ``rank`` in ``[1, max_rank]``, and the
   numeric fields are in range (see :meth:`Admission.check_spec`);
6. every reward name is one the rollout registry knows (names are compared, never imported);
7. the name has no live registration (deregister it or wait until it retires);
8. the dataset can be read: ``probe_dataset(spec.dataset)`` returns its size or raises
   :class:`~events.errors.ConfigError` with the reason (the rollout package provides the probe,
   which knows the operator's allowed roots; the orchestrator never imports rollout).

A probe raising anything but ``ConfigError`` is a bug and propagates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import msgspec

from events.errors import ConfigError
from events.schema import RegisterRequested
from events.specs import AdapterSpec, DatasetSpec
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import registration_key

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
"""Adapter names (matched whole with ``fullmatch``: ``^...$`` would let a trailing newline
through): lowercase letters, digits, ``.``, ``_``, ``-``; 1-63 characters, no leading ``.``,
``_`` or ``-``."""

REGISTRATION_ID_PATTERN = re.compile(r"[!-~]{1,128}")
"""Registration ids: 1-128 printable ASCII characters without spaces."""

ProbeDataset = Callable[[DatasetSpec], int]
"""Returns the dataset's number of prompts, or raises ConfigError naming why it is unreadable."""


class Admit(msgspec.Struct, frozen=True):
    """The registration may train; ``dataset_size`` prompts were found (> 0)."""

    dataset_size: int


class Reject(msgspec.Struct, frozen=True):
    """The registration is refused: ``reason`` names the bad value and the fix; ``field`` is its
    JSON path (``"adapter"``, ``"spec.rank"``, ``"spec.rewards[1].name"``, ...)."""

    reason: str
    field: str


Verdict = Admit | Reject


class Admission:
    """Admission checks of one trainer; all limits are flat constructor parameters."""

    def __init__(
        self,
        *,
        base_model: str,
        known_rewards: frozenset[str],
        probe_dataset: ProbeDataset,
        max_rank: int,
        max_payload_bytes: int = 1 << 16,
        max_group_size: int = 256,
        max_prompts_per_step: int = 1024,
        max_new_tokens: int = 32768,
    ) -> None:
        """``base_model``: the trainer's base model name; ``known_rewards``: the reward registry's
        names; ``max_rank``: the slot layers' rank; the ``max_*`` bound what one registration
        may ask of the trainer's batch."""
        if max_rank < 1:
            raise ConfigError(f"max_rank must be >= 1, got {max_rank}")
        self.base_model = base_model
        self.known_rewards = known_rewards
        self.probe_dataset = probe_dataset
        self.max_rank = max_rank
        self.max_payload_bytes = max_payload_bytes
        self.max_group_size = max_group_size
        self.max_prompts_per_step = max_prompts_per_step
        self.max_new_tokens = max_new_tokens

    def check(self, event: RegisterRequested, fleet: Fleet, payload_bytes: int) -> Verdict:
        """Admit or reject ``event`` given the trainer's ``fleet`` and the JSON's size in bytes."""
        name = event.adapter
        if not NAME_PATTERN.fullmatch(name):
            reason = (
                f"adapter name {name!r} is invalid; use 1-63 characters of lowercase letters, "
                "digits, '.', '_' or '-', starting with a letter or digit"
            )
            return Reject(reason, "adapter")
        if event.registration_id and not REGISTRATION_ID_PATTERN.fullmatch(event.registration_id):
            reason = (
                f"registration_id {event.registration_id!r} is invalid; use 1-128 printable "
                "ASCII characters without spaces, or leave it empty to get one assigned"
            )
            return Reject(reason, "registration_id")
        if payload_bytes > self.max_payload_bytes:
            reason = (
                f"registration is {payload_bytes} bytes, over the limit of "
                f"{self.max_payload_bytes}; shorten the spec (e.g. the prompt template)"
            )
            return Reject(reason, "spec")
        known = fleet.get(registration_key(event))
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
        try:
            size = self.probe_dataset(event.spec.dataset)
        except ConfigError as exc:
            return Reject(f"dataset is not readable: {exc}", "spec.dataset")
        if size < 1:
            return Reject("dataset has no prompts; point it at a non-empty file", "spec.dataset")
        return Admit(size)

    def check_spec(self, spec: AdapterSpec) -> Reject | None:
        """The first problem of ``spec`` alone (no fleet, no I/O), or None."""
        if spec.base_model and spec.base_model != self.base_model:
            reason = (
                f"base_model {spec.base_model!r} does not match this trainer's "
                f"{self.base_model!r}; register with the matching trainer or leave it empty"
            )
            return Reject(reason, "spec.base_model")
        for index, term in enumerate(spec.rewards):
            if term.name not in self.known_rewards:
                reason = f"reward {term.name!r} is unknown; use one of {sorted(self.known_rewards)}"
                return Reject(reason, f"spec.rewards[{index}].name")
            if not math.isfinite(term.weight):
                reason = f"reward weight {term.weight} of {term.name!r} must be finite"
                return Reject(reason, f"spec.rewards[{index}].weight")
        for field, ok, rule in self._rules(spec):
            if not ok:
                value = _lookup(spec, field)
                return Reject(f"{field} = {value!r} is invalid; {rule}", f"spec.{field}")
        return None

    def _rules(self, spec: AdapterSpec) -> list[tuple[str, bool, str]]:
        """(field, holds, rule) for every numeric range of the spec."""
        o, loss, s, d = spec.optim, spec.loss, spec.sampling, spec.dataset
        return [
            ("rewards", len(spec.rewards) >= 1, "give at least one reward term"),
            ("rank", 1 <= spec.rank <= self.max_rank, f"use 1 <= rank <= {self.max_rank}"),
            ("alpha", _pos(spec.alpha), "use a finite alpha > 0"),
            ("group_size", 2 <= spec.group_size <= self.max_group_size,
             f"use 2 <= group_size <= {self.max_group_size} (advantages need >= 2 samples)"),
            ("prompts_per_step", 1 <= spec.prompts_per_step <= self.max_prompts_per_step,
             f"use 1 <= prompts_per_step <= {self.max_prompts_per_step}"),
            ("steps", spec.steps >= 1, "use steps >= 1"),
            ("max_staleness", spec.max_staleness >= 0, "use max_staleness >= 0"),
            ("checkpoint_interval", spec.checkpoint_interval >= 1, "use checkpoint_interval >= 1"),
            ("keep_checkpoints", spec.keep_checkpoints >= 1, "use keep_checkpoints >= 1"),
            ("optim.lr", _pos(o.lr), "use a finite lr > 0"),
            ("optim.betas", all(0.0 <= b < 1.0 for b in o.betas), "use betas in [0, 1)"),
            ("optim.eps", _pos(o.eps), "use a finite eps > 0"),
            ("optim.weight_decay", _nonneg(o.weight_decay), "use a finite weight_decay >= 0"),
            ("optim.warmup_steps", o.warmup_steps >= 0, "use warmup_steps >= 0"),
            ("optim.min_lr_ratio", 0.0 <= o.min_lr_ratio <= 1.0, "use min_lr_ratio in [0, 1]"),
            ("optim.max_grad_norm", _pos(o.max_grad_norm), "use a finite max_grad_norm > 0"),
            ("loss.clip_low", 0.0 <= loss.clip_low < 1.0, "use clip_low in [0, 1)"),
            ("loss.clip_high", _nonneg(loss.clip_high), "use a finite clip_high >= 0"),
            ("loss.clip_ratio_c", loss.clip_ratio_c == 0.0 or 1.0 < loss.clip_ratio_c < math.inf,
             "use a finite clip_ratio_c > 1, or 0 for no dual clip"),
            ("loss.kl_coef", _nonneg(loss.kl_coef), "use a finite kl_coef >= 0"),
            ("sampling.temperature", _nonneg(s.temperature), "use a finite temperature >= 0"),
            ("sampling.top_p", 0.0 < s.top_p <= 1.0, "use top_p in (0, 1]"),
            ("sampling.top_k", s.top_k == -1 or s.top_k >= 1, "use top_k >= 1, or -1 for all"),
            ("sampling.max_new_tokens", 1 <= s.max_new_tokens <= self.max_new_tokens,
             f"use 1 <= max_new_tokens <= {self.max_new_tokens}"),
            ("dataset.path", d.kind == "reasoning_gym" or bool(d.path),
             f"a {d.kind} dataset needs a path under the allowed roots"),
            ("dataset.name", d.kind != "reasoning_gym" or bool(d.name),
             "a reasoning_gym dataset needs the name of a reasoning-gym task"),
            ("dataset.size", d.kind != "reasoning_gym" or d.size >= 1,
             "use a reasoning_gym dataset size >= 1"),
        ]  # fmt: skip


def _pos(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _lookup(spec: AdapterSpec, dotted: str) -> object:
    value: object = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
