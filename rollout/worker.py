"""The rollout worker process: a state machine over the control log and the task queue.

Run ``multilora rollout --redis-url redis://... --model models/smollm2-135m`` (flags,
env and file in :mod:`rollout.config`). Any number of replicas run side by side.

**Subscriptions.** ``rollout.tasks`` through ONE shared group ``rollout`` (each task goes to one
replica), and the control log through a group of its own, ``rollout.<name>`` (broadcast: every
replica sees every event; a new group starts at ``"0"``, so a new replica replays the log and
learns the registrations, epochs and versions before it serves).

**Control events** (:meth:`RolloutWorker.on_control`):

- ``adapter.admitted`` — remember ``(registration_id, epoch)``; the registration is live.
- ``adapter.sync_requested`` — verify the sha256 of ``adapter_model.safetensors`` against the
  event (mismatch: :class:`SyncError`, so the entry is retried, then dead-lettered), load the
  version unless a newer one is served, and publish ``adapter.synced`` (``latency_s`` = when it
  began serving the version − ``event.time``: a task that needed the version may have loaded it
  before the sync event was handled) plus ``sync:<worker> = <version>`` in the adapter's status
  hash, in the same commit as the ack. Events already in the log when the worker started
  (``history_until``) are only *recorded*: a replica replaying history loads lazily, from the
  next task, rather than every version ever published, and does not answer syncs addressed to
  the past.
- ``adapter.retired`` / ``.completed`` / ``.failed`` / ``.deregister_requested`` (a cancel)
  — the registration is dead: unload its versions and drop its future tasks. A later
  ``adapter.admitted`` under a higher epoch (a resume) makes it live again.

**Tasks** (:meth:`RolloutWorker.on_task`). Fencing first: a task of a dead registration, or of an
epoch older than the newest seen for it, is acknowledged with no output. Otherwise the worker
makes sure the weights are served (the task's own version if loaded; else a newer loaded version
of the same registration, reported in the group; else it loads ``weights_uri`` — workers are
stateless), reads the prompts by index from the adapter's dataset (sources cached per
:class:`DatasetSpec`), tokenizes them with the base model's tokenizer, generates ``group_size``
samples per prompt in ONE mixed batch with per-row seeds (:func:`row_seed`), scores them with the
composite reward, and publishes ONE ``rollout.group`` through :class:`Effects` committed
atomically with the task's ack. A worker whose entry was reclaimed by another (it was silent for
``claim_idle_ms``) has its commit refused, so each task is published once in effect; the
trainer still keys groups by ``task_id`` as a second line.

**Failure policy.** Known failures of one task become failed samples in its group, each with the
reason, so the trainer sees the failure and moves on (and may fail the adapter): a dataset that
cannot be opened, an unknown reward, invalid sampling, weights that cannot be loaded or fail
their checksum (one group), a prompt index out of range or a prompt longer than
``max_prompt_tokens`` (that prompt's samples; prompts are never truncated: a cut prompt is a
different question than the one the reward checks), a reward function that raises (that sample).
The worker never publishes ``adapter.failed``: whether an adapter has failed is the trainer's
decision, and one worker's view (a file missing on its host) must not kill an adapter. An
unreachable engine raises :class:`HandlerError` (retried later by any replica). Anything else is
a bug and crashes the process; at-least-once delivery makes that safe.

The module passes 600 lines on purpose: the worker's whole state machine (control log,
tasks, fencing, weight fetching) reads as one algorithm; its pure pieces live in backend.py.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from events.codec import Decoder, stamp
from events.connection import check_durability, connect
from events.consumer import Consumer, Delivery, Subscription
from events.effects import Effects
from events.errors import HandlerError
from events.metrics import instrument_consumer, metrics_registry, start_metrics_server
from events.schema import (
    Admitted,
    Completed,
    ControlEvent,
    DeregisterRequested,
    Failed,
    PromptGroup,
    Retired,
    RolloutGroup,
    RolloutTask,
    Sample,
    Synced,
    SyncRequested,
    TaskEvent,
)
from events.specs import DatasetSpec, RewardSpec
from events.streams import Streams
from orchestrator.status import sync_effects
from rollout.backend import (
    AdapterLoadError,
    BackendUnavailableError,
    Completion,
    GenerationBackend,
    GenerationRow,
    WeightsError,
    WeightsFetcher,
)
from rollout.config import RolloutConfig, load_config
from rollout.data import DataError, DataSource, PromptItem, open_source
from rollout.engine import AdapterRef
from rollout.metrics import RolloutMetrics
from rollout.rewards import (
    RemoteScorer,
    RewardComposite,
    RewardError,
    RewardRegistry,
    RewardResult,
)
from rollout.sampling import SamplingParamError, SamplingParams

log = logging.getLogger(__name__)

TASK_GROUP = "rollout"
"""The one consumer group every replica reads ``rollout.tasks`` through (load balancing)."""


class SyncError(HandlerError):
    """A ``sync_requested`` could not be applied (checksum mismatch, unreadable or bad files)."""


KNOWN_TASK_FAILURES = (DataError, RewardError, SamplingParamError, AdapterLoadError, WeightsError)
"""Task failures that become failed samples in the group instead of crashing the worker."""


CONTROL_READ_AHEAD = 256
"""Control events a worker reads ahead (in bulk) while it generates: all of them are handled
before its next task, so a weight sync never waits behind a backlog of other control events."""


def row_seed(task_seed: int, prompt_index: int, sample_index: int, occurrence: int = 0) -> int:
    """The sampling seed of one row: a hash of the task seed, prompt index and sample index.

    ``occurrence`` counts earlier copies of the same prompt index in the task (0 normally), so
    a prompt listed twice gets different samples. Result in ``[0, 2**63)``.
    """
    key = f"{task_seed}:{prompt_index}:{sample_index}:{occurrence}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def served_name(adapter: str, registration_id: str) -> str:
    """The engine-side adapter name of one registration (``math.<registration_id>``).

    Versions are immutable in the engines, so a name registered again after it retired must not
    reuse the old registration's ``name@version`` entries: the registration id makes it unique.
    """
    return f"{adapter}.{registration_id}" if registration_id else adapter


def entry_at_or_before(entry_id: str, bound: str) -> bool:
    """Whether stream entry ``entry_id`` is at or before ``bound`` (both ``"ms-seq"``)."""
    a, b = (tuple(int(x) for x in e.split("-")) for e in (entry_id, bound))
    return a <= b


def last_entry_id(client: Any, stream: str) -> str:
    """The id of the newest entry of ``stream`` (``"0-0"`` when empty or missing)."""
    newest = client.xrevrange(stream, count=1)
    if not newest:
        return "0-0"
    entry = newest[0][0]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


@dataclass
class _Registration:
    """What the worker knows of one registration: its newest epoch and whether it is live."""

    epoch: int
    live: bool = True


class _Lru:
    """A small LRU map from bytes keys to opened things (data sources, reward composites)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, Any] = OrderedDict()

    def get(self, key: bytes, build: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


class RolloutWorker:
    """The rollout worker's state machine; the consumer runtime calls :meth:`handle`.

    ``name``: this replica's stable name (consumer name and worker id in events).
    ``backend``: where generation runs; ``weights``: where published versions are read from.
    ``registry``: the closed reward registry; ``remote``: where remote rewards run (``None``:
    in-process). ``allowed_roots``: directories dataset files may live under.
    ``history_until``: the newest control entry when the process started (see the module
    doc). ``clock``: wall clock for ``latency_s``.
    """

    def __init__(
        self,
        *,
        name: str,
        streams: Streams,
        backend: GenerationBackend,
        weights: WeightsFetcher,
        registry: RewardRegistry,
        remote: RemoteScorer | None = None,
        allowed_roots: Sequence[Path] = (),
        max_prompt_tokens: int = 1024,
        history_until: str = "0-0",
        clock: Callable[[], float] = time.time,
        cache_size: int = 16,
        metrics: RolloutMetrics | None = None,
    ) -> None:
        self.name = name
        self.streams = streams
        self.backend = backend
        self.weights = weights
        self.registry = registry
        self.remote = remote
        self.allowed_roots = tuple(allowed_roots)
        self.max_prompt_tokens = max_prompt_tokens
        self.history_until = history_until
        self.clock = clock
        self.registrations: dict[str, _Registration] = {}
        self.syncs: dict[str, SyncRequested] = {}  # registration id -> newest sync seen
        self.loaded_sha: dict[tuple[str, int], str] = {}  # (served name, version) -> sha256
        self.serving_since: dict[tuple[str, int], float] = {}  # same keys -> clock() at load
        self._sources = _Lru(cache_size)
        self._rewards = _Lru(cache_size)
        self.metrics = metrics or RolloutMetrics(CollectorRegistry())  # default: not exported

    def subscriptions(self) -> list[Subscription]:
        """Control log (own group, from the start) and the task queue (shared group)."""
        return [
            Subscription(
                self.streams.control,
                f"rollout.{self.name}",
                Decoder(ControlEvent),
                priority=-1,
                max_in_flight=CONTROL_READ_AHEAD,
                count=CONTROL_READ_AHEAD,
            ),
            Subscription(self.streams.tasks, TASK_GROUP, Decoder(TaskEvent)),
        ]

    def handle(self, delivery: Delivery) -> Effects:
        """The consumer's handler: route by stream."""
        if delivery.subscription.stream == self.streams.tasks:
            return self.on_task(delivery.event)
        return self.on_control(delivery.event, delivery.entry_id)

    # --- control log ---------------------------------------------------------------------------

    def on_control(self, event: Any, entry_id: str = "") -> Effects:
        """Apply one control event; returns the effects to commit with its ack."""
        if isinstance(event, Admitted):
            view = self.registrations.get(event.registration_id)
            if view is None or event.epoch > view.epoch:
                self.registrations[event.registration_id] = _Registration(event.epoch)
        elif isinstance(event, SyncRequested):
            replay = bool(entry_id) and entry_at_or_before(entry_id, self.history_until)
            return self._on_sync(event, replay=replay)
        elif isinstance(event, Retired | Completed | Failed | DeregisterRequested):
            self._end(event.adapter, event.registration_id, event.epoch)
        return Effects()

    def _end(self, adapter: str, reg: str, epoch: int) -> None:
        """The registration ``reg`` is over: unload it, drop its cached weights and tasks.

        An event without a registration id names none (the trainer resolves by-name cancels to
        a registration before they reach the control log) and changes nothing.
        """
        if not reg:
            return
        view = self.registrations.setdefault(reg, _Registration(epoch))
        view.epoch, view.live = max(view.epoch, epoch), False
        self.syncs.pop(reg, None)
        name = served_name(adapter, reg)
        self.backend.unload(name)
        self.weights.forget(name)
        self._forget_unserved(name)

    def _on_sync(self, event: SyncRequested, *, replay: bool) -> Effects:
        view = self.registrations.setdefault(event.registration_id, _Registration(event.epoch))
        if not view.live and event.epoch <= view.epoch:
            return Effects()
        view.epoch = max(view.epoch, event.epoch)
        known = self.syncs.get(event.registration_id)
        if known is None or event.version >= known.version:
            self.syncs[event.registration_id] = event
        if replay:
            return Effects()
        name = served_name(event.adapter, event.registration_id)
        served = self.backend.versions(name)
        if served and max(served) > event.version:
            return Effects()  # a newer version is already served; this request is outdated
        if (
            self.loaded_sha.get((name, event.version)) != event.sha256
            or event.version not in served
        ):
            try:
                self._load(name, event.version, event.uri, expect_sha256=event.sha256)
            except (WeightsError, AdapterLoadError, BackendUnavailableError) as err:
                raise SyncError(f"sync of {name}@{event.version} failed: {err}") from err
        # A task may have loaded this version before its sync event got here: the worker has
        # served it since then, not since now.
        since = self.serving_since.get((name, event.version), self.clock())
        synced = Synced(
            adapter=event.adapter,
            registration_id=event.registration_id,
            epoch=event.epoch,
            worker=self.name,
            version=event.version,
            latency_s=max(0.0, since - event.time),
        )
        synced = stamp(synced, source=self.name)
        effects = Effects().publish(self.streams.control, synced)
        return effects.extend(sync_effects(self.streams, synced))

    def _load(self, name: str, version: int, uri: str, *, expect_sha256: str = "") -> None:
        """Fetch, verify (when the sha256 is known) and serve ``name@version``.

        A version already served with other content (a trainer that redid a step after a crash
        and published the version again) is unloaded first: versions are immutable in engines.
        """
        with self.metrics.load_timer():
            path, sha256 = self.weights.fetch(uri, name, version)
            if expect_sha256 and sha256 != expect_sha256:
                raise WeightsError(
                    f"sha256 of {path}/adapter_model.safetensors is {sha256}, the sync event says "
                    f"{expect_sha256}; the artifact is corrupt or was overwritten"
                )
            if self.loaded_sha.get((name, version), sha256) != sha256:
                self.backend.unload(name, version)
            self.backend.load(name, version, str(path))
        self.loaded_sha[(name, version)] = sha256
        self.serving_since[(name, version)] = self.clock()
        self._forget_unserved(name)

    def _forget_unserved(self, name: str) -> None:
        """Drop the records of ``name``'s versions the backend no longer serves."""
        served = set(self.backend.versions(name))  # older versions may have been evicted
        self.loaded_sha = {
            k: v for k, v in self.loaded_sha.items() if k[0] != name or k[1] in served
        }
        self.serving_since = {
            k: v for k, v in self.serving_since.items() if k[0] != name or k[1] in served
        }
        self.metrics.adapters_loaded(len(self.loaded_sha))

    # --- tasks ---------------------------------------------------------------------------------

    def fenced(self, task: RolloutTask) -> str:
        """Why ``task`` must be dropped ("" if it may run); updates the known epoch."""
        view = self.registrations.get(task.registration_id)
        if view is None:
            self.registrations[task.registration_id] = _Registration(task.epoch)
            return ""
        if not view.live and task.epoch <= view.epoch:
            return f"registration {task.registration_id!r} has ended"
        if task.epoch < view.epoch:
            return f"epoch {task.epoch} is older than the registration's epoch {view.epoch}"
        if task.epoch > view.epoch:
            view.epoch, view.live = task.epoch, True
        return ""

    def on_task(self, task: RolloutTask) -> Effects:
        """Run one task; the group is published with the task's ack (or nothing if fenced)."""
        why = self.fenced(task)
        if why:
            log.info("dropping task %s of %s: %s", task.id, task.adapter, why)
            self.metrics.task_dropped()
            return Effects()
        if task.group_size < 1:
            raise HandlerError(f"task {task.id}: group_size must be >= 1, got {task.group_size}")
        start = time.perf_counter()
        try:
            version, groups = self._run(task)
        except KNOWN_TASK_FAILURES as err:
            log.warning("task %s of %s failed: %s", task.id, task.adapter, err)
            version, groups = task.version, _failed_groups(task, f"{type(err).__name__}: {err}")
        except BackendUnavailableError as err:
            raise HandlerError(f"task {task.id}: engine unavailable: {err}") from err
        group = RolloutGroup(
            adapter=task.adapter,
            registration_id=task.registration_id,
            epoch=task.epoch,
            task_id=task.id,
            step=task.step,
            version=version,
            worker=self.name,
            groups=tuple(groups),
            generate_s=time.perf_counter() - start,
        )
        self.metrics.task_done(group)
        return Effects().publish(self.streams.groups, stamp(group, source=self.name))

    def _run(self, task: RolloutTask) -> tuple[int, list[PromptGroup]]:
        """Generate and score ``task``; returns ``(version used, prompt groups in task order)``."""
        version = self._ensure_weights(task)
        source: DataSource = self._sources.get(
            msgspec.json.encode(task.dataset), lambda: self._open(task.dataset)
        )
        reward: RewardComposite = self._rewards.get(
            msgspec.json.encode(task.rewards), lambda: self._composite(task.rewards)
        )
        SamplingParams.from_spec(task.sampling)  # invalid sampling fails the task, not a row
        ref = AdapterRef(served_name(task.adapter, task.registration_id), version)
        prompts: list[tuple[PromptItem, tuple[int, ...]] | str] = [
            self._prompt(source, index, task.dataset) for index in task.prompt_indices
        ]
        rows_B: list[GenerationRow] = []  # B = sum over runnable prompts of group_size
        items_B: list[PromptItem] = []
        seen: dict[int, int] = {}
        for index, prompt in zip(task.prompt_indices, prompts, strict=True):
            occurrence = seen.get(index, 0)
            seen[index] = occurrence + 1
            if isinstance(prompt, str):
                continue
            for g in range(task.group_size):
                seed = row_seed(task.seed, index, g, occurrence)
                sampling = SamplingParams.from_spec(task.sampling, seed=seed)
                rows_B.append(GenerationRow(prompt_ids=prompt[1], adapter=ref, sampling=sampling))
                items_B.append(prompt[0])
        completions_B = self.backend.generate(rows_B)  # ONE mixed batch for the whole task
        scores_B = reward.score_batch([c.text for c in completions_B], items_B, self.remote)
        done = iter(zip(completions_B, scores_B, strict=True))
        groups = []
        for index, prompt in zip(task.prompt_indices, prompts, strict=True):
            if isinstance(prompt, str):
                groups.append(_failed_prompt(index, task.group_size, prompt))
                continue
            samples_G = tuple(_sample(*next(done)) for _ in range(task.group_size))
            groups.append(PromptGroup(prompt_index=index, prompt_ids=prompt[1], samples=samples_G))
        return version, groups

    def _ensure_weights(self, task: RolloutTask) -> int:
        """Serve the task's version (or a newer loaded one); returns the version to use."""
        name = served_name(task.adapter, task.registration_id)
        served = self.backend.versions(name)
        if task.version in served:
            return task.version
        newer = [v for v in served if v > task.version]
        if newer:
            return max(newer)
        sync = self.syncs.get(task.registration_id)
        known = sync.sha256 if sync is not None and sync.version == task.version else ""
        self._load(name, task.version, task.weights_uri, expect_sha256=known)
        return task.version

    def _open(self, spec: DatasetSpec) -> DataSource:
        return open_source(spec, allowed_roots=self.allowed_roots, tokenizer=self.backend.tokenizer)

    def _composite(self, specs: tuple[RewardSpec, ...]) -> RewardComposite:
        return RewardComposite.from_specs(specs, self.registry)

    def _prompt(
        self, source: DataSource, index: int, spec: DatasetSpec
    ) -> tuple[PromptItem, tuple[int, ...]] | str:
        """The item and its token ids, or the reason this prompt cannot run.

        Chat-templated text already carries the model's special tokens, so the tokenizer adds
        none then; plain text gets them (e.g. a BOS token) as the model expects.
        """
        try:
            item = source[index]
        except IndexError as err:
            return f"prompt index: {err}"
        encoded = self.backend.tokenizer(item.prompt, add_special_tokens=not spec.chat_template)
        ids = tuple(int(t) for t in encoded["input_ids"])
        if not ids:
            return f"prompt {index} is empty after tokenization"
        if len(ids) > self.max_prompt_tokens:
            return (
                f"prompt {index} has {len(ids)} tokens, over max_prompt_tokens="
                f"{self.max_prompt_tokens}; shorten the dataset's prompts or raise the limit"
            )
        return item, ids


def _sample(c: Completion, score: RewardResult) -> Sample:
    """A generated sample; a failed reward marks it failed (reward 0.0, not to be trained on)."""
    return Sample(
        completion_ids=c.completion_ids,
        logprobs=c.logprobs,
        text=c.text,
        reward=score.total,
        reward_terms=score.terms,
        finish_reason=c.finish_reason,
        failed=score.failed,
        reason=score.reason,
    )


def _failed_prompt(index: int, group_size: int, reason: str) -> PromptGroup:
    failed = Sample(
        completion_ids=(),
        logprobs=(),
        text="",
        reward=0.0,
        finish_reason="error",
        failed=True,
        reason=reason,
    )
    return PromptGroup(prompt_index=index, prompt_ids=(), samples=(failed,) * group_size)


def _failed_groups(task: RolloutTask, reason: str) -> list[PromptGroup]:
    return [_failed_prompt(i, task.group_size, reason) for i in task.prompt_indices]


# --- process entry point -----------------------------------------------------------------------
