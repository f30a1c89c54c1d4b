"""Inference-only mixed-adapter LoRA over a Hugging Face causal LM.

Each target linear layer is wrapped by :class:`MultiLoraLinear`, which holds ``S`` adapter slots
at a common maximum rank ``R``::

    y_b = W x_b + scale[s_b] * B[s_b] (A[s_b] x_b)        s_b = slot of row b
    y_b = W x_b                                            s_b = BASE_SLOT (no adapter)

with ``A_S_R_I`` (``R x in``), ``B_S_O_R`` (``out x R``) and ``scale_S`` the adapter's PEFT
scale (:attr:`~events.adapter_format.PeftAdapter.scale`: ``alpha / r``, or ``alpha / sqrt(r)``
for rsLoRA). An adapter of rank ``r < R`` fills the first ``r`` rows of ``A``
and columns of ``B``; the zero padding contributes nothing. A layer an adapter does not target
keeps that slot zero. The layers know nothing of adapter names: the per-row slot ids are an
explicit input, set for one forward with :meth:`MultiLoraModel.route`; an id outside
``[BASE_SLOT, S)`` raises.

Two ways to compute the adapter term (same result to rounding, tested against each other):

* ``"gather"``: gather each adapter row's ``A``/``B`` and ``bmm`` — simple, any device/dtype.
* ``"grouped"``: sort the adapter tokens by slot and run two ``torch._grouped_mm`` calls (one
  segmented GEMM per projection, no per-row weight copies). Used on CUDA for bf16/fp16 when the
  feature sizes are multiples of 8 (the kernel's 16-byte alignment rule), and on CPU when this
  torch build provides it.

``"auto"`` (default) picks ``grouped`` where available, else ``gather``. The routing plan (which
rows, sort order, segment offsets) is computed once per forward and shared by all layers.

Adapters are PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``) as
written by ``PeftModel.save_pretrained``, read and validated by
:func:`events.adapter_format.read_peft_adapter` (the format's one reader and one list of supported
PEFT features); tensor names ``base_model.model.<module>.lora_A.weight`` map to the module
``<module>`` of the causal LM. This module checks an adapter against the model and fills slots.

On CUDA a load's copies run on a stream of their own, from pinned memory, and the load returns
once they are done. On the default stream they would queue behind the kernels of the batch in
flight (a CUDA-graph decoder enqueues several steps ahead), so a worker's sync would wait for
them. The slot a load writes is free, or holds a version no batch in flight uses
(:class:`~rollout.adapter_slots.AdapterSlots` pins), so the two streams never touch the same
weights; after a wrap the load stream first waits for the default stream, which zeroed the new
slot buffers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from events.adapter_format import ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterFormatError, PeftAdapter
from events.errors import MultiLoraError

BASE_SLOT = -1
"""Slot id of a row that runs the base model only."""

LoraBackend = Literal["auto", "gather", "grouped"]


class LoraError(MultiLoraError):
    """Root of the rollout LoRA layer's errors."""


class SlotRoutingError(LoraError, ValueError):
    """A slot id is outside ``[BASE_SLOT, num_slots)`` or routing was not set for a forward."""


class AdapterRankError(AdapterFormatError):
    """An adapter's rank exceeds the layer's maximum rank."""


@dataclass(frozen=True)
class RoutePlan:
    """How one forward's tokens reach the adapter slots (shared by every wrapped layer).

    ``rows_A``: batch rows that use an adapter; ``slots_A``: their slots. For the grouped path,
    ``perm_N`` lists the flattened token indices of those rows sorted by slot and ``offs_S`` the
    cumulative token count per slot (int32, ``torch._grouped_mm``'s segment ends).
    """

    rows_A: torch.Tensor
    slots_A: torch.Tensor
    perm_N: torch.Tensor
    slot_N: torch.Tensor
    offs_S: torch.Tensor


