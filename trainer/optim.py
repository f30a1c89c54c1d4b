"""Per-slot AdamW over the flat slot store: own step counter, schedule, clipping and moments.

Each configured slot has its own :class:`events.specs.OptimSpec` and total step count. One
:meth:`SlotAdamW.step` call updates only the slots it is given, with the exact update of
``torch.optim.AdamW`` (decoupled weight decay) preceded by clipping of *that slot's* gradient
norm (``torch.nn.utils.clip_grad_norm_``'s coefficient ``min(1, max_norm / (norm + 1e-6))``).

The update works on whole slots: slot ``s`` is the contiguous prefix ``[:rank_s]`` of row ``s``
of the store's ``[S, R, Q]`` buffers, so the update is a few ``torch._foreach_*`` kernels over
the list of present slots (per-slot lr, betas, eps and decay are scalar lists), not one kernel
per layer and per slot. Padded ranks ``[rank_s:]`` are never read or written (their gradient is
zeroed: the rank mask). Moments are float32 whatever the slot dtype.

A slot whose gradient norm is not finite is skipped: its weights, moments and step counter are
unchanged, and the result says why. Nothing here couples two slots.

Schedule (``lr_at``): linear warmup over ``warmup_steps`` (``lr · (k+1)/warmup``), then
``constant`` keeps ``lr`` and ``cosine`` decays to ``lr · min_lr_ratio`` at ``total_steps``:
``lr · (m + (1-m) · ½(1 + cos(π · p)))`` with ``p = (k - warmup) / max(1, total - warmup)``
clamped to [0, 1], where ``k`` is the number of updates already applied to the slot.

Clipping: ``max_grad_norm > 0`` clips the slot's gradient to that norm; exactly ``0`` means no
clipping; a negative value is an error. That is the rule of :class:`events.specs.OptimSpec`,
which the decoder enforces; :meth:`SlotAdamW.configure` refuses a negative value in a spec that
was built in code or read from a slot state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from events.errors import ConfigError
from events.specs import OptimSpec
from trainer.lora import SlotError, SlotStore, SlotTable


@dataclass(frozen=True)
class SlotStepResult:
    """Outcome of one optimizer call for one slot.

    ``grad_norm`` is the L2 norm of the slot's gradient before clipping; ``lr`` the learning rate
    of this update; ``step`` the slot's update count after the call.
    """

    slot: int
    grad_norm: float
    lr: float
    step: int
    skipped: bool
    reason: str | None = None


def validate_optim_spec(spec: OptimSpec, total_steps: int) -> None:
    """Raise :class:`ConfigError` naming the first invalid setting."""
    b1, b2 = spec.betas
    checks = [
        (math.isfinite(spec.lr) and spec.lr > 0, f"lr={spec.lr} must be finite and > 0"),
        (0 <= b1 < 1 and 0 <= b2 < 1, f"betas={spec.betas} must both be in [0, 1)"),
        (spec.eps > 0, f"eps={spec.eps} must be > 0"),
        (spec.weight_decay >= 0, f"weight_decay={spec.weight_decay} must be >= 0"),
        (spec.warmup_steps >= 0, f"warmup_steps={spec.warmup_steps} must be >= 0"),
        (0 <= spec.min_lr_ratio <= 1, f"min_lr_ratio={spec.min_lr_ratio} must be in [0, 1]"),
        (
            spec.max_grad_norm >= 0,
            f"max_grad_norm={spec.max_grad_norm} must be >= 0 (0: no clipping)",
        ),
        (total_steps >= 1, f"total_steps={total_steps} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid optimizer settings: {message}")


def lr_at(spec: OptimSpec, step: int, total_steps: int) -> float:
    """Learning rate of the update that follows ``step`` completed updates (see module doc)."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    m = spec.min_lr_ratio
    return spec.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))


