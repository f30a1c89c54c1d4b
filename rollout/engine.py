"""The embedded generation engine: one frozen base model, many LoRA adapter versions, mixed batches.

(Over 600 lines: both decode loops, the prefill they share, the version pins and the stop rule
act on one per-row state, :class:`_Row`, under one lock; the static decoder's own maths lives in
:mod:`rollout.graph_decode`, and what stays here is the part that reads and writes the rows.)

A rollout worker holds one :class:`Engine`. The trainer publishes adapter versions as PEFT
directories; the worker calls :meth:`Engine.load_adapter` (name, version, path) and then
:meth:`Engine.generate` with rows that each name their own ``(adapter, version)`` or none.

**Two decode loops** (``decoder``). On CUDA, for Llama, Mistral, Qwen2 and Qwen3, ``auto``
takes the static decoder of :mod:`rollout.graph_decode`: after the HF prefill it copies the cache
into preallocated buffers and runs its own decode step, captured as CUDA graphs, with sampling
on the GPU (the same draws as below), and batches continuously: the call's rows share up to
``max_batch_size`` buffer rows and waiting rows join as others finish. Elsewhere (CPU, other
models, ``decoder="hf"``) the eager loop below runs; ``static-eager`` runs the static step
without graphs (tests).

The eager loop: plain HF ``model(...)`` with a ``DynamicCache``: prompts are left-padded,
``position_ids = cumsum(attention_mask) - 1``, one token per step for every live row. Rows with
the same prompt and the same adapter version (the samples of a GRPO group) are prefilled once and
each continues from a copy of that prompt's cache row. Rows that finish are dropped from the
batch (cache rows included) once a quarter of the batch has finished, so a long row does not make
the whole batch pay for its length. Each row samples with its own seeded generator
(:mod:`rollout.sampling`), so its tokens do not depend on its batch-mates.

**Versions and slots.** Each loaded ``(name, version)`` occupies one LoRA slot; the bookkeeping
(retirement beyond ``keep_versions``, LRU eviction, pins of batches in flight) is
:class:`~rollout.adapter_slots.AdapterSlots`. The engine holds its lock around every change of
it and pins a batch's versions from the start of :meth:`Engine.generate` to its end, so a batch
keeps its versions even when a load retires them meanwhile. Versions are immutable: loading a
``(name, version)`` already loaded is a no-op.

**Prompt log-probs** (:meth:`Engine.prompt_logprobs`, for a client's ``compute_logprobs`` and
``sample(prompt_logprobs=True)``): one teacher-forced forward over a prompt with its adapter
version, ``log_softmax(logits)`` at temperature 1, pinned like a batch. Generation does not
compute them (its prefill keeps only the last position's logits).

A row's tokens are its ``completion_ids`` (the name the rollout group and the trainer use);
SGLang's HTTP field ``output_ids`` appears only at the HTTP edge (:mod:`rollout.sglang_api`,
:mod:`rollout.client`).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import msgspec
import torch

from events.adapter_format import PeftAdapter, read_peft_adapter
from rollout.adapter_slots import AdapterRef, AdapterSlots, EngineError, RequestError
from rollout.config import Decoder
from rollout.graph_decode import CHECK_EVERY, StaticDecoder, sampling_mode, unsupported_reason
from rollout.lora import BASE_SLOT, LoraBackend, MultiLoraModel
from rollout.sampling import SamplingParams, find_stop, sample_tokens_B, trim_at_stop

SCORE_CHUNK = 512
"""Tokens per log-softmax chunk of :meth:`Engine.prompt_logprobs` (bounds the float32 copy)."""
JOIN_FRACTION = 8
"""Static decoding: waiting rows join once 1/this of the buffer rows are free (or none run), so
their prefill is shared by a few rows rather than run for each finished row alone."""


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One row: prompt token ids, the adapter version to use (``None``: base model), sampling."""

    input_ids: tuple[int, ...]
    adapter: AdapterRef | None = None
    sampling: SamplingParams = SamplingParams()


class GenerateResult(msgspec.Struct, frozen=True, kw_only=True):
    """One row's output.

    ``completion_ids`` include the token that ended the row (EOS / stop token / the token
    completing a stop string), and ``logprobs[t]`` is the policy log-prob of
    ``completion_ids[t]`` (:mod:`rollout.sampling`).
    ``finish_reason`` is ``"stop"`` (``matched`` = stop token id or stop string) or ``"length"``.
    ``text`` is the decoded output, cut before a matched stop string.
    """

    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: Literal["stop", "length"]
    matched: int | str | None
    text: str
    prompt_tokens: int
    adapter: AdapterRef | None
    seed: int


