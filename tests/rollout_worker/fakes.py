"""Hand-written fakes for the rollout worker's state-machine tests: no model, CPU, milliseconds.

:class:`FakeBackend` implements :class:`rollout.backend.GenerationBackend` without torch. A
completion is a pure function of the served weights (the sha256 of the version's
``adapter_model.safetensors``), the prompt ids, the row's seed and ``max_new_tokens``, so it has
the properties the worker relies on and its tests check:

- the same row gives the same tokens on any worker that serves the same weights;
- different seeds give different samples; a version published again with other content gives
  other samples;
- a row naming a version that is not served fails like an evicted version on the embedded
  engine (:class:`BackendUnavailableError`); a directory without the PEFT files fails to load
  (:class:`AdapterLoadError`); a token id outside :class:`ByteTokenizer`'s vocabulary is refused
  (:class:`RowRefusedError`).

Prompt log-probs are a pure function of the served weights and the prefix, ``None`` first.

It records what the worker asked of it (``batches``: rows per ``generate`` call; ``calls``: loads
and unloads; ``scored``: prompts scored) and keeps the newest ``keep_versions`` versions of each
adapter, as both real backends do. :class:`ByteTokenizer` is the Hugging Face tokenizer subset
the worker uses, over UTF-8 bytes. :func:`write_fake_version` writes a version directory with
random weight bytes (the worker only reads the files and their sha256; the fake reads nothing
else).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rollout.adapter_slots import AdapterRef
from rollout.backend import (
    AdapterLoadError,
    BackendUnavailableError,
    Completion,
    GenerationBackend,
    GenerationRow,
    RowRefusedError,
)

BOS, EOS = 256, 257
"""Special token ids of :class:`ByteTokenizer` (bytes are 0..255)."""
VOCAB = 258


class ByteTokenizer:
    """UTF-8 bytes as token ids, ``BOS`` prepended when ``add_special_tokens``."""

    bos_token_id = BOS
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        special = {BOS: "<s>", EOS: "</s>"}
        parts = [
            bytes([t]).decode(errors="replace") if t < 256 else special[t]
            for t in ids
            if t < 256 or not skip_special_tokens
        ]
        return "".join(parts)


class FakeBackend:
    """A deterministic :class:`GenerationBackend` with no model (see the module doc).

    ``available=False`` makes every call raise :class:`BackendUnavailableError` (an engine
    that cannot be reached).
    """

    def __init__(self, *, keep_versions: int = 2) -> None:
        self.tokenizer: Any = ByteTokenizer()
        self.keep_versions = keep_versions
        self.available = True
        self.served: dict[str, dict[int, str]] = {}  # name -> version -> sha256 of the weights
        self.batches: list[int] = []
        self.calls: list[tuple[str, str, int | None]] = []
        self.scored: list[tuple[int, ...]] = []  # prompts of prompt_logprobs calls
        self.read_ahead: list[tuple[str, int]] = []  # loads handed what read() returned

    def read(self, path: str) -> Any:
        return ("read", path)

    def load(self, name: str, version: int, path: str, *, read: Any = None) -> None:
        self._reachable()
        have = self.served.setdefault(name, {})
        if version in have:
            return
        if read is not None:
            assert read == ("read", path), f"{read} was not read from {path}"
            self.read_ahead.append((name, version))
        weights = Path(path) / "adapter_model.safetensors"
        if not (Path(path) / "adapter_config.json").is_file() or not weights.is_file():
            raise AdapterLoadError(f"cannot load {name}@{version} from {path}: not a PEFT dir")
        have[version] = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.calls.append(("load", name, version))
        for old in sorted(have)[: -self.keep_versions]:
            del have[old]

    def unload(self, name: str, version: int | None = None) -> None:
        self._reachable()
        have = self.served.get(name, {})
        for v in sorted(have) if version is None else [v for v in (version,) if v in have]:
            del have[v]
            self.calls.append(("unload", name, v))

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self.served.get(name, {})))

    def generate(self, rows: Sequence[GenerationRow]) -> list[Completion]:
        self._reachable()
        self.batches.append(len(rows))
        return [self._complete(row) for row in rows]

    def prompt_logprobs(
        self, prompt_ids: tuple[int, ...], adapter: AdapterRef | None
    ) -> tuple[float | None, ...]:
        self._reachable()
        weights = self._weights(adapter, prompt_ids)
        self.scored.append(prompt_ids)
        return (
            None,
            *(
                -0.01 - 3 * random.Random(f"{weights}:{prompt_ids[: t + 1]}").random()
                for t in range(1, len(prompt_ids))
            ),
        )

    def _weights(self, adapter: AdapterRef | None, prompt_ids: tuple[int, ...]) -> str:
        if max(prompt_ids) >= VOCAB:
            raise RowRefusedError(f"input_ids: token ids must be in [0, {VOCAB})")
        if adapter is None:
            return "base"
        weights = self.served.get(adapter.name, {}).get(adapter.version, "")
        if not weights:
            raise BackendUnavailableError(f"adapter {adapter} is not loaded")
        return weights

    def _complete(self, row: GenerationRow) -> Completion:
        weights = self._weights(row.adapter, row.prompt_ids)
        sp = row.sampling
        rng = random.Random(f"{weights}:{row.prompt_ids}:{sp.seed}")
        length = rng.randint(1, sp.max_new_tokens)
        ids = [rng.randint(32, 126) for _ in range(length)]  # printable ASCII
        finish = "length"
        if length < sp.max_new_tokens:
            ids[-1], finish = EOS, "stop"  # the token that ended the row is part of it
        logprobs = tuple(-0.01 - 3 * rng.random() for _ in ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(
            completion_ids=tuple(ids), logprobs=logprobs, text=text, finish_reason=finish
        )

    def _reachable(self) -> None:
        if not self.available:
            raise BackendUnavailableError("fake engine is down")


def as_backend(fake: FakeBackend) -> GenerationBackend:
    """``fake`` typed as the protocol (a type checker verifies the fake implements it)."""
    return fake


def write_fake_version(out_dir: Path, *, seed: int) -> Path:
    """A version directory: a PEFT ``adapter_config.json`` and 64 random weight bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    (out_dir / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(64))
    return out_dir
