"""Generation backends: the one interface a rollout worker generates through, and two of them.

:class:`GenerationBackend` is what :class:`rollout.worker.RolloutWorker` needs from an engine:
load and unload adapter versions, generate a batch of rows, each with its own adapter
version, sampling parameters and seed, and score a prompt (its teacher-forced log-probs, for a
client's ``compute_logprobs``). Two implementations:

* :class:`EmbeddedBackend` — the in-process :class:`rollout.engine.Engine` (default).
* :class:`HttpBackend` — an SGLang-compatible server through :class:`rollout.client.SGLangClient`:
  ``python -m rollout.server`` or a real SGLang launched with ``--enable-lora``.

Adapter versions are named as :class:`rollout.adapter_slots.AdapterRef` names them:
``"name@version"`` (``lora_name`` on ``/load_lora_adapter``, ``lora_path`` on ``/generate``). On
a real SGLang server each version is simply a distinct adapter; :class:`HttpBackend` unloads
versions beyond the newest ``keep_versions`` itself, as the embedded engine does.

Weights reach a backend as a local PEFT directory. :class:`WeightsFetcher` turns the URI the
trainer published (a local path, ``file://``, or any fsspec URL such as ``s3://`` or
``memory://``) into one, copying remote versions into a local cache, and returns the sha256 of
``adapter_model.safetensors`` so the caller can check it against ``adapter.sync_requested``. (For
:class:`HttpBackend` the cache must be readable by the server: same host or a shared mount.)

Errors: a backend raises :class:`BackendUnavailableError` when the engine cannot be reached (a
transient condition: the worker retries the task later) and :class:`AdapterLoadError` when an
adapter directory cannot be served (bad files, too large a rank: a property of the artifact),
and :class:`RowRefusedError` when the engine refuses a row itself (a token id outside the
vocabulary, a prompt plus ``max_new_tokens`` beyond the model's context: a property of the
request); the fetcher raises :class:`WeightsError` for a URI that cannot be read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import msgspec
from safetensors import SafetensorError

from events.adapter_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterFormatError,
    read_peft_adapter,
    refuse_pickles,
)
from events.errors import MultiLoraError
from rollout.adapter_slots import AdapterNotLoadedError, AdapterRef, EngineError, RequestError
from rollout.client import GenerateOutput, SGLangClient, SGLangError, SGLangUnavailableError
from rollout.engine import Engine, GenerateRequest
from rollout.lora import LoraError
from rollout.sampling import SamplingParams


class BackendError(MultiLoraError):
    """Root of the generation backends' errors."""


class BackendUnavailableError(BackendError):
    """The engine could not be reached or failed transiently; retrying later may succeed."""


class AdapterLoadError(BackendError):
    """An adapter version could not be loaded (bad or missing files, rank or modules unfit)."""


class WeightsError(BackendError):
    """Published weights cannot be read from their URI, or their checksum does not match."""


class RowRefusedError(BackendError):
    """The engine refused a row as invalid (token ids, length); the same row always fails."""


class GenerationRow(msgspec.Struct, frozen=True, kw_only=True):
    """One completion to generate: prompt token ids, the adapter version, sampling with a seed.

    ``adapter=None`` runs the base model. ``sampling.seed`` fixes the row's draws, so the same
    row gives the same tokens on any worker with the same weights (and on the embedded engine,
    whatever other rows share its batch).
    """

    prompt_ids: tuple[int, ...]
    adapter: AdapterRef | None
    sampling: SamplingParams


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """One generated completion; ``logprobs[t]`` is the behaviour log-prob of ``completion_ids[t]``.

    ``finish_reason`` is ``"stop"`` (EOS, stop token or stop string) or ``"length"``; ``text`` is
    the decoded completion, cut before a matched stop string.
    """

    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str


class GenerationBackend(Protocol):
    """What a rollout worker generates through (see the module doc).

    ``tokenizer`` is the base model's Hugging Face tokenizer (prompts are tokenized by the
    worker). ``load`` is idempotent: loading a served version again is a no-op. ``unload``
    removes one version of ``name``, or every version when ``version`` is None (a no-op for
    versions not served). ``versions(name)`` are the
    versions of ``name`` new batches may use, ascending. ``generate`` returns one
    :class:`Completion` per row, in row order. ``prompt_logprobs`` returns
    ``log p(prompt_ids[t] | prompt_ids[:t])`` under ``adapter`` (``None``: the base model) for
    every position, at temperature 1 (``log_softmax(logits)``), ``None`` for position 0.
    """

    tokenizer: Any

    def load(self, name: str, version: int, path: str, *, read: Any = None) -> None: ...

    def read(self, path: str) -> Any:
        """What :meth:`load` would read from ``path`` (its ``read``), or None: called off the
        handler thread, so it must only read."""
        ...

    def unload(self, name: str, version: int | None = None) -> None: ...

    def versions(self, name: str) -> tuple[int, ...]: ...

    def generate(self, rows: Sequence[GenerationRow]) -> list[Completion]: ...

    def prompt_logprobs(
        self, prompt_ids: tuple[int, ...], adapter: AdapterRef | None
    ) -> tuple[float | None, ...]: ...


