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

Only for CUDA tensors in bf16 / fp16 with a power-of-two head dim; :func:`supported` says
whether it applies, and :class:`~rollout.graph_decode.StaticDecoder` keeps SDPA otherwise
(and on CPU, where Triton does not run).
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


if triton is not None:

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