class SlotRouting:
    """The per-row slot ids of the forward in progress, read by every wrapped layer of one model.

    The routing plan is computed on the CPU from the (CPU) slot ids and copied to the model's
    device once per forward, so no layer ever waits on the GPU to learn which rows go where.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slot_ids_B: torch.Tensor | None = None  # on CPU: plans are built without a sync
        self._device = torch.device("cpu")
        self._plans: dict[int, RoutePlan] = {}

    @contextmanager
    def route(
        self, slot_ids_B: Sequence[int] | torch.Tensor, device: torch.device
    ) -> Iterator[None]:
        """Set the slot id of each batch row for the forwards inside the block."""
        ids = torch.as_tensor(slot_ids_B, dtype=torch.long).reshape(-1).cpu()
        bad = ids[(ids < BASE_SLOT) | (ids >= self.num_slots)]
        if bad.numel():
            raise SlotRoutingError(
                f"slot ids {bad.tolist()} outside [{BASE_SLOT}, "
                f"{self.num_slots}); use BASE_SLOT={BASE_SLOT} for no adapter"
            )
        self._slot_ids_B, self._device, self._plans = ids, device, {}
        try:
            yield
        finally:
            self._slot_ids_B, self._plans = None, {}

    def plan(self, batch: int, tokens: int) -> RoutePlan:
        """The routing plan for an input of ``batch`` rows of ``tokens`` tokens (memoised)."""
        if self._slot_ids_B is None:
            raise SlotRoutingError(
                "a LoRA-wrapped model ran outside MultiLoraModel.route(...); "
                "every forward needs per-row slot ids"
            )
        if batch != self._slot_ids_B.numel():
            raise SlotRoutingError(
                f"forward has {batch} rows but {self._slot_ids_B.numel()} slot ids were routed"
            )
        plan = self._plans.get(tokens)
        if plan is None:
            cpu = _make_plan(self._slot_ids_B, tokens, self.num_slots)
            moved = {f.name: getattr(cpu, f.name).to(self._device) for f in dataclasses.fields(cpu)}
            plan = self._plans[tokens] = RoutePlan(**moved)
        return plan


def _make_plan(slot_ids_B: torch.Tensor, tokens: int, num_slots: int) -> RoutePlan:
    rows_A = torch.nonzero(slot_ids_B >= 0).flatten()
    slots_A = slot_ids_B[rows_A]
    order = torch.argsort(slots_A, stable=True)
    token_T = torch.arange(tokens, device=slot_ids_B.device)
    perm_N = (rows_A[order][:, None] * tokens + token_T[None, :]).flatten()
    slot_N = slots_A[order].repeat_interleave(tokens)
    counts_S = torch.bincount(slots_A, minlength=num_slots) * tokens
    offs_S = counts_S.cumsum(0).to(torch.int32)
    return RoutePlan(rows_A=rows_A, slots_A=slots_A, perm_N=perm_N, slot_N=slot_N, offs_S=offs_S)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here for ``dtype`` (probed with a 2-group call)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        return False
    x = torch.ones(16, 16, device=device, dtype=dtype)
    w = torch.ones(2, 16, 16, device=device, dtype=dtype).transpose(1, 2)  # layout used below
    offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
    try:
        torch._grouped_mm(x, w, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _aligned(linear: nn.Linear, max_rank: int) -> bool:
    """``torch._grouped_mm`` on CUDA needs every matrix stride to be a multiple of 16 bytes."""
    if linear.weight.device.type != "cuda":
        return True
    step = 16 // linear.weight.element_size()
    return all(d % step == 0 for d in (linear.in_features, linear.out_features, max_rank))


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``num_slots`` LoRA slots of rank ``max_rank`` (module doc)."""

    lora_A_S_R_I: torch.Tensor
    lora_B_S_O_R: torch.Tensor
    scale_S: torch.Tensor

    def __init__(self, base: nn.Linear, routing: SlotRouting, max_rank: int, backend: str) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.backend = backend
        self.max_rank = max_rank
        w = base.weight
        slots = routing.num_slots
        self.register_buffer("lora_A_S_R_I", w.new_zeros(slots, max_rank, base.in_features))
        self.register_buffer("lora_B_S_O_R", w.new_zeros(slots, base.out_features, max_rank))
        self.register_buffer("scale_S", w.new_zeros(slots))

    def set_slot(self, slot: int, a_r_I: torch.Tensor, b_O_r: torch.Tensor, scale: float) -> None:
        """Write one adapter into ``slot`` (zero-padded to ``max_rank``)."""
        self.check_slot(a_r_I, b_O_r)
        rank = a_r_I.shape[0]
        self.clear_slot(slot)
        self.lora_A_S_R_I[slot, :rank].copy_(a_r_I)
        self.lora_B_S_O_R[slot, :, :rank].copy_(b_O_r)
        self.scale_S[slot] = scale

    def check_slot(self, a_r_I: torch.Tensor, b_O_r: torch.Tensor) -> None:
        """Raise unless ``lora_A``/``lora_B`` fit a slot of this layer."""
        rank = a_r_I.shape[0]
        if rank > self.max_rank:
            raise AdapterRankError(
                f"adapter rank {rank} > max_rank {self.max_rank}; raise "
                "max_lora_rank or publish a smaller adapter"
            )
        if a_r_I.shape[1] != self.base.in_features or b_O_r.shape[0] != self.base.out_features:
            raise AdapterFormatError(
                f"lora_A {tuple(a_r_I.shape)} / lora_B {tuple(b_O_r.shape)} do not fit a linear "
                f"{self.base.in_features} -> {self.base.out_features}"
            )

    def clear_slot(self, slot: int) -> None:
        self.lora_A_S_R_I[slot].zero_()
        self.lora_B_S_O_R[slot].zero_()
        self.scale_S[slot] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus each adapter row's LoRA term, added in place into the fresh output
        (inference only: no gradient flows into the slots)."""
        y = self.base(x)
        if x.ndim != 3:
            raise SlotRoutingError(
                f"MultiLoraLinear expects (batch, tokens, features), got {tuple(x.shape)}"
            )
        plan = self.routing.plan(x.shape[0], x.shape[1])
        if plan.rows_A.numel() == 0:
            return y
        if self.backend == "grouped":
            return self._grouped(x, y, plan)
        return self._gather(x, y, plan)

    def _gather(self, x: torch.Tensor, y: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        a_A_R_I = self.lora_A_S_R_I[plan.slots_A]
        b_A_O_R = self.lora_B_S_O_R[plan.slots_A]
        h_A_T_R = torch.bmm(x[plan.rows_A], a_A_R_I.transpose(1, 2))
        h_A_T_R = h_A_T_R * self.scale_S[plan.slots_A][:, None, None]
        return y.index_add_(0, plan.rows_A, torch.bmm(h_A_T_R, b_A_O_R.transpose(1, 2)))

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        x_N_I = x.reshape(-1, x.shape[-1])[plan.perm_N]
        h_N_R = torch._grouped_mm(x_N_I, self.lora_A_S_R_I.transpose(1, 2), offs=plan.offs_S)
        h_N_R = h_N_R * self.scale_S[plan.slot_N][:, None]
        d_N_O = torch._grouped_mm(h_N_R, self.lora_B_S_O_R.transpose(1, 2), offs=plan.offs_S)
        y.view(-1, y.shape[-1]).index_add_(0, plan.perm_N, d_N_O)
        return y


Signature = tuple[int, tuple[tuple[str, torch.Size, torch.Size], ...]]
"""An adapter's rank and per-module ``(A, B)`` shapes: all a load's bookkeeping depends on."""
PLANS_KEPT_PER_SLOT = 4


def adapter_signature(adapter: PeftAdapter) -> Signature:
    return adapter.rank, tuple((m, a.shape, b.shape) for m, (a, b) in adapter.weights.items())


@dataclass
class _LoadPlan:
    """What loading an adapter of one signature into one slot writes: the slot's views."""

    modules: list[str] = dataclasses.field(default_factory=list)  # the adapter's, layer order
    sizes: list[int] = dataclasses.field(default_factory=list)  # numel of A, B per module
    shapes: list[torch.Size] = dataclasses.field(default_factory=list)
    targets: list[torch.Tensor] = dataclasses.field(default_factory=list)
    zeros: list[torch.Tensor] = dataclasses.field(default_factory=list)
    scales: list[torch.Tensor] = dataclasses.field(default_factory=list)


