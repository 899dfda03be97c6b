"""How a training run stops short: --patience (on the held-out loss, or on perplexity), the errors
that end it with a message (its results kept), the NaN check, and the message that says what to do.

    patience = Patience.from_config(train)                      # --patience, --patience-on, --cooldown-steps
    if patience.exhausted(state, eligible, improved, holdout):  # counts the epoch in state.bad_epochs
        ...                                                     # cool down (the lr to 0), or stop now
    check_finite(loss, step)          # the loss, or TrainingStopped
    stop_message(error, saved_epoch)  # "out of memory: lower --micro-batch-size ..."
    TrainResult(history, state, ...)  # how the loop ended: stopped early, interrupted, an error
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._dynamo.exc import TorchDynamoException

from utils.config.sections import TrainCfg
from utils.io.events import first_line
from utils.io.history import PerplexityHistory, finished_title
from utils.training.state import TrainState


@dataclass(frozen=True)
class Patience:
    """--patience: epochs at the final density without improvement of the watched number before the
    run stops.  `watch` "holdout" is the loss on the training text's held-out blocks (the stop is
    decided without the test set); "perplexity" the evaluation text's, as before --patience-on.  An
    epoch without a held-out loss (none held out) counts by perplexity.  `min_delta`: the relative
    drop that counts as an improvement, of perplexity or of the held-out perplexity exp(loss).
    `cooldown_steps`: steps trained after patience runs out, with the lr falling linearly to 0
    (Optimization.cool_down), before the run stops."""
    epochs: int | None
    watch: str = "holdout"
    min_delta: float = 0.0
    cooldown_steps: int = 0

    @classmethod
    def from_config(cls, train: TrainCfg) -> "Patience":
        return cls(train.patience, train.patience_on, train.min_delta, train.cooldown_steps)

    def watched(self, holdout_record: dict) -> str:
        """What this epoch was counted by (an epoch without a held-out loss counts by perplexity)."""
        return "the held-out loss" if self.watch == "holdout" and "holdout_loss" in holdout_record else "perplexity"

    def stop_line(self, bad_epochs: int, holdout_record: dict, cooldown_steps: int) -> str:
        """What the run says when patience runs out (with `cooldown_steps` more steps to train)."""
        line = f"{self.watched(holdout_record)} has not improved for {bad_epochs} epoch(s) (--patience {self.epochs})"
        if not cooldown_steps:
            return f"Early stopping: {line}"
        return (f"Patience ran out: {line}; cooling down: the lr falls to 0 over {cooldown_steps} more steps "
                "(--cooldown-steps), then the run stops")

    def exhausted(self, state: TrainState, eligible: bool, perplexity_improved: bool,
                  holdout_loss: float | None) -> bool:
        """Count this epoch (state.bad_epochs, state.best_holdout_loss); True when patience has run out."""
        improved = perplexity_improved
        if self.watch == "holdout" and holdout_loss is not None:
            best = state.best_holdout_loss
            # the same criterion as on perplexity: exp(loss) must fall by the fraction min_delta
            improved = eligible and (best is None or holdout_loss < best + math.log1p(-self.min_delta))
            if improved:
                state.best_holdout_loss = holdout_loss
        state.bad_epochs = 0 if improved or not eligible else state.bad_epochs + 1
        return self.epochs is not None and state.bad_epochs >= self.epochs


@dataclass
class TrainResult:
    history: PerplexityHistory
    state: TrainState
    stopped_early: bool = False
    interrupted: bool = False
    error: str | None = None  # why the run stopped short (NaN loss, out of memory, compilation); best model kept
    earlier_seconds: float = 0.0  # wall time of the processes that ran this run before a --resume

    def summary_title(self, total_steps: int) -> str:
        """The summary's heading: an interrupted or failed run's summary does not read like a finished one."""
        if self.interrupted:
            return (f"Summary So Far: INTERRUPTED at optimizer step {self.state.global_step} of {total_steps} "
                    "(continue with the same command plus --resume)")
        if self.error:
            return "Summary So Far: the run STOPPED SHORT (the error above); the best model is kept"
        return finished_title(self.stopped_early, self.state.global_step, total_steps)


class TrainingStopped(RuntimeError):
    """Raised when a run must stop (NaN loss); the message says what was kept."""


# Errors that end a run with a message and its results kept, instead of a traceback.
STOPPING_ERRORS = (torch.cuda.OutOfMemoryError, TorchDynamoException)


def stop_message(error: BaseException, saved_epoch: int | None = None) -> str:
    """What went wrong and what to do about it, with the first line of the error itself; `saved_epoch`:
    the epoch whose training was saved when its evaluation failed."""
    first = first_line(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        kept = (f" Epoch {saved_epoch}'s training is saved: the same command plus --resume (a lower --eval-batch-size "
                "may be given) evaluates it without training it again." if saved_epoch is not None else "")
        return ("out of memory: lower --micro-batch-size (gradient accumulation keeps the effective batch), "
                "--block-size, --eval-batch-size or --token-length, or use more GPUs with accelerate launch "
                f"({first}).{kept}")
    return (f"torch.compile failed ({type(error).__name__}: {first}); run again with --compile off "
            "(add --resume to continue from the last finished epoch)")


def check_finite(loss: float, step: int) -> float:
    """`loss`, or TrainingStopped when it is NaN or infinite (the weights may be already)."""
    if not math.isfinite(loss):
        raise TrainingStopped(f"the training loss became {loss} by optimizer step {step}; the best model so far is "
                              "kept. Lower --lr or use --mixed-precision bf16 instead of fp16")
    return loss
