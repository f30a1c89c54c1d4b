"""Event schemas: one msgspec tagged union per stream, JSON on the wire.

Every event is a frozen Struct whose ``type`` tag names it (``"adapter.admitted"``, ...). The
envelope fields (CloudEvents in spirit) come first on every event:

- ``id``: unique per event, chosen by the producer (a uuid4 hex). When a raw producer leaves it
  empty the consumer runtime uses the stream entry id, so re-reading the same entry always gives the
  same id. It is the idempotency key of events that are applied at most once.
- ``type``: the tag; ``source``: which process produced it (``trainer``, ``rollout.w1``, ...).
- ``time``: producer wall-clock, seconds since the epoch.
- ``adapter``: the adapter's name; ``registration_id``: one registration of that name (a name can be
  registered again after it retires; work of an older registration is discarded).
- ``epoch``: fencing token of the registration, bumped by the trainer on every resume; work produced
  under an older epoch is discarded, never trained on.

Schema evolution: new fields always get defaults. Ingress events (what tenants write) forbid
unknown fields so a typo is an error naming the field; internal events ignore unknown fields so an
older process can read a newer producer's events.

Streams and their unions (keys in :mod:`events.streams`):

==================  ===========================  ==============================================
stream              union                        written by → read by
==================  ===========================  ==============================================
``ingress``         :data:`IngressEvent`         any producer → trainer (admission)
``control``         :data:`ControlEvent`         trainer, rollout, checkpoint → all (broadcast)
``rollout.tasks``   :data:`TaskEvent`            trainer → rollout workers (one shared group)
``rollout.groups``  :data:`GroupEvent`           rollout workers → trainer
``train.requests``  :data:`TrainRequest`         gateways → trainer (client-driven adapters)
==================  ===========================  ==============================================

Results of client requests are not events: they are durable future records
(:mod:`events.futures`) written with the acknowledgement of the request that produced them.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from events.specs import (
    MAX_GROUP_SIZE,
    AdapterName,
    AdapterSpec,
    DatasetSpec,
    RegistrationId,
    RewardSpec,
    SamplingSpec,
)


class _Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    id: str = ""
    source: str = ""
    time: float = 0.0
    adapter: str
    registration_id: str = ""
    epoch: int = 0


class _StrictEnvelope(_Envelope, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


# --- ingress (tenant-written) ---------------------------------------------------------------


class RegisterRequested(
    _StrictEnvelope, frozen=True, kw_only=True, tag="adapter.register_requested"
):
    """A tenant asks to train an adapter.

    Produced by: any producer on ``ingress`` (``registration_id`` may be empty; admission assigns
    one). Admission (in the trainer process) validates it and republishes it on ``control`` with
    ``registration_id`` set, followed by ``adapter.admitted`` or ``adapter.queued``, or answers
    ``adapter.rejected``. Idempotency key: ``registration_id`` when given by the producer (a
    retried XADD registers once), else the event ``id``. ``adapter`` and ``registration_id`` are
    constrained here (patterns in :mod:`events.specs`), so the decoder rejects a bad one.
    """

    adapter: AdapterName
    registration_id: RegistrationId = ""
    spec: AdapterSpec


class DeregisterRequested(
    _StrictEnvelope, frozen=True, kw_only=True, tag="adapter.deregister_requested"
):
    """A tenant cancels an adapter (by name; ``registration_id`` narrows it to one registration).

    Produced by: any producer on ``ingress``; republished on ``control`` by the trainer, which
    stops issuing tasks, drops in-flight work of that registration, asks for a final checkpoint
    and frees the slot. Idempotency key: (``adapter``, ``registration_id``) — cancelling a
    registration that already ended is a no-op.
    """

    reason: str = "cancelled by user"


# --- control log (lifecycle, broadcast) ------------------------------------------------------


class Rejected(_Envelope, frozen=True, kw_only=True, tag="adapter.rejected"):
    """Admission refused a registration or an ingress entry could not be decoded.

    Produced by: the trainer's admission. Consumed by: status projection, CLI. ``field`` names the
    offending field when known; ``ingress_entry`` is the stream entry id of the bad input.
    Idempotency key: ``ingress_entry``.
    """

    reason: str
    field: str = ""
    ingress_entry: str = ""


class Admitted(_Envelope, frozen=True, kw_only=True, tag="adapter.admitted"):
    """The registration got slot ``slot`` and starts training under ``epoch``.

    Produced by: trainer. Consumed by: status, checkpoint (learns the spec), rollout (drops work of
    older registrations). Idempotency key: (``registration_id``, ``epoch``).
    """

    slot: int
    spec: AdapterSpec
    start_step: int = 0
    resumed_from: str = ""


class Queued(_Envelope, frozen=True, kw_only=True, tag="adapter.queued"):
    """No slot is free; the registration waits at ``position`` (0 = next). Produced by: trainer."""

    position: int
    spec: AdapterSpec


class StepDone(_Envelope, frozen=True, kw_only=True, tag="adapter.step_done"):
    """The adapter took optimizer step ``step``; its weights are now ``version``.

    Produced by: trainer, after the new version is durable in the artifact store. Consumed by:
    checkpoint (promotes at the interval), status, metrics. ``metrics`` holds scalar training
    statistics (reward mean, loss, KL, clip fraction, ...). ``state_uri`` points at the full
    training state of this version (weights, optimizer, cursor, RNG) in the artifact store.
    ``tasks`` are the ids of the rollout tasks whose groups the step trained on, so fencing (only
    groups of the registration's current epoch and of this step are trained) can be checked from
    the log alone. Idempotency key: (``registration_id``, ``step``); steps only increase.
    """

    step: int
    version: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    state_uri: str = ""
    tasks: tuple[str, ...] = ()


class SyncRequested(_Envelope, frozen=True, kw_only=True, tag="adapter.sync_requested"):
    """Weights ``version`` of the adapter are published as a PEFT directory at ``uri``.

    Produced by: trainer (version 0 at admission, then after every step). Consumed by: every
    rollout worker (loads it, answers ``adapter.synced``). ``sha256`` is over the safetensors
    file. Idempotency key: (``registration_id``, ``version``); versions only increase.
    """

    version: int
    step: int
    uri: str
    sha256: str
    bytes: int


class Synced(_Envelope, frozen=True, kw_only=True, tag="adapter.synced"):
    """Rollout ``worker`` now serves ``version``; ``latency_s`` since the trainer published it."""

    worker: str
    version: int
    latency_s: float


class CheckpointSaved(_Envelope, frozen=True, kw_only=True, tag="adapter.checkpoint_saved"):
    """The checkpoint process promoted step ``step`` to a durable checkpoint at ``uri``.

    ``final`` marks the checkpoint taken at completion or cancel. Idempotency key:
    (``registration_id``, ``step``).
    """

    step: int
    uri: str
    final: bool = False


class Exported(_Envelope, frozen=True, kw_only=True, tag="adapter.exported"):
    """A PEFT export of step ``step`` is at ``uri`` (loads in PEFT, vLLM and SGLang unchanged)."""

    step: int
    uri: str


class Completed(_Envelope, frozen=True, kw_only=True, tag="adapter.completed"):
    """Training of the registration ended at ``step`` (``reason``: ``budget`` or ``cancelled``).

    Produced by: trainer. Consumed by: checkpoint (final checkpoint + export), status.
    """

    step: int
    reason: Literal["budget", "cancelled"] = "budget"
    version: int = 0


class Retired(_Envelope, frozen=True, kw_only=True, tag="adapter.retired"):
    """The registration left slot ``slot``; the slot is reset for the next tenant.

    Produced by: trainer. Consumed by: rollout workers (unload; drop its tasks), status.
    """

    slot: int


class Failed(_Envelope, frozen=True, kw_only=True, tag="adapter.failed"):
    """The registration failed for ``reason`` (e.g. repeated non-finite losses)."""

    reason: str
    step: int = 0


# --- work queues -------------------------------------------------------------------------------


class RolloutTask(_Envelope, frozen=True, kw_only=True, tag="rollout.task"):
    """Generate ``group_size`` samples for each prompt index with weights ``version``.

    Produced by: trainer on ``rollout.tasks``; consumed by exactly one rollout worker (shared
    group). Self-contained so workers stay stateless: it carries the dataset, reward and sampling
    specs and the URI of the weights. ``step`` is the trainer step the samples are meant for.
    Idempotency key: ``id`` (the task id); the trainer takes one group per task id.
    """

    step: int
    version: int
    weights_uri: str
    prompt_indices: tuple[int, ...]
    group_size: int
    dataset: DatasetSpec
    rewards: tuple[RewardSpec, ...]
    sampling: SamplingSpec
    seed: int = 0


class Sample(msgspec.Struct, frozen=True, kw_only=True):
    """One completion: its tokens, behaviour log-probs, reward and failure status."""

    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    reward: float
    reward_terms: dict[str, float] = msgspec.field(default_factory=dict)
    finish_reason: str = "stop"
    failed: bool = False
    reason: str = ""


class PromptGroup(msgspec.Struct, frozen=True, kw_only=True):
    """The ``group_size`` samples of one prompt (``prompt_ids`` as tokenized by the worker)."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    samples: tuple[Sample, ...]


class RolloutGroup(_Envelope, frozen=True, kw_only=True, tag="rollout.group"):
    """The scored sample groups of one task.

    Produced by: a rollout worker on ``rollout.groups``; consumed by the trainer, which discards
    it if ``epoch``/``registration_id`` are stale. ``task_id`` is the idempotency key (a task
    re-run after a worker crash may produce a second group; the trainer keeps the first).
    ``version`` is the weights version that generated the samples.
    """

    task_id: str
    step: int
    version: int
    worker: str
    groups: tuple[PromptGroup, ...]
    generate_s: float = 0.0


# --- client-driven adapters (Tinker-SDK tenants behind the gateway) ----------------------------

LossFnName = Literal["cross_entropy", "importance_sampling", "ppo"]
"""The loss functions a client's ``forward_backward`` may name (the Tinker SDK's names)."""


class Datum(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One training example of a client-driven adapter, in the trainer's token alignment.

    ``tokens`` is the whole sequence ``x_0 .. x_T-1``; each loss input has ``T`` entries, entry
    ``t`` being about token ``t`` as a target, predicted from tokens ``< t`` (entry 0 is never a
    target). A Tinker datum (model input ``x_0 .. x_N-1``, ``target_tokens`` ``x_1 .. x_N``,
    loss inputs of length ``N``) becomes ``tokens = x_0 .. x_N`` and each loss input shifted
    right by one; the gateway does that conversion. Empty loss inputs mean zeros.

    - ``weights``: per-target weight of ``cross_entropy`` (``loss = -Σ w_t · log p_t``).
    - ``logprobs``: the sampler's log-probs (``importance_sampling``, ``ppo``).
    - ``advantages``: per-target advantages (``importance_sampling``, ``ppo``).
    """

    tokens: tuple[int, ...]
    weights: tuple[float, ...] = ()
    logprobs: tuple[float, ...] = ()
    advantages: tuple[float, ...] = ()


class ForwardBackward(_Envelope, frozen=True, kw_only=True, tag="train.forward_backward"):
    """A client's ``forward_backward`` (or, with ``backward=False``, ``forward``) on its adapter.

    Produced by: a gateway on ``train.requests``; consumed by the trainer, which packs the datums
    into its next mixed step with every other adapter's rows. The gradient (of the loss *summed*
    over target tokens, the Tinker convention) accumulates in the slot until the client's next
    ``optim_step``; the entry stays pending until that step's version is durable, so a crash
    recomputes it and applies it once. The result (per-datum target log-probs, the loss) is the
    future ``request_id`` (:mod:`events.futures`). ``loss_config`` holds the loss's settings
    (``ppo``: ``clip_low_threshold``, ``clip_high_threshold``, ratio bounds, default 0.8 / 1.2).
    """

    request_id: str
    datums: Annotated[tuple[Datum, ...], msgspec.Meta(min_length=1)]
    loss_fn: LossFnName = "cross_entropy"
    loss_config: dict[str, float] = msgspec.field(default_factory=dict)
    backward: bool = True


class OptimStep(_Envelope, frozen=True, kw_only=True, tag="train.optim_step"):
    """A client's ``optim_step``: one AdamW update of its slot with the gradient accumulated
    since the previous one, with these settings (Tinker's ``AdamParams``; decoupled weight
    decay; ``grad_clip_norm`` 0 = no clipping). The new weights are written as the adapter's
    next version before ``step_done`` and the future are published."""

    request_id: str
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class SaveWeights(_Envelope, frozen=True, kw_only=True, tag="train.save_weights"):
    """A client's ``save_weights_for_sampler`` (``kind="sampler"``: the current weights become a
    version the rollout workers serve, announced with ``sync_requested``) or ``save_state``
    (``kind="state"``: weights and optimizer state promoted to a named checkpoint by the
    checkpoint process). ``name`` is the client's name for it (unique per adapter)."""

    request_id: str
    name: str
    kind: Literal["sampler", "state"] = "sampler"


