"""A client's ``sample`` / ``compute_logprobs`` on a rollout worker: one ``rollout.sample`` task.

The Tinker gateway turns a client's sampling call into a :class:`~events.schema.SampleTask` on
``rollout.tasks``, the queue every rollout worker already consumes (one worker serves each). The
worker (:mod:`rollout.worker`) hands it to :class:`ClientSampler`, which answers the future
``task.request_id`` (:mod:`events.futures`) in the :class:`~events.effects.Effects` committed
with the task's ack, so the answer exists exactly when the task is done. A task redone after a
crash recomputes the same answer (same weights, same seeds), and ``futures.complete`` writes the
result with ``HSETNX``: the first answer is never replaced.

**Method.** ``num_samples`` rows of the token prompt ``prompt_ids`` (no tokenizer, no chat
template: the client sends ids) in ONE batch, row ``i`` seeded with
:func:`~rollout.groups.row_seed` ``(task.seed, 0, i)``, so the same request gives the same
samples on any worker with the same weights. Each :class:`~events.futures.SampledSequence` holds
the completion's tokens (the stop token that ended it included), their behaviour log-probs
(``log_softmax(logits / T)``, :mod:`rollout.sampling`) and ``stop`` / ``length``. With
``prompt_logprobs`` the result also carries ``log p(prompt_t | prompt_<t)`` for every prompt
token under the same weights, at **temperature 1** (``log_softmax(logits)``, whatever the
sampling temperature), ``None`` for the first token: one teacher-forced forward over the prompt
(:meth:`~rollout.backend.GenerationBackend.prompt_logprobs`). No reward is computed.

**Weights.** ``weights_uri == ""`` is the base model. Otherwise version ``version`` of the
registration is served through the worker's :class:`~rollout.served.ServedVersions` (fetched,
sha256-checked against the registration's ``sync_requested`` when the worker has seen it for
that version, cached like every version). Sampling is NOT fenced like RL work: a client may
sample any version it saved, as long as it can be loaded. To leave the versions RL rollouts use
undisturbed, the version is served

- under the registration's own name (:func:`~rollout.groups.served_name`) when it is served
  there already, or when the registration is live and the version is newer than every version
  served (a sync would load it there next anyway);
- otherwise (an older version, or a registration unknown to the worker or ended) under a name of
  its own, :func:`sampling_name`, one per version, so that loading it can never retire a
  version a rollout task needs. At most ``max_versions`` such names stay loaded (least recently
  used first out); a registration that ends drops them with its other versions.

**Failures** become a failed future (category ``user``) and the worker goes on: a prompt longer
than ``max_prompt_tokens`` or with negative ids, weights that cannot be read or fail their
checksum (for an ended registration the message says so: its versions may be deleted), files the
engine cannot load, a row the engine refuses (ids outside the vocabulary, prompt plus
``max_new_tokens`` beyond the model's context). An unreachable engine is retried
(:class:`~events.errors.HandlerError`); anything else is a bug and crashes the worker.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import msgspec

from events import futures
from events.effects import Effects
from events.errors import HandlerError, MultiLoraError
from events.futures import SampledSequence, SampleResult
from events.schema import SampleTask
from events.streams import Streams
from rollout.adapter_slots import AdapterRef
from rollout.backend import (
    AdapterLoadError,
    BackendUnavailableError,
    Completion,
    GenerationBackend,
    GenerationRow,
    RowRefusedError,
    WeightsError,
)
from rollout.groups import row_seed, served_name
from rollout.sampling import SamplingParamError, SamplingParams
from rollout.served import ServedVersions

log = logging.getLogger(__name__)

SAMPLE_VERSIONS = 4
"""Versions a worker keeps loaded under their own :func:`sampling_name` (see the module doc)."""


class SampleInputError(MultiLoraError, ValueError):
    """A sample request the worker cannot serve as given (the message names the fix)."""


SAMPLE_FAILURES = (
    SampleInputError,
    SamplingParamError,
    RowRefusedError,
    WeightsError,
    AdapterLoadError,
)
"""Failures of one sample request that fail its future instead of crashing the worker."""


def sampling_name(name: str, version: int) -> str:
    """The engine-side name version ``version`` of ``name`` is served under for sampling alone."""
    return f"{name}#v{version}"


def sample_rows(task: SampleTask, adapter: AdapterRef | None) -> list[GenerationRow]:
    """The ``num_samples`` rows of ``task``, row ``i`` seeded ``row_seed(task.seed, 0, i)``."""
    return [
        GenerationRow(
            prompt_ids=task.prompt_ids,
            adapter=adapter,
            sampling=SamplingParams.from_spec(task.sampling, seed=row_seed(task.seed, 0, i)),
        )
        for i in range(task.num_samples)
    ]


def sample_result(
    completions_G: list[Completion], prompt_logprobs: tuple[float | None, ...] | None
) -> SampleResult:
    """The future's result: one sequence per completion, in row order."""
    return SampleResult(
        sequences=tuple(
            SampledSequence(
                tokens=c.completion_ids,
                logprobs=c.logprobs,
                stop_reason="length" if c.finish_reason == "length" else "stop",
            )
            for c in completions_G
        ),
        prompt_logprobs=prompt_logprobs,
    )