class MultiLoraModel:
    """A causal LM whose linear layers get LoRA slots on demand; loads PEFT adapters into slots.

    ``model`` is modified in place (target linears are replaced by :class:`MultiLoraLinear`).
    Wrapping is lazy: :meth:`load` wraps the modules an adapter targets the first time one does,
    or :meth:`wrap` wraps a fixed list up front (SGLang's ``--lora-target-modules``).
    """

    def __init__(
        self, model: nn.Module, *, num_slots: int, max_rank: int, backend: LoraBackend = "auto"
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise LoraError(f"num_slots={num_slots} and max_rank={max_rank} must be >= 1")
        self.model = model
        self.max_rank = max_rank
        self.routing = SlotRouting(num_slots)
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        if backend == "auto":
            backend = "grouped" if grouped_mm_supported(self.device, self.dtype) else "gather"
        if backend not in ("gather", "grouped"):
            raise LoraError(f"lora backend {backend!r}; use 'auto', 'gather' or 'grouped'")
        self.backend: str = backend
        self.layers: dict[str, MultiLoraLinear] = {}
        self.rank_S = [0] * num_slots
        """The largest rank among each slot's modules (0: empty); the static decoder sizes a
        batch's adapter products by the largest of its slots', not by ``max_rank``."""
        # a load's Python work (which views to copy into and zero) depends only on the slot and
        # the adapter's shapes, the same for every version of an adapter: cached per both
        self._fits: set[Signature] = set()
        self._plans: OrderedDict[tuple[int, Signature], _LoadPlan] = OrderedDict()
        # on CUDA, loads copy on their own stream: batches in flight keep the default stream
        # busy, and a copy queued behind their kernels would wait for them (module doc)
        cuda = self.device.type == "cuda"
        self._load_stream = torch.cuda.Stream(self.device) if cuda else None
        self._wraps = 0  # wraps so far: new slot buffers the load stream must wait for
        self._wraps_seen = 0

    @property
    def num_slots(self) -> int:
        return self.routing.num_slots

    def route(self, slot_ids_B: Sequence[int] | torch.Tensor) -> AbstractContextManager[None]:
        """Context manager: forwards inside use these per-row slot ids (``BASE_SLOT``: none)."""
        return self.routing.route(slot_ids_B, self.device)

    def linear_names(self, suffixes: Iterable[str] | Literal["all"]) -> list[str]:
        """Full names of the model's linear layers (wrapped or not) whose last name part is in
        ``suffixes``; ``"all"`` means every linear layer except the LM head."""
        wanted = None if suffixes == "all" else set(suffixes)
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        inner = {id(layer.base) for layer in self.layers.values()}
        names = []
        for name, module in self.model.named_modules():
            is_linear = isinstance(module, MultiLoraLinear) or (
                isinstance(module, nn.Linear) and module is not head and id(module) not in inner
            )
            if is_linear and (wanted is None or name.rsplit(".", 1)[-1] in wanted):
                names.append(name)
        return names

    def wrap(self, names: Iterable[str]) -> None:
        """Wrap the named ``nn.Linear`` modules (already wrapped ones are left alone)."""
        names = [name for name in dict.fromkeys(names) if name not in self.layers]
        if names:
            self._plans.clear()  # their views of modules an adapter lacks are stale
            self._wraps += 1
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            module = getattr(parent, child, None)
            if not isinstance(module, nn.Linear):
                raise AdapterFormatError(
                    f"module {name!r} is {type(module).__name__}, not a "
                    "torch.nn.Linear; LoRA targets must be linear layers"
                )
            backend = self.backend
            if backend == "grouped" and not _aligned(module, self.max_rank):
                backend = "gather"
            layer = MultiLoraLinear(module, self.routing, self.max_rank, backend)
            setattr(parent, child, layer)
            self.layers[name] = layer

    def check(self, adapter: PeftAdapter, *, allow_wrap: bool) -> list[str]:
        """Validate ``adapter`` against the model (module names, linear shapes, rank) before any
        slot is touched; return the modules that still need wrapping."""
        signature = adapter_signature(adapter)
        if signature in self._fits:
            return []
        if adapter.rank > self.max_rank:
            raise AdapterRankError(
                f"{adapter.path}: rank {adapter.rank} > max_lora_rank "
                f"{self.max_rank}; raise max_lora_rank or lower the adapter's r"
            )
        missing = []
        for module in adapter.modules:
            where = (
                f"{adapter.path}/{ADAPTER_WEIGHTS}: tensor '{PEFT_PREFIX}{module}.lora_A.weight'"
            )
            layer = self.layers.get(module)
            if layer is not None:
                linear = layer.base
            else:
                try:
                    found = self.model.get_submodule(module)
                except AttributeError as err:
                    raise AdapterFormatError(
                        f"{where} names no module of the base model (an adapter for another model?)"
                    ) from err
                if not isinstance(found, nn.Linear):
                    raise AdapterFormatError(
                        f"{where} targets a {type(found).__name__}; LoRA "
                        "targets must be torch.nn.Linear layers"
                    )
                linear = found
                missing.append(module)
            a, b = adapter.weights[module]
            if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                raise AdapterFormatError(
                    f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                    f"linear {linear.in_features} -> {linear.out_features}"
                )
        if missing and not allow_wrap:
            raise AdapterFormatError(
                f"{adapter.path}: targets {missing[:3]}... which are not LoRA "
                "target modules of this engine; add them to target_modules"
            )
        if not missing:
            self._fits.add(signature)
        return missing

    def load(self, slot: int, adapter: PeftAdapter, *, allow_wrap: bool = True) -> None:
        """Write ``adapter`` into ``slot`` of every wrapped layer (zero where it has no tensors).

        One host-to-device copy of all the adapter's tensors (flattened into one buffer in the
        slots' dtype), then one batched device copy into the slot views, one batched zeroing of
        the rank padding and of the modules it lacks, and one write of the scales: a few
        launches per adapter, not several per layer (a synchronous copy per tensor made a load
        of a 30-layer model ~90 ms on a GPU).
        """
        if not 0 <= slot < self.num_slots:
            raise SlotRoutingError(f"slot {slot} outside [0, {self.num_slots})")
        self.wrap(self.check(adapter, allow_wrap=allow_wrap))
        plan = self._plan(slot, adapter)
        self.rank_S[slot] = max((a.shape[0] for a, _ in adapter.weights.values()), default=0)
        stream = self._load_stream
        if stream is None:
            self._write(plan, adapter)
            return
        if self._wraps != self._wraps_seen:  # new slot buffers, zeroed on the default stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self._wraps_seen = self._wraps
        with torch.cuda.stream(stream):
            self._write(plan, adapter, pinned=True)
        # the slot is free or unpinned (no batch in flight reads it); batches that use it are
        # queued after this returns, so they see the whole version
        stream.synchronize()

    def _write(self, plan: _LoadPlan, adapter: PeftAdapter, *, pinned: bool = False) -> None:
        """The load's device work: zero the padding, copy the tensors, write the scales."""
        if plan.zeros:
            torch._foreach_zero_(plan.zeros)
        if not plan.modules:
            return
        weights = adapter.weights
        sources = [t.reshape(-1) for name in plan.modules for t in weights[name]]
        if pinned:  # straight into page-locked memory: one host copy, an asynchronous upload
            dtype = functools.reduce(torch.promote_types, (t.dtype for t in sources))
            page_locked = torch.empty(sum(plan.sizes), dtype=dtype, pin_memory=True)
            host = torch.cat(sources, out=page_locked)
        else:
            host = torch.cat(sources)
        flat = host.to(self.device, self.dtype, non_blocking=pinned)
        pieces = flat.split(plan.sizes)
        views = [p.view(shape) for p, shape in zip(pieces, plan.shapes, strict=True)]
        torch._foreach_copy_(plan.targets, views)
        scale = torch.full((1,), adapter.scale, dtype=self.dtype, device=self.device)
        torch._foreach_copy_(plan.scales, [scale] * len(plan.scales))

    def _plan(self, slot: int, adapter: PeftAdapter) -> _LoadPlan:
        """The views a load of ``adapter`` into ``slot`` writes (cached per slot and shapes)."""
        key = (slot, adapter_signature(adapter))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = _LoadPlan()
        for name, layer in self.layers.items():
            pair = adapter.weights.get(name)
            if pair is None:  # the whole slot of a module the adapter lacks is zero
                plan.zeros += [layer.lora_A_S_R_I[slot], layer.lora_B_S_O_R[slot]]
                plan.zeros.append(layer.scale_S[slot : slot + 1])
                continue
            a, b = pair
            try:
                layer.check_slot(a, b)
            except AdapterFormatError as err:
                raise AdapterFormatError(
                    f"{adapter.path}/{ADAPTER_WEIGHTS}: {name}: {err}"
                ) from err
            rank = a.shape[0]
            plan.modules.append(name)
            plan.sizes += [a.numel(), b.numel()]
            plan.shapes += [a.shape, b.shape]
            plan.targets += [layer.lora_A_S_R_I[slot, :rank], layer.lora_B_S_O_R[slot, :, :rank]]
            if rank < layer.max_rank:  # the rank padding
                plan.zeros += [layer.lora_A_S_R_I[slot, rank:], layer.lora_B_S_O_R[slot, :, rank:]]
            plan.scales.append(layer.scale_S[slot : slot + 1])
        while len(self._plans) >= PLANS_KEPT_PER_SLOT * self.num_slots:
            self._plans.popitem(last=False)
        self._plans[key] = plan
        return plan

    def clear(self, slot: int) -> None:
        """Zero ``slot`` in every wrapped layer (rows routed to it then run the base model)."""
        self.rank_S[slot] = 0
        for layer in self.layers.values():
            layer.clear_slot(slot)