class LoadWeights(_Envelope, frozen=True, kw_only=True, tag="train.load_weights"):
    """A client's ``load_state`` (``with_optimizer``: also the Adam moments and step count) from
    the checkpoint directory ``uri`` (resolved by the gateway from the client's ``tinker://``
    path, of this tenant)."""

    request_id: str
    uri: str
    with_optimizer: bool = False


class SaveRequested(_Envelope, frozen=True, kw_only=True, tag="adapter.save_requested"):
    """The trainer asks the checkpoint process to promote version ``version`` (at ``state_uri``)
    of a client-driven adapter to the named checkpoint ``name``, and to answer the future
    ``request_id`` with its path. Produced by: trainer (on a ``save_state`` request)."""

    request_id: str
    name: str
    step: int
    version: int
    state_uri: str


class SampleTask(_Envelope, frozen=True, kw_only=True, tag="rollout.sample"):
    """A client's ``sample`` / ``compute_logprobs``: ``num_samples`` completions of the token
    prompt ``prompt_ids`` with weights ``version`` at ``weights_uri`` (``""``: the base model, no
    adapter), on ``rollout.tasks`` like any task, served by one rollout worker. With
    ``prompt_logprobs`` the result carries ``log p(prompt_t | prompt_<t)`` for every prompt
    token (``None`` for the first). The result is the future ``request_id``; no reward is
    computed (the client scores its own samples). ``adapter`` is empty for the base model."""

    request_id: str
    version: int = 0
    weights_uri: str = ""
    prompt_ids: Annotated[tuple[int, ...], msgspec.Meta(min_length=1)]
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_GROUP_SIZE)] = 1
    sampling: SamplingSpec = SamplingSpec()
    seed: int = 0
    prompt_logprobs: bool = False