class ClientSampler:
    """Serves sample tasks on one worker's backend and answers their futures (module doc).

    ``served`` is the worker's own :class:`ServedVersions` (one cache for every use of a
    version); ``max_prompt_tokens`` bounds a prompt as it bounds a dataset's prompts.
    """

    def __init__(
        self,
        *,
        streams: Streams,
        backend: GenerationBackend,
        served: ServedVersions,
        max_prompt_tokens: int,
        max_versions: int = SAMPLE_VERSIONS,
    ) -> None:
        self.streams = streams
        self.backend = backend
        self.served = served
        self.max_prompt_tokens = max_prompt_tokens
        self.max_versions = max_versions
        self._own: OrderedDict[str, str] = OrderedDict()  # sampling name -> served name, LRU

    def on_sample(self, task: SampleTask, *, live: bool, ended: str, sha256: str) -> Effects:
        """Serve ``task``; the effects answer its future (to commit with the task's ack).

        ``live``: the worker knows the registration and it may still need weights; ``ended``:
        why it has ended (``""`` if it has not); ``sha256``: the checksum its sync announced for
        ``task.version`` (``""``: unknown, not checked).
        """
        effects = Effects()
        try:
            result = self._sample(task, live=live, sha256=sha256)
        except SAMPLE_FAILURES as err:
            message = f"{type(err).__name__}: {err}"
            if ended and isinstance(err, WeightsError):
                message = f"{ended} and its weights cannot be loaded: {message}"
            log.warning(
                "sample request %s of %r failed: %s", task.request_id, task.adapter, message
            )
            futures.fail(effects, self.streams, task.request_id, message, category="user")
            return effects
        except BackendUnavailableError as err:
            raise HandlerError(f"sample task {task.id}: engine unavailable: {err}") from err
        futures.complete(effects, self.streams, task.request_id, result)
        return effects

    def drop(self, name: str) -> None:
        """Registration ``name`` (its served name) ended: unload its sampling-only versions."""
        for own in [own for own, of in self._own.items() if of == name]:
            del self._own[own]
            self.served.drop(own)

    def _sample(self, task: SampleTask, *, live: bool, sha256: str) -> SampleResult:
        self._check(task)
        SamplingParams.from_spec(task.sampling)  # invalid sampling fails before any load
        adapter = self._weights(task, live=live, sha256=sha256)
        t0 = time.perf_counter()
        completions_G = self.backend.generate(sample_rows(task, adapter))  # ONE batch
        scored = None
        if task.prompt_logprobs:
            scored = self.backend.prompt_logprobs(task.prompt_ids, adapter)
        result = sample_result(completions_G, scored)
        return msgspec.structs.replace(result, generate_s=time.perf_counter() - t0)

    def _check(self, task: SampleTask) -> None:
        if len(task.prompt_ids) > self.max_prompt_tokens:
            raise SampleInputError(
                f"prompt has {len(task.prompt_ids)} tokens, over this worker's "
                f"max_prompt_tokens={self.max_prompt_tokens}; send a shorter prompt"
            )
        if min(task.prompt_ids) < 0:
            raise SampleInputError(f"prompt token ids must be >= 0, got {min(task.prompt_ids)}")
        if task.weights_uri and not task.adapter:
            raise SampleInputError(
                f"weights_uri {task.weights_uri!r} needs the adapter (model id) it belongs to; "
                "leave weights_uri empty to sample the base model"
            )

    def _weights(self, task: SampleTask, *, live: bool, sha256: str) -> AdapterRef | None:
        """The adapter version to sample with, loaded if needed (``None``: the base model)."""
        if not task.weights_uri:
            return None
        name = served_name(task.adapter, task.registration_id)
        served = self.served.versions(name)
        if task.version in served:
            return AdapterRef(name, task.version)
        if live and all(v < task.version for v in served):
            self.served.load(name, task.version, task.weights_uri, expect_sha256=sha256)
            return AdapterRef(name, task.version)
        own = sampling_name(name, task.version)
        if task.version not in self.served.versions(own):
            self.served.load(own, task.version, task.weights_uri, expect_sha256=sha256)
        self._own[own] = name
        self._own.move_to_end(own)
        while len(self._own) > self.max_versions:
            oldest, _ = self._own.popitem(last=False)
            self.served.drop(oldest)
        return AdapterRef(own, task.version)
