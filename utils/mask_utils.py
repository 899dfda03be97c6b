"""Masks as explicit state: derived from the zeros, re-applied after every optimizer step, measured.

    masks = MaskSet.from_zeros(prunable_linears(model))   # after pruning or loading a checkpoint
    optimizer.step(); masks.apply()                        # pruned weights stay exactly 0
    report = sparsity_report(model)                        # measured, never assumed

Works on plain tensors and on FSDP2's sharded DTensor parameters alike: a mask is computed from
the parameter itself, so it is sharded exactly like the parameter and `apply` is local.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .model_utils import find_decoder_layers, find_linears


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _any_sharded(tensors) -> bool:
    """Whether any is an FSDP2 shard (a DTensor), whose counts must be summed over the ranks."""
    return any(hasattr(t, "to_local") for t in tensors)


class MaskSet:
    """Keep-masks (1 = kept, 0 = pruned) for named weights, stored in the weight's dtype so that
    re-applying them is one fused multiply over all tensors."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        self.names = list(params)
        self.sharded = _any_sharded(params.values())
        self._params = [_local(params[n]) for n in self.names]
        self._masks = [_local(masks[n]) for n in self.names]

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, weights: dict[str, torch.Tensor]) -> "MaskSet":
        masks = {name: (weight != 0).to(weight.dtype) for name, weight in weights.items()}
        return cls(weights, masks)

    @torch.no_grad()
    def apply(self) -> None:
        if self._params:
            torch._foreach_mul_(self._params, self._masks)

    @torch.no_grad()
    def violations(self) -> int:
        """How many pruned positions hold a non-zero value (0 after `apply`), summed over ranks."""
        count = sum(int(((m == 0) & (p != 0)).sum()) for p, m in zip(self._params, self._masks))
        return int(_all_reduce_sum(torch.tensor([count], dtype=torch.float64), self.sharded)[0])

    def kept_fraction(self) -> float:
        kept = sum(float(m.sum()) for m in self._masks)
        total = sum(m.numel() for m in self._masks)
        counts = _all_reduce_sum(torch.tensor([kept, total], dtype=torch.float64), self.sharded)
        return float(counts[0] / counts[1]) if counts[1] else 1.0


def _all_reduce_sum(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    if sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    return values


@dataclass
class SparsityReport:
    layers: list[tuple[str, int, int]] = field(default_factory=list)  # (layer name, nonzeros, numel)

    @property
    def nonzeros(self) -> int:
        return sum(nz for _, nz, _ in self.layers)

    @property
    def numel(self) -> int:
        return sum(n for _, _, n in self.layers)

    @property
    def density(self) -> float:
        return self.nonzeros / self.numel if self.numel else 1.0

    def lines(self) -> list[str]:
        lines = ["Non-zero ratio per layer (decoder linears):"]
        lines += [f"  {name}: {nz / n:.4f}" for name, nz, n in self.layers]
        lines.append(f"  overall: {self.density:.4f} ({self.nonzeros:,} of {self.numel:,} weights kept)")
        return lines

    def to_dict(self) -> dict:
        return {"density": self.density, "nonzeros": self.nonzeros, "numel": self.numel,
                "layers": {name: nz / n for name, nz, n in self.layers}}


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Measured non-zero ratio of every decoder layer's linear weights (shards of all ranks combined;
    a model that is not sharded is counted where it is, with no collective)."""
    prefix, layers = find_decoder_layers(model)
    counts, sharded = [], False
    for layer in layers:
        weights = [linear.weight for linear in find_linears(layer).values()]
        sharded = sharded or _any_sharded(weights)
        weights = [_local(w) for w in weights]
        counts.append([float(sum(int((w != 0).sum()) for w in weights)), float(sum(w.numel() for w in weights))])
    totals = _all_reduce_sum(torch.tensor(counts, dtype=torch.float64), sharded)
    return SparsityReport([(f"{prefix}.{i}", int(nz), int(n)) for i, (nz, n) in enumerate(totals.tolist())])
