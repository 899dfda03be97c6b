"""How a training run stops short: the errors that end it with a message (its results kept), the
NaN check, and the message that says what to do.

    check_finite(loss, step)          # the loss, or TrainingStopped
    stop_message(error)               # "out of memory: lower --micro-batch-size ..."
"""
from __future__ import annotations

import math

import torch
from torch._dynamo.exc import TorchDynamoException


class TrainingStopped(RuntimeError):
    """Raised when a run must stop (NaN loss); the message says what was kept."""


# Errors that end a run with a message and its results kept, instead of a traceback.
STOPPING_ERRORS = (torch.cuda.OutOfMemoryError, TorchDynamoException)


def stop_message(error: BaseException) -> str:
    """What went wrong and what to do about it, with the first line of the error itself."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("out of memory: lower --micro-batch-size (gradient accumulation keeps the effective batch), "
                "--block-size, --eval-batch-size or --token-length, or use more GPUs with accelerate launch "
                f"({first})")
    return (f"torch.compile failed ({type(error).__name__}: {first}); run again with --compile off "
            "(add --resume to continue from the last finished epoch)")


def check_finite(loss: float, step: int) -> float:
    """`loss`, or TrainingStopped when it is NaN or infinite (the weights may be already)."""
    if not math.isfinite(loss):
        raise TrainingStopped(f"the training loss became {loss} by optimizer step {step}; the best model so far is "
                              "kept. Lower --lr or use --mixed-precision bf16 instead of fp16")
    return loss
