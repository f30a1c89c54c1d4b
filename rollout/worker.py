"""The rollout worker process: a state machine over the control log and the task queue.

(Over 600 lines: the lifecycle view, the weight syncs, fencing and the task batches share one
state — the registrations, their syncs and what the engine serves — and each decision reads
all of it; split, the parts would pass that state around.)

Run ``multilora rollout --redis-url redis://... --model models/smollm2-135m`` (config in
:mod:`rollout.config`, wiring in :mod:`rollout.main`); any number of replicas side by side.

**Subscriptions.** ``rollout.tasks`` through ONE shared group ``rollout`` (each task goes to one
replica), and the control log through a group of its own, ``rollout.<name>`` (broadcast: every
replica sees every event; a new group starts at ``"0"``, so a new replica replays the log and
learns the registrations, epochs and versions before it serves).

**Control events** (:meth:`RolloutWorker.on_control`). The worker's view of the registrations is
the lifecycle's (:mod:`orchestrator.lifecycle`): one :class:`AdapterState` per registration id,
every control event folded through :func:`~orchestrator.lifecycle.decide`. On top of that:

- ``adapter.sync_requested`` the lifecycle applies (or applied before: a redelivery) — load
  the version unless a newer one is served, its sha256 checked against the event (mismatch:
  :class:`SyncError`: retried, then dead-lettered), and publish ``adapter.synced``
  (``latency_s`` = when it began serving the version − ``event.time``: a task may have loaded
  it first) plus ``sync:<worker>`` in the adapter's status hash, in the same commit as the
  ack. A sync the lifecycle calls stale (older version or epoch, ended registration) is not
  answered. Events in the log before the worker started (``history_until``) are only
  *recorded*: a replica replaying history loads lazily, from the next task, and does not
  answer syncs addressed to the past.
- an event that moves a registration out of the phases that may still need weights
  (:data:`SERVING`: completed, cancelled, failed, retired) unloads its versions and forgets
  its cached weights.

**Tasks** (:meth:`RolloutWorker.on_task`). Fencing first (:meth:`RolloutWorker.fenced`): a task
runs when the lifecycle accepts work of its registration at its epoch
(:func:`~orchestrator.lifecycle.accepts_work`: admitted or running, at the current epoch). The
task queue can run ahead of the control log (the two streams are read independently), so a task
of a registration the worker has not seen yet, or with a newer epoch than its state (a
re-admission not read yet), runs too, and that epoch fences older tasks until the log catches
up. Everything else is acknowledged with no output. Then the worker makes sure the weights are
served (:class:`~rollout.served.ServedVersions`: the task's own version if loaded; else a newer
loaded version of the same registration, reported in the group; else it loads ``weights_uri``
— workers are stateless), reads the prompts by index from the adapter's dataset (sources cached
per :class:`DatasetSpec`), tokenizes them, generates ``group_size`` samples per prompt in ONE
mixed batch with per-row seeds (:mod:`rollout.groups`), scores them with the composite reward,
and publishes ONE ``rollout.group`` through :class:`Effects` committed atomically with the
task's ack. A worker whose entry was reclaimed by another (it was silent for ``claim_idle_ms``)
has its commit refused, so each task is published once in effect; the trainer still keys groups
by ``task_id`` and fences them itself as a second line.

**Batches across tasks** (``batch_tasks`` > 1, the process's setting). The handler holds each task
(:data:`~events.consumer.DEFER`: it stays pending and owned) and the consumer's idle hook
(:meth:`RolloutWorker.flush`) generates every held task — of any adapter, any registration — in ONE
mixed engine batch as soon as nothing else waits to be read, or at ``batch_tasks`` tasks. So a
newly admitted adapter's first tasks ride in the same batch as the running adapters' instead of
queueing in front of them. Control events are handled first (their subscription's priority), so the
batch sees the newest syncs. Then each task is scored, and the batch's groups are committed with
their acks in ONE commit (:meth:`~events.consumer.Consumer.complete_all`), so they land together
and the trainer reads them in one go; a task another replica took over meanwhile makes that commit
refused, and the batch then commits task by task, so only that one is refused. A batch the engine
refuses is run again task by task, so only the task with the offending rows fails, and so is a
batch whose loads evicted a version one of its tasks was prepared with (more versions or adapters
than the engine keeps at once); an unreachable engine hands every held task back for a retry
(:meth:`~events.consumer.Consumer.retry_later`). Fencing, weights and rows are decided per task
when its batch runs, exactly as for a task run alone.

**Client samples** (``rollout.sample``, a Tinker client's ``sample`` / ``compute_logprobs``
through the gateway) are served by :class:`~rollout.client_sampling.ClientSampler` with the same
backend and version cache, and answered in the request's future with the task's ack. They are
not fenced by epoch or staleness: a client may sample any version it saved, as long as its
weights can be loaded (see :mod:`rollout.client_sampling`; failures fail the future).

**Failure policy.** Known failures of one task become failed samples in its group, each with the
reason, so the trainer sees the failure and moves on (and may fail the adapter): a dataset that
cannot be opened, an unknown reward, invalid sampling, weights that cannot be loaded or fail
their checksum, rows the engine refuses (e.g. prompt plus ``max_new_tokens`` beyond the model's
context) (one group), a prompt index out of range or a prompt longer than
``max_prompt_tokens`` (that prompt's samples; prompts are never truncated: a cut prompt is a
different question than the one the reward checks), a reward function that raises, returns
NaN/inf or runs past its deadline (that sample: in-process calls get ``reward_call_timeout_s``
each, through the worker's one :class:`~rollout.rewards.RewardDeadline`, which stops calling a
reward that left ``max_hung_reward_calls`` calls hung, so one hanging reward costs a task at
most that many deadlines and never stalls the tasks of other adapters).
The worker never publishes ``adapter.failed``: whether an adapter has failed is the trainer's
decision, and one worker's view (a file missing on its host) must not kill an adapter. An
unreachable engine raises :class:`HandlerError` (retried later by any replica). Anything else is
a bug and crashes the process; at-least-once delivery makes that safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from events.codec import Decoder, stamp
from events.consumer import DEFER, Consumer, Delivery, HandlerResult, Subscription
from events.effects import Effects
from events.errors import HandlerError, MultiLoraError
from events.heap import HeapTrimmer
from events.schema import (
    ControlEvent,
    PromptGroup,
    RolloutGroup,
    RolloutTask,
    SampleTask,
    Synced,
    SyncRequested,
    TaskEvent,
)
from events.specs import DatasetSpec, RewardSpec
from events.streams import Streams
from orchestrator.fleet import Fleet
from orchestrator.lifecycle import (
    TRAINING,
    WAITING,
    AdapterState,
    Outcome,
    Phase,
    Verdict,
    accepts_work,
    decide,
    is_ended,
    registration_key,
    tombstone,
)
from orchestrator.status import sync_effects
from rollout.adapter_slots import AdapterRef
from rollout.backend import (
    AdapterLoadError,
    BackendUnavailableError,
    GenerationBackend,
    RowRefusedError,
    WeightsError,
    WeightsFetcher,
)
from rollout.client_sampling import ClientSampler
from rollout.data import DataError, DataSource, open_source
from rollout.groups import (
    failed_groups,
    prompt_groups,
    served_name,
    task_rows,
    tokenize_prompt,
)
from rollout.metrics import RolloutMetrics
from rollout.rewards import (
    RemoteScorer,
    RewardComposite,
    RewardDeadline,
    RewardError,
    RewardRegistry,
)
from rollout.sampling import SamplingParamError, SamplingParams
from rollout.served import Fetched, ServedVersions

log = logging.getLogger(__name__)

TASK_GROUP = "rollout"
"""The one consumer group every replica reads ``rollout.tasks`` through (load balancing)."""


class SyncError(HandlerError):
    """A ``sync_requested`` could not be applied (checksum mismatch, unreadable or bad files)."""


KNOWN_TASK_FAILURES = (
    DataError,
    RewardError,
    SamplingParamError,
    AdapterLoadError,
    WeightsError,
    RowRefusedError,
)
"""Task failures that become failed samples in the group instead of crashing the worker."""


CONTROL_READ_AHEAD = 256
"""Control events a worker reads ahead (in bulk) while it generates: all of them are handled
before its next task, so a weight sync never waits behind a backlog of other control events."""
READ_AHEAD_VERSIONS = 16
"""At most this many syncs' versions are held read ahead (host memory: one adapter's tensors
each); past it the handler reads them itself."""

LIVE = WAITING | TRAINING
"""Phases from which a registration may still train: its tasks are not fenced for good."""

SERVING = LIVE | {Phase.COMPLETING}
"""Phases in which a registration may still need its weights (tasks; the final sync of
``completing``). A registration that leaves them is unloaded."""

_ANSWERED = frozenset({Verdict.APPLIED, Verdict.DUPLICATE, Verdict.UNKNOWN})
"""Verdicts of a ``sync_requested`` the worker answers: applied now, applied before (a
redelivery), or for a registration it has no state for (nothing says the sync is stale)."""


@dataclass(frozen=True)
class _Prepared:
    """A task ready to generate: the version it uses (of the served adapter ``name``), its
    tokenized prompts and engine rows."""

    task: RolloutTask
    name: str
    version: int
    prompts: list[Any]
    rows: list[Any]
    items: list[Any]
    reward: RewardComposite


def _check(task: RolloutTask) -> None:
    if task.group_size < 1:
        raise HandlerError(f"task {task.id}: group_size must be >= 1, got {task.group_size}")


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
    in-process). ``reward_call_timeout_s`` / ``max_hung_reward_calls``: the deadline of each
    in-process reward call and how many hung calls of one reward stop it being called (see
    :class:`~rollout.rewards.RewardDeadline`). ``allowed_roots``: directories dataset files may
    live under. ``batch_tasks``: how many held tasks one engine batch takes (1: one task at a
    time; see the module doc).
    ``history_until``: the newest control entry when the process started (see the module
    doc). ``clock``: wall clock for ``latency_s``.

    State: ``states`` (registration id -> lifecycle state, the one view of the control log),
    ``syncs`` (registration id -> newest ``sync_requested``: the sha256 a task's weights must
    have), ``served`` (what the backend serves, :class:`~rollout.served.ServedVersions`) and
    the epochs tasks carried ahead of the control log.
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
        reward_call_timeout_s: float = 5.0,
        max_hung_reward_calls: int = 2,
        allowed_roots: Sequence[Path] = (),
        max_prompt_tokens: int = 1024,
        history_until: str = "0-0",
        clock: Callable[[], float] = time.time,
        cache_size: int = 16,
        metrics: RolloutMetrics | None = None,
        batch_tasks: int = 1,
    ) -> None:
        self.name = name
        self.streams = streams
        self.backend = backend
        self.weights = weights
        self.registry = registry
        self.remote = remote
        self.deadline = RewardDeadline(reward_call_timeout_s, max_hung=max_hung_reward_calls)
        self.allowed_roots = tuple(allowed_roots)
        self.max_prompt_tokens = max_prompt_tokens
        self.history_until = history_until
        self.started_at = clock()  # syncs older than this are history: not read ahead
        self._ahead = 0  # versions read ahead and not yet handled (READ_AHEAD_VERSIONS)
        self._ahead_lock = threading.Lock()
        self.metrics = metrics or RolloutMetrics(CollectorRegistry())  # default: not exported
        self.served = ServedVersions(backend, weights, self.metrics, clock=clock)
        self.sampler = ClientSampler(
            streams=streams,
            backend=backend,
            served=self.served,
            max_prompt_tokens=max_prompt_tokens,
        )
        self.states: dict[str, AdapterState] = {}
        self.syncs: dict[str, SyncRequested] = {}
        self._epochs_ahead: dict[str, int] = {}  # registration id -> newest epoch of a task
        self._sources = _Lru(cache_size)
        self._rewards = _Lru(cache_size)
        self.batch_tasks = batch_tasks
        self._batch: list[Delivery[TaskEvent]] = []  # tasks held for the next batch
        self.consumer: Consumer | None = None  # set by rollout.main.build (commits batches)
        self.heap = HeapTrimmer()

    def seed(self, fleet: Fleet) -> None:
        """Start the lifecycle view from ``fleet`` (the control log's snapshot and the entries
        after it: :func:`orchestrator.compaction.load_fleet`), so a replica started after the
        log was trimmed still knows every registration; the log's own entries then fold on top
        (a state already known is kept)."""
        for state in fleet.states():
            self.states.setdefault(state.registration_id, state)

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
                prepare=self.fetch_ahead,
            ),
            # trimmed once every group acknowledged it (the work queue stays bounded); one read
            # takes up to a batch of the waiting tasks
            Subscription(
                self.streams.tasks,
                TASK_GROUP,
                Decoder(TaskEvent),
                trim=True,
                count=self.batch_tasks,
            ),
        ]

    def handle(self, delivery: Delivery[ControlEvent | TaskEvent]) -> HandlerResult:
        """The consumer's handler: a task (held for the next batch when ``batch_tasks`` > 1),
        or an event of the control log."""
        match delivery.event:
            case RolloutTask() as task:
                if self.batch_tasks > 1 and self.consumer is not None:
                    return self.defer_task(delivery)  # type: ignore[arg-type]
                return self.on_task(task)
            case SampleTask() as sample:
                return self.on_sample(sample)
            case event:
                fetched = delivery.prepared
                if fetched is not None:
                    with self._ahead_lock:
                        self._ahead -= 1
                return self.on_control(event, delivery.entry_id, fetched=fetched)

    # --- control log ---------------------------------------------------------------------------

    def fetch_ahead(self, event: ControlEvent) -> Fetched | None:
        """The control subscription's ``prepare`` (the consumer's reader thread): a sync's
        version fetched, checksummed and read, so the handler only copies it to the device
        (while the handler generates a batch, the next syncs' files are read). Syncs the log
        held at boot are skipped: a replica replaying history loads lazily; at most
        :data:`READ_AHEAD_VERSIONS` are held read ahead at once."""
        if not isinstance(event, SyncRequested) or event.time < self.started_at:
            return None
        with self._ahead_lock:
            if self._ahead >= READ_AHEAD_VERSIONS:
                return None
            self._ahead += 1
        try:
            return self.served.fetch_ahead(
                served_name(event.adapter, event.registration_id), event.version, event.uri
            )
        except BaseException:
            with self._ahead_lock:
                self._ahead -= 1
            raise

    def on_control(
        self, event: ControlEvent, entry_id: str = "", *, fetched: Fetched | None = None
    ) -> Effects:
        """Fold one control event into the lifecycle view; returns the effects of its ack
        (``fetched``: a sync's version read ahead, :meth:`fetch_ahead`)."""
        key = registration_key(event)
        outcome = decide(self.states.get(key), event)
        state = outcome.state
        if state is not None:
            self.states[key] = state
            if self._epochs_ahead.get(key, -1) <= state.epoch:
                self._epochs_ahead.pop(key, None)  # the log caught up with the task queue
        match event:
            case SyncRequested():
                replay = bool(entry_id) and entry_at_or_before(entry_id, self.history_until)
                return self._on_sync(event, outcome, replay=replay, fetched=fetched)
            case _ if outcome.verdict is Verdict.APPLIED and state and state.phase not in SERVING:
                self._end(state)
        return Effects()

    def _end(self, state: AdapterState) -> None:
        """The registration no longer needs weights: unload it, drop its cached weights, keep
        its state as a tombstone (fencing needs no spec)."""
        if is_ended(state):
            self.states[state.registration_id] = tombstone(state)
        self.syncs.pop(state.registration_id, None)
        name = served_name(state.name, state.registration_id)
        self.served.drop(name)
        self.sampler.drop(name)

    def _on_sync(
        self,
        event: SyncRequested,
        outcome: Outcome,
        *,
        replay: bool,
        fetched: Fetched | None = None,
    ) -> Effects:
        if outcome.verdict not in _ANSWERED:
            log.info("not answering sync %s: %s", event.id, outcome.reason)
            return Effects()
        known = self.syncs.get(event.registration_id)
        if known is None or event.version >= known.version:
            self.syncs[event.registration_id] = event
        if replay:
            return Effects()
        name = served_name(event.adapter, event.registration_id)
        served = self.served.versions(name)
        if served and max(served) > event.version:
            return Effects()  # a newer version is already served; this request is outdated
        if not self.served.serves(name, event.version, event.sha256):
            try:
                self.served.load(
                    name, event.version, event.uri, expect_sha256=event.sha256, fetched=fetched
                )
            except (WeightsError, AdapterLoadError, BackendUnavailableError) as err:
                raise SyncError(f"sync of {name}@{event.version} failed: {err}") from err
        # A task may have loaded this version before its sync event got here: the worker has
        # served it since then, not since now.
        since = self.served.since(name, event.version)
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

    # --- tasks ---------------------------------------------------------------------------------

    def fenced(self, task: RolloutTask) -> str:
        """Why ``task`` must be dropped (``""`` if it may run), as the lifecycle sees it.

        It runs when :func:`~orchestrator.lifecycle.accepts_work` (admitted or running, at the
        current epoch), or when the control log is behind the task queue: no state yet, or a
        newer epoch than the state's. That epoch is remembered and fences older tasks until the
        log catches up.
        """
        reg, epoch = task.registration_id, task.epoch
        state = self.states.get(reg)
        if state is not None and state.phase not in LIVE:
            return f"registration {reg!r} has ended ({state.phase})"
        fence = max(self._epochs_ahead.get(reg, 0), state.epoch if state is not None else 0)
        if epoch < fence:
            return f"epoch {epoch} is older than the registration's epoch {fence}"
        if accepts_work(state, reg, epoch):
            return ""
        if state is None or epoch > state.epoch:
            self._epochs_ahead[reg] = epoch
            return ""
        return f"registration {reg!r} is {state.phase}, not admitted"

    def on_task(self, task: RolloutTask) -> Effects:
        """Run one task alone; the group is published with the task's ack (or nothing if
        fenced)."""
        return self.run_tasks([task])[0]

    def defer_task(self, delivery: Delivery[TaskEvent]) -> HandlerResult:
        """Hold a task for the next batch (:meth:`flush`: at ``batch_tasks`` tasks, or when
        nothing else waits to be read)."""
        task = delivery.event
        assert isinstance(task, RolloutTask)
        _check(task)
        self._batch.append(delivery)
        if len(self._batch) >= self.batch_tasks:
            self.flush()
        return DEFER

    def flush(self) -> None:
        """The consumer's idle hook: generate every held task in ONE mixed batch, then commit
        the groups with their acks in one commit (a task another replica took over is refused
        alone: :meth:`~events.consumer.Consumer.complete_all`).
        An unreachable engine hands the tasks back to be retried (:meth:`Consumer.retry_later`).
        """
        batch, self._batch = self._batch, []
        if not batch:
            self.heap.maybe()  # idle: give the heap's free pages back (see events.heap)
            return
        if self.consumer is None:
            raise MultiLoraError("RolloutWorker.consumer is not set; build it with rollout.main")
        start = time.perf_counter()
        try:
            results = self.run_tasks([d.event for d in batch])  # type: ignore[misc]
        except HandlerError as exc:
            self.consumer.retry_later(batch, f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        # one commit: the batch's groups land together, so the trainer reads them in one go
        self.consumer.complete_all(list(zip(results, batch, strict=True)), seconds)

    def run_tasks(self, tasks: Sequence[RolloutTask]) -> list[Effects]:
        """Generate the tasks that are not fenced in ONE mixed batch (rows of every task and
        adapter; a row's tokens do not depend on its batch-mates) and score each; returns, per
        task in order, the effects that publish its group (none for a fenced task)."""
        results: list[Effects] = [Effects() for _ in tasks]
        ready: list[tuple[int, _Prepared]] = []
        start = time.perf_counter()
        for i, task in enumerate(tasks):
            why = self.fenced(task)
            if why:
                log.info("dropping task %s of %s: %s", task.id, task.adapter, why)
                self.metrics.task_dropped()
                continue
            _check(task)
            try:
                ready.append((i, self._prepare(task)))
            except KNOWN_TASK_FAILURES as err:
                results[i] = self._failed(task, err, start)
            except BackendUnavailableError as err:
                raise HandlerError(f"task {task.id}: engine unavailable: {err}") from err
        if self._evicted(ready):
            # a later task's load retired the version an earlier one was prepared with (more
            # versions or adapters than the engine keeps at once): the tasks run one at a time,
            # each with its version or a newer loaded one, as a task alone always can
            log.info("a batch of %d tasks evicted its own adapters: one at a time", len(tasks))
            return [self.run_tasks([task])[0] for task in tasks]
        try:
            generated = self._generate([p for _, p in ready])
        except BackendUnavailableError as err:
            raise HandlerError(f"{len(ready)} tasks: engine unavailable: {err}") from err
        for (i, p), completions in zip(ready, generated, strict=True):
            try:
                if isinstance(completions, Exception):
                    raise completions
                texts = [c.text for c in completions]
                scores = p.reward.score_batch(texts, p.items, self.remote, self.deadline)
                groups = prompt_groups(p.task, p.prompts, completions, scores)
            except KNOWN_TASK_FAILURES as err:
                results[i] = self._failed(p.task, err, start)
                continue
            results[i] = self._group(p.task, p.version, groups, start)
        return results

    def _evicted(self, ready: Sequence[tuple[int, _Prepared]]) -> bool:
        """Whether the engine no longer serves a version some of ``ready`` were prepared with."""
        return any(p.version not in self.served.versions(p.name) for _, p in ready)

    def _prepare(self, task: RolloutTask) -> _Prepared:
        """Weights served, prompts read and tokenized, rows built: the task ready to generate."""
        version = self._ensure_weights(task)
        source: DataSource = self._sources.get(
            msgspec.json.encode(task.dataset), lambda: self._open(task.dataset)
        )
        reward: RewardComposite = self._rewards.get(
            msgspec.json.encode(task.rewards), lambda: self._composite(task.rewards)
        )
        SamplingParams.from_spec(task.sampling)  # invalid sampling fails the task, not a row
        prompts = [
            tokenize_prompt(
                source,
                index,
                self.backend.tokenizer,
                chat_template=task.dataset.chat_template,
                max_tokens=self.max_prompt_tokens,
            )
            for index in task.prompt_indices
        ]
        ref = AdapterRef(served_name(task.adapter, task.registration_id), version)
        rows, items = task_rows(task, prompts, ref)
        return _Prepared(task, ref.name, version, prompts, rows, items, reward)

    def _generate(self, ready: Sequence[_Prepared]) -> list[list[Any] | Exception]:
        """Every task's rows as one engine batch; when the engine refuses the batch (a row of
        one task: too long, an unknown adapter), each task again alone, so only the offending
        task fails (its :class:`RowRefusedError` in its place)."""
        if not ready:
            return []
        rows = [row for p in ready for row in p.rows]
        try:
            flat = self.backend.generate(rows)
        except RowRefusedError as err:
            if len(ready) == 1:
                return [err]
            alone: list[list[Any] | Exception] = []
            for p in ready:
                try:
                    alone.append(self.backend.generate(p.rows))
                except RowRefusedError as one:
                    alone.append(one)
            return alone
        out: list[list[Any] | Exception] = []
        at = 0
        for p in ready:
            out.append(flat[at : at + len(p.rows)])
            at += len(p.rows)
        return out

    def _failed(self, task: RolloutTask, err: Exception, start: float) -> Effects:
        log.warning("task %s of %s failed: %s", task.id, task.adapter, err)
        reason = f"{type(err).__name__}: {err}"
        return self._group(task, task.version, failed_groups(task, reason), start)

    def _group(
        self, task: RolloutTask, version: int, groups: Sequence[PromptGroup], start: float
    ) -> Effects:
        """The effects that publish ``task``'s group (``generate_s``: since its batch began)."""
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

    def on_sample(self, task: SampleTask) -> Effects:
        """Serve a client's sample request; its future is answered with the task's ack."""
        state = self.states.get(task.registration_id) if task.registration_id else None
        ended = ""
        if state is not None and state.phase not in SERVING:
            ended = f"registration {task.registration_id!r} has ended ({state.phase})"
        sync = self.syncs.get(task.registration_id)
        known = sync.sha256 if sync is not None and sync.version == task.version else ""
        live = state is not None and not ended
        return self.sampler.on_sample(task, live=live, ended=ended, sha256=known)

    def _ensure_weights(self, task: RolloutTask) -> int:
        """Serve the task's version (or a newer loaded one); returns the version to use."""
        sync = self.syncs.get(task.registration_id)
        known = sync.sha256 if sync is not None and sync.version == task.version else ""
        name = served_name(task.adapter, task.registration_id)
        return self.served.usable(name, task.version, task.weights_uri, expect_sha256=known)

    def _open(self, spec: DatasetSpec) -> DataSource:
        return open_source(spec, allowed_roots=self.allowed_roots, tokenizer=self.backend.tokenizer)

    def _composite(self, specs: tuple[RewardSpec, ...]) -> RewardComposite:
        return RewardComposite.from_specs(specs, self.registry)
