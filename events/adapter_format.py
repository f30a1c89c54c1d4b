"""The on-disk format of one adapter version: one writer and one reader per file.

A published version (and every checkpoint, a copy of one) is a directory of four files::

    adapter_config.json          PEFT's LoraConfig as JSON: peft_type, r, lora_alpha, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight   [r, in]
                                 base_model.model.<module>.lora_B.weight   [out, r]
    training_state.safetensors   the slot's Adam moments exp_avg_r_Q, exp_avg_sq_r_Q   [r, Q]
    training_state.json          TrainingState: ids, step, version, epoch, cursor, spec, slot

The first two are exactly what ``peft.PeftModel.save_pretrained`` writes for a LoRA on a causal
LM, at the adapter's true rank ``r``, so PEFT, vLLM and SGLang load a version unchanged. The
trainer writes them with :func:`encode_peft_adapter`, imports foreign ones and restores its own
with :func:`read_peft_adapter` / :func:`parse_peft_weights`; rollout workers load them with
:func:`read_peft_adapter`; the checkpointer reads :class:`TrainingState` (its step, version,
epoch, cursor and the spec's checkpoint policy). Producers and consumers live in different
processes, so this is a contract like the events and lives in ``events/``.

What a PEFT config may hold (one list for every reader, PEFT 0.21's LoRA keys):

- read: ``peft_type`` (must be ``"LORA"``), ``r``, ``lora_alpha``, ``use_rslora``, ``bias``
  (must be ``"none"``), ``init_lora_weights`` (a plain init: true/false, gaussian, eva,
  orthogonal; the others change the base weights or the forward, see :data:`PLAIN_INITS`);
- ignored, :data:`IGNORED_CONFIG`: metadata, the module selection (the tensors say which modules
  an adapter has) and settings that act only in training or at initialisation (``lora_dropout``);
- refused when set (true, non-empty), :data:`UNSUPPORTED_CONFIG`: DoRA, biases, per-module
  rank/alpha patterns, ``modules_to_save`` ... anything the slot math ``y = W x + s · B A x``
  cannot express. A key in none of the lists is refused when set too (a newer PEFT feature is
  assumed to change the math until someone adds it to a list).

Scale: PEFT's semantics, :func:`lora_scale`: ``s = alpha / r``, or ``alpha / sqrt(r)`` when
``use_rslora`` is true. :attr:`PeftAdapter.scale` is the one value every consumer uses: rollout
slot layers take it as is; the trainer's slots compute ``alpha / r``, so an import configures
``alpha = s · r`` (rsLoRA folded into alpha) and a later export writes that alpha with
``use_rslora: false``, the same adapter.

Only safetensors load. A pickle (``torch.save``'s ``.bin``/``.pt``/``.pth``/``.ckpt``) can
run arbitrary code when unpickled, so no reader here ever opens one: a directory that holds one
and no ``adapter_model.safetensors`` is refused by :func:`refuse_pickles` with
:class:`PickleRefused` saying how to convert it (``torch.load`` appears nowhere on a load path).
Every safetensors file is checked by :func:`events.safetensors_io.check_header` before its
tensors are read: a malformed header or a dtype outside
:data:`~events.safetensors_io.FLOAT_DTYPES` is an :class:`AdapterFormatError`.

torch and safetensors are imported inside the functions that need them, so the checkpoint
process, which reads only :class:`TrainingState`, stays free of torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from events.errors import MultiLoraError
from events.specs import AdapterSpec

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
PEFT_PREFIX = "base_model.model."
"""Prefix of every tensor name in ``adapter_model.safetensors`` (PEFT's wrapper of the LM)."""

UNSUPPORTED_CONFIG: dict[str, str] = {
    "use_dora": "DoRA (a magnitude vector per layer)",
    "use_qalora": "QALoRA (pooled inputs)",
    "lora_bias": "a trained bias on lora_B",
    "modules_to_save": "fully trained copies of extra modules",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "alora_invocation_tokens": "activated LoRA (the adapter acts only after invocation tokens)",
    "use_bdlora": "block-diagonal LoRA factors",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular values between A and B over a truncated base)",
    "monteclora_config": "MonteCLoRA (sampled adapters)",
    "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers such as GPT-2's",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
}
"""PEFT config keys refused when set (true, non-empty): the feature each one turns on."""

IGNORED_CONFIG: frozenset[str] = frozenset(
    {
        # metadata
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        # module selection: the tensors say which modules the adapter has
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        # training or initialisation only (the init itself is checked, see PLAIN_INITS)
        "lora_dropout",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "velora_config",
        "qalora_group_size",
        "runtime_config",
        "megatron_config",
        "megatron_core",
        "ensure_weight_tying",
    }
)
"""PEFT config keys whose value does not change what a loaded adapter computes."""

