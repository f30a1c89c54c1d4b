"""The engine's fast decode loop: a preallocated KV cache, one decode step as a CUDA graph.

:class:`StaticDecoder` takes a batch over from the prefill (which stays the Hugging Face forward
of :mod:`rollout.engine`, with its group sharing) and runs every later token through its own
forward of the model's decoder layers, written against fixed buffers so that the whole step —
embedding, attention, LoRA, head, sampling, stop check — is captured once as a CUDA graph per
shape and replayed with one launch per token::

    x_B     = embed(token_B)                         token_B: last token of each row
    per layer: h = norm(x); q, k, v = proj(h) (+ LoRA); q, k = norm_qk(q, k); rope(pos_B)
               K[:, :, col] = k; V[:, :, col] = v    col = prompt width + step - 1 (same for all)
               x += o(sdpa(q, K, V, mask_B_T))       mask: pad_B <= t <= col
               x += down(act(gate(h')) * up(h'))     h' = norm(x), each with LoRA
    logits_B_V = head(norm(x)); token_B, logprob_B = sample(logits, params_B, uniform_B[step])

**LoRA in the graph.** A batch's adapters are copied once, at its start, into a snapshot of
``U`` slots (the distinct adapters of the batch, bucketed): per projection ``A_UR_I`` (each
adapter's ``A`` rows) and ``Bt_UR_O`` (``scale * B^T``), and one 0/1 mask ``mix_B_UR`` selects
each row's own adapter's ``R`` columns. The adapter term is then two dense matrix products::

    y_B_O += ((x_B_I @ A_UR_I^T) * mix_B_UR) @ Bt_UR_O

the same sum as the per-row form (the masked columns add exact zeros), with no gather, no sort
and no data-dependent shape, so it captures. A base row has an all-zero mask row. Loads that
happen while a batch decodes write the engine's slots, not the snapshot.

**Same results.** Sampling is :func:`rollout.sampling.sample_tokens_static_B`, the same maths as
the eager loop without host synchronisation; a row's uniforms are drawn from its own generator
up front (the same stream the eager loop draws one step at a time). Stop tokens and lengths are
applied on the host from the returned tokens, with the eager loop's own rule, so stop strings
behave the same. Rows that finish keep decoding (their extra tokens are dropped) until every row
of the batch is done, checked every :data:`CHECK_EVERY` steps.

**Shapes.** A graph is keyed by ``(rows bucket, cache length bucket, adapter bucket, sampling
mode)``; rows pad up to the bucket (padding rows attend to zeros and are ignored). Attention
reads the whole buffer under a mask (reading only the columns written so far, a graph per
32-column span, measured slower at 64 rows on an H200 and no faster at 256). An all-greedy
batch skips the sampler's draw. Buffers for one
``(rows, length)`` are shared by its graphs. On CPU (tests) the same step runs eagerly.

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
from rollout.lora import BASE_SLOT, MultiLoraLinear, MultiLoraModel
from rollout.sampling import sample_tokens_static_B

SamplingMode = Literal["greedy", "sample", "filtered"]

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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


@dataclass
class _Buffers:
    """Decode state for ``rows`` rows and ``length`` cache positions (fixed addresses)."""

    k_L: list[torch.Tensor]  # per layer (rows, kv_heads, length, head_dim)
    v_L: list[torch.Tensor]
    token_B: torch.Tensor  # last token of each row
    pos0_B: torch.Tensor  # position of a row's first generated token (its prompt length)
    pad_B: torch.Tensor  # first cache column a row attends to (left padding)
    col0: torch.Tensor  # 0-d: prompt width (column of the first generated token)
    step: torch.Tensor  # 0-d: index of the token this step produces
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
class _Snapshot:
    """The batch's adapters for the graph: per wrapped projection (A, scale*B^T), and the mask."""

    a_P: dict[str, torch.Tensor]  # name -> (U*R, in)
    bt_P: dict[str, torch.Tensor]  # name -> (U*R, out)
    mix_B_UR: torch.Tensor


