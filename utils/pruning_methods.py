"""The pruning methods, one table (no torch here, so the command line can read it cheaply).

    METHODS["sparsegpt"].calibrated     # True: needs calibration text (and so it is in the cache key)
    list(METHODS)                       # the --method choices

Each entry says what the method needs; `utils/prune_utils.LAYER_PRUNERS` holds the function that
prunes one layer's weights for each name, and the layer-wise driver asks the entry whether to
capture calibration activations (`calibrated`) and whether to accumulate a Hessian (`hessian`).
A new method is a row here and a layer function there (a test checks both tables name the same
methods).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruningMethod:
    name: str
    calibrated: bool  # reads calibration activations: needs --calibration-source text
    hessian: bool  # accumulates the inputs' X^T X per layer (SparseGPT), not only their column norms
    summary: str


METHODS = {method.name: method for method in (
    PruningMethod("sparsegpt", True, True, "SparseGPT (Frantar & Alistarh 2023): OBS-style weight updates from X^T X"),
    PruningMethod("wanda", True, False, "Wanda (Sun et al. 2023): |weight| × input column norm, per output row"),
    PruningMethod("magnitude", False, False, "magnitude: the largest |weight| of each matrix, no data"),
)}


def needs_calibration(method: str) -> bool:
    return METHODS[method].calibrated
