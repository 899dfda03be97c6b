"""Sparsity schedules: which density the model holds at each optimizer step.

    schedule = SparsitySchedule.oneshot(0.1)                               # pruned once, before training
    schedule = SparsitySchedule.iterative(0.1, total_steps=6250, steps=4)  # 0.5 → 0.29 → 0.17 → 0.1
    schedule.density_at(step); schedule.stage_starting_at(step)            # → the new density, or None

Iterative pruning (the seed lineage's finding: prune → fine-tune → prune beats one-shot past
40–60% sparsity) splits the training budget into equal stages; each stage after the first
starts by pruning the trained model further (re-calibrated).  The stage is a pure function of
the optimizer step, so a resumed run re-enters it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("oneshot", "iterative")
ITERATIVE_START = 0.5  # the first stage's density when none is given (SparseGPT loses little at 50%)


@dataclass(frozen=True)
class SparsitySchedule:
    kind: str
    stages: tuple[tuple[int, float], ...]  # (first optimizer step, density), steps increasing from 0

    @classmethod
    def oneshot(cls, density: float) -> "SparsitySchedule":
        return cls("oneshot", ((0, density),))

    @classmethod
    def iterative(cls, density: float, total_steps: int, steps: int = 4,
                  densities: list[float] | None = None) -> "SparsitySchedule":
        """`densities` (decreasing, ending at `density`), or `steps` geometric ones from 0.5."""
        if densities is None:
            start = max(ITERATIVE_START, density)
            densities = [start * (density / start) ** (i / max(1, steps - 1)) for i in range(steps)]
            densities[-1] = density
        if densities[-1] != density or any(b >= a for a, b in zip(densities, densities[1:])):
            raise ValueError(f"densities must decrease and end at {density:g}, got {densities}")
        if len(densities) > total_steps:
            raise ValueError(f"{len(densities)} stages do not fit in {total_steps} optimizer steps")
        return cls("iterative", tuple((i * total_steps // len(densities), d) for i, d in enumerate(densities)))

    @property
    def initial(self) -> float:
        return self.stages[0][1]

    @property
    def final(self) -> float:
        return self.stages[-1][1]

    def density_at(self, step: int) -> float:
        """The density the model holds while optimizer step `step` (0-based) runs."""
        return [d for start, d in self.stages if start <= step][-1]

    def stage_starting_at(self, step: int) -> float | None:
        """The density of a stage that begins at `step` (after the first), else None."""
        return next((d for start, d in self.stages[1:] if start == step), None)

    def describe(self) -> str:
        if self.kind == "oneshot":
            return f"one-shot to density {self.final:g}"
        return "iterative: " + " → ".join(f"{d:.3g} (step {start})" for start, d in self.stages)
