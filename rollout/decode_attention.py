"""Decode attention for the static decoder: each row reads only the cache columns it has written.

One query token per row against that row's K/V buffer row, columns ``[0, pos_b]``::

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G, :pos_b + 1]) @ V[b, h // G, :pos_b + 1]

``G`` = query heads per K/V head (grouped-query attention). The buffers are sized for the
longest row of a run, so SDPA under a mask reads every column of every row at every step
(twice the written columns on average for a GRPO call, and more than the model's weights at
64 rows of Qwen3-0.6B). This Triton kernel loops over the row's own columns instead, one
program per (row, K/V head) with its ``G`` query heads as one tile, online softmax in fp32
(flash-decoding without the split: rows x K/V heads programs fill the GPU at the batch sizes
the decoder runs). The loop bound is read from ``pos_B`` on the device, so a captured CUDA
graph replays it for any positions.

**The prologue** (:func:`qk_rope_cache`): between the q/k/v product and attention the torch
step runs up to ten small kernels a layer (the q and k RMSNorms of Qwen3, RoPE on q and on k,
the K and V writes into the cache). This kernel does all of it in one launch, one program per
(row, head) over the query and K/V heads: the head's vector is read once, normalised (fp32),
rotated with the row's ``cos`` / ``sin``, and written, the query heads to a new tensor and the
K/V heads into the cache column ``pos_b``. It is the same maths as the torch path rounded once
instead of after each op, so it agrees to bf16 rounding, not bit for bit.

Only for CUDA tensors in bf16 / fp16 with a power-of-two head dim; :func:`supported` says
whether they apply, and :class:`~rollout.graph_decode.StaticDecoder` keeps the torch ops
otherwise (and on CPU, where Triton does not run).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BLOCK_T = 64
"""Cache columns a program reads per iteration."""


def supported(q: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`decode_attention` runs for queries like ``q`` with this head dim."""
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def decode_attention(
    q_B_H_D: torch.Tensor,
    k_B_K_T_D: torch.Tensor,
    v_B_K_T_D: torch.Tensor,
    pos_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per row over columns ``[0, pos_B[b]]`` of its K/V (module doc).

    ``q_B_H_D`` (rows, heads, head_dim); ``k``/``v`` (rows, kv_heads, length, head_dim) with a
    unit stride on the head dim; ``pos_B`` (rows,) integer, each ``< length``. Returns
    (rows, heads, head_dim), contiguous, in ``q``'s dtype.
    """
    rows, heads, dim = q_B_H_D.shape
    kv_heads = k_B_K_T_D.shape[1]
    group = heads // kv_heads
    out = torch.empty((rows, heads, dim), dtype=q_B_H_D.dtype, device=q_B_H_D.device)
    q_str, k_str, v_str = q_B_H_D.stride(), k_B_K_T_D.stride(), v_B_K_T_D.stride()
    _kernel[(rows, kv_heads)](
        q_B_H_D,
        k_B_K_T_D,
        v_B_K_T_D,
        out,
        pos_B,
        scale,
        *q_str[:2],
        *k_str[:3],
        *v_str[:3],
        *out.stride()[:2],
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        BLOCK=BLOCK_T,
        num_warps=4,
    )
    return out


def qk_rope_cache(
    q_B_H_D: torch.Tensor,
    k_B_K_D: torch.Tensor,
    v_B_K_D: torch.Tensor,
    norms: tuple[torch.Tensor, float, torch.Tensor, float] | None,
    cos_B_D: torch.Tensor,
    sin_B_D: torch.Tensor,
    pos_B: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """The query heads normalised (``norms``: q weight and eps, k weight and eps; ``None``: no
    q/k norm)
    and rotated, returned as a new (rows, heads, head_dim) tensor; the key heads the same and,
    with the value heads, written into column ``pos_B[b]`` of the caches (module doc).

    ``q``/``k``/``v`` may be column views of one product (unit stride on the head dim);
    ``cos_B_D`` / ``sin_B_D``: the model's rotary tables at each row's position."""
    rows, heads, dim = q_B_H_D.shape
    kv_heads = k_B_K_D.shape[1]
    out = torch.empty((rows, heads, dim), dtype=q_B_H_D.dtype, device=q_B_H_D.device)
    q_w, q_eps, k_w, k_eps = norms if norms is not None else (q_B_H_D, 0.0, q_B_H_D, 0.0)
    _prologue[(rows, heads + kv_heads)](
        q_B_H_D,
        k_B_K_D,
        v_B_K_D,
        q_w,
        k_w,
        cos_B_D,
        sin_B_D,
        pos_B,
        k_cache,
        v_cache,
        out,
        *q_B_H_D.stride()[:2],
        *k_B_K_D.stride()[:2],
        *v_B_K_D.stride()[:2],
        cos_B_D.stride(0),
        sin_B_D.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out.stride()[:2],
        q_eps,
        k_eps,
        HEADS=heads,
        HALF=dim // 2,
        NORM=norms is not None,
        num_warps=1,
    )
    return out


if triton is not None:

    @triton.jit
    def _prologue(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        qw_ptr,
        kw_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        kc_ptr,
        vc_ptr,
        o_ptr,
        q_sb,
        q_sh,
        k_sb,
        k_sh,
        v_sb,
        v_sh,
        cos_sb,
        sin_sb,
        kc_sb,
        kc_sh,
        kc_st,
        vc_sb,
        vc_sh,
        vc_st,
        o_sb,
        o_sh,
        q_eps,
        k_eps,
        HEADS: tl.constexpr,
        HALF: tl.constexpr,
        NORM: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, HALF)
        is_q = head < HEADS
        kv = tl.maximum(head - HEADS, 0)
        src = tl.where(is_q, q_ptr + row * q_sb + head * q_sh, k_ptr + row * k_sb + kv * k_sh)
        x1 = tl.load(src + d).to(tl.float32)
        x2 = tl.load(src + HALF + d).to(tl.float32)
        if NORM:
            eps = tl.where(is_q, q_eps, k_eps)
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
            w = tl.where(is_q, qw_ptr, kw_ptr)
            x1 = x1 * inv * tl.load(w + d).to(tl.float32)
            x2 = x2 * inv * tl.load(w + HALF + d).to(tl.float32)
        cos1 = tl.load(cos_ptr + row * cos_sb + d).to(tl.float32)
        cos2 = tl.load(cos_ptr + row * cos_sb + HALF + d).to(tl.float32)
        sin1 = tl.load(sin_ptr + row * sin_sb + d).to(tl.float32)
        sin2 = tl.load(sin_ptr + row * sin_sb + HALF + d).to(tl.float32)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
        pos = tl.load(pos_ptr + row)
        dst = tl.where(is_q, o_ptr + row * o_sb + head * o_sh, kc_ptr + row * kc_sb + kv * kc_sh)
        dst = tl.where(is_q, dst, dst + pos * kc_st)
        tl.store(dst + d, y1.to(o_ptr.dtype.element_ty))
        tl.store(dst + HALF + d, y2.to(o_ptr.dtype.element_ty))
        if head >= HEADS:
            v_src = v_ptr + row * v_sb + kv * v_sh
            v_dst = vc_ptr + row * vc_sb + kv * vc_sh + pos * vc_st
            tl.store(v_dst + d, tl.load(v_src + d))
            tl.store(v_dst + HALF + d, tl.load(v_src + HALF + d))

    @triton.jit
    def _kernel(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        pos_ptr,
        scale,
        q_sb,
        q_sh,
        k_sb,
        k_sh,
        k_st,
        v_sb,
        v_sh,
        v_st,
        o_sb,
        o_sh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        last = tl.load(pos_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        heads = kv_head * GROUP + g
        real = g < GROUP
        q_at = q_ptr + row * q_sb + heads[:, None] * q_sh + d[None, :]
        q = tl.load(q_at, mask=real[:, None], other=0.0)
        k_row = k_ptr + row * k_sb + kv_head * k_sh
        v_row = v_ptr + row * v_sb + kv_head * v_sh
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM), dtype=tl.float32)
        for start in range(0, last + 1, BLOCK):
            t = start + tl.arange(0, BLOCK)
            seen = t <= last
            k = tl.load(k_row + t[:, None] * k_st + d[None, :], mask=seen[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(seen[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_row + t[:, None] * v_st + d[None, :], mask=seen[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / total[:, None]
        o = o_ptr + row * o_sb + heads[:, None] * o_sh + d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=real[:, None])
