"""What a run leaves besides perplexity (main process): zero-shot task scores, and the model
exported by `--export` into the run folder.

    extras = deliver(context, model, info={...}, which="best model")   # {"tasks": ..., "export": ...}
"""
from __future__ import annotations

import torch
from safetensors import SafetensorError
from torch import nn

from utils.export.registry import EXPORTERS, export_model
from utils.pipeline.context import Context
from utils.pipeline.kernels import both_kernels
from utils.task_eval import describe_scores, evaluate_tasks


def deliver(context: Context, model: nn.Module, info: dict | None, export: bool = True, which: str = "") -> dict:
    """Task scores of `model` (when --tasks) and its export (unless --export none); returns them
    for results.json.  A full disk while exporting keeps every other result: `export_error`."""
    config, logger, device = context.config, context.logger, context.device
    extras = {}
    if context.tasks is not None:
        tasks = config.tasks
        logger.info(f"Zero-shot tasks (lm-eval) on the {which or 'model'}: {', '.join(context.tasks.names)} ...")
        scores = evaluate_tasks(model.to(device), context.tokenizer, context.tasks, device, tasks.batch_size,
                                tasks.limit, config.train.seed)
        logger.info(f"Zero-shot tasks: {describe_scores(scores)}")
        logger.log({"event": "tasks", "model": which or "model", "scores": scores, "limit": tasks.limit})
        extras["tasks"] = scores
    name = config.output.export
    if export and name != "none":
        folder = context.output / EXPORTERS[name].folder
        try:
            report = export_model(name, model, context.tokenizer, context.output,
                                  getattr(torch, config.output.export_dtype), info)
        except (OSError, SafetensorError) as error:  # a full disk: what was computed stays; export again later
            extras["export_error"] = (f"could not write {folder}: {getattr(error, 'strerror', None) or error} "
                                      f"({getattr(error, 'filename', None) or ''}); the other results are kept. "
                                      "Free space, then --export-only --model THE_MODEL_FOLDER")
            logger.info(f"error: {extras['export_error']}")
            return extras
        for line in report.lines():
            logger.info(line)
        logger.log({"event": "export", **report.to_dict()})
        extras["export"] = report.to_dict()
        if config.model.kernels == "sparse" and name == "compressed":  # the same weights through both kernels
            extras["kernels"] = both_kernels(context, folder)
    return extras
