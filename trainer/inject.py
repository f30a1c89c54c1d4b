"""Turn a Hugging Face causal LM into a multi-slot LoRA model.

:class:`MultiLoraModel` replaces every attention and MLP projection of a supported family
(``q/k/v/o_proj``, ``gate/up/down_proj``, or the fused ``qkv_proj``/``gate_up_proj``) with a
:class:`trainer.lora.SlotLinear`; MoE experts, routers and the LM head stay plain and frozen.
All base weights are frozen (``requires_grad=False``); the only trainable tensors are the slot
tensors, which live in one :class:`trainer.lora.SlotStore`. The HF model is kept in eval mode:
there is no dropout anywhere (LoRA dropout is refused, see :func:`check_lora_dropout`).

Sequences are rows; ``slot_ids_B`` routes each row to a slot or to ``BASE_SLOT``. Position ids
are derived from the attention mask (``cumsum - 1``), so left- and right-padded rows give the
same log-probs for their real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from events.errors import ConfigError
from trainer.lora import BASE_SLOT, Kernel, SlotLinear, SlotRouting, SlotStore, SlotTable

_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "qwen3_moe": _DENSE,  # experts are not nn.Linear children named like these; routers are "gate"
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
"""Which ``nn.Linear`` leaf names get slots, per HF ``model_type``. Extend here, with a test."""


def check_lora_dropout(lora_dropout: float) -> None:
    """Refuse LoRA dropout: slot layers apply none (it would break exact equivalences)."""
    if lora_dropout != 0.0:
        raise ConfigError(
            f"lora_dropout={lora_dropout} is not supported by slot layers; use lora_dropout=0.0"
        )


def position_ids_from_mask(attention_mask_B_T: Tensor) -> Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1``, clamped at 0 for pads."""
    return (attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    logits_B_T_V: Tensor, tokens_B_T: Tensor, temperature_B: Tensor | None = None
) -> Tensor:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` in float32, shape ``[B, T-1]``.

    With ``temperature_B`` the distribution is ``softmax(logits / T_row)``: the policy a rollout
    worker sampled from at that temperature, so importance ratios compare like with like.
    """
    b, t, v = logits_B_T_V.shape
    logits = logits_B_T_V[:, :-1].float()
    if temperature_B is not None:
        logits = (
            logits / temperature_B.to(logits.device, torch.float32).clamp(min=1e-6)[:, None, None]
        )
    nll = F.cross_entropy(
        logits.reshape(-1, v),
        tokens_B_T[:, 1:].reshape(-1),
        reduction="none",
    )
    return -nll.view(b, t - 1)


class MultiLoraModel(nn.Module):
    """A frozen HF causal LM whose projections hold ``num_slots`` LoRA adapters.

    Build with :meth:`from_pretrained` (local dir) or :meth:`wrap` (an HF model in memory).
    Slot lifecycle: :meth:`configure_slot` (rank, alpha, fresh init) → train → :meth:`release_slot`.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        layers: dict[str, SlotLinear],
        table: SlotTable,
        routing: SlotRouting,
        store: SlotStore,
    ) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.table = table
        self.routing = routing
        self.store = store
        self._layers = layers

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        adapter_dtype: torch.dtype | None = None,
        kernel: Kernel = "auto",
        lora_dropout: float = 0.0,
        attn_implementation: str = "sdpa",
    ) -> MultiLoraModel:
        """Load the HF causal LM at local ``path`` in ``dtype`` on ``device`` and wrap it.

        ``adapter_dtype`` (default: float32) is the dtype of the slot weights and gradients;
        compute runs in the activations' dtype. Adam moments are always float32.
        """
        from transformers import AutoModelForCausalLM

        check_lora_dropout(lora_dropout)
        if not (Path(path) / "config.json").exists():
            raise ConfigError(
                f"no HF model at {str(path)!r} (config.json missing); pass a local dir"
            )
        hf_model: nn.Module = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True
        )  # a pickled base model (pytorch_model.bin) is refused, never unpickled
        hf_model.to(torch.device(device))
        return cls.wrap(
            hf_model,
            num_slots,
            max_rank,
            adapter_dtype=adapter_dtype,
            kernel=kernel,
            lora_dropout=lora_dropout,
        )

    @classmethod
    def wrap(
        cls,
        hf_model: nn.Module,
        num_slots: int,
        max_rank: int,
        *,
        adapter_dtype: torch.dtype | None = None,
        kernel: Kernel = "auto",
        lora_dropout: float = 0.0,
    ) -> MultiLoraModel:
        """Freeze ``hf_model`` and replace its target linears by slot layers, in place.

        Build the HF model on its final device first: slot tensors are created next to its
        weights, and the model must not be moved afterwards (see :mod:`trainer.lora`).
        """
        check_lora_dropout(lora_dropout)
        model_type = getattr(hf_model.config, "model_type", None)
        if model_type not in TARGETS_BY_MODEL_TYPE:
            raise ConfigError(
                f"model_type {model_type!r} is not supported for slot injection; supported: "
                f"{sorted(TARGETS_BY_MODEL_TYPE)} (add its projection names to "
                "trainer.inject.TARGETS_BY_MODEL_TYPE)"
            )
        targets = TARGETS_BY_MODEL_TYPE[model_type]
        hf_model.requires_grad_(False)
        hf_model.eval()
        found = [
            (name, module)
            for name, module in hf_model.named_modules()
            if isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] in targets
            and ".experts." not in f".{name}."
        ]
        if not found:
            raise ConfigError(f"no {targets} linears found in the {model_type!r} model")
        device = found[0][1].weight.device
        widths = [w for _, lin in found for w in (lin.in_features, lin.out_features)]
        store = SlotStore(num_slots, max_rank, widths, adapter_dtype or torch.float32, device)
        table = SlotTable(num_slots, max_rank, device)
        routing = SlotRouting(table)
        layers: dict[str, SlotLinear] = {}
        for i, (name, linear) in enumerate(found):
            layer = SlotLinear(
                linear, store.new_param(2 * i), store.new_param(2 * i + 1), routing, kernel
            )
            parent_name, _, child = name.rpartition(".")
            setattr(hf_model.get_submodule(parent_name), child, layer)
            layers[name] = layer
        return cls(hf_model, layers, table, routing, store)

    # ------------------------------------------------------------------------- properties
    @property
    def num_slots(self) -> int:
        return self.table.num_slots

    @property
    def max_rank(self) -> int:
        return self.table.max_rank

    @property
    def model_type(self) -> str:
        return str(getattr(self.hf_model, "config").model_type)  # noqa: B009

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Leaf names of the wrapped linears (PEFT's ``target_modules``), sorted."""
        return tuple(sorted({name.rsplit(".", 1)[-1] for name in self._layers}))

    def slot_layers(self) -> Iterator[tuple[str, SlotLinear]]:
        """``(qualified name in the HF model, layer)`` in store order."""
        yield from self._layers.items()

    def layer_weights(self, slot: int, name: str) -> tuple[Tensor, Tensor]:
        """Views ``(A [r, in], Bt [r, out])`` of ``slot``'s true-rank weights in layer ``name``."""
        rank = self.table.rank(slot)
        layer = self._layers[name]
        return layer.lora_A.data[slot, :rank], layer.lora_Bt.data[slot, :rank]

    def split_layers(self, weight_r_Q: Tensor) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(name, A [r, in], Bt [r, out])`` views of one slot's ``[r, Q]`` weight block.

        The block may be a copy (e.g. on the CPU): a slot's weights are one contiguous block of
        the store, so one device-to-host copy serves every layer.
        """
        offsets, widths = self.store.offsets, self.store.widths
        for i, name in enumerate(self._layers):
            a_lo, bt_lo = offsets[2 * i], offsets[2 * i + 1]
            yield (
                name,
                weight_r_Q[:, a_lo : a_lo + widths[2 * i]],
                weight_r_Q[:, bt_lo : bt_lo + widths[2 * i + 1]],
            )

    # --------------------------------------------------------------------- slot lifecycle
    def configure_slot(self, slot: int, rank: int, alpha: float, seed: int = 0) -> None:
        """Give ``slot`` a rank and alpha and fresh weights (:meth:`reset_slot` with ``seed``)."""
        self.table.configure(slot, rank, alpha)
        self.reset_slot(slot, seed)

    def reset_slot(self, slot: int, seed: int) -> None:
        """Fresh LoRA init for ``slot``: A ~ kaiming-uniform(a=√5) like PEFT, B = 0; grads zeroed.

        For ``A: [r, in]`` that is ``U(-1/√in, 1/√in)``. Draws use a generator seeded with
        ``seed`` on the model's device, layer by layer in store order (same seed, same device →
        same weights). The padded ranks ``[r:]`` are zero.
        """
        rank = self.table.rank(slot)
        if rank == 0:
            raise ConfigError(f"slot {slot} is not configured; call configure_slot first")
        self.store.weight_S_R_Q[slot].zero_()
        self.store.grad_S_R_Q[slot].zero_()
        gen = torch.Generator(device=self.store.weight_S_R_Q.device).manual_seed(seed)
        for layer in self._layers.values():
            bound = 1.0 / math.sqrt(layer.in_features)
            a_r_I = torch.rand(
                rank, layer.in_features, generator=gen, device=gen.device, dtype=torch.float32
            )
            layer.lora_A.data[slot, :rank].copy_(a_r_I.mul_(2 * bound).sub_(bound))

    def release_slot(self, slot: int) -> None:
        """Zero ``slot``'s weights and grads and mark it free."""
        self.table.check_slot(slot)
        self.store.weight_S_R_Q[slot].zero_()
        self.store.grad_S_R_Q[slot].zero_()
        self.table.release(slot)

    # --------------------------------------------------------------------------- compute
    def forward(self, tokens_B_T: Tensor, attention_mask_B_T: Tensor, slot_ids_B: Tensor) -> Tensor:
        """Logits ``[B, T, V]``; row ``b`` uses slot ``slot_ids_B[b]`` (or none: ``BASE_SLOT``)."""
        with self.routing.route(slot_ids_B, tokens_B_T.shape[1]):
            out = self.hf_model(
                input_ids=tokens_B_T,
                attention_mask=attention_mask_B_T,
                position_ids=position_ids_from_mask(attention_mask_B_T),
                use_cache=False,
            )
        return out.logits

    def logprobs(
        self,
        tokens_B_T: Tensor,
        attention_mask_B_T: Tensor,
        slot_ids_B: Tensor,
        adapters: bool = True,
        temperature_B: Tensor | None = None,
    ) -> Tensor:
        """Log-probs of the next tokens, ``[B, T-1]`` float32 (entry ``t`` scores token ``t+1``).

        ``adapters=False`` gives the base-model reference (every row on ``BASE_SLOT``, no grad):
        the KL anchor of the RL loss. ``temperature_B`` scales each row's logits (see
        :func:`token_logprobs`). Pad positions carry meaningless values; mask them.
        """
        if adapters:
            logits = self(tokens_B_T, attention_mask_B_T, slot_ids_B)
            return token_logprobs(logits, tokens_B_T, temperature_B)
        base_ids_B = torch.full((tokens_B_T.shape[0],), BASE_SLOT, dtype=torch.long)
        with torch.no_grad():
            logits = self(tokens_B_T, attention_mask_B_T, base_ids_B)
            return token_logprobs(logits, tokens_B_T, temperature_B)
