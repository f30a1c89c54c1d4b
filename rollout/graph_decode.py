"""The engine's fast decode loop: a preallocated KV cache, one decode step as a CUDA graph.

(Over 600 lines: the step, the buffers it is captured against, the run's adapter snapshot and
the join / take calls of continuous batching all address the same fixed tensors, and splitting
them would pass those tensors across modules; the weight fusion is :mod:`rollout.fused_linears`,
the Triton kernels :mod:`rollout.decode_attention`.)

:class:`StaticDecoder` takes a batch over from the prefill (which stays the Hugging Face forward
of :mod:`rollout.engine`, with its group sharing) and runs every later token through its own
forward of the model's decoder layers, written against fixed buffers so that the whole step —
embedding, attention, LoRA, head, sampling, stop check — is captured once as a CUDA graph per
shape and replayed with one launch per token::

    x_B     = embed(token_B)                         token_B: last token of each row
    per layer: h = norm(x); q, k, v = proj(h) (+ LoRA); q, k = norm_qk(q, k); rope(pos_B)
               K[b, :, pos_b] = k_b; V[b, :, pos_b] = v_b   pos_b = prompt_b + step_b - 1
               x += o(sdpa(q, K, V, mask_B_T))       mask: t <= pos_b
               x += down(act(gate(h')) * up(h'))     h' = norm(x), each with LoRA
    logits_B_V = head(norm(x)); token_B, logprob_B = sample(logits, params_B, uniform_B[step])

**LoRA in the graph.** A run's adapters (those of every row of the call) are copied once, at
its start, into a snapshot of ``U`` slots (the distinct adapters, bucketed): per projection
``A_UR_I`` (each adapter's ``A`` rows) and ``Bt_UR_O`` (``scale * B^T``), and one 0/1 mask
``mix_B_UR`` selects each row's own adapter's ``R`` columns. The adapter term is then two
dense matrix products::

    y_B_O += ((x_B_I @ A_UR_I^T) * mix_B_UR) @ Bt_UR_O

the same sum as the per-row form (the masked columns add exact zeros), with no gather, no sort
and no data-dependent shape, so it captures. A base row has an all-zero mask row. ``R`` is the
run's largest adapter rank (a power of two, at most the store's ``max_rank``). Loads that
happen while a run decodes write the engine's slots, not the snapshot (the run's versions are
pinned by the engine, so none of them is evicted meanwhile).

**Fused projections.** q/k/v and gate/up read the same input: each group runs as one product
over a fused weight (:mod:`rollout.fused_linears`: the model's own parameters become views of
its rows, so there is one copy), its adapters share one shrink (their ``A`` rows stacked), and
each member's expand is added in place into its columns.

**Continuous batching.** Each row of the buffers is its own sequence: its prompt sits in
columns ``[0, len)`` (column = position), it has its own step counter, and a row that finishes
is handed back (:meth:`StaticDecoder.take`) and refilled with a waiting row
(:meth:`StaticDecoder.join`: its prefill's cache copied into that row, its first token sampled)
while the other rows keep decoding. The engine drives it (:meth:`rollout.engine.Engine.generate`):
the rows of one call, of any task and adapter, share a fixed number of buffer rows, and rows
join as others finish, so a long row does not hold a batch's short ones back and a call with
more rows than ``max_batch_size`` streams them through.

**Same results.** Sampling is :func:`rollout.sampling.sample_tokens_static_B`, the same maths as
the eager loop without host synchronisation; a row's uniforms are drawn from its own generator
up front (the same stream the eager loop draws one step at a time). Stop tokens and lengths are
applied on the host from the returned tokens, with the eager loop's own rule, so stop strings
behave the same. Rows that finish keep stepping (their extra tokens are dropped) until the
host sees them done, checked every :data:`CHECK_EVERY` steps. The graph knows stop token ids,
not text: the engine reads rows with stop strings back at each check (:meth:`StaticDecoder.peek`)
and ends them when a string appears.

**Shapes.** A graph is keyed by ``(rows bucket, cache length bucket, adapter bucket, rank,
sampling mode, attention)``; rows pad up to the bucket (free rows are marked done and
ignored). On CUDA in bf16 / fp16, attention is :mod:`rollout.decode_attention`'s Triton kernel,
which reads each row's written columns only; elsewhere SDPA reads the whole buffer under a
mask. An all-greedy batch skips the sampler's draw. Buffers for one ``(rows, length)`` are
shared by its graphs and kept for later runs within a byte budget. On CPU (tests) the same step
runs eagerly.

Supported: Llama, Mistral, Qwen2 and Qwen3 decoder layers (full attention, RMSNorm, gated MLP);
:func:`unsupported_reason` says why another model stays on the eager loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from events.specs import GREEDY_TEMPERATURE
from rollout import decode_attention
from rollout.fused_linears import Group, fuse_layers, still_fused
from rollout.lora import BASE_SLOT, MultiLoraModel
from rollout.sampling import sample_tokens_static_B

SamplingMode = Literal["greedy", "sample", "filtered"]
Attention = Literal["auto", "triton", "sdpa"]
Prologue = Literal["torch", "triton"]

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
CHECK_EVERY = 16
"""Decode steps between two host checks of "is every row done" (one sync each)."""
LENGTH_BUCKET = 64
"""Cache lengths round up to a multiple of this (one graph serves many prompt widths)."""
MAX_GRAPHS = 16
MAX_BUFFERS = 3
CPU_CACHE_BYTES = 4 << 30


def unsupported_reason(model: Any) -> str | None:
    """Why ``model`` cannot use the static decoder (``None``: it can)."""
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind not in MODEL_TYPES:
        return f"model_type {kind!r} (static decode covers {sorted(MODEL_TYPES)})"
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    return None


def row_bucket(rows: int) -> int:
    """Rows padded up to a power of two below 64, to a multiple of 64 above."""
    if rows <= 64:
        return 1 << max(0, (rows - 1).bit_length())
    return -(-rows // 64) * 64


def sampling_mode(sampling_B: Sequence[tuple[float, int, float]]) -> SamplingMode:
    """``greedy`` when every row is, ``filtered`` when some row uses top-k / top-p."""
    if all(t < GREEDY_TEMPERATURE for t, _, _ in sampling_B):
        return "greedy"
    return "filtered" if any(k > 0 or p < 1.0 for _, k, p in sampling_B) else "sample"


def slot_bucket(slots: int, num_slots: int) -> int:
    return 0 if slots == 0 else min(num_slots, 1 << (slots - 1).bit_length())


def rank_bucket(rank: int, max_rank: int) -> int:
    """A run's adapter width: its largest rank up to a power of two, at most ``max_rank``."""
    return min(max_rank, 1 << max(0, rank - 1).bit_length())