PLAIN_INITS: tuple[str, ...] = ("gaussian", "eva", "orthogonal")
"""``init_lora_weights`` strings (besides true/false) that leave the base weights alone.

PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA subtract the initial ``B A`` from (or quantize) the base
weights when the adapter is created, so their tensors fit only that changed model; MiCA has its
own forward. PEFT converts such an adapter to a plain LoRA on save
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``), which writes
``init_lora_weights: true``.
"""

_READ_CONFIG = frozenset(
    {"peft_type", "r", "lora_alpha", "use_rslora", "bias", "init_lora_weights"}
)


PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""File endings of pickle-based tensor files (``torch.save``), which are never loaded."""

CONVERT_HINT = (
    'convert it in a trusted environment with `python -c "import torch; '
    "from safetensors.torch import save_file; save_file(torch.load('adapter_model.bin', "
    "weights_only=True), 'adapter_model.safetensors')\"` (or save the PEFT model again with "
    "save_pretrained(..., safe_serialization=True)), then keep only the safetensors file"
)
"""How to turn a pickled adapter into the format multilora loads."""


class AdapterFormatError(MultiLoraError, ValueError):
    """A PEFT directory or training state is malformed or uses a feature slot layers lack."""


class PickleRefused(AdapterFormatError):
    """A directory holds a pickled tensor file and no safetensors file: it is never unpickled."""


def is_pickle_name(name: str) -> bool:
    """Whether the file ``name`` is a pickle-based tensor file (:data:`PICKLE_SUFFIXES`)."""
    return name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickles(names: Iterable[str], *, where: str) -> None:
    """Raise :class:`PickleRefused` when the directory listing ``names`` (of ``where``) holds a
    pickle-based file and no ``adapter_model.safetensors``; a pickle beside the safetensors
    file is left alone (nothing here opens it)."""
    listed = list(names)
    pickles = sorted(n for n in listed if is_pickle_name(n))
    if pickles and ADAPTER_WEIGHTS not in listed:
        raise PickleRefused(
            f"{where} holds {pickles[0]} (pickle); multilora loads only safetensors "
            f"({ADAPTER_WEIGHTS}) and never unpickles a file: {CONVERT_HINT}"
        )


def _check_tensors(data: bytes | bytearray | memoryview, where: str) -> None:
    """:func:`events.safetensors_io.check_header` of in-memory file bytes, as this module's
    error."""
    from events.safetensors_io import SafetensorsHeaderError, check_header

    try:
        check_header(data, len(data), where=where)
    except SafetensorsHeaderError as err:
        raise AdapterFormatError(str(err)) from None


# --- the PEFT adapter ------------------------------------------------------------------------


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023), else ``alpha/r``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class PeftAdapter(msgspec.Struct, frozen=True, kw_only=True):
    """A validated PEFT LoRA adapter: rank, alpha and ``module -> (A_r_I, B_O_r)``.

    ``path`` says where it was read from (for messages). Tensors are on the CPU in the file's
    dtype; every module has both ``A`` (``[r, in]``) and ``B`` (``[out, r]``) at rank ``r``.
    """

    path: str
    rank: int
    alpha: float
    use_rslora: bool
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        """The factor on ``B A x`` (:func:`lora_scale`): what every consumer applies."""
        return lora_scale(self.rank, self.alpha, self.use_rslora)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted(self.weights))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and validate the PEFT LoRA directory ``path`` (tensors memory-mapped, on CPU).

    Raises :class:`AdapterFormatError` naming the file and the key or tensor when a file is
    missing or unreadable, the config sets a feature slot layers do not implement (module doc),
    or the weights are not ``lora_A``/``lora_B`` pairs of rank ``r``; :class:`PickleRefused`
    for a directory holding ``adapter_model.bin`` (or another pickle) instead of safetensors.
    """

    from events.safetensors_io import SafetensorsHeaderError, check_file

    root = Path(path)
    if root.is_dir():
        refuse_pickles((p.name for p in root.iterdir()), where=str(root))
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (root / name).is_file():
            raise AdapterFormatError(
                f"{root / name} not found; a PEFT adapter directory needs {ADAPTER_CONFIG} "
                f"and {ADAPTER_WEIGHTS} (PeftModel.save_pretrained writes both)"
            )
    rank, alpha, use_rslora = _check_config((root / ADAPTER_CONFIG).read_bytes(), str(root))
    try:
        check_file(root / ADAPTER_WEIGHTS)
    except SafetensorsHeaderError as err:
        raise AdapterFormatError(str(err)) from None
    # read as bytes and parsed in memory: safetensors' load_file (0.8) leaks two small objects
    # per tensor on every call, which a worker loading versions for weeks would feel
    weights = parse_peft_weights((root / ADAPTER_WEIGHTS).read_bytes(), rank, where=str(root))
    return PeftAdapter(
        path=str(root), rank=rank, alpha=alpha, use_rslora=use_rslora, weights=weights
    )