IngressEvent = RegisterRequested | DeregisterRequested
ControlEvent = (
    RegisterRequested
    | DeregisterRequested
    | Rejected
    | Admitted
    | Queued
    | StepDone
    | SyncRequested
    | Synced
    | CheckpointSaved
    | Exported
    | Completed
    | Retired
    | Failed
    | SaveRequested
)
TaskEvent = RolloutTask | SampleTask
GroupEvent = RolloutGroup
TrainRequest = ForwardBackward | OptimStep | SaveWeights | LoadWeights
AnyEvent = ControlEvent | RolloutTask | SampleTask | RolloutGroup | TrainRequest

ALL_EVENT_TYPES: tuple[type[_Envelope], ...] = (
    RegisterRequested,
    DeregisterRequested,
    Rejected,
    Admitted,
    Queued,
    StepDone,
    SyncRequested,
    Synced,
    CheckpointSaved,
    Exported,
    Completed,
    Retired,
    Failed,
    RolloutTask,
    RolloutGroup,
    SaveRequested,
    SampleTask,
    ForwardBackward,
    OptimStep,
    SaveWeights,
    LoadWeights,
)


def event_type(event: msgspec.Struct) -> str:
    """The wire tag of ``event`` (e.g. ``"adapter.admitted"``)."""
    return str(type(event).__struct_config__.tag)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An entry moved to the dead-letter stream, with why and how often it was delivered.

    ``payload`` holds the entry's original fields, verbatim, so nothing is lost: an operator can
    fix the cause and re-publish it.
    """

    stream: str
    group: str
    entry_id: str
    reason: str
    deliveries: int
    consumer: str
    time: float
    payload: dict[str, str]
