"""A decoder's structure, found by shape rather than by family: its decoder layers and the linear
layers inside them (what pruning touches), as every method and the masks see them.

    prefix, layers = find_decoder_layers(model)     # ("model.layers", ModuleList)
    linears = prunable_linears(model)               # {"model.layers.0.self_attn.q_proj": Linear, ...}
    weight_matrix(linear)                           # (out, in), also for GPT-2's transposed Conv1D
"""
from __future__ import annotations

import torch
from torch import nn

from utils.models.hub import ModelError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the ModuleList of the model's own `_no_split_modules` blocks
    (what transformers itself treats as one decoder layer), or else, by structure, the longest
    ModuleList of identical blocks that hold linear layers (the structural rule alone would pick
    a mixture-of-experts layer's list of experts when it is longer than the list of layers)."""
    declared = set(getattr(model, "_no_split_modules", None) or [])
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(_is_linear(m) for m in module[0].modules()):
            continue
        candidates.append((name, module))
    named = [c for c in candidates if type(c[1][0]).__name__ in declared]
    pool = named or candidates
    if not pool:
        raise ModelError(f"{type(model).__name__}: found no list of decoder layers with linear modules")
    return max(pool, key=lambda item: len(item[1]))


def check_prunable(model: nn.Module) -> None:
    """Refuse models whose decoder holds weights pruning would silently skip: fused 3-D expert
    tensors of mixture-of-experts layers (they would stay dense while the run reports the density)."""
    prefix, layers = find_decoder_layers(model)
    fused = [f"{prefix}.0.{name}" for name, param in layers[0].named_parameters() if param.ndim > 2]
    if fused:
        raise ModelError(f"{type(model).__name__} keeps expert weights as fused {fused[0]} tensors "
                         f"({len(fused)} per layer), which this tool cannot prune yet; pruning only its "
                         "nn.Linear layers would leave them dense while reporting the requested density")


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer whose weight is stored transposed, (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside one decoder layer (nn.Linear or Conv1D), by its name relative to the layer."""
    return {name: module for name, module in layer.named_modules() if _is_linear(module)}


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), what every pruning method takes: the parameter
    itself for nn.Linear, a transposed view of it for Conv1D (writes go to the parameter)."""
    return linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()


def in_features(linear: nn.Module) -> int:
    return weight_matrix(linear).shape[1]


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Full names of the linears in decoder layers: what pruning touches (never embeddings or the LM head)."""
    prefix, layers = find_decoder_layers(model)
    found = {}
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            found[f"{prefix}.{index}.{name}"] = linear
    return found


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