@dataclass
class _Buffers:
    """Decode state for ``rows`` rows and ``length`` cache positions (fixed addresses)."""

    k_L: list[torch.Tensor]  # per layer (rows, kv_heads, length, head_dim)
    v_L: list[torch.Tensor]
    token_B: torch.Tensor  # last token of each row
    len_B: torch.Tensor  # prompt length: the position (= column) of the first generated token
    step_B: torch.Tensor  # index of the token the row's next step produces
    uniform_B_N: torch.Tensor
    temperature_B: torch.Tensor
    top_k_B: torch.Tensor
    top_p_B: torch.Tensor
    token_B_N: torch.Tensor  # outputs
    logprob_B_N: torch.Tensor
    stop_B_K: torch.Tensor  # stop token ids, -1 padded
    max_new_B: torch.Tensor
    done_B: torch.Tensor
    arange_T: torch.Tensor


@dataclass
class _Run:
    """The run in progress: its buffers, adapters, captured step and sampling mode."""

    buf: _Buffers
    snap: _Snapshot
    step_fn: Callable[[], None]
    mode: SamplingMode
    column: dict[int, int]  # slot -> its adapter's index in the snapshot


@dataclass
class _GroupLora:
    """A group's adapters in a snapshot: its wrapped members' ``A`` rows stacked (one shrink
    for the group) and each one's ``scale * B^T`` with the output columns it adds to."""

    a: torch.Tensor  # (members * U*R, in)
    bt: list[torch.Tensor]  # per wrapped member (U*R, out)
    cols: list[tuple[int, int]]
    names: list[str]


