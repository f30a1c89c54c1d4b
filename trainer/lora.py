"""Slot layers: one frozen ``nn.Linear`` plus ``S`` LoRA adapters, routed per batch row.

The math, for a row ``b`` routed to slot ``s`` with rank ``r_s`` and alpha ``α_s``::

    y_b = W x_b + bias + (α_s / r_s) · B_s A_s x_b        A_s: [r_s, in], B_s: [out, r_s]

Rows routed to :data:`BASE_SLOT` get ``W x_b + bias`` exactly (bit for bit the frozen layer's
output: the adapter delta is only ever added to the other rows, never a computed zero).

Storage. Every slot tensor of a model lives in one :class:`SlotStore` buffer ``weight_S_R_Q``
(``Q`` = the summed widths of all layers' ``A`` and ``Bᵀ``), so slot ``s`` is one contiguous
``[R, Q]`` block and its true-rank part ``[:r_s]`` is one contiguous prefix. A layer's
``lora_A`` (``[S, R, in]``) and ``lora_Bt`` (``[S, R, out]``, i.e. B transposed) are views
into it, and their ``.grad`` are views into ``grad_S_R_Q``. The optimizer then works on whole
slots with a handful of kernels instead of one per layer, and the padded ranks ``[r_s:]`` are
never touched by it. Padded rows of ``A`` and of ``Bᵀ`` are zero, which makes every gradient
reaching them exactly zero (``h[:, r_s:] = x A[r_s:]ᵀ = 0`` and ``dA[r_s:] = (dy B[:, r_s:])ᵀ x
= 0``); the loop path also slices to the true rank, and the optimizer masks ``[r_s:]``.
Because parameters are views, never move a slot model with ``.to()``; build it on its device.

Routing. HF models do not pass slot ids to their linears, so all slot layers of one model share
one :class:`SlotRouting`; the model wrapper sets a :class:`RoutingPlan` for the duration of a
forward (rows sorted by slot, segment offsets, per-row scales), built once and reused by every
layer. A forward without a plan raises :class:`SlotError`.

Compute paths (one function, :func:`slot_delta`): ``loop`` (per present slot, true-rank
slices; the CPU default) and ``segments``/``grouped_mm`` (rows sorted by slot, one grouped
matmul over the token segments with ``torch._grouped_mm`` when the torch build, device and dtype
support it — bf16 on sm90+ — else one matmul per segment). They agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from events.errors import MultiLoraError

BASE_SLOT = -1
"""Slot id of rows that use the frozen base model only (no adapter)."""

Kernel = Literal["auto", "loop", "segments", "grouped_mm"]
KERNELS: tuple[Kernel, ...] = ("auto", "loop", "segments", "grouped_mm")
_ALIGN = 16  # elements; keeps every view 16-byte aligned for grouped GEMM kernels


class SlotError(MultiLoraError):
    """A slot id, slot configuration or routing is invalid for this slot model."""


class SlotTable:
    """Rank and alpha of each of ``num_slots`` slots; shared by all slot layers of a model.

    ``scale_S`` (float32, on the model's device) holds ``alpha / rank`` per configured slot and
    0 for free slots. Rank 0 means the slot is free; routing rows to a free slot raises.
    """

    def __init__(self, num_slots: int, max_rank: int, device: torch.device) -> None:
        if num_slots < 1 or max_rank < 1:
            raise SlotError(f"num_slots={num_slots} and max_rank={max_rank} must both be >= 1")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._ranks = [0] * num_slots
        self._alphas = [0.0] * num_slots
        self.scale_S = torch.zeros(num_slots, dtype=torch.float32, device=device)

    def check_slot(self, slot: int) -> None:
        """Raise :class:`SlotError` unless ``0 <= slot < num_slots``."""
        if not 0 <= slot < self.num_slots:
            raise SlotError(
                f"slot {slot} is out of range; this model has slots 0..{self.num_slots - 1}"
            )

    def configure(self, slot: int, rank: int, alpha: float) -> None:
        """Set ``slot``'s rank (1..max_rank) and alpha (> 0); scale becomes ``alpha / rank``."""
        self.check_slot(slot)
        if not 1 <= rank <= self.max_rank:
            raise SlotError(
                f"rank {rank} for slot {slot} is outside 1..{self.max_rank} (the model's "
                "max_rank); build the model with a larger max_rank or lower the adapter's rank"
            )
        if not alpha > 0 or alpha == float("inf"):
            raise SlotError(f"lora_alpha {alpha} for slot {slot} must be a finite number > 0")
        self._ranks[slot] = rank
        self._alphas[slot] = float(alpha)
        self.scale_S[slot] = float(alpha) / rank

    def release(self, slot: int) -> None:
        """Mark ``slot`` free (rank 0); rows routed to it then raise."""
        self.check_slot(slot)
        self._ranks[slot] = 0
        self._alphas[slot] = 0.0
        self.scale_S[slot] = 0.0

    def rank(self, slot: int) -> int:
        """True rank of ``slot``; 0 when free."""
        self.check_slot(slot)
        return self._ranks[slot]

    def alpha(self, slot: int) -> float:
        self.check_slot(slot)
        return self._alphas[slot]

    def is_configured(self, slot: int) -> bool:
        return self.rank(slot) > 0


class SlotStore:
    """One flat buffer for every slot tensor of a model, and one for their gradients.

    ``weight_S_R_Q`` / ``grad_S_R_Q`` have shape ``[num_slots, max_rank, Q]``; :meth:`new_param`
    carves a ``[S, R, width]`` parameter out of it whose ``.grad`` is the matching view of
    ``grad_S_R_Q`` (autograd accumulates into an existing ``.grad`` in place). Widths are padded
    to 16 elements so every view stays 16-byte aligned.
    """

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        widths: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.offsets: list[int] = []
        total = 0
        for width in widths:
            self.offsets.append(total)
            total += -(-width // _ALIGN) * _ALIGN
        self.widths = list(widths)
        self.weight_S_R_Q = torch.zeros(num_slots, max_rank, total, dtype=dtype, device=device)
        self.grad_S_R_Q = torch.zeros_like(self.weight_S_R_Q)
        self._params: list[tuple[nn.Parameter, Tensor]] = []

    @property
    def width(self) -> int:
        """``Q``: elements per rank row of one slot (all layers, padded)."""
        return self.weight_S_R_Q.shape[2]

    def new_param(self, index: int) -> nn.Parameter:
        """The parameter view for segment ``index`` (``[S, R, widths[index]]``), grad attached."""
        lo, width = self.offsets[index], self.widths[index]
        param = nn.Parameter(self.weight_S_R_Q[:, :, lo : lo + width])
        grad = self.grad_S_R_Q[:, :, lo : lo + width]
        param.grad = grad
        self._params.append((param, grad))
        return param

    def grads_attached(self) -> bool:
        """True when every parameter's ``.grad`` is still its view into ``grad_S_R_Q``."""
        return all(
            p.grad is not None
            and p.grad.data_ptr() == g.data_ptr()
            and p.grad.stride() == g.stride()
            for p, g in self._params
        )

    def zero_grad(self) -> None:
        """Zero all slot gradients in place and re-attach any ``.grad`` that was replaced."""
        self.grad_S_R_Q.zero_()
        for param, grad in self._params:
            param.grad = grad


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, end)`` of the slot-sorted batch belong to ``slot`` (true rank ``rank``)."""

    slot: int
    start: int
    end: int
    rank: int


@dataclass(frozen=True)
class RoutingPlan:
    """Per-forward routing shared by all slot layers; built once by :meth:`SlotRouting.route`.

    ``rows_N`` are the adapter rows (slot != BASE_SLOT) of the batch, stably sorted by slot;
    ``scale_N`` their ``alpha/rank``; ``present_P`` the ``P`` slots present, ascending (group
    ``g`` of the grouped GEMM is slot ``present_P[g]``) and ``offsets_P`` (int32) the cumulative
    *token* count of each group (``_grouped_mm``'s ``offs``); ``row_span`` is ``(lo, hi)`` when
    ``rows_N`` is the contiguous range ``lo..hi-1`` (then layers slice instead of gather/scatter;
    the train step sorts rows so this holds).
    """

    slot_ids_B: Tensor
    batch_size: int
    seq_len: int
    rows_N: Tensor
    scale_N: Tensor
    present_P: Tensor
    offsets_P: Tensor
    segments: tuple[Segment, ...]
    row_span: tuple[int, int] | None

    @property
    def num_adapter_rows(self) -> int:
        return int(self.rows_N.shape[0])

    @property
    def present_slots(self) -> tuple[int, ...]:
        return tuple(seg.slot for seg in self.segments)


class SlotRouting:
    """Holds the :class:`RoutingPlan` of the forward in progress for one model's slot layers."""

    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self._plan: RoutingPlan | None = None

    def plan(self) -> RoutingPlan:
        """The active plan; raises :class:`SlotError` naming the fix when none is set."""
        if self._plan is None:
            raise SlotError(
                "slot layer called without routing: run the model through MultiLoraModel.forward/"
                "logprobs, or wrap the call in `with model.routing.route(slot_ids_B, seq_len):`"
            )
        return self._plan

    @contextmanager
    def route(self, slot_ids_B: Tensor | Sequence[int], seq_len: int) -> Iterator[RoutingPlan]:
        """Validate ``slot_ids_B`` (one id per row) and set the plan for the ``with`` body."""
        if self._plan is not None:
            raise SlotError(
                "routing is already set; nested forwards on one slot model are not allowed"
            )
        self._plan = self._build(slot_ids_B, seq_len)
        try:
            yield self._plan
        finally:
            self._plan = None

    def _build(self, slot_ids: Tensor | Sequence[int], seq_len: int) -> RoutingPlan:
        table = self.table
        device = table.scale_S.device
        ids = torch.as_tensor(slot_ids, dtype=torch.long).to(device).reshape(-1)
        ids_list = ids.tolist()
        bad = sorted({s for s in ids_list if s != BASE_SLOT and not 0 <= s < table.num_slots})
        if bad:
            raise SlotError(
                f"slot ids {bad} are out of range; use 0..{table.num_slots - 1} or "
                f"BASE_SLOT={BASE_SLOT}"
            )
        free = sorted({s for s in ids_list if s != BASE_SLOT and not table.is_configured(s)})
        if free:
            raise SlotError(f"slots {free} are not configured; call configure_slot first")
        order = sorted((s, b) for b, s in enumerate(ids_list) if s != BASE_SLOT)
        rows = [b for _, b in order]
        counts_S = [0] * table.num_slots
        for s, _ in order:
            counts_S[s] += 1
        segments, start = [], 0
        for s, count in enumerate(counts_S):
            if count:
                segments.append(Segment(s, start, start + count, table.rank(s)))
                start += count
        counts_P = [seg.end - seg.start for seg in segments]
        offsets_P = torch.tensor(counts_P, dtype=torch.int64).cumsum(0) * seq_len
        rows_N = torch.tensor(rows, dtype=torch.long, device=device)
        return RoutingPlan(
            slot_ids_B=ids,
            batch_size=len(ids_list),
            seq_len=seq_len,
            rows_N=rows_N,
            scale_N=table.scale_S[ids[rows_N]] if rows else table.scale_S[:0],
            present_P=torch.tensor([seg.slot for seg in segments], dtype=torch.long, device=device),
            offsets_P=offsets_P.to(device=device, dtype=torch.int32),
            segments=tuple(segments),
            row_span=(rows[0], rows[-1] + 1)
            if rows and rows == list(range(rows[0], rows[-1] + 1))
            else None,
        )


def grouped_mm_supported(x: Tensor, *weights: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands fast on this build and device.

    True only for CUDA bf16 on compute capability >= 9.0 with 16-byte aligned strides and
    pointers (the kernel's requirements); everything else takes the per-segment fallback.
    """
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    for t in (x, *weights):
        if t.dtype != torch.bfloat16 or t.data_ptr() % 16:
            return False
        if any(st % 8 for st, n in zip(t.stride(), t.shape, strict=True) if st != 1 and n > 1):
            return False
    return True


def slot_delta(
    x_N_T_I: Tensor, lora_A: Tensor, lora_Bt: Tensor, plan: RoutingPlan, kernel: Kernel
) -> Tensor:
    """The adapter term ``(α_s/r_s) · x A_sᵀ B_sᵀ`` for the slot-sorted adapter rows.

    ``x_N_T_I``: inputs of ``plan.rows_N`` in that order; ``lora_A``: ``[S, R, in]``;
    ``lora_Bt``: ``[S, R, out]``. Returns ``[N, T, out]`` in ``x``'s dtype. ``kernel`` picks the
    path (``auto``: grouped on CUDA, loop elsewhere); all paths give the same values. The
    ``torch._grouped_mm`` kernel is used (in ``auto``/``segments``) only when
    :func:`grouped_mm_supported` holds and ``T`` is a multiple of 8, so that every token segment
    starts 16-byte aligned for the weight-gradient GEMM; the train step pads ``T`` accordingly.
    """
    if kernel == "auto":
        kernel = "segments" if x_N_T_I.is_cuda else "loop"
    n, t, _ = x_N_T_I.shape
    dtype = x_N_T_I.dtype
    scale_N = plan.scale_N.to(dtype)
    if kernel == "loop":
        # unbind, not A[slot]: its backward builds the [S, ...] gradient once, not per segment
        a_R_I, bt_R_O = lora_A.unbind(0), lora_Bt.unbind(0)
        pieces = []
        for seg in plan.segments:
            h = x_N_T_I[seg.start : seg.end] @ a_R_I[seg.slot][: seg.rank].to(dtype).T
            h = h * scale_N[seg.start : seg.end, None, None]
            pieces.append(h @ bt_R_O[seg.slot][: seg.rank].to(dtype))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    # Grouped: only the present slots' weights take part (gathered and cast once per layer).
    if len(plan.segments) < lora_A.shape[0]:
        lora_A, lora_Bt = (
            lora_A.index_select(0, plan.present_P),
            lora_Bt.index_select(0, plan.present_P),
        )
    a_P_I_R = lora_A.to(dtype).transpose(1, 2)
    bt_P_R_O = lora_Bt.to(dtype)
    x_M_I = x_N_T_I.reshape(n * t, -1)
    # The kernel's weight-gradient GEMM runs over token segments; keep their offsets aligned.
    use_kernel = kernel == "grouped_mm" or (
        t % 8 == 0 and grouped_mm_supported(x_M_I, a_P_I_R, bt_P_R_O)
    )
    h_M_R = _grouped(x_M_I, a_P_I_R, plan, use_kernel)
    h_M_R = (h_M_R.view(n, t, -1) * scale_N[:, None, None]).view(n * t, -1)
    return _grouped(h_M_R, bt_P_R_O, plan, use_kernel).view(n, t, -1)


def _grouped(x_M_K: Tensor, w_P_K_N: Tensor, plan: RoutingPlan, use_kernel: bool) -> Tensor:
    """``out[m] = x[m] @ w[group(m)]`` over the slot-sorted token segments (one group each)."""
    if use_kernel:
        return torch._grouped_mm(x_M_K, w_P_K_N, offs=plan.offsets_P)
    t, w_K_N = plan.seq_len, w_P_K_N.unbind(0)
    pieces = [x_M_K[s.start * t : s.end * t] @ w_K_N[g] for g, s in enumerate(plan.segments)]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class SlotLinear(nn.Module):
    """A frozen ``nn.Linear`` with ``S`` LoRA slots; see the module docstring for the math.

    ``lora_A`` (``[S, R, in]``) and ``lora_Bt`` (``[S, R, out]``) are views into the model's
    :class:`SlotStore`; ``routing`` is the model's shared :class:`SlotRouting`. Input
    ``[B, T, in]`` (rows = the plan's batch rows) → output ``[B, T, out]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_A: nn.Parameter,
        lora_Bt: nn.Parameter,
        routing: SlotRouting,
        kernel: Kernel,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise SlotError(f"unknown slot kernel {kernel!r}; use one of {KERNELS}")
        base.requires_grad_(False)
        self.base = base
        self.lora_A = lora_A
        self.lora_Bt = lora_Bt
        self.routing = routing
        self.kernel: Kernel = kernel

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        plan = self.routing.plan()
        base_out = self.base(x)
        if plan.num_adapter_rows == 0:
            return base_out
        if x.shape[0] != plan.batch_size or x.shape[1] != plan.seq_len:
            raise SlotError(
                f"slot layer input {tuple(x.shape)} does not match the routed batch "
                f"[{plan.batch_size}, {plan.seq_len}, ...]; route with the tokens' [B, T]"
            )
        if plan.row_span is not None:
            lo, hi = plan.row_span
            if (lo, hi) == (0, plan.batch_size):
                return base_out + slot_delta(x, self.lora_A, self.lora_Bt, plan, self.kernel)
            delta = slot_delta(x[lo:hi], self.lora_A, self.lora_Bt, plan, self.kernel)
            return torch.cat([base_out[:lo], base_out[lo:hi] + delta, base_out[hi:]])
        x_sel = x.index_select(0, plan.rows_N)
        delta = slot_delta(x_sel, self.lora_A, self.lora_Bt, plan, self.kernel)
        return base_out.index_add(0, plan.rows_N, delta.to(base_out.dtype))