class LoadedAdapter(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`Engine.load_adapter` did: where the version lives and what it cost."""

    adapter: AdapterRef
    path: str
    slot: int
    rank: int
    scale: float
    modules: int
    nbytes: int
    load_ms: float
    evicted: tuple[AdapterRef, ...] = ()


@dataclass
class _Row:
    """Mutable decoding state of one request (private to one :meth:`Engine.generate` call)."""

    request: GenerateRequest
    slot: int
    seed: int
    generator: torch.Generator
    stop_ids: frozenset[int]
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Literal["stop", "length"] | None = None
    matched: int | str | None = None


@dataclass
class _Prefill:
    """One prefill: its HF cache and last logits (``U`` unique rows), and each row's source."""

    cache: Any
    logits_U_V: torch.Tensor
    mask_U_T: torch.Tensor
    pos_U_T: torch.Tensor
    source_B: list[int]
    width: int
    unique: int


class Engine:
    """Mixed-adapter batched generation over one frozen causal LM (see module doc).

    ``model`` is an HF causal LM (modified in place: target linears get LoRA slots); ``tokenizer``
    decodes output text and stop strings (``None``: no text, no stop strings). ``max_loras``
    slots of rank ``max_lora_rank`` (SGLang's ``--max-loras-per-batch`` / ``--max-lora-rank``);
    ``target_modules`` fixes the wrapped linears up front (``None``: wrap what adapters target,
    when they load). Thread-safe: loads may run while a batch decodes; batches run one at a time.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None,
        *,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        keep_versions: int = 2,
        target_modules: Sequence[str] | Literal["all"] | None = None,
        lora_backend: LoraBackend = "auto",
        max_batch_size: int = 256,
        seed: int = 0,
        model_path: str = "",
        decoder: Decoder = "auto",
        static_cache_bytes: int | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.static_cache_bytes = static_cache_bytes
        self.tokenizer: Any = tokenizer  # None: no text, no stop strings
        self.model_path = model_path
        self.lora = MultiLoraModel(
            model, num_slots=max_loras, max_rank=max_lora_rank, backend=lora_backend
        )
        self.fixed_targets = target_modules is not None
        if target_modules is not None:
            self.lora.wrap(self.lora.linear_names(target_modules))
        self.slots = AdapterSlots(max_loras, keep_versions)
        self.max_batch_size = max_batch_size
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = _pad_id(model, tokenizer, self.eos_ids)
        self._seeds = random.Random(seed)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0  # generate calls between acquire and release
        self._wrapping = 0  # loads waiting to wrap new target modules
        self._decode_lock = threading.Lock()
        self._cache_kw = _cache_keyword(model)
        # the prefill keeps one position (``logits_to_keep=1``): HF slices ``hidden[:, -1:]``,
        # a strided view, and ``linear`` then broadcasts the head's weight over the batch (a
        # batched GEMV reading the whole head once per row: 10x a plain GEMM on a CPU at 512
        # rows); a contiguous input makes it one matrix product
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        self.static = self._static_decoder(decoder)
        self.decoder = "hf" if self.static is None else "static"
        self._decoder_choice = decoder

    def use_decoder(self, decoder: Decoder) -> None:
        """Switch how later batches decode (:data:`Decoder`); waits for a running batch. The
        decoder in use stays (with its captured graphs and buffers) when ``decoder`` is the
        choice it was made for."""
        with self._decode_lock:
            if decoder == self._decoder_choice:
                return
            self.static = self._static_decoder(decoder)
            self.decoder = "hf" if self.static is None else "static"
            self._decoder_choice = decoder

    def _static_decoder(self, decoder: Decoder) -> StaticDecoder | None:
        if decoder not in get_args(Decoder):
            raise EngineError(f"decoder {decoder!r}; use one of {', '.join(get_args(Decoder))}")
        if decoder == "hf" or (decoder == "auto" and self.lora.device.type != "cuda"):
            return None
        reason = unsupported_reason(self.model)
        if reason is not None:
            if decoder == "auto":
                return None
            raise EngineError(f"decoder {decoder!r} does not support this model: {reason}")
        graphs = decoder != "static-eager"
        return StaticDecoder(
            self.model,
            self.lora,
            max_rows=self.max_batch_size,
            graphs=graphs,
            cache_bytes=self.static_cache_bytes,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu", **kwargs: Any
    ) -> Engine:
        """Load the base model and tokenizer from a local HF directory (no hub access)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise EngineError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, ...)")
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, local_files_only=True, use_safetensors=True
        )  # a pickled base model (pytorch_model.bin) is refused, never unpickled
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(model.to(device), tokenizer, model_path=str(path), **kwargs)

    # ---- adapters -------------------------------------------------------------------------

    def load_adapter(
        self, name: str, version: int, path: str | Path, *, adapter: PeftAdapter | None = None
    ) -> LoadedAdapter:
        """Load the PEFT directory ``path`` as ``name@version`` (idempotent; see module doc);
        ``adapter``: its files already read (:func:`read_peft_adapter` of ``path``)."""
        ref = AdapterRef(name, version)
        start = time.perf_counter()
        adapter = adapter if adapter is not None else read_peft_adapter(path)
        self.lora.check(adapter, allow_wrap=not self.fixed_targets)
        with self._lock:
            entry = self.slots.get(ref)
            if entry is not None:
                return self._loaded(ref, entry.slot, adapter, start, ())
            self.slots.check_fresh(ref)
            if self.lora.check(adapter, allow_wrap=True):
                # wrapping swaps modules: hold new batches back and wait for running ones
                self._wrapping += 1
                try:
                    self._idle.wait_for(lambda: self._inflight == 0)
                    self.lora.wrap(self.lora.check(adapter, allow_wrap=True))
                finally:
                    self._wrapping -= 1
                    self._idle.notify_all()
            slot, evicted = self.slots.place()
            self.lora.load(slot, adapter)
            _, retired = self.slots.commit(ref, slot, str(path))
            gone = tuple(r for r in (evicted, *retired) if r is not None)
            return self._loaded(ref, slot, adapter, start, gone)

    def _loaded(
        self,
        ref: AdapterRef,
        slot: int,
        adapter: Any,
        start: float,
        evicted: tuple[AdapterRef, ...],
    ) -> LoadedAdapter:
        return LoadedAdapter(
            adapter=ref,
            path=adapter.path,
            slot=slot,
            rank=adapter.rank,
            scale=adapter.scale,
            modules=len(adapter.weights),
            nbytes=adapter.nbytes,
            evicted=evicted,
            load_ms=(time.perf_counter() - start) * 1e3,
        )

    def unload_adapter(self, name: str, version: int | None = None) -> list[AdapterRef]:
        """Stop serving ``name@version`` (every version when ``None``); in-flight batches finish."""
        with self._lock:
            _, retired = self.slots.retire(name, version)
        return retired

    def loaded_adapters(self) -> list[AdapterRef]:
        """Versions new batches may use, by name then version."""
        with self._lock:
            return self.slots.live()

    def adapter_paths(self) -> dict[AdapterRef, str]:
        """Each usable version and the directory it was loaded from."""
        with self._lock:
            return {ref: self.slots.path_of(ref) for ref in self.slots.live()}

    # ---- generation -----------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Generate every request (any mix of adapters and base rows); results in input order.
        A row with ``max_new_tokens=0`` gets no token (``finish_reason`` ``"length"``)."""
        for i, request in enumerate(requests):
            self._validate(i, request)
        with self._pinned(requests) as slots_B:
            rows = [self._row(r, slot) for r, slot in zip(requests, slots_B, strict=True)]
            todo = [row for row in rows if row.finish is None]  # max_new_tokens=0 rows are done
            with self._decode_lock:
                if self.static is not None and todo:
                    self._static_generate(self.static, todo)
                else:
                    for lo in range(0, len(todo), self.max_batch_size):
                        self._decode(todo[lo : lo + self.max_batch_size])
        return [self._result(row) for row in rows]

    def prompt_logprobs(
        self, requests: Sequence[GenerateRequest]
    ) -> list[tuple[float | None, ...]]:
        """Teacher-forced log-probs of each request's own tokens under its adapter (or the base).

        Entry ``t`` of a row is ``log p(input_ids[t] | input_ids[:t])`` =
        ``log_softmax(logits_{t-1})[input_ids[t]]`` in float32, at **temperature 1** whatever
        ``request.sampling`` says (it is not used); entry 0 is ``None`` (no context). One plain
        forward per row (no cache, no decoding) through the same model and slot routing as
        :meth:`generate`, so these are the numbers a prefill computes. Memory: one row's
        ``T x V`` logits at a time (log-softmax taken in chunks of :data:`SCORE_CHUNK` tokens).
        """
        if not requests:
            return []
        for i, request in enumerate(requests):
            self._validate_ids(i, request.input_ids)
            if self.max_positions and len(request.input_ids) > self.max_positions:
                raise RequestError(
                    f"input_ids[{i}]",
                    f"{len(request.input_ids)} tokens exceed the model's "
                    f"max_position_embeddings {self.max_positions}",
                )
        with self._pinned(requests) as slots_B, self._decode_lock:
            return [
                self._score(r.input_ids, slot) for r, slot in zip(requests, slots_B, strict=True)
            ]

    @contextmanager
    def _pinned(self, requests: Sequence[GenerateRequest]) -> Iterator[list[int]]:
        """Pin the requests' adapter versions for one batch; yields each row's slot id."""
        refs = [r.adapter for r in requests if r.adapter is not None]
        with self._lock:
            self._idle.wait_for(lambda: self._wrapping == 0)
            slot_of = self.slots.acquire(refs)
            self._inflight += 1
        try:
            yield [BASE_SLOT if r.adapter is None else slot_of[r.adapter] for r in requests]
        finally:
            with self._lock:
                self.slots.release(refs)
                self._inflight -= 1
                self._idle.notify_all()

    @torch.inference_mode()
    def _score(self, ids: tuple[int, ...], slot: int) -> tuple[float | None, ...]:
        ids_1_T = torch.tensor([ids], dtype=torch.long, device=self.lora.device)
        with self.lora.route([slot]):
            logits_T_V = self.model(input_ids=ids_1_T, use_cache=False).logits[0, :-1]
        targets_T = ids_1_T[0, 1:]
        logprobs_T = [
            torch.log_softmax(chunk_V.float(), dim=-1).gather(-1, target[:, None])[:, 0]
            for chunk_V, target in zip(
                logits_T_V.split(SCORE_CHUNK), targets_T.split(SCORE_CHUNK), strict=True
            )
        ]
        scored = torch.cat(logprobs_T).tolist() if logprobs_T else []
        return (None, *scored)

    def _validate_ids(self, i: int, ids: tuple[int, ...]) -> None:
        if not ids:
            raise RequestError(f"input_ids[{i}]", "prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError(f"input_ids[{i}]", f"token ids must be in [0, {self.vocab_size})")

    def _validate(self, i: int, request: GenerateRequest) -> None:
        ids = request.input_ids
        self._validate_ids(i, ids)
        total = len(ids) + request.sampling.max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise RequestError(
                f"sampling_params[{i}].max_new_tokens",
                f"prompt {len(ids)} + max_new_tokens {request.sampling.max_new_tokens} exceeds "
                f"the model's max_position_embeddings {self.max_positions}",
            )
        if request.sampling.stop and self.tokenizer is None:
            raise RequestError(f"sampling_params[{i}].stop", "stop strings need a tokenizer")

    def _row(self, request: GenerateRequest, slot: int) -> _Row:
        sp = request.sampling
        seed = sp.seed if sp.seed is not None else self._seeds.randrange(2**63)
        stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_ids)
        generator = torch.Generator().manual_seed(seed)
        row = _Row(request=request, slot=slot, seed=seed, generator=generator, stop_ids=stop_ids)
        if sp.max_new_tokens == 0:
            row.finish = "length"
        return row

    def _prefill(self, rows: list[_Row]) -> _Prefill:
        """One forward over the rows' prompts, left-padded; rows with one prompt and one slot
        (a GRPO group's samples) share one prefill row."""
        device = self.lora.device
        first: dict[tuple[tuple[int, ...], int], int] = {}
        prefill: list[_Row] = []
        source_B: list[int] = []
        for row in rows:
            key = (row.request.input_ids, row.slot)
            if key not in first:
                first[key] = len(prefill)
                prefill.append(row)
            source_B.append(first[key])
        width = max(len(r.request.input_ids) for r in prefill)
        ids_U_T = torch.full((len(prefill), width), self.pad_id, dtype=torch.long)
        mask_U_T = torch.zeros((len(prefill), width), dtype=torch.long)
        for u, row in enumerate(prefill):
            prompt = row.request.input_ids
            ids_U_T[u, width - len(prompt) :] = torch.tensor(prompt)
            mask_U_T[u, width - len(prompt) :] = 1
        ids_U_T, mask_U_T = ids_U_T.to(device), mask_U_T.to(device)
        pos_U_T = (mask_U_T.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self.model)
        logits_U_V = self._forward(ids_U_T, mask_U_T, pos_U_T, cache, prefill)
        return _Prefill(cache, logits_U_V, mask_U_T, pos_U_T, source_B, width, len(prefill))

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        """Run ``rows`` to completion as one batch with the eager loop (prefill, then one
        token per step)."""
        device = self.lora.device
        pre = self._prefill(rows)
        cache = pre.cache
        logits_B_V, mask_B_T, next_pos_B = pre.logits_U_V, pre.mask_U_T, pre.pos_U_T[:, -1] + 1
        if pre.unique < len(rows):  # each row gets a copy of its prompt's cache row
            index = torch.tensor(pre.source_B, device=device)
            cache.batch_select_indices(index)
            logits_B_V, mask_B_T, next_pos_B = logits_B_V[index], mask_B_T[index], next_pos_B[index]
        live = list(rows)
        while True:
            tokens_B = self._step(live, logits_B_V)
            keep = [b for b, row in enumerate(live) if row.finish is None]
            if not keep:
                return
            if len(live) - len(keep) >= max(1, len(live) // 4):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                live = [live[b] for b in keep]
                mask_B_T, next_pos_B, tokens_B = mask_B_T[index], next_pos_B[index], tokens_B[index]
            mask_B_T = torch.cat([mask_B_T, mask_B_T.new_ones(len(live), 1)], dim=1)
            logits_B_V = self._forward(
                tokens_B[:, None], mask_B_T, next_pos_B[:, None], cache, live
            )
            next_pos_B = next_pos_B + 1

    @torch.inference_mode()
    def _static_generate(self, static: StaticDecoder, rows: list[_Row]) -> None:
        """Run ``rows`` through :class:`~rollout.graph_decode.StaticDecoder` with continuous
        batching: up to ``max_batch_size`` buffer rows decode at once, and waiting rows join
        (prefilled together, a few at a time) as others finish; then each row's stops and
        length are applied to its tokens (the rule :meth:`_append` keeps)."""
        sps = [row.request.sampling for row in rows]
        capacity = min(len(rows), self.max_batch_size)
        static.begin(
            rows=capacity,
            length=max(len(r.request.input_ids) + r.request.sampling.max_new_tokens for r in rows),
            slots=[row.slot for row in rows],
            mode=sampling_mode([(sp.temperature, sp.top_k, sp.top_p) for sp in sps]),
        )
        pending = deque(rows)
        free = deque(range(capacity))
        active: dict[int, _Row] = {}
        left: dict[int, int] = {}  # tokens each active row may still make
        join_at = max(1, capacity // JOIN_FRACTION)
        try:
            while pending or active:
                if pending and (not active or len(free) >= min(join_at, len(pending))):
                    joining = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                    index = [free.popleft() for _ in joining]
                    self._static_join(static, index, joining)
                    for b, row in zip(index, joining, strict=True):
                        active[b] = row
                        left[b] = row.request.sampling.max_new_tokens - 1
                steps = min(CHECK_EVERY, max(left.values()))
                done = static.run(steps)
                finished = []
                for b in active:
                    left[b] = max(0, left[b] - steps)
                    if b in done or left[b] == 0:
                        finished.append(b)
                # stop strings are text: the graph cannot see them, so rows that have them are
                # read back at every check and end as soon as one appears (not at their length)
                texts = [b for b in active if b not in finished and active[b].request.sampling.stop]
                if texts:
                    tokens_T_N, logprobs_T_N = static.peek(texts)
                    for b, tokens, logprobs in zip(
                        texts, tokens_T_N.tolist(), logprobs_T_N.tolist(), strict=True
                    ):
                        made = active[b].request.sampling.max_new_tokens - left[b]
                        self._extend(active[b], tokens[:made], logprobs[:made])
                        if active[b].finish is not None:
                            finished.append(b)
                if not finished:
                    continue
                tokens_F_N, logprobs_F_N = static.take(finished)
                for b, tokens, logprobs in zip(
                    finished, tokens_F_N.tolist(), logprobs_F_N.tolist(), strict=True
                ):
                    row = active.pop(b)
                    del left[b]
                    free.append(b)
                    self._extend(row, tokens, logprobs)
        finally:
            static.end()

    def _static_join(self, static: StaticDecoder, index: list[int], rows: list[_Row]) -> None:
        """Prefill ``rows`` and hand them to the static decoder's free rows ``index``."""
        pre = self._prefill(rows)
        source = torch.tensor(pre.source_B, device=pre.logits_U_V.device)
        sps = [row.request.sampling for row in rows]
        uniform_J_N = torch.zeros(len(rows), max(sp.max_new_tokens for sp in sps))
        for j, row in enumerate(rows):  # the draws the eager loop makes one step at a time
            uniform_J_N[j, : sps[j].max_new_tokens] = torch.rand(
                sps[j].max_new_tokens, generator=row.generator
            )
        static.join(
            index,
            slots=[row.slot for row in rows],
            cache=pre.cache,
            source=source,
            width=pre.width,
            prompt_len=[len(row.request.input_ids) for row in rows],
            first_logits=pre.logits_U_V[source],
            sampling=[(sp.temperature, sp.top_k, sp.top_p) for sp in sps],
            uniform=uniform_J_N,
            stop_ids=[row.stop_ids for row in rows],
            max_new=[sp.max_new_tokens for sp in sps],
        )

    def _forward(
        self,
        ids_B_T: torch.Tensor,
        mask_B_T: torch.Tensor,
        pos_B_T: torch.Tensor,
        cache: Any,
        rows: list[_Row],
    ) -> torch.Tensor:
        with self.lora.route([row.slot for row in rows]):
            out = self.model(
                input_ids=ids_B_T,
                attention_mask=mask_B_T,
                position_ids=pos_B_T,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
        return out.logits[:, -1, :]

    def _step(self, rows: list[_Row], logits_B_V: torch.Tensor) -> torch.Tensor:
        """Sample one token for every row, record it for unfinished rows, mark finished ones."""
        sps = [row.request.sampling for row in rows]
        device = logits_B_V.device
        temperature_B = torch.tensor([sp.temperature for sp in sps], device=device)
        top_k_B = torch.tensor([sp.top_k for sp in sps], device=device)
        top_p_B = torch.tensor([sp.top_p for sp in sps], device=device)
        uniform_B = torch.cat([torch.rand(1, generator=row.generator) for row in rows])
        tokens_B, logprobs_B = sample_tokens_B(
            logits_B_V, temperature_B, top_k_B, top_p_B, uniform_B.to(device)
        )
        for row, token, logprob in zip(rows, tokens_B.tolist(), logprobs_B.tolist(), strict=True):
            if row.finish is None:
                self._append(row, token, logprob)
        return tokens_B

    def _extend(self, row: _Row, tokens: list[int], logprobs: list[float]) -> None:
        """Append the row's tokens past those it holds, until it finishes (:meth:`_append`)."""
        start = len(row.completion_ids)
        for token, logprob in zip(tokens[start:], logprobs[start:], strict=True):
            if row.finish is not None:
                return
            self._append(row, token, logprob)

    def _append(self, row: _Row, token: int, logprob: float) -> None:
        sp = row.request.sampling
        row.completion_ids.append(token)
        row.logprobs.append(logprob)
        if token in row.stop_ids:
            row.finish, row.matched = "stop", token
        elif sp.stop and self.tokenizer is not None:  # _validate rejects stop without one
            window = max(len(s) for s in sp.stop) + 4
            tail = self.tokenizer.decode(row.completion_ids[-window:], skip_special_tokens=True)
            hit = find_stop(tail, sp.stop)
            if hit is not None:
                row.finish, row.matched = "stop", hit[1]
        if row.finish is None and len(row.completion_ids) >= sp.max_new_tokens:
            row.finish = "length"

    def _result(self, row: _Row) -> GenerateResult:
        sp = row.request.sampling
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(
                row.completion_ids, skip_special_tokens=sp.skip_special_tokens
            )
            if isinstance(row.matched, str):
                text = trim_at_stop(text, row.matched)
        if row.finish is None:
            raise EngineError("internal: a row left decoding unfinished")
        return GenerateResult(
            completion_ids=tuple(row.completion_ids),
            logprobs=tuple(row.logprobs),
            finish_reason=row.finish,
            matched=row.matched,
            text=text,
            prompt_tokens=len(row.request.input_ids),
            adapter=row.request.adapter,
            seed=row.seed,
        )


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_keyword(model: Any) -> str:
    """``cache`` on transformers >= 5.2x, ``past_key_values`` before (same object either way)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any | None) -> frozenset[int]:
    """EOS ids from the generation config, the model config and the tokenizer (union)."""
    found: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (
        getattr(gen, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return frozenset(found)


def _pad_id(model: Any, tokenizer: Any | None, eos_ids: frozenset[int]) -> int:
    for value in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(model.config, "pad_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return min(eos_ids) if eos_ids else 0
