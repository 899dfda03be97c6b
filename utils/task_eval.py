"""Zero-shot task accuracy through lm-eval (EleutherAI's harness), as the SparseGPT and Wanda papers
report it.  lm-eval is optional: `pip install lm-eval`.

    tasks = load_tasks(["arc_easy", "my_local_task"], task_dir="tasks/")   # early: names and data checked
    scores = evaluate_tasks(model, tokenizer, tasks, device, batch_size=8)  # {"arc_easy": {"acc": 0.61, ...}}

Hub tasks (arc_easy, hellaswag, piqa, winogrande, ...) download their datasets; without a network
use a local task: a YAML file in `task_dir` whose `dataset_path: json` reads local JSON lines
(lm-eval's own mechanism; README "Zero-shot tasks" has an example).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import torch
from torch import nn

from utils.io.events import first_line

INSTALL = "pip install lm-eval"


class TaskError(ValueError):
    """A task that cannot be found or loaded; the message says what to do."""


def lm_eval_missing() -> str | None:
    """Why --tasks cannot run here, or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"--tasks needs the lm-eval package, which is not installed ({INSTALL})"
    return None


@dataclass
class TaskSet:
    """Tasks loaded before any work (their data read once), ready for every evaluation of the run."""
    names: list[str]
    tasks: dict  # lm-eval's name → Task
    manager: object


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs at INFO and prints a warning for every model object; the run's own lines say what matters."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def load_tasks(names: list[str], task_dir: str | None = None) -> TaskSet:
    """lm-eval's tasks by name (hub tasks and the YAML tasks in `task_dir`), their datasets loaded."""
    missing = lm_eval_missing()
    if missing:
        raise TaskError(missing)
    from lm_eval.tasks import TaskManager
    with _quiet_lm_eval():
        manager = TaskManager(include_path=task_dir)
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            where = f" or in --task-dir {task_dir}" if task_dir else " (local YAML tasks: --task-dir FOLDER)"
            raise TaskError(f"--tasks: unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}; "
                            "lm-eval --tasks list shows them")
        try:
            loaded = manager.load(names)
        except (ConnectionError, OSError) as error:
            raise TaskError(f"--tasks: cannot load the data of {', '.join(names)} ({first_line(error)}); hub tasks "
                            "need a network. Offline, write a local task (dataset_path: json) into --task-dir") from None
        except Exception as error:  # noqa: BLE001 - a bad YAML or data file raises many kinds
            raise TaskError(f"--tasks: cannot load {', '.join(names)} ({type(error).__name__}: "
                            f"{first_line(error)})") from None
    return TaskSet(names=list(names), tasks=loaded["tasks"], manager=manager)


def evaluate_tasks(model: nn.Module, tokenizer, tasks: TaskSet, device: torch.device, batch_size: int = 8,
                   limit: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Every task's metrics on `model` (already on `device`), zero-shot: {task: {"acc": 0.61, ...}}.
    Standard errors are skipped (bootstrap_iters=0), as the papers report plain accuracy."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    was_training = model.training
    model.eval()
    try:
        with _quiet_lm_eval():
            wrapper = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
            output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks.tasks.values()),
                                             task_manager=tasks.manager, limit=limit, bootstrap_iters=0,
                                             log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")
    finally:
        model.train(was_training)
    return {task: {metric.split(",")[0]: float(value) for metric, value in metrics.items()
                   if isinstance(value, (int, float)) and "stderr" not in metric and metric != "sample_len"}
            for task, metrics in output["results"].items()}


def describe_scores(scores: dict[str, dict[str, float]]) -> str:
    """One line: `arc_easy acc 61.2% · piqa acc 70.1% acc_norm 70.5%`."""
    return " · ".join(f"{task} " + " ".join(f"{metric} {value:.1%}" if 0 <= value <= 1 else f"{metric} {value:.4g}"
                                            for metric, value in metrics.items())
                      for task, metrics in scores.items())
