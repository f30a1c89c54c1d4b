"""Prompt data sources: an adapter's dataset as a stateless map from index to :class:`PromptItem`.

A rollout task names prompt *indices* (issued by the trainer's data cursor); the worker opens the
adapter's dataset once with :func:`open_source` and looks each index up. Sources therefore hold no
cursor and no randomness: ``src[i]`` is the same item for every worker, every time.

Three kinds, chosen by :class:`events.specs.DatasetSpec.kind`:

* ``jsonl``: one JSON object per line (blank lines skipped), loaded fully at open.
* ``parquet``: the input/label/metadata columns of a Parquet file, loaded fully at open.
* ``reasoning_gym``: ``reasoning_gym.create_dataset(name, size=, seed=, **config)``, generated
  offline and on demand (entries are deterministic functions of seed and index).

Prompt text is built in two steps: ``prompt_template`` with ``{input}`` replaced by the raw input
(plain substitution, so braces elsewhere in the template, e.g. LaTeX, need no escaping), then, with
``chat_template=True``, one user turn through the model tokenizer's chat template with the
generation prompt appended.

Security: file paths come from tenants, so a path must resolve (symlinks followed, ``..``
collapsed) to a regular file under one of the operator's ``allowed_roots``, by the one
containment rule of :mod:`orchestrator.storage` (:func:`resolve_under_roots`). Every user-caused
problem raises :class:`DataError` naming the file, the key or the value and the fix.
"""

from __future__ import annotations

import difflib
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from events.errors import ConfigError
from events.specs import DatasetSpec
from orchestrator.storage import PathEscape, check_under

INPUT_PLACEHOLDER = "{input}"


class DataError(ConfigError):
    """A dataset spec cannot be opened: bad path, missing key, empty file, unknown dataset name."""


class PromptItem(msgspec.Struct, frozen=True, kw_only=True):
    """One prompt of a dataset, ready to generate from and to score.

    ``prompt`` is the final text handed to the engine (template and chat template applied).
    ``label`` is the reference answer as a string ("" when the dataset has none). ``metadata`` is
    a JSON-able object for the reward function; for reasoning-gym items it holds
    ``{"reasoning_gym": {name, size, seed, config, index}, "entry": <the entry, JSON-able>}``.
    """

    index: int
    prompt: str
    label: str
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class DataSource(Protocol):
    """A stateless, deterministic map ``index -> PromptItem`` over ``range(len(src))``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PromptItem: ...


class PromptFormatter:
    """Turns a raw dataset input into the prompt text: template, then optional chat template."""

    def __init__(self, template: str, tokenizer: Any = None) -> None:
        """``tokenizer``: a Hugging Face tokenizer with a chat template, or None for plain text."""
        if INPUT_PLACEHOLDER not in template:
            raise DataError(
                f"prompt_template {template!r} has no {INPUT_PLACEHOLDER} placeholder; "
                f"add {INPUT_PLACEHOLDER} where the dataset input goes"
            )
        self._template = template
        self._tokenizer = tokenizer

    def __call__(self, raw_input: str) -> str:
        text = self._template.replace(INPUT_PLACEHOLDER, raw_input)
        if self._tokenizer is None:
            return text
        messages = [{"role": "user", "content": text}]
        try:
            out = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except ValueError as err:  # transformers raises ValueError when no template is set
            raise DataError(
                f"chat_template=True but the tokenizer cannot apply a chat template ({err}); "
                "use a model whose tokenizer defines one, or set chat_template=False"
            ) from err
        return str(out)


class RecordSource:
    """Rows already in memory (from JSONL or Parquet): raw inputs, labels and metadata."""

    def __init__(
        self,
        inputs: Sequence[str],
        labels: Sequence[str],
        metadata: Sequence[dict[str, Any]],
        formatter: PromptFormatter,
    ) -> None:
        """All three sequences have one entry per row (``len`` equal, checked)."""
        if not len(inputs) == len(labels) == len(metadata):
            raise ValueError(
                f"row columns differ in length: {len(inputs)}, {len(labels)}, {len(metadata)}"
            )
        self._inputs = list(inputs)
        self._labels = list(labels)
        self._metadata = list(metadata)
        self._format = formatter

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index: int) -> PromptItem:
        i = _check_index(index, len(self))
        return PromptItem(
            index=i,
            prompt=self._format(self._inputs[i]),
            label=self._labels[i],
            metadata=dict(self._metadata[i]),
        )


class ReasoningGymSource:
    """A reasoning-gym procedural dataset; entries are generated on demand from (seed, index)."""

    def __init__(
        self,
        name: str,
        *,
        size: int,
        seed: int,
        config: Mapping[str, Any],
        formatter: PromptFormatter,
    ) -> None:
        self._dataset = create_reasoning_gym(name, size=size, seed=seed, config=config)
        self._spec = {"name": name, "size": size, "seed": seed, "config": dict(config)}
        self._size = size
        self._format = formatter

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> PromptItem:
        i = _check_index(index, self._size)
        entry = self._dataset[i]
        answer = entry.get("answer")
        return PromptItem(
            index=i,
            prompt=self._format(str(entry["question"])),
            label="" if answer is None else str(answer),
            metadata={"reasoning_gym": {**self._spec, "index": i}, "entry": to_jsonable(entry)},
        )


def create_reasoning_gym(name: str, *, size: int, seed: int, config: Mapping[str, Any]) -> Any:
    """``reasoning_gym.create_dataset`` with project errors: unknown names list close matches.

    Shared by the data source and the ``reasoning_gym`` reward (which rebuilds the dataset to get
    the dataset's own verifier with the same config).
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        known = sorted(DATASETS)
        # the close matches; when none passes difflib's cutoff, still the nearest few, by ratio
        close = difflib.get_close_matches(name, known, n=5) or difflib.get_close_matches(
            name, known, n=5, cutoff=0.0
        )
        raise DataError(
            f"unknown reasoning-gym dataset {name!r}; did you mean one of {close}? "
            f"({len(known)} datasets exist, e.g. chain_sum, basic_arithmetic, leg_counting)"
        )
    if size <= 0:
        raise DataError(f"reasoning-gym dataset {name!r}: size must be positive, got {size}")
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **dict(config))
    except (TypeError, ValueError, AssertionError) as err:  # config dataclass init / validate()
        raise DataError(
            f"reasoning-gym dataset {name!r} rejects config {dict(config)}: {err}"
        ) from err


