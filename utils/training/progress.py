"""How often the training loop reports, and what it says of the time left.

    cadence = LogCadence(every=None, world=1)
    cadence.due(steps=3, seconds=31.0)          # True: at least every 30 s by default
    estimate_line(seconds_per_step=0.2, remaining_steps=1000, evaluations=5, evaluation_seconds=12.0)

A log window ends with one host sync (the loss read back, the NaN check, the line), so it is
not closed every step on a GPU; on a CPU a step can take half a minute, and a person should not
wait six minutes for the first line.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.io.events import duration

WINDOW_STEPS = 10  # a window's steps by default (GPU: about a second)
WINDOW_SECONDS = 30.0  # ... or this long, whichever comes first (one process)


@dataclass(frozen=True)
class LogCadence:
    """When a log window closes: every `every` steps when given (--log-every); else after
    WINDOW_STEPS steps or WINDOW_SECONDS, whichever comes first.  Several processes close windows
    by steps only: a window's end is a collective, and their clocks would not agree."""
    every: int | None
    world: int = 1

    def due(self, steps: int, seconds: float, compiling: bool = False) -> bool:
        """`compiling`: the window holds the steps that compile, closed by steps only (by time its
        first step alone would close it, and the warm-up would count in the steady rate)."""
        if self.every is not None:
            return steps >= self.every
        return steps >= WINDOW_STEPS or (self.world == 1 and not compiling and seconds >= WINDOW_SECONDS)


def estimate_line(seconds_per_step: float, remaining_steps: int, evaluations: int,
                  evaluation_seconds: float | None, holdout_untimed: bool = False) -> tuple[str, dict]:
    """The time left, from the steps measured so far (and the last evaluation's time); the line
    and its event.  `holdout_untimed`: the evaluation's time is the baseline's, which scored no
    held-out text (each epoch's evaluation also does: said, not guessed)."""
    training = seconds_per_step * remaining_steps
    evaluating = evaluations * evaluation_seconds if evaluation_seconds else 0.0
    untimed = " and the held-out text, not yet timed" if holdout_untimed else ""
    also = (f" + {evaluations} evaluation(s) of about {duration(evaluation_seconds)}{untimed} = "
            f"{duration(training + evaluating)}{' and more' if holdout_untimed else ''}" if evaluating else "")
    line = (f"Time: {duration(seconds_per_step)} per optimizer step so far → about {duration(training)} for the "
            f"{remaining_steps:,} steps left{also}")
    return line, {"event": "estimate", "seconds_per_step": seconds_per_step, "remaining_steps": remaining_steps,
                  "training_seconds": training, "evaluation_seconds": evaluating, "holdout_untimed": holdout_untimed}
