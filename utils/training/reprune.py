"""A schedule's later prune, in the middle of training: the model pruned further in place, its
masks and optimizer moments following.

    measured = prune_in_place(model, 0.2, reprune, masks, optimization, logger, state)
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from utils.io.events import MetricsLogger, describe_density
from utils.models.sparsity import sparsity_report
from utils.pruning.driver import density_tolerance
from utils.training.masks import MaskSet
from utils.training.state import TrainState
from utils.training.step import Optimization


def prune_in_place(model: nn.Module, density: float, reprune: Callable[[float], None], masks: MaskSet,
                   optimization: Optimization, logger: MetricsLogger, state: TrainState) -> float:
    """Prune the trained model in place to `density`: masks refreshed in place (the compiled
    backward reads these very buffers), the new zeros' optimizer moments cleared.  Returns the
    measured density; recorded as a `mask_update` event (a gradual schedule's are not printed)."""
    was_training = model.training
    model.eval()
    reprune(density)
    model.train(was_training)
    masks.agree()  # --parallel ddp: every copy pruned itself; all keep rank 0's masks
    masks.refresh()
    masks.mask_optimizer_state(optimization.optimizer)
    measured = sparsity_report(model).density
    logger.log({"event": "mask_update", "step": state.global_step, "epoch": state.epoch, "density": density,
                "measured_density": measured}, step=state.global_step)
    if abs(measured - density) > density_tolerance(model):
        logger.info(f"Warning: the prune at step {state.global_step} left {describe_density(measured)}, not the "
                    f"scheduled {density:.4g} (more than rounding); training goes on at the measured density. "
                    "This is a bug, please report it with the run's metrics.jsonl")
    return measured
