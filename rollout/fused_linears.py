"""A decoder layer's projections that read the same input, fused into one weight each.

q/k/v read the attention's normed input and gate/up the MLP's (:data:`LAYER_GROUPS`). The static
decoder (:mod:`rollout.graph_decode`) runs each such group as one matrix product: the members'
weights (and biases) are concatenated by output once, and each member's parameters are then
re-pointed at its rows of that matrix, so the model holds one copy and its own forward (the
prefill) reads the same values as before. Members that differ in input size, dtype, device,
bias or layout stay one group each. A second decoder on the same model reuses the fusion while
the members still hold the parameters it made; :func:`still_fused` tells a decoder whether the
model's weights were replaced or moved since (then it fuses again).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rollout.lora import MultiLoraLinear

LAYER_GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
"""A decoder layer's projections by input: those of one group read the same activations and
run as one matrix product (their weights become views of one fused matrix)."""


@dataclass
class Group:
    """Projections of one layer that read the same input, as one product (:data:`LAYER_GROUPS`)."""

    index: int
    names: tuple[str, ...]  # full module names, in the order of their output columns
    weight: torch.Tensor  # (sum of outputs, in): each member's weight is a view of its rows
    bias: torch.Tensor | None
    widths: tuple[int, ...]


def fuse_layers(model: Any) -> list[list[list[Group]]]:
    """Per decoder layer of ``model`` (``model.model.layers``), per :data:`LAYER_GROUPS` entry,
    its groups (one, or one per member when the members cannot fuse), each weight fused."""
    inner = model.model
    prefix = next(name for name, m in model.named_modules() if m is inner.layers)
    layers: list[list[list[Group]]] = []
    index = 0
    for i, layer in enumerate(inner.layers):
        parts = []
        for part, names in LAYER_GROUPS:
            parent = getattr(layer, part)
            linears = [_linear(getattr(parent, n)) for n in names]
            full = [f"{prefix}.{i}.{part}.{n}" for n in names]
            same = len({_fusable_as(m) for m in linears}) == 1
            members = [list(range(len(names)))] if same else [[j] for j in range(len(names))]
            groups = []
            for chosen in members:
                weight, bias = _fuse_linears([linears[j] for j in chosen])
                groups.append(
                    Group(
                        index=index,
                        names=tuple(full[j] for j in chosen),
                        weight=weight,
                        bias=bias,
                        widths=tuple(linears[j].out_features for j in chosen),
                    )
                )
                index += 1
            parts.append(groups)
        layers.append(parts)
    return layers


def still_fused(layers: list[nn.Module], groups: list[list[list[Group]]]) -> bool:
    """Whether every projection of ``layers`` still reads its rows of its group's weight."""
    for layer, parts in zip(layers, groups, strict=True):
        for (part, names), part_groups in zip(LAYER_GROUPS, parts, strict=True):
            parent = getattr(layer, part)
            linears = iter(_linear(getattr(parent, n)) for n in names)
            for group in part_groups:
                at, row_bytes = group.weight.data_ptr(), group.weight[0].nbytes
                for width in group.widths:
                    if next(linears).weight.data_ptr() != at:
                        return False
                    at += width * row_bytes
    return True


def _linear(module: nn.Module) -> nn.Linear:
    """The frozen ``nn.Linear`` of a projection, wrapped or not."""
    found = module.base if isinstance(module, MultiLoraLinear) else module
    if not isinstance(found, nn.Linear):
        raise ValueError(f"static decode supports linear projections, not {type(found).__name__}")
    return found


def _fusable_as(m: nn.Linear) -> tuple[Any, ...]:
    """Linears fuse when these agree."""
    return m.in_features, m.weight.dtype, m.weight.device, m.bias is None, m.weight.is_contiguous()


_FUSED: weakref.WeakKeyDictionary[nn.Linear, tuple[torch.Tensor, torch.Tensor | None, tuple]] = (
    weakref.WeakKeyDictionary()
)
"""First linear of a fused group -> (weight, bias, the members' parameters it made): a second
decoder on the same model (``Engine.use_decoder``) reuses the fusion while they are in place."""


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for ``linears`` stacked by output; each linear's parameters become
    views of its rows, so the model keeps one copy."""
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    params = tuple(p for m in linears for p in (m.weight, m.bias))
    known = _FUSED.get(linears[0])
    if (
        known is not None
        and len(known[2]) == len(params)
        and all(map(operator.is_, known[2], params))
    ):
        return known[0], known[1]
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    row = 0
    for m in linears:
        rows = slice(row, row + m.out_features)
        m.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[rows], requires_grad=False)
        row += m.out_features
    _FUSED[linears[0]] = (weight, bias, tuple(p for m in linears for p in (m.weight, m.bias)))
    return weight, bias