class SlotAdamW:
    """AdamW with independent state per slot of one :class:`SlotStore`.

    ``chunk_elements`` bounds the temporary memory of one update (slots are updated in groups of
    at most that many elements, at least one slot per group).
    """

    def __init__(self, store: SlotStore, table: SlotTable, *, chunk_elements: int = 1 << 28):
        self.store = store
        self.table = table
        self.chunk_elements = chunk_elements
        shape, device = store.weight_S_R_Q.shape, store.weight_S_R_Q.device
        self.exp_avg_S_R_Q = torch.zeros(shape, dtype=torch.float32, device=device)
        self.exp_avg_sq_S_R_Q = torch.zeros(shape, dtype=torch.float32, device=device)
        self._specs: list[OptimSpec | None] = [None] * table.num_slots
        self._total_steps = [0] * table.num_slots
        self._steps = [0] * table.num_slots

    # ---------------------------------------------------------------------- slot lifecycle
    def configure(self, slot: int, spec: OptimSpec, total_steps: int) -> None:
        """Set ``slot``'s optimizer settings and start it from a clean state (:meth:`reset`)."""
        self.table.check_slot(slot)
        validate_optim_spec(spec, total_steps)
        self._specs[slot] = spec
        self._total_steps[slot] = total_steps
        self.reset(slot)

    def update_settings(self, slot: int, spec: OptimSpec, total_steps: int) -> None:
        """Change ``slot``'s settings and step budget but keep its moments and step count (a
        resumed adapter whose new registration asks for more steps or another rate)."""
        self.table.check_slot(slot)
        validate_optim_spec(spec, total_steps)
        self._specs[slot] = spec
        self._total_steps[slot] = total_steps

    def reset(self, slot: int) -> None:
        """Zero ``slot``'s moments, step counter and gradients (settings are kept)."""
        self.table.check_slot(slot)
        self.exp_avg_S_R_Q[slot].zero_()
        self.exp_avg_sq_S_R_Q[slot].zero_()
        self.store.grad_S_R_Q[slot].zero_()
        self._steps[slot] = 0

    def release(self, slot: int) -> None:
        """:meth:`reset` and forget the settings; stepping the slot then raises."""
        self.reset(slot)
        self._specs[slot] = None
        self._total_steps[slot] = 0

    def zero_grad(self) -> None:
        """Zero every slot gradient (and re-attach ``.grad`` views; see :class:`SlotStore`)."""
        self.store.zero_grad()

    # ------------------------------------------------------------------------ inspection
    def spec(self, slot: int) -> OptimSpec:
        self.table.check_slot(slot)
        spec = self._specs[slot]
        if spec is None:
            raise SlotError(f"slot {slot} has no optimizer settings; call configure(slot, ...)")
        return spec

    def total_steps(self, slot: int) -> int:
        self.spec(slot)
        return self._total_steps[slot]

    def step_count(self, slot: int) -> int:
        """Updates applied to ``slot`` since its last reset."""
        self.table.check_slot(slot)
        return self._steps[slot]

    def set_step_count(self, slot: int, step: int) -> None:
        """Restore the counter (checkpoint resume); moments must be restored alongside."""
        self.table.check_slot(slot)
        if step < 0:
            raise ConfigError(f"step count {step} for slot {slot} must be >= 0")
        self._steps[slot] = step

    def current_lr(self, slot: int) -> float:
        """Learning rate the next update of ``slot`` would use."""
        return lr_at(self.spec(slot), self._steps[slot], self._total_steps[slot])

    # ------------------------------------------------------------------------------ step
    def step(self, slots: Sequence[int]) -> dict[int, SlotStepResult]:
        """Clip and apply one AdamW update to each slot in ``slots`` (others are untouched)."""
        order = sorted(set(slots))
        for slot in order:
            self.spec(slot)
            if not self.table.is_configured(slot):
                raise SlotError(f"slot {slot} is not configured in the model; cannot step it")
        if not order:
            return {}
        if not self.store.grads_attached():
            raise SlotError(
                "slot gradients were detached from the slot store (e.g. by "
                "model.zero_grad(set_to_none=True)); use optimizer.zero_grad() instead"
            )
        grad, ranks = self.store.grad_S_R_Q, [self.table.rank(s) for s in order]
        for slot, rank in zip(order, ranks, strict=True):
            grad[slot, rank:].zero_()  # the rank mask: padded ranks never get an update
        norms_n = torch.stack(
            [
                torch.linalg.vector_norm(grad[s, :r], dtype=torch.float32)
                for s, r in zip(order, ranks, strict=True)
            ]
        )
        norms = norms_n.tolist()  # the one host sync of a step
        results: dict[int, SlotStepResult] = {}
        todo: list[tuple[int, int, float]] = []
        for slot, rank, norm in zip(order, ranks, norms, strict=True):
            lr = self.current_lr(slot)
            if not math.isfinite(norm):
                results[slot] = SlotStepResult(
                    slot, norm, lr, self._steps[slot], True, "non-finite gradient norm"
                )
            else:
                todo.append((slot, rank, norm))
        chunk: list[tuple[int, int, float]] = []
        size = 0
        for item in todo:
            if chunk and size + item[1] * self.store.width > self.chunk_elements:
                self._update(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += item[1] * self.store.width
        if chunk:
            self._update(chunk)
        for slot, _, norm in todo:
            lr = self.current_lr(slot)
            self._steps[slot] += 1
            results[slot] = SlotStepResult(slot, norm, lr, self._steps[slot], False)
        return results

    def _update(self, chunk: list[tuple[int, int, float]]) -> None:
        """One AdamW update (torch.optim.AdamW's math) for the slots in ``chunk``."""
        weight, grad = self.store.weight_S_R_Q, self.store.grad_S_R_Q
        params = [weight[s, :r].view(-1) for s, r, _ in chunk]
        grads = [grad[s, :r].view(-1) for s, r, _ in chunk]
        exp_avgs = [self.exp_avg_S_R_Q[s, :r].view(-1) for s, r, _ in chunk]
        exp_avg_sqs = [self.exp_avg_sq_S_R_Q[s, :r].view(-1) for s, r, _ in chunk]
        specs = [self.spec(s) for s, _, _ in chunk]
        lrs = [self.current_lr(s) for s, _, _ in chunk]
        steps = [self._steps[s] + 1 for s, _, _ in chunk]
        low_precision = weight.dtype != torch.float32
        p32 = [p.float() for p in params] if low_precision else params
        g32 = [g.float() for g in grads] if low_precision else grads

        coefs = [
            min(1.0, sp.max_grad_norm / (norm + 1e-6)) if sp.max_grad_norm > 0 else 1.0
            for sp, (_, _, norm) in zip(specs, chunk, strict=True)
        ]
        torch._foreach_mul_(g32, coefs)
        decays = [1 - lr * sp.weight_decay for lr, sp in zip(lrs, specs, strict=True)]
        if any(d != 1.0 for d in decays):
            torch._foreach_mul_(p32, decays)
        for beta1 in sorted({sp.betas[0] for sp in specs}):
            idx = [i for i, sp in enumerate(specs) if sp.betas[0] == beta1]
            torch._foreach_lerp_([exp_avgs[i] for i in idx], [g32[i] for i in idx], 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, [sp.betas[1] for sp in specs])
        torch._foreach_addcmul_(exp_avg_sqs, g32, g32, [1 - sp.betas[1] for sp in specs])
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(
            denoms, [math.sqrt(1 - sp.betas[1] ** t) for sp, t in zip(specs, steps, strict=True)]
        )
        torch._foreach_add_(denoms, [sp.eps for sp in specs])
        step_sizes = [
            -lr / (1 - sp.betas[0] ** t) for lr, sp, t in zip(lrs, specs, steps, strict=True)
        ]
        torch._foreach_addcdiv_(p32, exp_avgs, denoms, step_sizes)
        if low_precision:
            for p, p_new in zip(params, p32, strict=True):
                p.copy_(p_new)


def adamw_state_tensors(optimizer: SlotAdamW, slot: int) -> tuple[Tensor, Tensor]:
    """Views of ``slot``'s true-rank moments ``(exp_avg [r, Q], exp_avg_sq [r, Q])``."""
    rank = optimizer.table.rank(slot)
    return optimizer.exp_avg_S_R_Q[slot, :rank], optimizer.exp_avg_sq_S_R_Q[slot, :rank]
