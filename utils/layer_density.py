"""Which per-layer density rule a prune uses (`--layer-density`), without importing torch.

    resolve_layer_density("auto", 0.1, None, "oneshot", "sparsegpt")   # → "owl"
    resolve_layer_density("auto", 0.5, None, "oneshot", "sparsegpt")   # → "uniform"

OWL (outlier-weighted layer-wise sparsity, utils/prune_utils.owl_profile) gives layers with more
activation outliers more weights.  Measured on SmolLM2-135M with SparseGPT (BENCHMARKS.md,
"Recovery at 0.1, 0.3, 0.5" and "Recovery over the full budget"): at density 0.1 it lowers the
pruned perplexity 9,579 → 7,297 and the recovered one 167.2 → 141.8 (distillation, 5.1M tokens);
at 0.3 the pruned one 183.3 → 177.9, and every recipe that recovered 0.3 best (41.0, 38.9, 34.9)
used it; at 0.5 it moved the pruned model the wrong way (39.79 → 39.89).  So `auto` picks OWL at
density ≤ 0.3 and one density everywhere else: also for N:M patterns (one density by
construction), for the iterative schedule (`--layer-density owl` works there, a profile per stage,
but was not measured to its end) and the gradual one (which re-prunes uniformly), and for
magnitude pruning (OWL needs calibration activations, which magnitude pruning otherwise does
without).
"""
from __future__ import annotations

from .pruning_methods import needs_calibration

LAYER_DENSITIES = ("auto", "uniform", "owl")
OWL_AUTO_MAX_DENSITY = 0.3  # at or below: OWL by default (see above)


def resolve_layer_density(choice: str, density: float, pattern, schedule: str, method: str) -> str:
    """`--layer-density` as the prune will use it: "uniform" or "owl"."""
    if choice != "auto":
        return choice
    if pattern is None and schedule == "oneshot" and needs_calibration(method) and density <= OWL_AUTO_MAX_DENSITY:
        return "owl"
    return "uniform"
