"""Sparsity schedules: which density the model holds at each optimizer step.

    schedule = SparsitySchedule.oneshot(0.1)                               # pruned once, before training
    schedule = SparsitySchedule.iterative(0.1, total_steps=6250, steps=4)  # 0.5 → 0.29 → 0.17 → 0.1
    schedule = SparsitySchedule.gradual(0.1, total_steps=6250, every=50)    # cubic 0.5 → 0.1 over 60% of the steps
    schedule.density_at(step); schedule.stage_starting_at(step)            # → the new density, or None

Iterative pruning (the seed lineage's finding: prune → fine-tune → prune beats one-shot past
40–60% sparsity) splits the training budget into equal stages; each stage after the first
starts by pruning the trained model further (re-calibrated).  The stage is a pure function of
the optimizer step, so a resumed run re-enters it exactly.

Gradual pruning (Zhu & Gupta 2017) lowers the density a little every `every` steps along a cubic,
d(t) = final + (start − final)·(1 − t/T)³, reaching the final density at T = 60% of the steps and
holding it after; each update prunes the trained weights by magnitude (or, with --reprune-method,
by a calibrated criterion on a few windows), keeps the zeros it finds,
changes the masks in place and is not evaluated, unlike an iterative stage.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from utils.config.sections import ScheduleCfg
from utils.models.sparsity import sparsity_report
from utils.pruning.driver import prune_model
from utils.pruning.methods import METHODS, MethodOptions, needs_calibration
from utils.pruning.profile import DensityProfile


@dataclass(frozen=True)
class ScheduleKind:
    """What a schedule kind does at its stage boundaries."""
    evaluates_stages: bool  # perplexity before and after each later prune (a few large steps worth reporting)
    reprune_method: str | None  # the method of later prunes: None = the run's --method
    summary: str


KINDS: dict[str, ScheduleKind] = {
    "oneshot": ScheduleKind(False, None, "prune once before training"),
    "iterative": ScheduleKind(True, None, "prune, fine-tune, prune further (re-calibrated), ..."),
    # many small updates, each too small to be worth a calibration pass
    "gradual": ScheduleKind(False, "magnitude", "lower the density along a cubic, masks updated in place"),
}
SCHEDULES = tuple(KINDS)
ITERATIVE_START = 0.5  # the first stage's density when none is given (SparseGPT loses little at 50%)
GRADUAL_RAMP = ScheduleCfg().ramp_end  # gradual: the fraction of the steps over which the density falls (--ramp-end)


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

    @classmethod
    def gradual(cls, density: float, total_steps: int, every: int = 50, start: float | None = None,
                ramp: float = GRADUAL_RAMP) -> "SparsitySchedule":
        """From `start` (default 0.5, pruned before training) down a cubic to `density` at
        `ramp`·`total_steps`, one update every `every` steps (updates that would not change the
        density, by rounding, are left out)."""
        start = max(ITERATIVE_START, density) if start is None else start
        if not density < start <= 1:
            raise ValueError(f"the gradual start density {start:g} must lie above the final {density:g} and at most 1")
        end = max(1, int(ramp * total_steps))
        stages = [(0, start)]
        for step in range(every, end + 1, every):
            stages.append((step, density + (start - density) * (1 - step / end) ** 3))
        if stages[-1][0] != end:  # (the cubic at `end` itself is `density` exactly)
            stages.append((end, density))
        distinct = [stages[0]] + [s for p, s in zip(stages, stages[1:]) if round(s[1], 6) < round(p[1], 6)]
        distinct[-1] = (distinct[-1][0], density)  # the last update may have been the one left out as equal
        return cls("gradual", tuple(distinct))

    @property
    def evaluates_stages(self) -> bool:
        """Whether a stage boundary is evaluated before and after pruning (iterative: a few large
        steps worth reporting; gradual: many small ones, seen in the epochs' numbers)."""
        return KINDS[self.kind].evaluates_stages

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

    def describe(self, method: str = "magnitude") -> str:
        """`method`: what the later prunes use (utils/pipeline/prune_step.reprune_method)."""
        if self.kind == "oneshot":
            return f"one-shot to density {self.final:g}"
        if self.kind == "gradual":
            (first, start), (end, _) = self.stages[1], self.stages[-1]
            return (f"gradual: {self.initial:g} (step 0), then {method} updates from step {first} "
                    f"({start:.3g}) along a cubic to {self.final:g} at step {end}, {len(self.stages) - 1} updates")
        return "iterative: " + " → ".join(f"{d:.3g} (step {start})" for start, d in self.stages)


def reprune_method(schedule: ScheduleCfg, method: str) -> str:
    """The method of a schedule's later prunes: --reprune-method, else the kind's (gradual:
    magnitude; iterative: `method`, the first prune's)."""
    if schedule.reprune_method != "auto":
        return schedule.reprune_method
    return KINDS[schedule.kind].reprune_method or method


@dataclass
class Repruner:
    """A schedule's later prunes: the trained model pruned in place to a density, with the method
    `reprune_method` names (iterative: --method, re-calibrated on the trained model with the same
    windows as the first prune; gradual: magnitude, or a calibrated method on the first
    --reprune-nsamples windows), per layer by OWL when the profile says so.  A gradual update keeps
    the zeros it finds (its options' `keep_zeros`): its masks only ever grow; and, where the method's
    entry says so (wanda), it calibrates on the model as it stands (`sequential=False`: one forward
    of each layer, not two passes)."""
    model: nn.Module
    method: str
    profile: DensityProfile
    calibration: torch.Tensor | None
    device: torch.device
    options: MethodOptions | None = None

    @classmethod
    def for_schedule(cls, schedule: ScheduleCfg, model: nn.Module, method: str, profile: DensityProfile,
                     calibration: Callable[[], torch.Tensor], device: torch.device,
                     options: MethodOptions | None = None) -> "Repruner":
        """`calibration()` makes the windows, called only when the re-prune reads activations;
        `options`: those of `method` (another method takes its defaults)."""
        chosen = reprune_method(schedule, method)
        needed = needs_calibration(chosen) or profile.owl
        windows = calibration() if needed else None
        if windows is not None and schedule.kind == "gradual":  # many small updates: a small calibration batch
            windows = windows[:schedule.reprune_nsamples]
        own = options if chosen == method and options is not None else METHODS[chosen].options()
        return cls(model, chosen, profile, windows, device,
                   dataclasses.replace(own, keep_zeros=True, sequential=not METHODS[chosen].updates_at_once)
                   if schedule.kind == "gradual" else own)

    def __call__(self, density: float) -> None:
        # OWL: the profile anew for this density, from the trained model, no layer above the
        # density it holds now (its pruned weights cannot come back)
        held = None
        if self.profile.owl:
            report = sparsity_report(self.model)
            if report.density <= density:  # rows' rounding at an earlier update left no more than this
                return
            held = [nonzeros / numel for _, nonzeros, numel in report.layers]
        target = self.profile.densities(self.model, self.calibration, density, self.device, ceiling=held)
        prune_model(self.model, self.method, target, calibration=self.calibration, device=self.device,
                    options=self.options, progress=False)
