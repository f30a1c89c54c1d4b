"""Reward functions: the protocol, a closed registry by name, and weighted composition.

An adapter's reward is a tuple of :class:`events.specs.RewardSpec` terms. The rollout process
resolves each term's ``name`` in *its own* :class:`RewardRegistry` at boot/admission
(:meth:`RewardComposite.from_specs` validates names and parameters, so a typo fails before any
sample is generated) and scores every completion with :meth:`RewardComposite.score`:

    total = sum_i weight_i * value_i

Failure policy: a reward function that raises, or returns a non-number, NaN/inf or a value
outside its registered range, marks *that sample* failed (``RewardResult.failed``, with the
term key, exception type and message in ``reason``; ``total`` is then 0.0 and must not be
trained on); so does a weighted total that overflows to inf. Scoring never raises for
reward-function errors, so one bad completion or one buggy reward never takes the worker down or
touches another adapter.

Deadlines: remote terms have one per batch (:mod:`rollout.reward_queue`). In-process terms get
one per call when scored with a :class:`RewardDeadline` (the rollout worker always passes its
own): each call runs on one of its daemon runner threads (reused from call to call: one
normally, one more per call still hung) and the caller waits at most ``timeout_s``; past it the
term fails with ``"timeout after Xs"`` and the caller moves on. Python cannot kill a thread, so
a hung call is *abandoned*, not stopped: its thread keeps running (and holding what it holds)
until the function returns, if ever. To bound that, the deadline counts the abandoned calls
still running per reward name; once ``max_hung`` of them are, further calls of that reward are
not started and fail at once (``"timeout after Xs (not called: K earlier calls are still
hung)"``) until one of them returns. So a reward that hangs for good costs one worker at most
``max_hung`` threads and ``max_hung * timeout_s`` seconds of waiting (a single worker's other
adapters wait that long once: it scores one task after another), and every other reward (and
every other adapter) keeps scoring normally. Limits: the bound is per process and per reward *name*
(two adapters using one hanging reward with different parameters share it); a hung call's CPU
use is not stopped (a reward spinning in pure Python also slows the GIL-bound worker), and its
thread dies only with the process. The alternative, a subprocess pool that can be killed,
would pickle every completion and item across a process boundary and fork a model-sized worker;
rewards that may really spin belong on RQ workers (a built-in named in ``remote_rewards``),
whose jobs are killed at their timeout.

Security: events only ever name registry keys. Operators may add rewards from their own code with
:meth:`RewardRegistry.register_entry_point` (``"pkg.mod:fn"``), called from the rollout process's
own config at boot; nothing named in an event is ever imported.

The built-in rewards and :func:`~rollout.reward_builtins.builtin_registry` live in
:mod:`rollout.reward_builtins`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from events.errors import ConfigError
from events.specs import RewardSpec, Scalar
from rollout.data import PromptItem

Params = Mapping[str, Scalar]
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
UNBOUNDED = (-math.inf, math.inf)


class RewardError(ConfigError):
    """An unknown reward name, bad reward parameters, or an input a reward cannot score."""


class RewardFn(Protocol):
    """``fn(completion, item, **params) -> float``: one reward term for one completion.

    Must be a pure function of its arguments (it may run in another process, see
    :mod:`rollout.reward_queue`). Raising marks the sample failed; it never crashes the worker.
    """

    def __call__(self, completion: str, item: PromptItem, **params: Any) -> float: ...


class RewardResult(msgspec.Struct, frozen=True, kw_only=True):
    """The score of one completion: weighted ``total`` and each term's unweighted value.

    ``terms`` is keyed by reward name (``name#2``, ``name#3`` for repeated names). When
    ``failed``, ``total`` is 0.0, ``terms`` holds only the terms that succeeded and ``reason``
    says which term failed and why.
    """

    total: float
    terms: dict[str, float]
    failed: bool = False
    reason: str = ""


class TermValue(msgspec.Struct, frozen=True, kw_only=True):
    """One term's unweighted value, or its failure (``value`` is then 0.0).

    ``reason`` is the failure without the term's name (the composite prefixes the term key).
    """

    value: float = 0.0
    failed: bool = False
    reason: str = ""


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: the function, its parameter check, range and placement.

    ``validate(params)`` raises :class:`RewardError` for bad parameters. ``value_range`` is the
    documented closed range; values outside it fail the sample. ``remote=True`` asks callers with
    a remote scorer (RQ) to run this reward there; without one it runs in-process.
    """

    name: str
    fn: Callable[..., float]
    validate: Callable[[Params], None]
    value_range: tuple[float, float] = UNBOUNDED
    remote: bool = False


class RewardRegistry:
    """An explicit, per-process map from reward name to :class:`RewardEntry`."""

    def __init__(self) -> None:
        self._entries: dict[str, RewardEntry] = {}

    def register(
        self,
        name: str,
        fn: Callable[..., float],
        *,
        value_range: tuple[float, float] = UNBOUNDED,
        remote: bool = False,
    ) -> None:
        """Add ``fn`` (following the :class:`RewardFn` convention) under ``name``.

        ``fn`` may expose ``validate_params(params)``; otherwise parameters are checked against
        its signature (each must be accepted as a keyword argument).
        """
        if not _NAME_RE.match(name):
            raise RewardError(
                f"reward name {name!r} is invalid; use lowercase letters, digits, '_', '.', '-' "
                "(starting with a letter, at most 64 characters)"
            )
        if name in self._entries:
            raise RewardError(f"reward {name!r} is already registered; pick another name")
        if not callable(fn):
            raise RewardError(f"reward {name!r}: {fn!r} is not callable")
        lo, hi = value_range
        if not lo <= hi:
            raise RewardError(f"reward {name!r}: value_range {value_range} has low > high")
        validate = getattr(fn, "validate_params", None) or _signature_validator(name, fn)
        self._entries[name] = RewardEntry(name, fn, validate, (float(lo), float(hi)), remote)

    def register_entry_point(
        self,
        name: str,
        target: str,
        *,
        value_range: tuple[float, float] = UNBOUNDED,
    ) -> None:
        """Import ``target`` (``"package.module:function"``) and register it under ``name``.

        Only for the operator's own process config, read at boot; never with a string that
        arrived in an event. Entry-point rewards run in-process: RQ reward workers resolve
        names in the built-in registry only (see :mod:`rollout.reward_queue`).
        """
        if not _ENTRY_POINT_RE.match(target):
            raise RewardError(
                f"reward entry point {target!r} for {name!r} must look like 'package.module:fn'"
            )
        module_name, _, attr_path = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardError(
                f"reward entry point {target!r}: cannot import {module_name!r} ({err})"
            ) from err
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise RewardError(f"reward entry point {target!r}: no attribute {attr!r}")
            obj = getattr(obj, attr)
        self.register(name, obj, value_range=value_range)

    def get(self, name: str) -> RewardEntry:
        """The entry for ``name``; :class:`RewardError` listing the known names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise RewardError(
                f"unknown reward {name!r}; known rewards: {sorted(self._entries)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _signature_validator(name: str, fn: Callable[..., Any]) -> Callable[[Params], None]:
    """Checks that every parameter is accepted by ``fn(completion, item, **params)``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: accept any parameters
        return lambda params: None

    def validate(params: Params) -> None:
        try:
            signature.bind("", None, **params)
        except TypeError as err:
            raise RewardError(f"reward {name!r} rejects params {dict(params)}: {err}") from err

    return validate


def evaluate_term(
    entry: RewardEntry, params: Params, completion: str, item: PromptItem
) -> TermValue:
    """Run one reward; any exception or bad value becomes a failed :class:`TermValue`.

    Catching every ``Exception`` is the documented failure policy: reward code scores untrusted
    model output and may be operator code, and its failure must stay confined to one sample.
    """
    try:
        raw = entry.fn(completion, item, **params)
    except Exception as err:  # failure policy: confine to this sample, keep the reason
        return TermValue(failed=True, reason=f"{type(err).__name__}: {err}")
    if not isinstance(raw, numbers.Real):
        return TermValue(failed=True, reason=f"returned {type(raw).__name__}, expected a float")
    value = float(raw)
    lo, hi = entry.value_range
    if not math.isfinite(value):
        return TermValue(failed=True, reason=f"returned non-finite {value}")
    if not lo <= value <= hi:
        return TermValue(failed=True, reason=f"returned {value} outside [{lo}, {hi}]")
    return TermValue(value=value)


@dataclass(frozen=True)
class BoundTerm:
    """One resolved, validated term of a composite: its result key, entry and spec."""

    key: str
    entry: RewardEntry
    spec: RewardSpec

    def evaluate(
        self, completion: str, item: PromptItem, deadline: RewardDeadline | None = None
    ) -> TermValue:
        """The term's value in this process (under ``deadline`` when given)."""
        if deadline is None:
            return evaluate_term(self.entry, self.spec.params, completion, item)
        return deadline.evaluate(self.entry, self.spec.params, completion, item)


class _Call:
    """One in-process reward call run by :class:`RewardDeadline`: its value once it returned,
    and whether the caller stopped waiting for it (both under the deadline's lock)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: TermValue | None = None
        self.abandoned = False


class RewardDeadline:
    """Runs in-process reward calls with a deadline of ``timeout_s`` each (see the module doc).

    ``max_hung``: abandoned calls of one reward name still running past their deadline after
    which that reward is not called again (its terms fail at once) until one returns. Safe to
    share between threads; one per worker process (tests build their own).
    """

    def __init__(self, timeout_s: float, *, max_hung: int = 2) -> None:
        if not timeout_s > 0:
            raise RewardError(f"reward call timeout_s must be > 0, got {timeout_s}")
        if max_hung < 1:
            raise RewardError(f"max_hung must be >= 1, got {max_hung}")
        self.timeout_s = timeout_s
        self.max_hung = max_hung
        self._lock = threading.Lock()
        self._hung: dict[str, int] = {}
        self._work: queue.SimpleQueue[tuple[_Call, RewardEntry, Params, str, PromptItem]] = (
            queue.SimpleQueue()
        )
        self._idle = 0  # runner threads waiting for a call
        self.runners = 0  # runner threads started, ever

    def hung(self, name: str) -> int:
        """Abandoned calls of reward ``name`` that have not returned yet."""
        with self._lock:
            return self._hung.get(name, 0)

    def evaluate(
        self, entry: RewardEntry, params: Params, completion: str, item: PromptItem
    ) -> TermValue:
        """:func:`evaluate_term` on a runner thread, waited for at most ``timeout_s``.

        Never raises for the reward's failures; a call past the deadline comes back failed with
        ``"timeout after Xs"`` and is abandoned (counted until its thread returns).
        """
        timeout = f"timeout after {self.timeout_s:g}s"
        hung = self.hung(entry.name)
        if hung >= self.max_hung:
            return TermValue(
                failed=True,
                reason=f"{timeout} (not called: {hung} earlier calls are still hung)",
            )
        call = _Call()
        self._submit((call, entry, params, completion, item))
        finished = call.done.wait(self.timeout_s)
        with self._lock:
            if not finished and not call.done.is_set():
                call.abandoned = True
                self._hung[entry.name] = self._hung.get(entry.name, 0) + 1
                return TermValue(failed=True, reason=timeout)
        if call.value is None:  # the thread ended by a BaseException (e.g. SystemExit)
            return TermValue(failed=True, reason="the reward call ended without a value")
        return call.value

    def _submit(self, work: tuple[_Call, RewardEntry, Params, str, PromptItem]) -> None:
        """Hand one call to an idle runner thread, starting one when none is idle (the runner
        that a hung call holds stays held; the next call gets another)."""
        with self._lock:
            start = self._idle == 0
            if start:
                self.runners += 1
            else:
                self._idle -= 1
        if start:
            # daemon: a hung call must not keep the process from exiting
            threading.Thread(target=self._runner, name="reward-runner", daemon=True).start()
        self._work.put(work)

    def _runner(self) -> None:
        while True:
            self._run(*self._work.get())
            with self._lock:
                self._idle += 1

    def _run(
        self, call: _Call, entry: RewardEntry, params: Params, completion: str, item: PromptItem
    ) -> None:
        try:
            call.value = evaluate_term(entry, params, completion, item)
        finally:
            with self._lock:
                call.done.set()
                if call.abandoned:
                    self._hung[entry.name] -= 1


class TermRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One term to score elsewhere: the spec (name, params) and the completion with its item."""

    spec: RewardSpec
    completion: str
    item: PromptItem


class RemoteScorer(Protocol):
    """Scores terms outside this process (e.g. on RQ workers); one value per request, in order.

    Must not raise for reward failures or timeouts: those come back as failed values.
    """

    def score_terms(self, requests: Sequence[TermRequest]) -> list[TermValue]: ...


class RewardComposite:
    """An adapter's reward: the weighted sum of validated terms."""

    def __init__(self, terms: Sequence[BoundTerm]) -> None:
        if not terms:
            raise RewardError("a reward needs at least one term; give at least one RewardSpec")
        self.terms = tuple(terms)

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec], registry: RewardRegistry) -> RewardComposite:
        """Resolve and validate every spec; :class:`RewardError` names the bad term."""
        terms: list[BoundTerm] = []
        seen: dict[str, int] = {}
        for spec in specs:
            entry = registry.get(spec.name)
            if not math.isfinite(spec.weight):
                raise RewardError(f"reward {spec.name!r}: weight must be finite, got {spec.weight}")
            entry.validate(spec.params)
            seen[spec.name] = seen.get(spec.name, 0) + 1
            key = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
            terms.append(BoundTerm(key, entry, spec))
        return cls(terms)

    def score(
        self, completion: str, item: PromptItem, deadline: RewardDeadline | None = None
    ) -> RewardResult:
        """Score one completion in-process (each call under ``deadline`` when given); never
        raises for reward-function errors."""
        return self.combine([t.evaluate(completion, item, deadline) for t in self.terms])

    __call__ = score

    def score_batch(
        self,
        completions: Sequence[str],
        items: Sequence[PromptItem],
        remote: RemoteScorer | None = None,
        deadline: RewardDeadline | None = None,
    ) -> list[RewardResult]:
        """Score ``completions[b]`` against ``items[b]``; ``remote`` runs the remote terms.

        Terms registered ``remote=True`` are sent to ``remote`` in one batch (so their latency
        overlaps); all other terms, and every term when ``remote`` is None, run here, each call
        under ``deadline`` when given.
        """
        if len(completions) != len(items):
            raise ValueError(f"{len(completions)} completions but {len(items)} items")
        values_B_K: list[list[TermValue | None]] = [[None] * len(self.terms) for _ in items]
        requests: list[TermRequest] = []
        slots: list[tuple[int, int]] = []
        for b, (completion, item) in enumerate(zip(completions, items, strict=True)):
            for k, term in enumerate(self.terms):
                if remote is not None and term.entry.remote:
                    requests.append(TermRequest(spec=term.spec, completion=completion, item=item))
                    slots.append((b, k))
                else:
                    values_B_K[b][k] = term.evaluate(completion, item, deadline)
        if requests and remote is not None:
            for (b, k), value in zip(slots, remote.score_terms(requests), strict=True):
                values_B_K[b][k] = value
        return [self.combine([v for v in row if v is not None]) for row in values_B_K]

    def combine(self, values_K: Sequence[TermValue]) -> RewardResult:
        """The weighted total of one value per term (in term order)."""
        if len(values_K) != len(self.terms):
            raise ValueError(f"{len(values_K)} term values for {len(self.terms)} terms")
        terms = {t.key: v.value for t, v in zip(self.terms, values_K, strict=True) if not v.failed}
        failures = [
            f"{t.key}: {v.reason}" for t, v in zip(self.terms, values_K, strict=True) if v.failed
        ]
        if failures:
            return RewardResult(total=0.0, terms=terms, failed=True, reason="; ".join(failures))
        total = sum(t.spec.weight * v.value for t, v in zip(self.terms, values_K, strict=True))
        if not math.isfinite(total):  # finite terms and weights can still overflow
            reason = f"weighted total is non-finite ({total}); lower the terms' weights"
            return RewardResult(total=0.0, terms=terms, failed=True, reason=reason)
        return RewardResult(total=total, terms=terms)
