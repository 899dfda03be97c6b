"""The density of a model, measured (never assumed): every decoder layer's linear weights counted,
shards of all processes combined, in one host read.

    report = sparsity_report(model)      # report.density, report.layers, report.lines()
    nonzero_counts([[w1, w2], [w3]])     # [non-zeros of w1 and w2, of w3], one transfer

`local_part` and `any_sharded` see through FSDP2's DTensor parameters: masks, counts and the
training state work on each process's own shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from utils.models.structure import find_decoder_layers, find_linears


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def any_sharded(tensors) -> bool:
    """Whether any is an FSDP2 shard (a DTensor), whose counts must be summed over the ranks."""
    return any(hasattr(t, "to_local") for t in tensors)


def replication(tensors) -> int:
    """How many processes hold each shard of these DTensors (HSDP: one per machine; FSDP: 1): a sum
    over all processes counts every shard this many times."""
    for tensor in tensors:
        if hasattr(tensor, "placements"):
            return math.prod(tensor.device_mesh.size(dim) for dim, placement in enumerate(tensor.placements)
                             if placement.is_replicate())
    return 1


def all_reduce_sum(values: torch.Tensor, sharded: bool) -> torch.Tensor:
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

    def event(self, **where) -> dict:
        """A `sparsity` event for metrics.jsonl: the counts of every linear (curves.png draws them)."""
        return {"event": "sparsity", **where, "density": self.density,
                "layers": [[name, nz, n] for name, nz, n in self.layers]}


@torch.no_grad()
def nonzero_counts(groups: list[list[torch.Tensor]]) -> list[int]:
    """The non-zeros of each group of tensors, read back in one transfer: a host read per tensor
    stalls a GPU step each time, and far longer when other processes share the GPU (a gradual
    schedule's mask update counts every layer)."""
    device = next((t.device for group in groups for t in group), None)
    if device is None:  # no tensors at all (an empty group counts 0, as before)
        return [0] * len(groups)
    return torch.stack([sum((torch.count_nonzero(t).to(device) for t in group),
                            torch.zeros((), dtype=torch.int64, device=device)) for group in groups]).tolist()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Measured non-zero ratio of every decoder layer's linear weights (shards of all ranks combined;
    a model that is not sharded is counted where it is, with no collective)."""
    prefix, layers = find_decoder_layers(model)
    groups = [[linear.weight for linear in find_linears(layer).values()] for layer in layers]
    sharded = any(any_sharded(weights) for weights in groups)
    replicas = replication([w for group in groups for w in group])
    groups = [[local_part(w) for w in weights] for weights in groups]
    counts = [[float(nonzeros), float(sum(w.numel() for w in weights))]
              for nonzeros, weights in zip(nonzero_counts(groups), groups)]
    totals = all_reduce_sum(torch.tensor(counts, dtype=torch.float64), sharded) / replicas
    return SparsityReport([(f"{prefix}.{i}", int(nz), int(n)) for i, (nz, n) in enumerate(totals.tolist())])