def parse_peft_adapter(
    config: bytes | bytearray, weights: bytes | bytearray, *, where: str
) -> PeftAdapter:
    """:func:`read_peft_adapter` for the two files' bytes; ``where`` names their directory."""
    rank, alpha, use_rslora = _check_config(config, where)
    pairs = parse_peft_weights(weights, rank, where=where)
    return PeftAdapter(path=where, rank=rank, alpha=alpha, use_rslora=use_rslora, weights=pairs)


def parse_peft_weights(
    weights: bytes | bytearray, rank: int, *, where: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``module -> (A_r_I, B_O_r)`` from ``adapter_model.safetensors`` bytes of rank ``rank``.

    The tensor half of the reader, for a caller that knows the rank from elsewhere (a restore
    reads it from the training state); raises :class:`AdapterFormatError` like the reader.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    _check_tensors(weights, f"{where}/{ADAPTER_WEIGHTS}")
    try:
        tensors = load(bytes(weights))  # no copy of a bytes object
    except SafetensorError as err:
        raise _unreadable(where, err) from err
    return _lora_pairs(tensors, rank, where)


def encode_peft_adapter(
    layers: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    base_model_name_or_path: str,
    dtype: torch.dtype | None = None,
) -> dict[str, bytes | bytearray]:
    """The two files of a PEFT LoRA adapter (name → bytes), as ``save_pretrained`` writes them.

    ``layers`` yields ``(module, A, B)``: CPU tensors ``A`` of ``[>= rank, in]`` and ``B`` of
    ``[out, >= rank]``, any strides (views are fine: each is copied once, into the file bytes);
    only the first ``rank`` rows of ``A`` and columns of ``B`` are written, in ``dtype`` if given.
    The scale is plain ``alpha / rank`` (``use_rslora: false``).
    """
    from events.safetensors_io import to_safetensors

    if rank < 1 or not alpha > 0:
        raise AdapterFormatError(
            f"cannot write an adapter of rank {rank}, alpha {alpha}; r must be >= 1, alpha > 0"
        )
    tensors: dict[str, torch.Tensor] = {}
    for module, a, b in layers:
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] < rank or b.shape[1] < rank:
            raise AdapterFormatError(
                f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not hold rank {rank}; "
                "pass A as [r, in] and B as [out, r] (or wider)"
            )
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a[:rank].to(dtype or a.dtype)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b[:, :rank].to(dtype or b.dtype)
    if not tensors:
        raise AdapterFormatError("cannot write an adapter without layers")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    return {
        ADAPTER_WEIGHTS: to_safetensors(tensors, metadata={"format": "pt"}),
        ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def _check_config(data: bytes | bytearray, where: str) -> tuple[int, float, bool]:
    """``(r, lora_alpha, use_rslora)`` of an ``adapter_config.json``, validated (module doc)."""
    at = f"{where}/{ADAPTER_CONFIG}"
    try:
        config = json.loads(data)
    except ValueError as err:
        raise AdapterFormatError(f"{at} is not JSON ({err}); re-export the adapter") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{at} holds a {type(config).__name__}, not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterFormatError(
            f"{at}: peft_type={config.get('peft_type')!r}; only 'LORA' adapters load into slot "
            "layers (PeftModel.save_pretrained writes peft_type)"
        )
    for key, value in config.items():
        if key in _READ_CONFIG or key in IGNORED_CONFIG or not value:
            continue
        if key in UNSUPPORTED_CONFIG:
            raise AdapterFormatError(
                f"{at}: {key}={value!r} ({UNSUPPORTED_CONFIG[key]}) is not supported: slot "
                f"layers compute plain LoRA; re-train or merge the adapter without {key}"
            )
        raise AdapterFormatError(
            f"{at}: unknown PEFT config key {key}={value!r}; it may change the LoRA math, so "
            f"it is refused. If it does not, add it to IGNORED_CONFIG in {__name__}"
        )
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(
            f"{at}: bias={config['bias']!r} trains the base layers' biases; only 'none' loads"
        )
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in PLAIN_INITS:
        raise AdapterFormatError(
            f"{at}: init_lora_weights={init!r} is not a plain LoRA: its tensors fit only the "
            "base weights it changed (or its own forward). Convert it with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) or re-train it"
        )
    rank, alpha, use_rslora = config.get("r"), config.get("lora_alpha"), config.get("use_rslora")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterFormatError(f"{at}: r={rank!r}; the rank must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise AdapterFormatError(f"{at}: lora_alpha={alpha!r}; it must be a number > 0")
    if not isinstance(use_rslora, bool | None):
        raise AdapterFormatError(f"{at}: use_rslora={use_rslora!r}; it must be true or false")
    return rank, float(alpha), bool(use_rslora)


def _lora_pairs(
    tensors: Mapping[str, torch.Tensor], rank: int, where: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    at = f"{where}/{ADAPTER_WEIGHTS}"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, kind = name.removeprefix(PEFT_PREFIX).removesuffix(".weight").rpartition(".")
        framed = name.startswith(PEFT_PREFIX) and name.endswith(".weight") and module != ""
        if not framed or kind not in ("lora_A", "lora_B"):
            raise AdapterFormatError(
                f"{at}: tensor {name!r} is not a PEFT LoRA weight ('{PEFT_PREFIX}<module>"
                ".lora_A.weight' / '.lora_B.weight'); embeddings, DoRA magnitudes and "
                "modules_to_save copies are not supported"
            )
        pairs.setdefault(module, {})[kind] = tensor
    if not pairs:
        raise AdapterFormatError(f"{at}: holds no LoRA tensors")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(
                f"{at}: module {module!r} has only {sorted(pair)}; every module needs both "
                "lora_A and lora_B"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterFormatError(
                f"{at}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have "
                f"rank r={rank} from {ADAPTER_CONFIG}"
            )
        weights[module] = (a, b)
    return weights


def _unreadable(where: str, err: Exception) -> AdapterFormatError:
    return AdapterFormatError(
        f"{where}/{ADAPTER_WEIGHTS} is not a readable safetensors file ({err}); re-export it"
    )


# --- the training state ----------------------------------------------------------------------


class CursorState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A data cursor's full state: dataset size, shuffle seed, current epoch, position in it.

    Invariant: ``n > 0``, ``epoch >= 0`` and ``0 <= position < n`` (a finished epoch is stored as
    the next epoch at position 0). Part of this format (training state, checkpoint manifest);
    :class:`orchestrator.cursor.DataCursor` produces and restores it.
    """

    n: int
    seed: int
    epoch: int = 0
    position: int = 0


class SlotScalars(msgspec.Struct, frozen=True, kw_only=True):
    """The slot's scalars that the spec does not hold.

    ``rank``/``alpha``: the slot's (a resumed registration keeps them even when its new spec
    asks for others); ``step``: optimizer updates applied, the schedule's position;
    ``layout_width``: ``Q``, the width of the base model's slot store (a restore into another
    base model raises).
    """

    rank: int
    alpha: float
    step: int
    layout_width: int


class TrainingState(msgspec.Struct, frozen=True, kw_only=True):
    """``training_state.json``: everything a resume needs besides the tensors.

    The optimizer settings are stored once, in ``spec.optim`` (and the schedule length in
    ``spec.steps``): the trainer's slot always runs its spec's settings. Unknown fields are
    ignored, so a reader accepts the files of a newer writer that added optional fields.
    """

    adapter: str
    registration_id: str
    step: int
    version: int
    epoch: int
    cursor: CursorState
    spec: AdapterSpec
    slot: SlotScalars


def encode_training_state(state: TrainingState) -> bytes:
    """The ``training_state.json`` bytes of ``state`` (indented JSON, one trailing newline)."""
    return msgspec.json.format(msgspec.json.encode(state), indent=1) + b"\n"


def decode_training_state(data: bytes, *, where: str = STATE_JSON) -> TrainingState:
    """Parse ``training_state.json``; ``where`` names the file in errors.

    Also reads the layout before :class:`SlotScalars` had its field: the same scalars under
    ``optimizer``, beside copies of ``spec.optim`` (ignored).
    """
    try:
        raw: Any = msgspec.json.decode(data)
    except msgspec.DecodeError as err:
        raise AdapterFormatError(
            f"{where} is not JSON ({err}); it is not a training state"
        ) from None
    if isinstance(raw, dict) and "slot" not in raw and isinstance(raw.get("optimizer"), dict):
        raw = {**raw, "slot": raw["optimizer"]}
    try:
        return msgspec.convert(raw, TrainingState)
    except msgspec.ValidationError as err:
        raise AdapterFormatError(
            f"{where} is not a training state: {err}; encode_training_state writes one"
        ) from None


def encode_state_tensors(tensors: Mapping[str, torch.Tensor]) -> bytearray:
    """The ``training_state.safetensors`` bytes of the slot's CPU tensors (no pickle)."""
    from events.safetensors_io import to_safetensors

    return to_safetensors(tensors)


def decode_state_tensors(
    data: bytes | bytearray, *, where: str = STATE_TENSORS
) -> dict[str, torch.Tensor]:
    """The tensors of ``training_state.safetensors`` (CPU); ``where`` names the file in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    _check_tensors(data, where)
    try:
        return load(bytes(data))
    except SafetensorError as err:
        raise AdapterFormatError(f"{where} is not a readable safetensors file ({err})") from None