def to_jsonable(value: Any) -> Any:
    """A JSON-able copy of ``value`` (tuples and sets become lists, unknown objects their repr)."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=repr))


class PathDataError(DataError, PathEscape):
    """A dataset path resolves outside the operator's allowed data roots (or is a URL, or
    starts with ``~``): admission reports it on ``spec.dataset.path``. (A failed task's reason
    starts with the class name, so it keeps ``DataError`` in it.)"""

    def __init__(self, message: str, *, value: str, roots: Sequence[str]) -> None:
        PathEscape.__init__(self, message, value=value, roots=roots)


def resolve_under_roots(path: str, allowed_roots: Sequence[Path]) -> Path:
    """The real path of an existing regular file under one of ``allowed_roots``.

    A relative ``path`` is tried against each root in order; an absolute one must lie under a
    root. Symlinks (of the file and of any parent directory) are followed and ``..`` collapsed
    *before* the containment check, which compares whole path components
    (:func:`orchestrator.storage.is_under`: ``/data-evil/x`` is not under ``/data``). URLs
    (``file://`` included) and ``~`` paths are refused: a dataset is a local file, and ``~`` is
    never expanded. Raises :class:`PathDataError` for an escape, :class:`DataError` otherwise.
    """
    if not path:
        raise DataError("dataset path is empty; set DatasetSpec.path to a file under a data root")
    if not allowed_roots:
        raise DataError(f"no data roots are configured, so {path!r} cannot be opened")
    roots = [os.path.realpath(r) for r in allowed_roots]
    fix = "give a path relative to a data root, or an absolute path inside one"
    if "://" in path or path.startswith("~"):
        kind = "a URL" if "://" in path else "a '~' path (never expanded)"
        raise PathDataError(
            f"dataset path {path!r} is {kind}; {fix} (allowed roots {roots})",
            value=path,
            roots=roots,
        )
    given = Path(path)
    candidates = [given] if given.is_absolute() else [Path(root) / given for root in roots]
    inside: list[Path] = []
    for candidate in candidates:
        try:
            inside.append(Path(check_under(str(candidate), roots, what="dataset path", fix=fix)))
        except PathEscape:
            continue
    if not inside:
        resolved = os.path.realpath(candidates[0])
        raise PathDataError(
            f"dataset path {path!r} resolves to {resolved!r}, outside the allowed data roots "
            f"{roots}; move the file under a root ('..', symlinks and symlinked parent "
            "directories are followed before this check)",
            value=path,
            roots=roots,
        )
    for real in inside:
        if real.is_file():
            return real
    raise DataError(
        f"dataset file {path!r} not found (looked at {[str(p) for p in inside]}); "
        "check DatasetSpec.path"
    )


def open_source(
    spec: DatasetSpec, *, allowed_roots: Sequence[Path], tokenizer: Any = None
) -> DataSource:
    """Open the dataset ``spec`` describes; raises :class:`DataError` for any user error.

    ``tokenizer`` is required when ``spec.chat_template`` is set; the first item is formatted
    here so a broken template fails at open, not mid-run.
    """
    if spec.chat_template and tokenizer is None:
        raise DataError("chat_template=True needs the model tokenizer; none was given")
    formatter = PromptFormatter(spec.prompt_template, tokenizer if spec.chat_template else None)
    source: DataSource
    if spec.kind == "reasoning_gym":  # a decoded spec has a name (DatasetSpec.__post_init__)
        source = ReasoningGymSource(
            spec.name, size=spec.size, seed=spec.seed, config=spec.config, formatter=formatter
        )
    else:
        real = resolve_under_roots(spec.path, allowed_roots)
        loader = _load_jsonl if spec.kind == "jsonl" else _load_parquet
        rows = loader(real, spec)
        if not rows:
            raise DataError(f"dataset file {real} has no rows; it must hold at least one prompt")
        inputs, labels, metadata = _columns(rows, real, spec)
        source = RecordSource(inputs, labels, metadata, formatter)
    source[0]  # fail at open on template / chat-template / first-row problems
    return source


def _load_jsonl(path: Path, spec: DatasetSpec) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{line_no} is a JSON {type(row).__name__}, expected an object "
                    f"with keys {spec.input_key!r} and {spec.label_key!r}"
                )
            rows.append(row)
    return rows


def _load_parquet(path: Path, spec: DatasetSpec) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid derives from ValueError
        raise DataError(f"{path} is not a readable Parquet file: {err}") from err
    wanted = [k for k in (spec.input_key, spec.label_key, spec.metadata_key) if k]
    for key in wanted:
        if key not in schema.names:
            raise DataError(f"key {key!r} is not a column of {path}; columns are {schema.names}")
    return pq.read_table(path, columns=list(dict.fromkeys(wanted))).to_pylist()


def _columns(
    rows: list[dict[str, Any]], path: Path, spec: DatasetSpec
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Validate every row and split it into input, label and metadata columns."""
    inputs: list[str] = []
    labels: list[str] = []
    metadata: list[dict[str, Any]] = []
    for row_no, row in enumerate(rows):
        for key in (spec.input_key, spec.label_key):
            if key not in row:
                raise DataError(
                    f"key {key!r} missing in row {row_no} of {path}; that row has keys "
                    f"{sorted(row)} (set DatasetSpec.input_key / label_key)"
                )
        raw, label = row[spec.input_key], row[spec.label_key]
        if not isinstance(raw, str):
            raise DataError(
                f"row {row_no} of {path}: {spec.input_key!r} must be a string, "
                f"got {type(raw).__name__}"
            )
        if label is None or isinstance(label, dict | list):
            raise DataError(
                f"row {row_no} of {path}: {spec.label_key!r} must be a string or number, "
                f"got {type(label).__name__}"
            )
        inputs.append(raw)
        labels.append(label if isinstance(label, str) else json.dumps(label))
        metadata.append(_row_metadata(row, row_no, path, spec.metadata_key))
    return inputs, labels, metadata


def _row_metadata(row: dict[str, Any], row_no: int, path: Path, key: str) -> dict[str, Any]:
    if not key:
        return {}
    if key not in row:
        raise DataError(
            f"metadata key {key!r} missing in row {row_no} of {path}; that row has keys "
            f"{sorted(row)} (set DatasetSpec.metadata_key, or '' for none)"
        )
    value = row[key]
    if isinstance(value, str):  # a JSON object stored as text (common in Parquet exports)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(
                f"row {row_no} of {path}: {key!r} is a string but not JSON ({err.msg})"
            ) from err
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(
            f"row {row_no} of {path}: {key!r} must be a JSON object, got {type(value).__name__}"
        )
    return dict(to_jsonable(value))


def _check_index(index: int, n: int) -> int:
    """``index`` as an int in ``[0, n)``; negative indices do not wrap (a task names real rows)."""
    if isinstance(index, bool):
        raise IndexError(f"prompt index {index!r} is a bool, expected an int in [0, {n})")
    i = operator.index(index)
    if not 0 <= i < n:
        raise IndexError(f"prompt index {index!r} out of range for a dataset of {n} items")
    return i
