"""Triton kernels of the static decoder: attention over each row's own columns, and LoRA by segment.

**Decode attention.** One query token per row against that row's K/V buffer row, columns
``[0, pos_b]``::

    out[b, h] = softmax(scale * q[b, h] . K[b, h // G, :pos_b + 1]) @ V[b, h // G, :pos_b + 1]

``G`` = query heads per K/V head (grouped-query attention). The buffers are sized for the
longest row of a run, so SDPA under a mask reads every column of every row at every step
(twice the written columns on average for a GRPO call, and more than the model's weights at
64 rows of Qwen3-0.6B). :func:`decode_attention` loops over the row's own columns instead, one
program per (row, K/V head) with its ``G`` query heads as one tile, online softmax in fp32
(flash-decoding without the split: rows x K/V heads programs fill the GPU at the batch sizes
the decoder runs). The loop bound is read from ``pos_B`` on the device, so a captured CUDA
graph replays it for any positions.

**LoRA by segment.** The dense form of the adapters (:mod:`rollout.graph_decode`) is three
kernels per projection (shrink over every adapter of the run, the row mask, the expand) and
does every adapter's work for every row. :func:`lora_delta_` is one kernel per projection
that does each row's own adapter only: the rows of adapter ``u`` are listed in
``rows_U_M[u, :count_U[u]]`` (kept by the decoder as rows join and leave), and program
``(u, column block)`` computes ``x[rows] @ A_u^T`` for its rows, 16 at a time, then adds
``(...) @ Bt_u[:, block]`` into those rows of ``y`` in place. Base rows are in no list.

Both only for CUDA tensors in bf16 / fp16 (:func:`supported`);
:class:`~rollout.graph_decode.StaticDecoder` keeps SDPA and the dense LoRA products otherwise
(and on CPU, where Triton does not run).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None

BLOCK_T = 64
"""Cache columns an attention program reads per iteration."""
LORA_BLOCK_M = 16
LORA_BLOCK_I = 128
LORA_BLOCK_O = 256


def supported(x: torch.Tensor, head_dim: int | None = None) -> bool:
    """Whether the kernels run for tensors like ``x`` (and :func:`decode_attention` for this
    head dim: a power of two, at least 16)."""
    fits = head_dim is None or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and fits


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


def lora_delta_(
    y_B_O: torch.Tensor,
    x_B_I: torch.Tensor,
    a_UR_I: torch.Tensor,
    bt_UR_O: torch.Tensor,
    rows_U_M: torch.Tensor,
    count_U: torch.Tensor,
    rank: int,
) -> None:
    """``y[b] += (x[b] @ A_u^T) @ Bt_u`` for every row ``b`` listed for adapter ``u`` (module
    doc), in place. ``a_UR_I`` / ``bt_UR_O``: adapter ``u``'s rows ``[u * rank, (u+1) * rank)``
    (``Bt`` = ``scale * B^T``); ``y_B_O`` may be a column slice (unit column stride);
    ``rows_U_M`` int32 (adapters, rows), ``count_U`` int32."""
    adapters, out = rows_U_M.shape[0], y_B_O.shape[1]
    fan_in = x_B_I.shape[1]
    assert y_B_O.stride(1) == 1 and x_B_I.stride(1) == 1, "unit column strides"
    grid = (adapters, triton.cdiv(out, LORA_BLOCK_O))
    _lora_kernel[grid](
        y_B_O,
        x_B_I,
        a_UR_I,
        bt_UR_O,
        rows_U_M,
        count_U,
        y_B_O.stride(0),
        x_B_I.stride(0),
        a_UR_I.stride(0),
        bt_UR_O.stride(0),
        rows_U_M.stride(0),
        fan_in,
        out,
        RANK=rank,
        RANK_PAD=max(16, triton.next_power_of_2(rank)),
        BLOCK_M=LORA_BLOCK_M,
        BLOCK_I=LORA_BLOCK_I,
        BLOCK_O=LORA_BLOCK_O,
        num_warps=4,
    )


if triton is not None:

    @triton.jit
    def _lora_kernel(  # type: ignore[no-untyped-def]
        y_ptr,
        x_ptr,
        a_ptr,
        bt_ptr,
        rows_ptr,
        count_ptr,
        y_sb,
        x_sb,
        a_sr,
        bt_sr,
        rows_su,
        fan_in,
        out,
        RANK: tl.constexpr,
        RANK_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        u = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        count = tl.load(count_ptr + u)
        r = tl.arange(0, RANK_PAD)
        real_r = r < RANK
        a_rows = a_ptr + (u * RANK + r)[:, None] * a_sr
        bt = tl.load(
            bt_ptr + (u * RANK + r)[:, None] * bt_sr + cols[None, :],
            mask=real_r[:, None] & (cols[None, :] < out),
            other=0.0,
        )
        for m0 in range(0, count, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            listed = m < count
            row = tl.load(rows_ptr + u * rows_su + m, mask=listed, other=0)
            h = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
            for i0 in range(0, fan_in, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                inside = i < fan_in
                x = tl.load(
                    x_ptr + row[:, None] * x_sb + i[None, :],
                    mask=listed[:, None] & inside[None, :],
                    other=0.0,
                )
                a = tl.load(a_rows + i[None, :], mask=real_r[:, None] & inside[None, :], other=0.0)
                h += tl.dot(x, tl.trans(a))
            delta = tl.dot(h.to(bt.dtype), bt)
            at = y_ptr + row[:, None] * y_sb + cols[None, :]
            keep = listed[:, None] & (cols[None, :] < out)
            y = tl.load(at, mask=keep, other=0.0)
            tl.store(at, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=keep)

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
