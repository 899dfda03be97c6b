"""What every step of a run shares once the model is known: the config, the process group, the
logger, the model's source, identity and tokenizer, and the evaluation protocol with its text.

    context = Context(config, accelerator, logger, folder, source, ...)   # made by run.py
    context.device, context.output, context.is_main
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.config.sections import EvalProtocol, RunConfig
from utils.data.sources import TokenizedText
from utils.eval_utils import CompiledKernels
from utils.io.events import MetricsLogger
from utils.io.run_folder import RunFolder
from utils.models.loading import ModelSource
from utils.pruning.schedule import SparsitySchedule
from utils.task_eval import TaskSet
from utils.training.parallel import MainFirst


@dataclass(frozen=True)
class Start:
    """How a mode starts: the run's identity (saved with its state), whether it continues a saved
    state, and the training loop's callbacks."""
    identity: dict
    resuming: bool = False
    callbacks: tuple = ()


@dataclass
class Context:
    config: RunConfig
    accelerator: object  # accelerate.Accelerator
    logger: MetricsLogger
    folder: RunFolder
    source: ModelSource
    model_identity: dict  # utils/models/loading.model_identity: where the model comes from, its fingerprint
    tokenizer: object
    bos: int | None  # every window and block starts with this token (--bos-per-window), or None
    schedule: SparsitySchedule
    model_config: object = None  # the model's transformers config
    protocol: EvalProtocol | None = None  # config.eval with the model's BOS (evaluating modes)
    eval_tokens: TokenizedText | None = None
    tasks: TaskSet | None = None
    kernels: CompiledKernels | None = None
    started: float = field(default_factory=time.monotonic)  # when the run began (time.monotonic)
    first: MainFirst = field(default_factory=lambda: MainFirst(True, 1))  # the main process first, the others after

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def output(self) -> Path:
        return self.folder.path

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes
