"""Pure value types shared by every layer: what an adapter registration asks for.

These records travel inside events (see :mod:`events.schema`) and are read by the trainer
(hyper-parameters, data cursor), by rollout workers (dataset, reward, sampling) and by admission.
They are frozen msgspec Structs that forbid unknown fields, so a typo in a producer's JSON is a
validation error naming the field, never a silently ignored setting. New fields always get defaults.

**Validated once, here.** Every rule that needs neither the fleet nor I/O lives on these types:
value ranges as ``msgspec.Meta`` constraints (so the published JSON Schema carries them to
producers) and the rules Meta cannot express (one field against another, or a value set with a
hole such as "``-1`` or ``>= 1``") in ``__post_init__``. The ingress decoder rejects a bad value
with its JSON path (``Expected `int` >= 1 - at `$.spec.steps```); a ``__post_init__`` message
starts with the field it is about (``top_k = 0 is invalid; ...``), since msgspec gives it the
path of the enclosing object only. Code downstream trusts a decoded spec. Admission keeps only
what needs the trainer or I/O: ``base_model``, ``rank <= max_rank``, known reward names, a free
name, a readable dataset (:mod:`orchestrator.admission`).

Two things to know when building specs in Python: ``__post_init__`` rules run on construction
too (``LossSpec(clip_ratio_c=0.5)`` raises ``ValueError``), Meta ranges only when decoding or
``msgspec.convert`` (so a spec built in code is checked when a producer encodes and the trainer
decodes it). JSON cannot carry NaN or infinity, so every float that reaches the trainer is finite.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Scalar = str | int | float | bool
"""A JSON scalar: the only values allowed in reward parameter maps."""
ConfigValue = Scalar | list[Scalar]
"""A dataset config value: a scalar or a list of scalars (e.g. reasoning-gym's ``operators``)."""

# ``(?!\n)`` after ``$``: Python's ``re.search`` (msgspec, the jsonschema package) lets ``$``
# match before a trailing newline; ECMA-262 (every other JSON Schema validator) does not. With it
# both accept exactly the same strings.
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$(?!\n)"
"""Adapter names: 1-63 lowercase letters, digits, ``.``, ``_``, ``-``, starting with a letter or
digit (a name becomes part of keys, paths and URLs)."""
REGISTRATION_ID_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$(?!\n)"
"""Registration ids: up to 128 of ``[A-Za-z0-9._-]``, starting with a letter or digit (an id
names a directory of the artifact and checkpoint stores, so it is one safe path component:
never ``..``, never a ``/``); empty: assigned."""
PRODUCER_PATTERN = r"^([a-z0-9][a-z0-9._-]{0,62})?$(?!\n)"
"""Producer names: like adapter names, or empty (anonymous)."""

ADAPTER_NAME_RULE = (
    "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
)
REGISTRATION_ID_RULE = (
    "use up to 128 printable ASCII characters from [A-Za-z0-9._-], starting with a letter or "
    "digit (it names a directory), or leave it empty to get one"
)
PRODUCER_RULE = (
    "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "or leave it empty (anonymous)"
)
AdapterName = Annotated[
    str, msgspec.Meta(pattern=ADAPTER_NAME_PATTERN, description=ADAPTER_NAME_RULE)
]
RegistrationId = Annotated[
    str, msgspec.Meta(pattern=REGISTRATION_ID_PATTERN, description=REGISTRATION_ID_RULE)
]
ProducerName = Annotated[str, msgspec.Meta(pattern=PRODUCER_PATTERN, description=PRODUCER_RULE)]

MAX_GROUP_SIZE = 256
"""Most samples per prompt one registration may ask for."""
MAX_PROMPTS_PER_STEP = 1024
"""Most prompts per optimizer step one registration may ask for."""
MAX_NEW_TOKENS = 32768
"""Most tokens one completion may ask for."""
GREEDY_TEMPERATURE = 1e-6
"""Temperatures below this are greedy (argmax), as in SGLang, and their log-probs are
``log_softmax(logits)``, i.e. taken at temperature 1: see :attr:`SamplingSpec.logprob_temperature`,
the one statement of this rule (the rollout engine and the trainer both use it)."""

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Beta = Annotated[float, msgspec.Meta(ge=0, lt=1)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


def _invalid(field: str, value: object, fix: str) -> ValueError:
    """The ``__post_init__`` error: names the field and the value first, then the fix."""
    return ValueError(f"{field} = {value!r} is invalid; {fix}")


class DatasetSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an adapter's prompts come from.

    ``kind="jsonl"`` / ``"parquet"``: a file under one of the operator's allowed roots (``path``,
    required); each row gives the prompt text under ``input_key``, the reference answer under
    ``label_key`` and, optionally, a JSON object under ``metadata_key`` handed to the reward
    function. ``kind="reasoning_gym"``: a procedurally generated reasoning-gym dataset built
    offline from ``name`` (required), ``size`` prompts, ``seed`` and ``config`` (keyword arguments
    of the dataset's config). Whether the file exists and the task name is known is checked by
    admission's probe (I/O), not here.

    ``prompt_template`` is applied to the raw input (``{input}`` is replaced); with
    ``chat_template=True`` the result is wrapped as one user turn through the model tokenizer's chat
    template. ``shuffle_seed`` fixes the sample order of the data cursor (epochs reshuffle
    deterministically from it).
    """

    kind: Literal["jsonl", "parquet", "reasoning_gym"]
    path: Annotated[str, msgspec.Meta(description="required for jsonl and parquet")] = ""
    name: Annotated[str, msgspec.Meta(description="required for reasoning_gym")] = ""
    size: PositiveInt = 1000
    seed: int = 0
    config: dict[str, ConfigValue] = msgspec.field(default_factory=dict)
    input_key: str = "prompt"
    label_key: str = "answer"
    metadata_key: str = ""
    prompt_template: str = "{input}"
    chat_template: bool = False
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind != "reasoning_gym" and not self.path:
            fix = f"a {self.kind} dataset needs a path under the allowed roots"
            raise _invalid("path", self.path, fix)
        if self.kind == "reasoning_gym" and not self.name:
            fix = "a reasoning_gym dataset needs the name of a reasoning-gym task, e.g. 'chain_sum'"
            raise _invalid("name", self.name, fix)


class RewardSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One term of an adapter's reward: a registry key, its weight and its parameters.

    An adapter's reward is the weighted sum of its terms, e.g. correctness plus a small length
    penalty. ``name`` is only ever looked up in the rollout process's closed reward registry;
    nothing named here is ever imported. ``weight`` is any finite number (negative: a penalty).
    """

    name: str
    weight: float = 1.0
    params: dict[str, Scalar] = msgspec.field(default_factory=dict)


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sampling parameters for an adapter's rollouts (SGLang's ``sampling_params`` subset).

    ``temperature`` below :data:`GREEDY_TEMPERATURE` (e.g. 0) is greedy; ``top_p`` in (0, 1];
    ``top_k`` is ``-1`` (the whole vocabulary) or ``>= 1``; ``stop`` strings are non-empty.
    """

    temperature: NonNegativeFloat = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, description="-1 (all) or >= 1")] = -1
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 32
    stop: tuple[NonEmptyStr, ...] = ()

    def __post_init__(self) -> None:
        if self.top_k == 0:
            raise _invalid("top_k", self.top_k, "use top_k >= 1, or -1 for all")

    @property
    def greedy(self) -> bool:
        """Whether rows are argmax picks (``temperature < GREEDY_TEMPERATURE``)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def logprob_temperature(self) -> float:
        """The temperature a sample's log-probs are taken at: ``temperature``, or 1 for greedy
        rows (``log_softmax(logits / T)`` with ``T := 1``, SGLang's convention). The rollout
        engine reports, and the trainer recomputes, log-probs at this temperature."""
        return 1.0 if self.greedy else self.temperature


class OptimSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-adapter AdamW and schedule settings (the trainer keeps one optimizer state per slot).

    ``lr > 0``, ``eps > 0``, ``weight_decay >= 0``, both ``betas`` in ``[0, 1)``,
    ``min_lr_ratio`` in ``[0, 1]``; ``warmup_steps`` may not exceed the registration's ``steps``
    (checked by :class:`AdapterSpec`). ``max_grad_norm > 0`` clips the slot's gradient to that
    L2 norm; exactly ``0`` means no clipping; negative values are rejected (see
    :mod:`trainer.optim`).
    """

    lr: PositiveFloat = 1e-4
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    max_grad_norm: Annotated[float, msgspec.Meta(ge=0, description="0: no clipping")] = 1.0


class LossSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-adapter RL loss settings (GRPO family).

    ``advantage="grpo"`` normalises rewards by the group's mean and std; ``"drgrpo"`` only
    subtracts the mean. ``clip_low``/``clip_high`` are DAPO's asymmetric PPO clip range
    (``clip_low`` in [0, 1), ``clip_high >= 0``; equal values are plain PPO).
    ``clip_ratio_c`` is dual-clip PPO's bound for negative advantages: a token whose ratio is
    above it contributes ``clip_ratio_c · A`` and no gradient; it is ``0`` (the bound is off) or
    ``> 1``. ``kl_coef > 0`` adds a KL penalty to the base model (the same forward with the
    adapter off). ``filter_zero_variance`` drops groups whose rewards are all equal (no learning
    signal).
    """

    advantage: Literal["grpo", "drgrpo"] = "grpo"
    clip_low: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2
    clip_high: NonNegativeFloat = 0.28
    clip_ratio_c: Annotated[float, msgspec.Meta(ge=0, description="0 (off) or > 1")] = 3.0
    kl_coef: NonNegativeFloat = 0.0
    filter_zero_variance: bool = False

    def __post_init__(self) -> None:
        if 0.0 < self.clip_ratio_c <= 1.0:
            fix = "use a value > 1, or 0 for no dual clip"
            raise _invalid("clip_ratio_c", self.clip_ratio_c, fix)


class AdapterSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a tenant asks for when registering an adapter (the registration payload).

    The adapter's name travels in the event envelope (``adapter``), not here. ``base_model``, when
    set, must equal the trainer's base model name or admission rejects the registration.
    ``rank >= 1`` (admission also caps it at the trainer's max rank); ``alpha > 0``.
    ``prompts_per_step`` prompts with ``group_size`` samples each (at least 2: advantages compare
    samples of one prompt) make one optimizer step; ``steps >= 1`` is the step budget;
    ``max_staleness >= 0`` bounds how many versions old the policy that generated a sample may be
    when it is trained on (flow control on task issue). ``checkpoint_interval`` (steps) and
    ``keep_checkpoints`` drive the checkpoint process. ``resume=True`` continues the adapter's
    latest checkpoint under the same name. At least one reward term;
    ``optim.warmup_steps <= steps`` (a longer warmup never reaches ``optim.lr``).

    ``init_from``: a checkpoint directory (one the checkpoint process wrote, e.g. a client's
    saved state; it must lie under the trainer's checkpoint root) whose weights the slot starts
    from, and with ``init_optimizer`` its Adam moments and step count too (a client's
    ``create_training_client_from_state[_with_optimizer]``); client-driven adapters only, not
    with ``resume``.

    ``driver="client"``: a client-driven adapter (a Tinker-SDK client behind the gateway runs
    its own loop): no dataset, no rewards; ``steps`` bounds its optimizer steps, and its
    ``optim`` holds only defaults (each ``optim_step`` request carries its own Adam settings).

    ``producer``: who asks (a team, a pipeline, a gateway tenant); ``""`` is anonymous, and all
    anonymous registrations share one producer. The wait queue is fair across producers and
    each producer may keep only so many registrations waiting (:mod:`orchestrator.fleet`,
    :mod:`orchestrator.admission`). The field is trusted as far as the producer is: with Redis
    ACLs each producer gets its own ingress credentials, and the operator can check that a
    producer writes only its own name (see docs/SECURITY-paths.md); nothing here proves it.
    """

    @property
    def dataset_spec(self) -> DatasetSpec:
        """The dataset of a dataset-driven adapter (raises for a client-driven one)."""
        if self.dataset is None:
            raise ValueError(f"a {self.driver}-driven adapter has no dataset")
        return self.dataset

    driver: Annotated[
        Literal["dataset", "client"],
        msgspec.Meta(description="dataset: we run the RL loop; client: a Tinker client does"),
    ] = "dataset"
    base_model: str = ""
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dataset: Annotated[
        DatasetSpec | None, msgspec.Meta(description="required when driver is dataset")
    ] = None
    rewards: Annotated[
        tuple[RewardSpec, ...], msgspec.Meta(description="at least one when driver is dataset")
    ] = ()
    sampling: SamplingSpec = SamplingSpec()
    optim: OptimSpec = OptimSpec()
    loss: LossSpec = LossSpec()
    group_size: Annotated[int, msgspec.Meta(ge=2, le=MAX_GROUP_SIZE)] = 8
    prompts_per_step: Annotated[int, msgspec.Meta(ge=1, le=MAX_PROMPTS_PER_STEP)] = 4
    steps: PositiveInt = 100
    max_staleness: NonNegativeInt = 1
    checkpoint_interval: PositiveInt = 10
    keep_checkpoints: PositiveInt = 3
    priority: int = 0
    producer: Annotated[
        ProducerName, msgspec.Meta(description="who registers it ('' = anonymous): fair queueing")
    ] = ""
    resume: bool = False
    init_from: Annotated[
        str,
        msgspec.Meta(description="start from this checkpoint directory (under the trainer's root)"),
    ] = ""
    init_optimizer: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.driver == "dataset" and self.dataset is None:
            fix = "a dataset-driven adapter needs a dataset (or set driver to 'client')"
            raise _invalid("dataset", self.dataset, fix)
        if self.driver == "dataset" and not self.rewards:
            fix = "a dataset-driven adapter needs at least one reward term"
            raise _invalid("rewards", self.rewards, fix)
        if self.driver == "client" and (self.dataset is not None or self.rewards):
            fix = "a client-driven adapter takes no dataset or rewards (its client scores samples)"
            raise _invalid("driver", self.driver, fix)
        if self.init_from and self.driver != "client":
            fix = "init_from is for client-driven adapters; a dataset-driven one uses resume"
            raise _invalid("init_from", self.init_from, fix)
        if self.init_from and self.resume:
            fix = "resume continues the adapter's own latest checkpoint; use one or the other"
            raise _invalid("init_from", self.init_from, fix)
        if self.init_optimizer and not self.init_from:
            raise _invalid("init_optimizer", True, "init_optimizer needs init_from")
        if self.optim.warmup_steps > self.steps:
            fix = f"use at most steps = {self.steps}, or the learning rate never reaches optim.lr"
            raise _invalid("optim.warmup_steps", self.optim.warmup_steps, fix)
