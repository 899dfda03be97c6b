"""The training mode: the pruned model (cached or made now), its training text and loss, the
baseline, the training loop (fsdp_finetune.Trainer), then the best model delivered and summarized.

    status = train(context, start)
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from fsdp_finetune import Trainer, TrainingJob
from utils.config.recipes import recipe_note
from utils.config.sections import RunConfig
from utils.data.generated import GenerationSpec, split_sources
from utils.data.training_text import read_training_text, report_budget, training_blocks
from utils.eval_utils import Heading, evaluate_and_log
from utils.export.registry import load_source, resolve_source
from utils.io.files import write_json
from utils.io.events import duration
from utils.io.history import PerplexityHistory
from utils.models.loading import parse_dtype
from utils.models.structure import count_parameters
from utils.pipeline.context import Context, Start
from utils.pipeline.deliver import deliver
from utils.pipeline.keep import Curves, draw_curves, tidy_state
from utils.pipeline.modes import dense_model, eval_compile, prepare_evaluation
from utils.pipeline.prune_step import pruned_model, repruner
from utils.pipeline.record import quick_note, run_record
from utils.pruning.schedule import reprune_method
from utils.task_eval import describe_scores
from utils.training.losses import describe, loss_record, memorization_passes, needs_teacher
from utils.training.parallel import (SHARDED, compute_dtype, launcher_local_size, mesh_shape, prepare_model,
                                     resolve_compile_mode)


def generation_spec(config: RunConfig) -> GenerationSpec | None:
    """The `generated:N` part of --train-source with its sampling settings, or None."""
    generated = split_sources(config.train.train_source)[1]
    if generated is None:
        return None
    train, sampling = config.train, config.train.generation
    return GenerationSpec.parse(generated, temperature=sampling.temperature, top_p=sampling.top_p,
                                length=train.sampled_length, batch_size=sampling.batch_size,
                                seed=train.seed)


def _training_text(context: Context, mixed: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.nn.Module | None]:
    """Training and held-out blocks of --train-source, its budget printed, and the dense model
    when it was loaded to sample a generated:N text (distillation's teacher too)."""
    config, loaded = context.config, []

    def dense() -> torch.nn.Module:  # the dense --model, to sample a generated:N training text from
        loaded.append(dense_model(context, compute_dtype(mixed)).to(context.device))
        return loaded[0]
    text = read_training_text(config.train.train_source, context.tokenizer, generation_spec(config), dense,
                              context.model_identity["fingerprint"], context.device, context.logger,
                              first=context.first)
    blocks, holdout = training_blocks(text, config.train.block_size, config.train.holdout, context.bos)
    report_budget(text, blocks, holdout, config.train, memorization_passes(config.loss), context.logger)
    return blocks, holdout, loaded[0] if loaded else None


def _teacher(context: Context, mixed: str, sampler: torch.nn.Module | None) -> torch.nn.Module | None:
    """The dense model the run started from, frozen, in the compute precision (distillation only);
    `sampler`: that model when it is loaded already (it sampled a generated:N text)."""
    config, logger = context.config, context.logger
    logger.report(f"Loss: {describe(config.loss)}" + (
        f" (--loss auto: the loss of the best recovery measured near density {config.prune.density:g}, "
        "utils/config/recipes.py)" if config.loss.auto else ""),
        {"event": "loss", **loss_record(config.loss), "auto": config.loss.auto})
    if not needs_teacher(config.loss):
        return None
    teacher = sampler if sampler is not None else dense_model(context, compute_dtype(mixed))
    logger.report(f"Teacher: the dense {config.model.name} ({count_parameters(teacher):,} parameters, "
                  f"{teacher.dtype}), frozen", {"event": "teacher", "parameters": count_parameters(teacher),
                                                "dtype": str(teacher.dtype)})
    return teacher


def _prepare(context: Context, model: torch.nn.Module, mixed: str):
    """The model ready to train (sharded or whole, compiled, with its teacher) and its data."""
    config, logger, device, world = context.config, context.logger, context.device, context.world
    blocks, holdout, sampler = _training_text(context, mixed)
    teacher = _teacher(context, mixed, sampler)
    shards = world if config.train.parallel in SHARDED else 1
    micro = config.train.micro_batch_size or max(1, config.train.batch_size // world)
    compile_mode, compile_note = resolve_compile_mode(config.train.compile, device, shards,
                                                      accumulation=config.train.batch_size // (micro * world))
    parallel = f" | parallel: {config.train.parallel} × {world} processes" if world > 1 else ""
    if world > 1 and config.train.parallel == "hsdp":
        machines, local = mesh_shape(world, launcher_local_size())
        parallel += f" ({machines} machines × {local} processes: sharded within a machine, replicated across)"
    meaning = {"no": " (float32 throughout)", "bf16": " (autocast over float32 weights)",
               "fp16": " (autocast over float32 weights, loss scaling)"}.get(mixed, "")
    logger.report(f"Precision: {mixed}{meaning} | torch.compile: {compile_note}{parallel}",
                  {"event": "setup", "precision": mixed, "compile": compile_mode, "compile_note": compile_note,
                   "parallel": config.train.parallel, "processes": world})
    if shards > 1 and device.type == "cuda":
        logger.info("Note: FSDP steps run without CUDA graphs; a model that fits one GPU may train faster with "
                    "--parallel ddp (a whole copy per process, CUDA graphs kept) or on one GPU (BENCHMARKS.md)")
    note = recipe_note(config)
    if note:
        logger.report(note, {"event": "recipe", "note": note})
    prepared = prepare_model(model, device, mixed, compile_mode, config.train.parallel, teacher=teacher,
                             loss=config.loss)
    return prepared, blocks, holdout, compile_mode


def train(context: Context, start: Start) -> int:
    prepare_evaluation(context)
    config, logger, schedule = context.config, context.logger, context.schedule
    if schedule.kind != "oneshot":
        later = reprune_method(config.schedule, config.prune.method)
        logger.report(f"Sparsity schedule: {schedule.describe(later)}",
                      {"event": "sparsity_schedule", "kind": schedule.kind, "stages": [list(s) for s in schedule.stages]})
    # The first stage's density is what is pruned (and cached) before training.
    model, info, report = pruned_model(context, schedule.initial, torch.float32)
    history = PerplexityHistory(dense=info.get("dense_perplexity"), quick=quick_note(context.protocol))
    for line in report.lines():
        logger.info(line)
    logger.log(report.event(when="pruned"), track=False)
    train_cfg = config.train
    mixed = train_cfg.mixed_precision if train_cfg.mixed_precision != "auto" else (
        "bf16" if context.device.type == "cuda" else "no")
    # compile_mode: how training compiles, also under FSDP (where Prepared.compile_mode is None: its layers compile)
    prepared, blocks, holdout, compile_mode = _prepare(context, model, mixed)
    protocol = replace(context.protocol, compile=eval_compile(config.eval.compile, compile_mode is not None))
    reprune = repruner(context, prepared.module) if schedule.kind != "oneshot" else None
    if schedule.kind != "oneshot":  # only epochs at the final density compete for the best model
        history.final_from = math.ceil((schedule.stages[-1][0] + 1) / train_cfg.max_step)
        history.densities = (schedule.initial, schedule.final)
    eval_seconds = None
    if not start.resuming:
        if config.output.resume:
            logger.info(f"--resume: no saved state in {context.output / 'state'}; starting from the beginning")
        with prepared.precision():
            baseline = evaluate_and_log(prepared.module, context.eval_tokens, logger,
                                        Heading("Baseline Evaluation (Before Training)", density=schedule.initial),
                                        protocol, kernels=context.kernels)
        history.baseline = baseline.perplexity
        eval_seconds = baseline.seconds
    pruning = {k: v for k, v in info.items() if k != "layer_density"}
    best_info = lambda: {"model": config.model.name, "density": config.prune.density,  # noqa: E731
                         "method": config.prune.method, "pattern": info.get("pattern"),
                         "loss": loss_record(config.loss), "pruning": pruning}
    if compile_mode:
        logger.info("The first training steps compile the model (minutes on a cold compile cache, seconds when "
                    "cached); --compile off skips it")
    job = TrainingJob(prepared, context.tokenizer, blocks, holdout, context.eval_tokens, protocol, schedule, reprune,
                      start.identity, best_info, history, context.output, loss_kind=config.loss.kind,
                      resume=start.resuming, save_best=config.output.save_best, kernels=context.kernels,
                      compiles=compile_mode is not None, started=context.started,
                      save_dtype=getattr(torch, config.output.save_dtype), eval_seconds=eval_seconds)
    callbacks = [EpochResults(context, best_info), Curves(context.output, logger), *start.callbacks] \
        if context.is_main else start.callbacks
    result = Trainer(job, replace(train_cfg, mixed_precision=mixed), logger, callbacks).fit()
    return _finish(context, result, prepared.module, best_info)


def _finish(context: Context, result, module: torch.nn.Module, best_info) -> int:
    """After the loop: the delivered model's tasks and export, the summary, results.json."""
    config, logger = context.config, context.logger
    history = result.history
    if result.error:
        logger.info(f"error: {result.error}")
        logger.log({"event": "error", "message": result.error})
    extras, which = {}, ""
    if context.is_main and not result.interrupted and (context.tasks is not None or config.output.export != "none"):
        final, which = _final_model(context, module if context.world == 1 else None)
        if final is not None:
            extras = deliver(context, final, info={**best_info(), "model_from": which}, which=which)
    record = run_record(context, result.earlier_seconds)
    timings = run_timings(record, result.state)
    for line in history.summary_lines(result.summary_title(config.train.total_steps)):
        logger.info(line)
    if "tasks" in extras:
        logger.info(f"Zero-shot tasks ({which}): {describe_scores(extras['tasks'])}")
    if "export" in extras:
        logger.info(f"Export ({extras['export']['format']}): {extras['export']['folder']} "
                    f"({extras['export']['ratio']:.1%} of the dense size, "
                    f"{config.output.export_dtype}; the perplexities above were measured in the training precision, "
                    "so the export's own may differ slightly: --eval-only --model it)")
    logger.report(f"Time: {duration(timings['wall_seconds'])} in all (training "
                  f"{duration(timings.get('training_seconds', 0))}, evaluation during training "
                  f"{duration(timings.get('evaluation_seconds', 0))})", {"event": "timings", **timings})
    note = recipe_note(config)
    if note and not result.interrupted and config.train.lr_derived:  # the most useful line, once more at the end
        logger.info(note)
    finished = result.state.finished and not result.interrupted and not result.error and "export_error" not in extras
    if context.is_main:
        write_json(context.output / "results.json", {**record, **extras, **results_fields(context, result, best_info),
                                                     "timings": timings, "finished": finished})
        logger.info(f"Results: {context.output / 'results.json'}")
        if finished:
            tidy_state(context.output, logger, config.output.keep_state,
                       delivered=(context.output / "best" / "config.json").exists() or "export" in extras)
        draw_curves(context.output, logger, final=True)
    return 130 if result.interrupted else 1 if result.error or "export_error" in extras else 0


def run_timings(record: dict, state) -> dict:
    """results.json's timings: the wall time of `record` (run_record), the state's other seconds."""
    return {"wall_seconds": record["wall_seconds"],
            **{key: round(value, 3) for key, value in state.timings.items() if key != "wall_seconds"}}


def results_fields(context: Context, result, best_info) -> dict:
    """What results.json says of a training run from its history and state (utils.training.stopping.TrainResult),
    at its end or after an epoch."""
    config, history, state = context.config, result.history, result.state
    last = history.details.get(history.epochs[-1][0], {}) if history.epochs else {}
    return {**history.to_dict(), "loss": loss_record(config.loss), "bos_per_window": context.bos is not None,
            "schedule": [list(stage) for stage in context.schedule.stages], "epochs_completed": state.epoch - 1,
            "stopped_early": result.stopped_early, "interrupted": result.interrupted, "error": result.error,
            "final_accuracy": last.get("accuracy"), "final_holdout_loss": last.get("holdout_loss"),
            "tokens_trained": state.global_step * config.train.batch_size * config.train.block_size,
            "pruning": best_info()["pruning"]}


class EpochResults:
    """results.json after every epoch (main process), `in_progress` and not `finished`: --compare and a
    reader see a long run as it goes (a run killed outright keeps its last epoch's); the run's end
    writes it whole."""

    def __init__(self, context: Context, best_info):
        self.context, self.best_info = context, best_info

    def on_step_end(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        record = run_record(self.context, trainer.result.earlier_seconds)
        try:
            write_json(self.context.output / "results.json", {
                **record, **results_fields(self.context, trainer.result, self.best_info), "in_progress": True,
                "finished": False, "timings": run_timings(record, trainer.state)})
        except OSError as error:  # the saved state holds the epoch: the run goes on, its end writes the file
            self.context.logger.report(f"Warning: results.json could not be written after epoch "
                                       f"{trainer.state.epoch - 1} ({error}); the run goes on",
                                       {"event": "results", "error": str(error)})


def _final_model(context: Context, module: torch.nn.Module | None) -> tuple[torch.nn.Module | None, str]:
    """The model a training run delivers: best/ when it was saved, else the trained module itself
    (one process; under FSDP its weights are sharded and only best/ has them whole)."""
    best = Path(context.output) / "best"
    if (best / "config.json").exists():
        model, _ = load_source(resolve_source(str(best)), parse_dtype(context.config.model.dtype, context.device))
        return model, "best model"
    return module, ("final model" if module is not None else "")
