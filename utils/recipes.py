"""The best recovery measured near each density, and the note a run with the brief's lr prints.

    recipe = measured_recipe(0.1)   # → MeasuredRecipe(density=0.1, loss="kd", schedule="gradual", lr=6e-4, ...)
    default_loss(0.5)               # → "ce+kd": what --loss auto trains with
    auto_loss_rule()                # → "kd at density ≤ 0.4, ce+kd above"
    recipe_note(config)             # → "Note: the best recovery measured near density 0.1 ..." or None

Measured with SmolLM2-135M on the H200 over the user's budget: 5 epochs × 1,250 steps × batch 8
× 512 tokens = 25.6M tokens, on 2.3M tokens of text (`wiki.valid.raw` + the fallback text), the
full WikiText-2 test protocol; dense 21.61 (BENCHMARKS.md, "Recovery over the full budget" and
"The table's missing rows", "The table completed").  The brief fixes the default lr at
5e-6·√batch; every recipe here trained at a larger one, so a run at the derived lr is told what
was measured and the `--base-lr` that keeps the √batch rule.  The loss is free: `--loss auto`
(the default) takes the row's.  The table is data: a new measurement is a new row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MEASURED_BATCH = 8


@dataclass(frozen=True)
class MeasuredRecipe:
    density: float
    up_to: float  # the recipe is named for densities in (the previous row's up_to, up_to]
    loss: str
    schedule: str
    lr: float  # at MEASURED_BATCH
    perplexity: float
    compared: str  # what other recipes measured on the same budget

    @property
    def base_lr(self) -> float:
        return self.lr / math.sqrt(MEASURED_BATCH)


RECIPES = (
    MeasuredRecipe(0.1, 0.2, "kd", "gradual", 6e-4, 66.77,
                   "iterative at the same lr 75.45, iterative + OWL 76.72, one-shot OWL 79.54; gradual at the "
                   "derived lr 464.1 after one epoch, one-shot 286.1"),
    MeasuredRecipe(0.3, 0.4, "kd", "gradual", 6e-4, 34.18,
                   "one-shot OWL at the same lr 34.91; cross-entropy on wiki.valid at the derived lr (today's "
                   "recipe) 47.90"),
    MeasuredRecipe(0.5, 0.6, "ce+kd", "oneshot", 5e-5, 22.16,
                   "at 5e-5 cross-entropy 23.29, distillation 26.31, iterative from 0.8 23.33; cross-entropy at "
                   "the derived lr 23.19, on wiki.valid alone (today's recipe) 25.32"),
)


def measured_recipe(density: float) -> MeasuredRecipe | None:
    """The row whose band holds `density`, or None (none measured near it)."""
    low = 0.0
    for recipe in RECIPES:
        if low < density <= recipe.up_to:
            return recipe
        low = recipe.up_to
    return None


def default_loss(density: float) -> str:
    """`--loss auto`: the loss of the recipe measured nearest `density` (above the last band, near
    dense: the last row's, whose cross-entropy term still learns and whose teacher still anchors)."""
    recipe = measured_recipe(density) or min(RECIPES, key=lambda row: abs(row.density - density))
    return recipe.loss


def auto_loss_rule() -> str:
    """What `--loss auto` picks, in words, from the table: "kd at density ≤ 0.4, ce+kd above"."""
    groups: list[list] = []  # [loss, up_to of its last row], consecutive rows of one loss merged
    for row in RECIPES:
        if groups and groups[-1][0] == row.loss:
            groups[-1][1] = row.up_to
        else:
            groups.append([row.loss, row.up_to])
    words = [f"{loss} {'at density ≤' if index == 0 else 'to'} {up_to:g}"
             for index, (loss, up_to) in enumerate(groups[:-1])]
    return ", ".join([*words, f"{groups[-1][0]} above" if words else groups[-1][0]])


def _lr(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-")  # 6.0e-4, 2.1e-4


def recipe_note(config) -> str | None:
    """What a run at the brief's derived lr prints: the best measured recipe near its density and
    where this run differs.  Silent once --lr or --base-lr is given, or far from every row."""
    recipe = measured_recipe(config.density)
    if not config.lr_derived or recipe is None:
        return None
    differs = [f"--{name} {ours}" for name, ours, theirs in (("loss", config.loss, recipe.loss),
                                                             ("schedule", config.schedule, recipe.schedule))
               if ours != theirs]
    derived_base = config.lr / math.sqrt(config.batch_size)
    differs.append(f"lr {_lr(config.lr)} (derived: {_lr(derived_base)} × √batch)")
    base = float(f"{recipe.base_lr:.2g}")  # as printed, so that the lr named is the one the flag gives
    flags = f"--loss {recipe.loss}" + (f" --schedule {recipe.schedule}" if recipe.schedule != "oneshot" else "")
    return (f"Note: the best recovery measured near density {recipe.density:g} (SmolLM2-135M over the user's 25.6M "
            f"tokens on 2.3M tokens of text, BENCHMARKS.md) is {recipe.perplexity:.2f} with {flags} and lr "
            f"{_lr(recipe.lr)} at batch {MEASURED_BATCH}; for comparison {recipe.compared}. This run has "
            + ", ".join(differs) + f". {flags} --base-lr {_lr(base)} keeps the √batch rule and gives lr "
            f"{_lr(base * math.sqrt(config.batch_size))} at batch {config.batch_size}")