class EmbeddedBackend:
    """:class:`GenerationBackend` over an in-process :class:`Engine` (one mixed batch per call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer: Any = engine.tokenizer

    def load(self, name: str, version: int, path: str, *, read: Any = None) -> None:
        try:
            self.engine.load_adapter(name, version, path, adapter=read)
        except (EngineError, LoraError, SafetensorError, OSError, ValueError) as err:
            # bad config JSON / unreadable or corrupt tensors / unfit rank or modules
            raise AdapterLoadError(f"cannot load {name}@{version} from {path}: {err}") from err

    def read(self, path: str) -> Any:
        """The PEFT adapter at ``path``, parsed (tensors on the host)."""
        return read_peft_adapter(path)

    def unload(self, name: str, version: int | None = None) -> None:
        served = self.versions(name)
        if served and (version is None or version in served):
            self.engine.unload_adapter(name, version)

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(r.version for r in self.engine.loaded_adapters() if r.name == name))

    def generate(self, rows: Sequence[GenerationRow]) -> list[Completion]:
        requests = [
            GenerateRequest(input_ids=row.prompt_ids, adapter=row.adapter, sampling=row.sampling)
            for row in rows
        ]
        try:
            results = self.engine.generate(requests)
        except AdapterNotLoadedError as err:  # evicted since the worker loaded it
            raise BackendUnavailableError(str(err)) from err
        except RequestError as err:
            raise RowRefusedError(str(err)) from err
        return [
            Completion(
                completion_ids=r.completion_ids,
                logprobs=r.logprobs,
                text=r.text,
                finish_reason=r.finish_reason,
            )
            for r in results
        ]

    def prompt_logprobs(
        self, prompt_ids: tuple[int, ...], adapter: AdapterRef | None
    ) -> tuple[float | None, ...]:
        """One teacher-forced forward (:meth:`Engine.prompt_logprobs`), no decoding."""
        try:
            (scored,) = self.engine.prompt_logprobs(
                [GenerateRequest(input_ids=prompt_ids, adapter=adapter)]
            )
        except AdapterNotLoadedError as err:
            raise BackendUnavailableError(str(err)) from err
        except RequestError as err:
            raise RowRefusedError(str(err)) from err
        return scored


class HttpBackend:
    """:class:`GenerationBackend` over an SGLang-compatible HTTP server.

    ``tokenizer`` must be the server's model tokenizer (read from the same local directory).
    ``loaded`` tracks the versions this backend loaded; a server shared by several workers is
    fine as long as they use the same ``keep_versions`` (a load the server reports as already
    done counts as done). Adapter paths must be readable by the server.
    """

    def __init__(self, client: SGLangClient, tokenizer: Any, *, keep_versions: int = 2) -> None:
        if keep_versions < 1:
            raise BackendError(f"keep_versions={keep_versions} must be >= 1 (max staleness + 1)")
        self.client = client
        self.tokenizer: Any = tokenizer
        self.keep_versions = keep_versions
        self.loaded: dict[str, set[int]] = {}

    def read(self, path: str) -> Any:
        return None  # the server reads the files itself

    def load(self, name: str, version: int, path: str, *, read: Any = None) -> None:
        have = self.loaded.setdefault(name, set())
        if version in have:
            return
        ref = AdapterRef(name, version)
        try:
            self.client.load_lora_adapter(str(ref), str(Path(path)))
        except SGLangUnavailableError as err:
            raise BackendUnavailableError(str(err)) from err
        except SGLangError as err:
            if "already" not in err.message:
                raise AdapterLoadError(f"cannot load {ref} from {path}: {err}") from err
        have.add(version)
        for old in sorted(have)[: -self.keep_versions]:
            self._unload_one(AdapterRef(name, old))
            have.discard(old)

    def unload(self, name: str, version: int | None = None) -> None:
        have = self.loaded.get(name, set())
        targets = sorted(have) if version is None else [v for v in (version,) if v in have]
        for v in targets:
            self._unload_one(AdapterRef(name, v))
            have.discard(v)

    def _unload_one(self, ref: AdapterRef) -> None:
        try:
            self.client.unload_lora_adapter(str(ref))
        except SGLangUnavailableError as err:
            raise BackendUnavailableError(str(err)) from err
        except SGLangError:
            return  # not loaded there (server restarted, or evicted by another worker): done

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self.loaded.get(name, ())))

    def generate(self, rows: Sequence[GenerationRow]) -> list[Completion]:
        if not rows:
            return []
        try:
            outputs = self.client.generate_batch(
                [row.prompt_ids for row in rows],
                [row.sampling for row in rows],
                lora_path=[None if row.adapter is None else str(row.adapter) for row in rows],
                return_logprob=True,
            )
        except SGLangUnavailableError as err:
            raise BackendUnavailableError(str(err)) from err
        except SGLangError as err:
            raise _http_error(err) from err
        completions = []
        for out in outputs:
            logprobs = out.output_token_logprobs or ()
            if len(logprobs) != len(out.completion_ids):
                raise BackendError(
                    f"server returned {len(logprobs)} logprobs for {len(out.completion_ids)} "
                    "tokens; it must honour return_logprob=True"
                )
            completions.append(
                Completion(
                    completion_ids=out.completion_ids,
                    logprobs=logprobs,
                    text=out.text,
                    finish_reason=out.finish_reason,
                )
            )
        return completions

    def prompt_logprobs(
        self, prompt_ids: tuple[int, ...], adapter: AdapterRef | None
    ) -> tuple[float | None, ...]:
        """SGLang's ``input_token_logprobs`` (``return_logprob`` with ``logprob_start_len=0``).

        The scoring request samples one throw-away token at temperature 1, so the prompt's
        log-probs are the unscaled ``log_softmax(logits)`` whatever temperature scaling the
        server applies to input log-probs; the first entry (no context) is ``None`` on SGLang.
        """
        try:
            out = self.client.generate(
                input_ids=list(prompt_ids),
                sampling_params=SamplingParams(temperature=1.0, max_new_tokens=1, seed=0),
                lora_path=None if adapter is None else str(adapter),
                return_logprob=True,
                logprob_start_len=0,
            )
        except SGLangUnavailableError as err:
            raise BackendUnavailableError(str(err)) from err
        except SGLangError as err:
            raise _http_error(err) from err
        scored = out.input_token_logprobs if isinstance(out, GenerateOutput) else None
        if scored is None or len(scored) != len(prompt_ids):
            got = "none" if scored is None else len(scored)
            raise BackendError(
                f"server returned {got} input_token_logprobs for a {len(prompt_ids)}-token "
                "prompt; it must honour return_logprob=True with logprob_start_len=0"
            )
        return (None, *scored[1:])


def _http_error(err: SGLangError) -> BackendError:
    """A server's refusal as a backend error: transient, or the row's own fault."""
    if err.status >= 500 or err.param == "lora_path":  # server fault / adapter evicted
        return BackendUnavailableError(str(err))
    return RowRefusedError(str(err))


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at ``path``, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class WeightsFetcher:
    """Published adapter versions as local PEFT directories (see the module doc).

    ``cache_dir`` receives copies of non-local versions at ``{cache_dir}/{name}/v{version}``,
    written to a temporary name and renamed, so a crash never leaves half a copy in place.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def fetch(self, uri: str, name: str, version: int) -> tuple[Path, str]:
        """``(local directory, sha256 of its adapter_model.safetensors)`` of the version."""
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            local = Path(parsed.path if parsed.scheme else uri)
            weights = local / ADAPTER_WEIGHTS
            if local.is_dir() and not weights.is_file():
                try:  # a pickled adapter is refused by name, never opened
                    refuse_pickles([p.name for p in local.iterdir()], where=str(local))
                except AdapterFormatError as err:
                    raise WeightsError(str(err)) from err
            if not weights.is_file():
                raise WeightsError(f"{weights} not found; the published version is incomplete")
            try:
                return local, file_sha256(weights)
            except OSError as err:  # deleted while read (a version retired by GC)
                raise WeightsError(f"{weights} not found while read ({err}); retry") from err
        return self._copy(uri, name, version)

    def _copy(self, uri: str, name: str, version: int) -> tuple[Path, str]:
        from fsspec.core import url_to_fs

        try:
            fs, root = url_to_fs(uri)
            files = {
                f: bytes(fs.cat_file(f"{root.rstrip('/')}/{f}"))
                for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
            }
        except (OSError, ValueError, ImportError) as err:  # missing file, bad URL, no driver
            raise WeightsError(f"cannot read the version at {uri!r}: {err}") from err
        final = self.cache_dir / name / f"v{version}"
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        for file, data in files.items():
            (tmp / file).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)  # a version written again by a trainer redoing a step
        os.replace(tmp, final)
        return final, hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest()

    def forget(self, name: str) -> None:
        """Delete the cached copies of every version of ``name`` (its registration ended)."""
        shutil.rmtree(self.cache_dir / name, ignore_errors=True)
