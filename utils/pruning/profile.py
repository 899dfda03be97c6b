"""Per-layer densities (`--layer-density`): one density everywhere, or OWL's profile.

    profile = DensityProfile("owl", lam=0.08, m=5.0)
    profile.tag                                                   # "owl-0.08-5": cache key and run identity
    profile.densities(model, calibration, 0.1, device)            # one per decoder layer, mean exactly 0.1
    resolve_layer_density("auto", 0.1, None, "oneshot", "sparsegpt")   # → "owl"

OWL (outlier-weighted layer-wise sparsity, driver.owl_profile) gives layers with more activation
outliers more weights.  Measured on SmolLM2-135M with SparseGPT (docs/benchmark-log.md, "Recovery at 0.1,
0.3, 0.5" and "Recovery over the full budget"): at density 0.1 it lowers the pruned perplexity
9,579 → 7,297 and the recovered one 167.2 → 141.8 (distillation, 5.1M tokens); at 0.3 the pruned
one 183.3 → 177.9, and every recipe that recovered 0.3 best (41.0, 38.9, 34.9) used it; at 0.5 it
moved the pruned model the wrong way (39.79 → 39.89).  So `auto` picks OWL at density ≤ 0.3 and
one density everywhere else: also for N:M patterns (one density by construction), for the
iterative and gradual schedules (`--layer-density owl` works there, a profile per stage or update,
none above what a layer holds), and for magnitude pruning (OWL needs calibration activations, which
magnitude pruning otherwise does without).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.pruning.driver import owl_profile
from utils.pruning.methods import needs_calibration

LAYER_DENSITIES = ("auto", "uniform", "owl")
OWL_AUTO_MAX_DENSITY = 0.3  # at or below: OWL by default (see above)


def resolve_layer_density(choice: str, density: float, pattern, schedule: str, method: str) -> str:
    """`--layer-density` as the prune will use it: "uniform" or "owl"."""
    if choice != "auto":
        return choice
    if pattern is None and schedule == "oneshot" and needs_calibration(method) and density <= OWL_AUTO_MAX_DENSITY:
        return "owl"
    return "uniform"


@dataclass(frozen=True)
class DensityProfile:
    kind: str = "uniform"  # "uniform" | "owl"
    lam: float = 0.08  # OWL: densities spread over density ± lam
    m: float = 5.0  # OWL: a weight is an outlier above m × its layer's mean Wanda score

    @property
    def owl(self) -> bool:
        return self.kind == "owl"

    @property
    def tag(self) -> str:
        """The rule as the cache key and the run identity name it."""
        return "uniform" if not self.owl else f"owl-{self.lam:g}-{self.m:g}"

    def densities(self, model: nn.Module, calibration: torch.Tensor | None, density: float,
                  device: torch.device, ceiling: list[float] | None = None) -> float | list[float]:
        """`density` everywhere, or OWL's per-layer densities (mean exactly `density`; `ceiling`:
        what each layer of a model pruned before still holds)."""
        if not self.owl or density >= 1:
            return density
        return owl_profile(model, calibration, density, self.lam, self.m, device=device, ceiling=ceiling)
