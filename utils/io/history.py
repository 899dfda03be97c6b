"""Perplexity over a run: the dense model, the baseline, one entry per epoch, the trend and the summary.

    history = PerplexityHistory(dense=21.6, baseline=9579.0)
    history.add(1, 80.2); history.trend_lines(); history.summary_lines()
    history.to_dict()     # results.json and the saved state; PerplexityHistory.from_dict reads it back
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.io.events import banner, percent


@dataclass
class PerplexityHistory:
    """Perplexity over a run: the baseline, one entry per epoch, the trend and the summary."""

    baseline: float | None = None
    dense: float | None = None
    epochs: list[tuple[int, float]] = field(default_factory=list)
    final_from: int = 0  # first epoch at the final density (iterative pruning: earlier ones hold more weights)
    # A schedule's baseline is measured at its first density, above the final one: (start, final), else None
    densities: tuple[float, float] | None = None
    # Per epoch, what was measured beside perplexity (accuracy, bits/byte, training and held-out loss)
    details: dict[int, dict] = field(default_factory=dict)
    quick: str | None = None  # set when perplexity is a quick look (--eval-windows): said in every summary

    def add(self, epoch: int, perplexity: float) -> None:
        self.epochs = [(e, p) for e, p in self.epochs if e != epoch] + [(epoch, perplexity)]

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, perplexity) of the best evaluation; epoch 0 is the baseline."""
        candidates = ([(0, self.baseline)] if self.baseline is not None else []) + self.epochs
        finite = [(e, p) for e, p in candidates if math.isfinite(p) and e >= self.final_from]
        return min(finite, key=lambda item: item[1]) if finite else None

    @property
    def final(self) -> float | None:
        """The last evaluation's; before any epoch the baseline's, unless a schedule measured the baseline
        at another density than the model it trains to (then None: nothing measured it yet)."""
        if self.epochs:
            return self.epochs[-1][1]
        return None if self.densities else self.baseline

    @staticmethod
    def change(before: float, after: float) -> str:
        """'↓5.9%' when perplexity fell, '↑2.0%' when it rose."""
        if not (math.isfinite(before) and math.isfinite(after)) or before == 0:
            return "n/a"
        delta = (after - before) / before * 100
        return f"{'↓' if delta <= 0 else '↑'}{abs(delta):.1f}%"

    def trend_lines(self) -> list[str]:
        lines = []
        if self.dense is not None:
            lines.append(f"Dense model: {self.dense:.2f}")
        against = f" against the baseline at density {percent(self.densities[0])}" if self.densities else ""
        if self.baseline is not None:
            where = (f"pruned to density {percent(self.densities[0])}, where the schedule starts"
                     if self.densities else "pruned")
            lines.append(f"Baseline ({where}, before training): {self.baseline:.2f}")
        for epoch, ppl in self.epochs:
            trend = f" ({self.change(self.baseline, ppl)}{against})" if self.baseline is not None else ""
            lines.append(f"Epoch {epoch}: {ppl:.2f}{trend}")
        return lines

    def summary_lines(self, title: str = "Final Summary") -> list[str]:
        lines = [banner(title)] + ([self.quick] if self.quick else [])
        if self.dense is not None:
            lines.append(f"Dense perplexity:    {self.dense:.4f}")
        if self.baseline is not None:
            lines.append(f"Baseline perplexity: {self.baseline:.4f}")
        if self.final is not None:
            lines.append(f"Final perplexity:    {self.final:.4f}")
        best = self.best
        if best is not None:
            where = "baseline" if best[0] == 0 else f"epoch {best[0]}"
            lines.append(f"Best perplexity:     {best[1]:.4f} ({where})")
        if self.baseline is not None and self.final is not None:
            drop = self.baseline - self.final
            than = "than the baseline" if not self.densities else (
                f"than the baseline, which held density {percent(self.densities[0])}; the final model holds "
                f"{percent(self.densities[1])}, so this is not a gain from training alone")
            label = "Total improvement:  " if not self.densities else "Since the baseline: "
            lines.append(f"{label} {self.change(self.baseline, self.final)} "
                         f"({abs(drop):.4f} {'lower' if drop >= 0 else 'higher'} {than})")
        if self.dense and self.final is not None and self.epochs:
            lines.append(f"Against dense:       {self.final / self.dense:.2f}× the dense perplexity")
        return lines

    def to_dict(self) -> dict:
        best = self.best
        return {"dense": self.dense, "baseline": self.baseline, "final": self.final, "final_from": self.final_from,
                "baseline_density": self.densities[0] if self.densities else None,
                "epochs": [{"epoch": e, "perplexity": p, **self.details.get(e, {})} for e, p in self.epochs],
                "quick_look": self.quick,
                "best": {"epoch": best[0], "perplexity": best[1]} if best else None,
                "densities": list(self.densities) if self.densities else None}

    @classmethod
    def from_dict(cls, data: dict) -> "PerplexityHistory":
        densities = data.get("densities")
        epochs = data.get("epochs", [])
        return cls(baseline=data.get("baseline"), dense=data.get("dense"), final_from=int(data.get("final_from", 0)),
                   epochs=[(int(e["epoch"]), float(e["perplexity"])) for e in epochs],
                   details={int(e["epoch"]): {k: v for k, v in e.items() if k not in ("epoch", "perplexity")}
                            for e in epochs if len(e) > 2}, quick=data.get("quick_look"),
                   densities=tuple(densities) if isinstance(densities, list) and len(densities) == 2 else None)


def finished_title(stopped_early: bool, step: int, total_steps: int) -> str:
    """The summary's heading of a run that ended by itself: all its steps, or stopped by --patience."""
    if stopped_early:
        return f"Final Summary: stopped early by --patience at optimizer step {step} of {total_steps}"
    return "Final Summary"