@dataclass
class _Snapshot:
    """The batch's adapters for the graph: per group with wrapped members, and the mask."""

    lora_G: dict[int, _GroupLora]  # group index ->
    mix_B_UR: torch.Tensor
    rank: int  # R: columns per adapter
    wrapped: frozenset[str]  # the engine's wrapped layers when it was made


class StaticDecoder:
    """Decodes batches of an :class:`~rollout.engine.Engine` after its prefill (module doc).

    ``model`` is the engine's HF causal LM (its wrapped linears read through ``lora``);
    ``graphs``: capture CUDA graphs (only on CUDA; ``False`` runs the same step eagerly).
    ``cache_bytes``: the most the buffers kept between batches may hold (K/V caches dominate);
    the least recently used are freed first, and a batch whose buffers alone exceed it frees
    them when it ends. ``None``: half the device memory free when the decoder is made
    (:data:`CPU_CACHE_BYTES` on CPU). ``attention``: ``triton`` reads each row's written
    columns only (:mod:`rollout.decode_attention`), ``sdpa`` the whole buffer under a mask;
    ``auto`` is ``triton`` where it runs (CUDA, bf16 / fp16). ``prologue``: ``triton`` runs
    the q/k norms, RoPE and the cache writes as one kernel
    (:func:`rollout.decode_attention.qk_rope_cache`), ``torch`` as separate ops (the default:
    the kernel's speed is not measured yet). Both attributes may be switched between batches
    (graphs are kept per choice).

    The model's projections of one :data:`rollout.fused_linears.LAYER_GROUPS` group are
    re-pointed at rows of one fused weight (same values, no copy kept), which the step reads
    with one product; a model whose weights are replaced or moved afterwards is fused again at
    the next batch.
    """

    def __init__(
        self,
        model: Any,
        lora: MultiLoraModel,
        *,
        max_rows: int,
        graphs: bool = True,
        cache_bytes: int | None = None,
        attention: Attention = "auto",
        prologue: Prologue = "torch",
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"static decode does not support this model: {reason}")
        self.model = model
        self.lora = lora
        self.max_rows = row_bucket(max_rows)
        self.device = lora.device
        self.graphs = graphs and self.device.type == "cuda"
        config = model.config
        self.layers = list(model.model.layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        if attention not in ("auto", "triton", "sdpa"):
            raise ValueError(f"attention {attention!r}; use 'auto', 'triton' or 'sdpa'")
        probe = next(model.parameters())
        fast = decode_attention.supported(probe, self.head_dim)
        if attention == "triton" and not fast:
            raise ValueError(
                f"triton decode attention needs Triton, CUDA and bf16 / fp16 with a power-of-two "
                f"head dim (here {probe.device.type}, {probe.dtype}, head dim {self.head_dim})"
            )
        self.attention: Attention = "triton" if attention != "sdpa" and fast else "sdpa"
        if prologue not in ("torch", "triton"):
            raise ValueError(f"prologue {prologue!r}; use 'torch' or 'triton'")
        if prologue == "triton" and not fast:
            raise ValueError(
                f"the triton prologue needs Triton, CUDA and bf16 / fp16 with a power-of-two "
                f"head dim (here {probe.device.type}, {probe.dtype}, head dim {self.head_dim})"
            )
        self.prologue: Prologue = prologue
        self._groups = fuse_layers(self.model)
        self._buffers: OrderedDict[tuple[int, int], _Buffers] = OrderedDict()
        if cache_bytes is None:
            cuda = self.device.type == "cuda"
            cache_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if cuda else CPU_CACHE_BYTES
        self.cache_bytes = cache_bytes
        self._snapshots: dict[tuple[int, int, int], _Snapshot] = {}
        self._graphs: OrderedDict[tuple[Any, ...], Callable[[], None]] = OrderedDict()
        self._pool: Any = None
        self._run: _Run | None = None

    def _fused_still(self) -> bool:
        """Whether every projection still reads its rows of its group's fused weight."""
        return still_fused(self.layers, self._groups)

    # ---- one batch -------------------------------------------------------------------------

    @torch.inference_mode()
    def begin(self, *, rows: int, length: int, slots: Sequence[int], mode: SamplingMode) -> int:
        """Start a run of up to ``rows`` rows at a time, each at most ``length`` positions
        (prompt + new tokens), using the adapters of ``slots`` (every row that will join) and
        one sampling ``mode`` (:func:`sampling_mode` of all of them). Every buffer row starts
        free. Returns the number of buffer rows (``rows`` bucketed)."""
        bucket = row_bucket(rows)
        length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
        used = sorted({s for s in slots if s != BASE_SLOT})
        u_bucket = slot_bucket(len(used), self.lora.num_slots)
        # a slot loaded without a recorded rank (0) counts as the store's max rank
        most = max((self.lora.rank_S[s] or self.lora.max_rank for s in used), default=0)
        rank = rank_bucket(most, self.lora.max_rank) if used else 0
        if not self._fused_still():  # the model's weights were replaced or moved
            self._groups = fuse_layers(self.model)
            self._snapshots.clear()
            self._graphs.clear()
        buf = self._buffers_for(bucket, length)
        snap = self._snapshot_for(bucket, u_bucket, rank)
        step_fn = self._step_for(buf, snap, bucket, length, u_bucket, mode)
        self._reset(buf, snap, used)
        self._run = _Run(buf, snap, step_fn, mode, {slot: u for u, slot in enumerate(used)})
        return bucket

    @torch.inference_mode()
    def join(
        self,
        index: Sequence[int],
        *,
        slots: Sequence[int],
        cache: Any,
        source: torch.Tensor,
        width: int,
        prompt_len: Sequence[int],
        first_logits: torch.Tensor,
        sampling: Sequence[tuple[float, int, float]],
        uniform: torch.Tensor,
        stop_ids: Sequence[frozenset[int]],
        max_new: Sequence[int],
    ) -> None:
        """Put new rows into the free buffer rows ``index`` after their prefill.

        ``cache``: the prefill's HF cache (left-padded to ``width``), ``source`` each new row's
        prefill row; ``first_logits`` the prefill's last logits per new row; ``sampling``
        (temperature, top_k, top_p); ``uniform`` each row's draws for its steps. The first new
        token is sampled here, with the graph's sampler.
        """
        run, dev = self._require_run(), self.device
        buf, snap = run.buf, run.snap
        idx = self._rows(index)
        lens = list(prompt_len)
        # the prefill is left-padded to ``width``; a buffer row holds its prompt from column 0:
        # column t of row j takes the prefill's column width - len_j + t (past the prompt the
        # clamped copy is never attended: a step writes its column before it reads it)
        len_J = torch.tensor(lens, device=dev)
        src_J_T = (width - len_J[:, None] + torch.arange(width, device=dev)[None, :]).clamp(
            max=width - 1
        )
        src_J_K_T_D = src_J_T[:, None, :, None].expand(
            len(lens), self.kv_heads, width, self.head_dim
        )
        for layer, (k, v) in enumerate(_cache_tensors(cache)):
            buf.k_L[layer][idx, :, :width] = k[source].gather(2, src_J_K_T_D)
            buf.v_L[layer][idx, :, :width] = v[source].gather(2, src_J_K_T_D)
        temperature, top_k, top_p = (torch.tensor(x) for x in zip(*sampling, strict=True))
        count = len(lens)
        stops = torch.full((count, buf.stop_B_K.shape[1]), -1, dtype=torch.long)
        for j, ids in enumerate(stop_ids):
            chosen = sorted(ids)[: stops.shape[1]]
            stops[j, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        draws = torch.zeros(count, buf.uniform_B_N.shape[1])
        draws[:, : uniform.shape[1]] = uniform
        mix = torch.zeros(count, snap.mix_B_UR.shape[1])
        rank = snap.rank
        for j, slot in enumerate(slots):
            if slot != BASE_SLOT:
                u = run.column[slot]
                mix[j, u * rank : (u + 1) * rank] = 1.0
        for target, values in (
            (buf.len_B, torch.tensor(lens)),
            (buf.temperature_B, temperature.float()),
            (buf.top_k_B, top_k.long()),
            (buf.top_p_B, top_p.float()),
            (buf.uniform_B_N, draws),
            (buf.stop_B_K, stops),
            (buf.max_new_B, torch.tensor(list(max_new))),
            (snap.mix_B_UR, mix),
        ):
            target.index_copy_(0, idx, values.to(dev, target.dtype))
        # the first token, from the prefill's logits, with the same sampler as the step
        token_J, logprob_J = sample_tokens_static_B(
            first_logits.float(),
            buf.temperature_B[idx],
            buf.top_k_B[idx],
            buf.top_p_B[idx],
            buf.uniform_B_N[idx, 0],
            filtered=run.mode == "filtered",
            greedy_only=run.mode == "greedy",
        )
        buf.token_B.index_copy_(0, idx, token_J)
        buf.token_B_N[idx, 0] = token_J
        buf.logprob_B_N[idx, 0] = logprob_J
        buf.step_B.index_fill_(0, idx, 1)
        done_J = (token_J[:, None] == buf.stop_B_K[idx]).any(-1) | (buf.max_new_B[idx] <= 1)
        buf.done_B.index_copy_(0, idx, done_J)

    @torch.inference_mode()
    def run(self, steps: int) -> set[int]:
        """Decode ``steps`` tokens for every row; return the rows done (one host sync)."""
        run = self._require_run()
        for _ in range(steps):
            run.step_fn()
        return set(torch.nonzero(run.buf.done_B).flatten().tolist())

    @torch.inference_mode()
    def peek(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens and log-probs of buffer rows ``index`` so far (column ``n``: the row's
        ``n``-th new token; columns past what it made are meaningless), on the CPU."""
        return self._read(self._require_run().buf, self._rows(index))

    @torch.inference_mode()
    def take(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`peek`, and the rows become free."""
        buf, idx = self._require_run().buf, self._rows(index)
        out = self._read(buf, idx)
        buf.done_B.index_fill_(0, idx, True)
        return out

    def _rows(self, index: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(index), dtype=torch.long, device=self.device)

    @staticmethod
    def _read(buf: _Buffers, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return buf.token_B_N[idx].cpu(), buf.logprob_B_N[idx].cpu()

    def end(self) -> None:
        """End the run (buffers too big for the cache budget are freed)."""
        run, self._run = self._run, None
        if run is None:
            return
        rows, length = run.buf.token_B.shape[0], run.buf.arange_T.shape[0]
        if self.buffer_bytes(rows, length) > self.cache_bytes:
            self._drop_buffers((rows, length))  # too big to keep for the next run

    def _require_run(self) -> _Run:
        if self._run is None:
            raise RuntimeError("no decode run: call begin() first")
        return self._run

    def _reset(self, buf: _Buffers, snap: _Snapshot, used: list[int]) -> None:
        """Every row free; the run's adapters (each used slot's A rows and scale * B^T)."""
        buf.done_B.fill_(True)
        buf.step_B.zero_()
        buf.len_B.zero_()
        buf.token_B.zero_()
        buf.max_new_B.fill_(1)
        buf.stop_B_K.fill_(-1)
        buf.temperature_B.zero_()
        buf.top_k_B.fill_(-1)
        buf.top_p_B.fill_(1.0)
        snap.mix_B_UR.zero_()
        if not used:
            return
        rank, width = snap.rank, snap.mix_B_UR.shape[1]
        filled = len(used) * rank
        index = torch.tensor(used, device=self.device)
        for lora in snap.lora_G.values():
            lora.a.zero_()
            for j, (name, bt) in enumerate(zip(lora.names, lora.bt, strict=True)):
                layer = self.lora.layers[name]
                a_U_R_I = layer.lora_A_S_R_I[index, :rank]
                lora.a[j * width : j * width + filled] = a_U_R_I.reshape(filled, -1)
                scaled = layer.lora_B_S_O_R[index, :, :rank] * layer.scale_S[index][:, None, None]
                bt.zero_()
                bt[:filled] = scaled.transpose(1, 2).reshape(filled, -1)

    def buffer_bytes(self, rows: int, length: int) -> int:
        """Bytes of the K/V buffers for ``rows`` x ``length`` (the rest is small)."""
        per = rows * self.kv_heads * length * self.head_dim * self.lora.dtype.itemsize
        return 2 * len(self.layers) * per

    @property
    def cached_bytes(self) -> int:
        """K/V bytes the kept buffers hold now."""
        return sum(self.buffer_bytes(rows, length) for rows, length in self._buffers)

    def _buffers_for(self, rows: int, length: int) -> _Buffers:
        key = (rows, length)
        buf = self._buffers.get(key)
        if buf is not None:
            self._buffers.move_to_end(key)
            return buf
        need = self.buffer_bytes(rows, length)
        while self._buffers and (
            len(self._buffers) >= MAX_BUFFERS or self.cached_bytes + need > self.cache_bytes
        ):
            self._drop_buffers(next(iter(self._buffers)))
        dev, dtype = self.device, self.lora.dtype
        shape = (rows, self.kv_heads, length, self.head_dim)
        buf = _Buffers(
            k_L=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
            v_L=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.layers],
            token_B=torch.zeros(rows, dtype=torch.long, device=dev),
            len_B=torch.zeros(rows, dtype=torch.long, device=dev),
            step_B=torch.zeros(rows, dtype=torch.long, device=dev),
            uniform_B_N=torch.zeros(rows, length, device=dev),
            temperature_B=torch.zeros(rows, device=dev),
            top_k_B=torch.full((rows,), -1, dtype=torch.long, device=dev),
            top_p_B=torch.ones(rows, device=dev),
            token_B_N=torch.zeros(rows, length, dtype=torch.long, device=dev),
            logprob_B_N=torch.zeros(rows, length, device=dev),
            stop_B_K=torch.full((rows, 8), -1, dtype=torch.long, device=dev),
            max_new_B=torch.ones(rows, dtype=torch.long, device=dev),
            done_B=torch.zeros(rows, dtype=torch.bool, device=dev),
            arange_T=torch.arange(length, device=dev),
        )
        self._buffers[key] = buf
        return buf

    def _drop_buffers(self, key: tuple[int, int]) -> None:
        del self._buffers[key]
        for gkey in [g for g in self._graphs if g[:2] == key]:
            del self._graphs[gkey]

    def _snapshot_for(self, rows: int, u_bucket: int, rank: int) -> _Snapshot:
        key = (rows, u_bucket, rank)
        snap = self._snapshots.get(key)
        # layers wrapped after the snapshot was made (a new adapter's targets) need a new one
        if snap is not None and snap.wrapped == self.lora.layers.keys():
            return snap
        width = u_bucket * rank
        dev, dtype = self.device, self.lora.dtype
        lora_G = {}
        for parts in self._groups if width else ():
            for group in (g for groups in parts for g in groups):
                names, cols, start = [], [], 0
                for name, out in zip(group.names, group.widths, strict=True):
                    if name in self.lora.layers:
                        names.append(name)
                        cols.append((start, start + out))
                    start += out
                if not names:
                    continue
                fan_in = group.weight.shape[1]
                lora_G[group.index] = _GroupLora(
                    a=torch.zeros(len(names) * width, fan_in, device=dev, dtype=dtype),
                    bt=[torch.zeros(width, hi - lo, device=dev, dtype=dtype) for lo, hi in cols],
                    cols=cols,
                    names=names,
                )
        snap = _Snapshot(
            lora_G=lora_G,
            mix_B_UR=torch.zeros(rows, width, device=dev, dtype=dtype),
            rank=rank,
            wrapped=frozenset(self.lora.layers),
        )
        self._snapshots[key] = snap
        for gkey in [g for g in self._graphs if (g[0], g[2], g[3]) == (rows, u_bucket, rank)]:
            del self._graphs[gkey]  # they read the old snapshot's addresses
        return snap

    def _step_for(
        self,
        buf: _Buffers,
        snap: _Snapshot,
        rows: int,
        length: int,
        u: int,
        mode: SamplingMode,
    ) -> Callable[[], None]:
        key = (rows, length, u, snap.rank, mode, self.attention, self.prologue)
        fn = self._graphs.get(key)
        if fn is not None:
            self._graphs.move_to_end(key)
            return fn

        def eager() -> None:
            self._step(buf, snap, mode)

        # the capture's warm-up runs really execute; every index the step uses is clamped to
        # the buffers, and the run's reset overwrites what they scribble
        fn = self._capture(eager) if self.graphs else eager
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self._graphs[key] = fn
        return fn

    def _capture(self, step: Callable[[], None]) -> Callable[[], None]:
        """Record ``step`` as a CUDA graph (after warm-up runs on a side stream; the buffers it
        scribbles on meanwhile are refilled by every batch before its first replay)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        return graph.replay

    # ---- the step --------------------------------------------------------------------------

    def _step(self, buf: _Buffers, snap: _Snapshot, mode: SamplingMode) -> None:
        """One token for every row: reads ``token_B`` and ``step_B``, writes its K/V at the
        row's position and its new token in column ``step_B``; free and done rows step too."""
        inner = self.model.model
        rows = buf.token_B.shape[0]
        last = buf.arange_T.shape[0] - 1
        pos_B = (buf.len_B + buf.step_B - 1).clamp(0, last)  # the input token's position
        pos_B_1 = pos_B[:, None]
        mask_B_1_1_T = (buf.arange_T[None, :] <= pos_B_1)[:, None, None, :]
        # each row writes its own column: a scatter along the cache's position axis
        col_B_K_1_D = pos_B[:, None, None, None].expand(rows, self.kv_heads, 1, self.head_dim)
        x_B_1_H = inner.embed_tokens(buf.token_B[:, None])
        cos, sin = inner.rotary_emb(x_B_1_H, pos_B_1)
        cos_B_1_1_D = cos[:, None]
        cos_B_D, sin_B_D = cos[:, 0], sin[:, 0]
        # rotate-half as a swap of the halves times a sign-folded sine: 3 kernels, not 5
        half = self.head_dim // 2
        sin_B_1_1_D = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        x_B_H = x_B_1_H[:, 0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv, o_proj, gate_up, down = self._groups[i]
            h_B_H = _rms_norm(layer.input_layernorm, x_B_H)
            q, k, v = self._project(qkv, h_B_H, snap)
            q = q.view(rows, self.heads, self.head_dim)
            k = k.view(rows, self.kv_heads, self.head_dim)
            v = v.view(rows, self.kv_heads, self.head_dim)
            if self.prologue == "triton":
                q_B_1_1_D = decode_attention.qk_rope_cache(
                    q, k, v, _qk_norms(attn), cos_B_D, sin_B_D, pos_B, buf.k_L[i], buf.v_L[i]
                )[:, :, None]
            else:
                if hasattr(attn, "q_norm"):
                    q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
                q_B_1_1_D = _rope(q[:, :, None], cos_B_1_1_D, sin_B_1_1_D)  # (rows, heads, 1, D)
                k_B_1_1_D = _rope(k[:, :, None], cos_B_1_1_D, sin_B_1_1_D)
                buf.k_L[i].scatter_(2, col_B_K_1_D, k_B_1_1_D)
                buf.v_L[i].scatter_(2, col_B_K_1_D, v[:, :, None])
            if self.attention == "triton":
                out = decode_attention.decode_attention(
                    q_B_1_1_D[:, :, 0], buf.k_L[i], buf.v_L[i], pos_B, attn.scaling
                )
            else:
                out = F.scaled_dot_product_attention(
                    q_B_1_1_D,
                    buf.k_L[i],
                    buf.v_L[i],
                    attn_mask=mask_B_1_1_T,
                    scale=attn.scaling,
                    enable_gqa=self.kv_heads != self.heads,
                )
            (o,) = self._project(o_proj, out.reshape(rows, -1), snap)
            x_B_H = x_B_H + o
            h_B_H = _rms_norm(layer.post_attention_layernorm, x_B_H)
            gate, up = self._project(gate_up, h_B_H, snap)
            (o,) = self._project(down, layer.mlp.act_fn(gate) * up, snap)
            x_B_H = x_B_H + o
        logits_B_V = self.model.get_output_embeddings()(_rms_norm(inner.norm, x_B_H)).float()
        self._sample_into(buf, logits_B_V, mode)
        buf.step_B.add_(1)

    def _project(
        self, groups: list[Group], x_B_I: torch.Tensor, snap: _Snapshot
    ) -> list[torch.Tensor]:
        """The outputs of ``groups``' projections of ``x_B_I``, member by member: per group one
        base product, one shrink for all its wrapped members, and each member's expand added
        in place to its columns (views of the group's output)."""
        outs: list[torch.Tensor] = []
        for group in groups:
            y_B_O = F.linear(x_B_I, group.weight, group.bias)
            lora = snap.lora_G.get(group.index)
            if lora is not None:
                rows, width = x_B_I.shape[0], snap.mix_B_UR.shape[1]
                u_B_M_UR = F.linear(x_B_I, lora.a).view(rows, -1, width)
                u_B_MUR = u_B_M_UR.mul_(snap.mix_B_UR[:, None, :]).view(rows, -1)
                for j, ((lo, hi), bt) in enumerate(zip(lora.cols, lora.bt, strict=True)):
                    y_B_O[:, lo:hi].addmm_(u_B_MUR[:, j * width : (j + 1) * width], bt)
            outs.extend(y_B_O.split(group.widths, dim=1) if len(group.widths) > 1 else [y_B_O])
        return outs

    def _sample_into(self, buf: _Buffers, logits_B_V: torch.Tensor, mode: SamplingMode) -> None:
        n_B_1 = buf.step_B.clamp(max=buf.token_B_N.shape[1] - 1)[:, None]
        uniform_B = buf.uniform_B_N.gather(1, n_B_1)[:, 0]
        token_B, logprob_B = sample_tokens_static_B(
            logits_B_V,
            buf.temperature_B,
            buf.top_k_B,
            buf.top_p_B,
            uniform_B,
            filtered=mode == "filtered",
            greedy_only=mode == "greedy",
        )
        buf.token_B_N.scatter_(1, n_B_1, token_B[:, None])
        buf.logprob_B_N.scatter_(1, n_B_1, logprob_B[:, None])
        buf.token_B.copy_(token_B)
        stopped_B = (token_B[:, None] == buf.stop_B_K).any(-1) | (buf.step_B + 1 >= buf.max_new_B)
        buf.done_B.logical_or_(stopped_B)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, with ``signed_sin`` = ``[-sin_1, sin_2]``:
    ``rotate_half(x) * sin`` is ``[x_2, x_1] * [-sin_1, sin_2]``, the same products."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _qk_norms(attn: nn.Module) -> tuple[torch.Tensor, float, torch.Tensor, float] | None:
    """Qwen3's per-head q and k RMSNorms as (weight, eps) pairs; ``None`` for other families."""
    if not hasattr(attn, "q_norm"):
        return None
    q_norm, k_norm = attn.get_submodule("q_norm"), attn.get_submodule("k_norm")
    q_w, k_w = q_norm.weight, k_norm.weight
    assert isinstance(q_w, torch.Tensor) and isinstance(k_w, torch.Tensor)
    return q_w, _eps(q_norm), k_w, _eps(k_norm)


def _eps(module: nn.Module) -> float:
    """An HF RMSNorm module's epsilon (``variance_epsilon`` or ``eps`` by family)."""
    return float(getattr(module, "variance_epsilon", None) or getattr(module, "eps"))  # noqa: B009


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module as one fused ``F.rms_norm`` (HF's is about eight kernels)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return F.rms_norm(x, (x.shape[-1],), weight, _eps(module))


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of an HF ``DynamicCache`` (``(rows, kv_heads, T, D)``)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