class StaticDecoder:
    """Decodes batches of an :class:`~rollout.engine.Engine` after its prefill (module doc).

    ``model`` is the engine's HF causal LM (its wrapped linears read through ``lora``);
    ``graphs``: capture CUDA graphs (only on CUDA; ``False`` runs the same step eagerly).
    ``cache_bytes``: the most the buffers kept between batches may hold (K/V caches dominate);
    the least recently used are freed first, and a batch whose buffers alone exceed it frees
    them when it ends. ``None``: half the device memory free when the decoder is made
    (:data:`CPU_CACHE_BYTES` on CPU).
    """

    def __init__(
        self,
        model: Any,
        lora: MultiLoraModel,
        *,
        max_rows: int,
        graphs: bool = True,
        cache_bytes: int | None = None,
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
        self._buffers: OrderedDict[tuple[int, int], _Buffers] = OrderedDict()
        if cache_bytes is None:
            cuda = self.device.type == "cuda"
            cache_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if cuda else CPU_CACHE_BYTES
        self.cache_bytes = cache_bytes
        self._snapshots: dict[tuple[int, int], _Snapshot] = {}
        self._graphs: OrderedDict[tuple[int, int, int, str], Callable[[], None]] = OrderedDict()
        self._pool: Any = None
        self._name_of: dict[int, str] = {}

    # ---- one batch -------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self,
        *,
        slots_B: Sequence[int],
        cache: Any,
        source_B: torch.Tensor,
        width: int,
        prompt_len_B: Sequence[int],
        first_logits_B_V: torch.Tensor,
        sampling_B: Sequence[tuple[float, int, float]],
        uniform_B_N: torch.Tensor,
        stop_ids_B: Sequence[frozenset[int]],
        max_new_B: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one batch after its prefill; return ``(tokens_B_N, logprobs_B_N)`` on the CPU.

        ``cache``: the prefill's HF cache (``U`` unique rows), ``source_B`` each row's prefill
        row; ``first_logits_B_V`` the prefill's last logits per row; ``sampling_B``
        (temperature, top_k, top_p); ``uniform_B_N`` each row's draws for its ``N`` steps.
        Column ``n`` of the result is the row's ``n``-th new token; columns past a row's end
        are meaningless (the caller applies stops and lengths).
        """
        rows, steps = len(slots_B), uniform_B_N.shape[1]
        bucket = row_bucket(rows)
        length = -(-(width + steps) // LENGTH_BUCKET) * LENGTH_BUCKET
        used = sorted({s for s in slots_B if s != BASE_SLOT})
        u_bucket = slot_bucket(len(used), self.lora.num_slots)
        mode = sampling_mode(sampling_B)
        total = max(max_new_B)
        buf = self._buffers_for(bucket, length)
        snap = self._snapshot_for(bucket, u_bucket)
        step_fn = self._step_for(buf, snap, bucket, length, u_bucket, mode)
        self._fill(
            buf, snap, used, slots_B, cache, source_B, width, prompt_len_B, sampling_B,
            uniform_B_N, stop_ids_B, max_new_B,
        )  # fmt: skip
        # the first new token comes from the prefill's logits, with the graph's sampler
        first_B = torch.zeros(bucket, first_logits_B_V.shape[1], device=self.device)
        first_B[:rows] = first_logits_B_V.float()
        buf.step.fill_(0)
        self._sample_into(buf, first_B, mode)
        buf.step.fill_(1)
        for n in range(1, total):
            step_fn()
            if n % CHECK_EVERY == 0 and bool(buf.done_B[:rows].all()):
                break
        tokens_B_N, logprobs_B_N = buf.token_B_N[:rows].cpu(), buf.logprob_B_N[:rows].cpu()
        if self.buffer_bytes(bucket, length) > self.cache_bytes:
            self._drop_buffers((bucket, length))  # too big to keep for the next batch
        return tokens_B_N, logprobs_B_N

    def _fill(
        self,
        buf: _Buffers,
        snap: _Snapshot,
        used: list[int],
        slots_B: Sequence[int],
        cache: Any,
        source_B: torch.Tensor,
        width: int,
        prompt_len_B: Sequence[int],
        sampling_B: Sequence[tuple[float, int, float]],
        uniform_B_N: torch.Tensor,
        stop_ids_B: Sequence[frozenset[int]],
        max_new_B: Sequence[int],
    ) -> None:
        rows, dev = len(slots_B), self.device
        for layer, (k, v) in enumerate(_cache_tensors(cache)):
            buf.k_L[layer].zero_()
            buf.v_L[layer].zero_()
            buf.k_L[layer][:rows, :, :width] = k[source_B]
            buf.v_L[layer][:rows, :, :width] = v[source_B]
        lens = torch.tensor(list(prompt_len_B), dtype=torch.long)
        buf.pos0_B.zero_()
        buf.pos0_B[:rows] = lens.to(dev)
        buf.pad_B.zero_()
        buf.pad_B[:rows] = (width - lens).to(dev)
        buf.col0.fill_(width)
        temperature, top_k, top_p = zip(*sampling_B, strict=True)
        buf.temperature_B.zero_()
        buf.temperature_B[:rows] = torch.tensor(temperature).to(dev)
        buf.top_k_B.fill_(-1)
        buf.top_k_B[:rows] = torch.tensor(top_k).to(dev)
        buf.top_p_B.fill_(1.0)
        buf.top_p_B[:rows] = torch.tensor(top_p).to(dev)
        buf.uniform_B_N.zero_()
        buf.uniform_B_N[:rows, : uniform_B_N.shape[1]] = uniform_B_N.to(dev)
        width_k = buf.stop_B_K.shape[1]
        stops = torch.full((rows, width_k), -1, dtype=torch.long)
        for b, ids in enumerate(stop_ids_B):
            chosen = sorted(ids)[:width_k]
            stops[b, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        buf.stop_B_K.fill_(-1)
        buf.stop_B_K[:rows] = stops.to(dev)
        buf.max_new_B.fill_(1)  # padding rows are done at once
        buf.max_new_B[:rows] = torch.tensor(list(max_new_B)).to(dev)
        buf.done_B.zero_()
        # the adapters: each used slot's A rows and scale * B^T, and each row's mask
        rank = self.lora.max_rank
        column = {slot: u for u, slot in enumerate(used)}
        mix = torch.zeros(buf.token_B.shape[0], snap.mix_B_UR.shape[1] or 1)
        for b, slot in enumerate(slots_B):
            if slot != BASE_SLOT:
                mix[b, column[slot] * rank : (column[slot] + 1) * rank] = 1.0
        snap.mix_B_UR.copy_(mix[:, : snap.mix_B_UR.shape[1]].to(dev))
        if used:
            index = torch.tensor(used, device=dev)
            for name, lora_layer in self.lora.layers.items():
                a, bt = snap.a_P[name], snap.bt_P[name]
                a.zero_()
                bt.zero_()
                a[: len(used) * rank] = lora_layer.lora_A_S_R_I[index].reshape(-1, a.shape[1])
                scaled = lora_layer.lora_B_S_O_R[index] * lora_layer.scale_S[index][:, None, None]
                bt[: len(used) * rank] = scaled.transpose(1, 2).reshape(-1, bt.shape[1])

    # ---- buffers and graphs ----------------------------------------------------------------

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
            pos0_B=torch.zeros(rows, dtype=torch.long, device=dev),
            pad_B=torch.zeros(rows, dtype=torch.long, device=dev),
            col0=torch.zeros((), dtype=torch.long, device=dev),
            step=torch.zeros((), dtype=torch.long, device=dev),
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

    def _snapshot_for(self, rows: int, u_bucket: int) -> _Snapshot:
        key = (rows, u_bucket)
        snap = self._snapshots.get(key)
        # layers wrapped after the snapshot was made (a new adapter's targets) need a new one
        if snap is not None and snap.a_P.keys() == self.lora.layers.keys():
            return snap
        width = u_bucket * self.lora.max_rank
        dev, dtype = self.device, self.lora.dtype
        a_P, bt_P = {}, {}
        for name, layer in self.lora.layers.items():
            a_P[name] = torch.zeros(width, layer.base.in_features, device=dev, dtype=dtype)
            bt_P[name] = torch.zeros(width, layer.base.out_features, device=dev, dtype=dtype)
        snap = _Snapshot(
            a_P=a_P, bt_P=bt_P, mix_B_UR=torch.zeros(rows, width, device=dev, dtype=dtype)
        )
        self._snapshots[key] = snap
        self._name_of = {id(layer): name for name, layer in self.lora.layers.items()}
        for gkey in [g for g in self._graphs if g[0] == rows and g[2] == u_bucket]:
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
        key = (rows, length, u, mode)
        fn = self._graphs.get(key)
        if fn is not None:
            self._graphs.move_to_end(key)
            return fn

        def eager() -> None:
            self._step(buf, snap, mode)

        if self.graphs:
            # the warm-up runs really execute: point them at valid columns (a fresh buffer's
            # step 0 would write column -1); the batch's fill overwrites what they scribble
            buf.step.fill_(1)
            buf.col0.fill_(0)
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
        """One token for every row: reads ``token_B`` and ``step``, writes column ``step``."""
        inner = self.model.model
        rows = buf.token_B.shape[0]
        step_1 = buf.step.view(1)
        col_1 = buf.col0.view(1) + step_1 - 1
        pos_B_1 = (buf.pos0_B + buf.step - 1)[:, None]
        arange_T = buf.arange_T
        mask_B_1_1_T = ((arange_T[None, :] >= buf.pad_B[:, None]) & (arange_T[None, :] <= col_1))[
            :, None, None, :
        ]
        x_B_1_H = inner.embed_tokens(buf.token_B[:, None])
        cos, sin = inner.rotary_emb(x_B_1_H, pos_B_1)
        cos_B_1_1_D = cos[:, None]
        # rotate-half as a swap of the halves times a sign-folded sine: 3 kernels, not 5
        half = self.head_dim // 2
        sin_B_1_1_D = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        x_B_H = x_B_1_H[:, 0]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h_B_H = _rms_norm(layer.input_layernorm, x_B_H)
            q = self._proj(attn.q_proj, h_B_H, snap).view(rows, self.heads, self.head_dim)
            k = self._proj(attn.k_proj, h_B_H, snap).view(rows, self.kv_heads, self.head_dim)
            v = self._proj(attn.v_proj, h_B_H, snap).view(rows, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
            q_B_1_1_D = q[:, :, None]  # (rows, heads, 1, head_dim)
            k_B_1_1_D = k[:, :, None]
            q_B_1_1_D = _rope(q_B_1_1_D, cos_B_1_1_D, sin_B_1_1_D)
            k_B_1_1_D = _rope(k_B_1_1_D, cos_B_1_1_D, sin_B_1_1_D)
            buf.k_L[i].index_copy_(2, col_1, k_B_1_1_D)
            buf.v_L[i].index_copy_(2, col_1, v[:, :, None])
            out = F.scaled_dot_product_attention(
                q_B_1_1_D,
                buf.k_L[i],
                buf.v_L[i],
                attn_mask=mask_B_1_1_T,
                scale=attn.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x_B_H = x_B_H + self._proj(attn.o_proj, out.reshape(rows, -1), snap)
            mlp = layer.mlp
            h_B_H = _rms_norm(layer.post_attention_layernorm, x_B_H)
            gate = self._proj(mlp.gate_proj, h_B_H, snap)
            up = self._proj(mlp.up_proj, h_B_H, snap)
            x_B_H = x_B_H + self._proj(mlp.down_proj, mlp.act_fn(gate) * up, snap)
        logits_B_V = self.model.get_output_embeddings()(_rms_norm(inner.norm, x_B_H)).float()
        self._sample_into(buf, logits_B_V, mode)
        buf.step.add_(1)

    def _proj(self, module: nn.Module, x_B_I: torch.Tensor, snap: _Snapshot) -> torch.Tensor:
        if not isinstance(module, MultiLoraLinear):
            assert isinstance(module, nn.Linear), f"unsupported projection {type(module)}"
            return F.linear(x_B_I, module.weight, module.bias)
        base = module.base
        y_B_O = F.linear(x_B_I, base.weight, base.bias)
        if snap.mix_B_UR.shape[1] == 0:
            return y_B_O
        name = self._name_of[id(module)]
        u_B_UR = (x_B_I @ snap.a_P[name].T) * snap.mix_B_UR
        return torch.addmm(y_B_O, u_B_UR, snap.bt_P[name])

    def _sample_into(self, buf: _Buffers, logits_B_V: torch.Tensor, mode: SamplingMode) -> None:
        step_1 = buf.step.view(1)
        uniform_B = buf.uniform_B_N.index_select(1, step_1)[:, 0]
        token_B, logprob_B = sample_tokens_static_B(
            logits_B_V,
            buf.temperature_B,
            buf.top_k_B,
            buf.top_p_B,
            uniform_B,
            filtered=mode == "filtered",
            greedy_only=mode == "greedy",
        )
        buf.token_B_N.index_copy_(1, step_1, token_B[:, None])
        buf.logprob_B_N.index_copy_(1, step_1, logprob_B[:, None])
        buf.token_B.copy_(token_B)
        stopped_B = (token_B[:, None] == buf.stop_B_K).any(-1) | (buf.step + 1 >= buf.max_new_B)
        buf.done_B.logical_or_(stopped_B)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, with ``signed_sin`` = ``[-sin_1, sin_2]``:
    ``rotate_half(x) * sin`` is ``[x_2, x_1] * [-sin_1, sin_2]``, the same products."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module as one fused ``F.rms_norm`` (HF's is about eight kernels)."""
    eps: float = getattr(module, "variance_epsilon", None) or getattr(module, "eps")  # noqa: B009
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of an HF ``DynamicCache`` (``(rows, kv_heads, T, D)``)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
