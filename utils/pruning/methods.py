"""The pruning methods, ONE table: what each method reads, the function that prunes with it, and
its own options.

    METHODS["sparsegpt"].statistics          # "hessian": the inputs' X^T X per layer
    METHODS["wanda"].prune(weights, stats, density, pattern, options)   # in place
    METHODS["sparsegpt"].options()           # SparseGPTOptions(blocksize=128, percdamp=0.01, ...)
    list(METHODS)                            # the --method choices

A method is a function of tensors: the (out, in) weight views of the linears that share one input
(q/k/v, gate/up) and the statistics of that input → those weights pruned in place.  The layer-wise
driver (driver.py) collects the statistics the entry names and calls `prune`; it knows nothing else
about any method.  A new method is one row here; a knob of its own is a field of its options
dataclass (with `metadata={"flag": "--NAME-KNOB", "help": ...}` the command line gets the flag,
the config carries the value and the cache key names it when it is not the default).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from utils.pruning.criteria import (GraphedSweeps, InputStats, Pattern, Solver, magnitude_keep, sparsegpt_prune,
                                   wanda_keep)


@dataclass(frozen=True)
class MethodOptions:
    """Options every method has: how many calibration windows go through a layer at once."""
    batch_size: int = field(default=8, metadata={"identity": False})  # only the float rounding of running means
    # weights zero already stay zero, each matrix still pruned to exactly its density (a gradual
    # schedule's later prunes: SparseGPT's error updates would otherwise bring some back)
    keep_zeros: bool = field(default=False, metadata={"identity": False, "recorded": False})
    # each layer calibrated on what the pruned layers before it produce (the papers' way); False: on
    # the model as it stands, statistics and the next layer's inputs from one forward of each layer
    # (a gradual update's small change, where the method's entry says so: half the forwards)
    sequential: bool = field(default=True, metadata={"identity": False, "recorded": False})


@dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    blocksize: int = 128  # columns pruned together before their error is spread onward
    percdamp: float = 0.01  # dampening added to the Hessian's diagonal, as a fraction of its mean
    # the column sweep captured once per block shape and replayed (GPU): the same kernels, faster launched
    cuda_graphs: bool = field(default=True, metadata={"identity": False})


def _zeros(weight: torch.Tensor, options: MethodOptions) -> torch.Tensor | None:
    return weight == 0 if options.keep_zeros else None


def _magnitude(weights: list[torch.Tensor], stats: InputStats | None, density: float, pattern: Pattern,
               options: MethodOptions, sweep: Callable | None = None) -> None:
    for weight in weights:
        weight.masked_fill_(~magnitude_keep(weight, density, pattern, _zeros(weight, options)), 0.0)


def _wanda(weights: list[torch.Tensor], stats: InputStats, density: float, pattern: Pattern,
           options: MethodOptions, sweep: Callable | None = None) -> None:
    for weight in weights:
        weight.masked_fill_(~wanda_keep(weight, stats.sq_norm, density, pattern, _zeros(weight, options)), 0.0)


def _sparsegpt(weights: list[torch.Tensor], stats: InputStats, density: float, pattern: Pattern,
               options: SparseGPTOptions, sweep: Callable | None = None) -> None:
    """The matrices that share an input (q/k/v, gate/up) as one stacked sweep over one Hessian."""
    stacked = torch.cat([w.float() for w in weights])
    pruned, _ = sparsegpt_prune(stacked, stats.hessian, density, pattern, row_splits=[w.shape[0] for w in weights],
                                solver=Solver(options.blocksize, options.percdamp, sweep),
                                frozen=_zeros(stacked, options))
    for weight, part in zip(weights, pruned.split([w.shape[0] for w in weights])):
        weight.copy_(part.to(weight.dtype))


def _graphed_sweeps(device: torch.device, options: SparseGPTOptions) -> Callable | None:
    return GraphedSweeps(device) if options.cuda_graphs and device.type == "cuda" else None


@dataclass(frozen=True)
class PruningMethod:
    name: str
    statistics: str  # what it reads of each layer's inputs: "none", "norms" (‖X_j‖²) or "hessian" (X^T X too)
    prune: Callable  # (weights, stats, density, pattern, options, sweep) → None, the weights pruned in place
    summary: str
    options: type = MethodOptions
    sweeper: Callable | None = None  # (device, options) → a per-call helper `prune` takes as `sweep`, or None
    # a gradual update calibrates on the model as it stands (options' sequential=False), not layer by
    # layer: measured for wanda on the CPU, better and 2.5x faster; SparseGPT's error updates lean on what the
    # pruned layers before produce, and lost 12% that way (docs/benchmark-log.md, "A gradual update
    # calibrated on the model as it stands")
    updates_at_once: bool = False

    @property
    def calibrated(self) -> bool:
        """Reads calibration activations: needs --calibration-source text (and so it is in the cache key)."""
        return self.statistics != "none"

    @property
    def hessian(self) -> bool:
        return self.statistics == "hessian"


METHODS: dict[str, PruningMethod] = {method.name: method for method in (
    PruningMethod("sparsegpt", "hessian", _sparsegpt,
                  "SparseGPT (Frantar & Alistarh 2023): OBS-style weight updates from X^T X",
                  options=SparseGPTOptions, sweeper=_graphed_sweeps),
    PruningMethod("wanda", "norms", _wanda, "Wanda (Sun et al. 2023): |weight| × input column norm, per output row",
                  updates_at_once=True),
    PruningMethod("magnitude", "none", _magnitude, "magnitude: the largest |weight| of each matrix, no data"),
)}


def needs_calibration(method: str) -> bool:
    return METHODS[method].calibrated


def option_flags() -> list[tuple[str, object]]:
    """(method name, dataclass field) of every method option that has a command-line flag."""
    return [(name, option) for name, method in METHODS.items() for option in fields(method.options)
            if "flag" in option.metadata]


def non_default_options(options: MethodOptions) -> dict[str, object]:
    """The options that differ from their defaults: what the cache key and the identity name."""
    return {option.name: getattr(options, option.name) for option in fields(options)
            if option.metadata.get("identity", True) and getattr(options, option.name) != option.default}

