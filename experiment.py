"""The pipeline behind the CLI: set up → pruned model (cached or made) → evaluate → fine-tune → summarize.

    from extreme_compression_experiment import build_parser, validate
    from experiment import run
    run(validate(build_parser().parse_args([...]), parser))

Every process of an `accelerate launch` runs this; the main process prunes and writes files,
the others wait for it (`main_process_first`) and then read what it wrote.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path
from typing import Callable

import torch

from fsdp_finetune import STOPPING_ERRORS, TrainConfig, finetune, stop_message
from utils.data_utils import tokenize_source
from utils.eval_utils import PerplexityHistory, evaluate_and_log
from utils.export_utils import export_model
from utils.generated_text import GenerationSpec, split_sources
from utils.logging_utils import MetricsLogger, describe_density, quiet_transformers_progress, write_json
from utils.losses import LossSpec
from utils.mask_utils import sparsity_report
from utils.model_utils import (ModelError, bos_per_window, count_parameters, load_config,
                               load_model, load_tokenizer, model_identity, parse_dtype, position_limit, resolve_model)
from utils.prepare_utils import compute_dtype, init_distributed, prepare_model, resolve_compile_mode
from utils.pruning_methods import needs_calibration
from utils.pruning_steps import profile_tag, pruned_model, repruner, sparsity_schedule
from utils.recipes import recipe_note
from utils.schedules import SparsitySchedule
from utils.run_folder import (RunFolder, RunFolderError, check_file_writable, check_writable, drop_events_after,
                              resume_differences)
from utils.state_utils import read_meta
from utils.task_eval import TaskSet, describe_scores, evaluate_tasks, load_tasks
from utils.training_text import read_training_text, report_budget, training_blocks


def _versions() -> dict:
    import accelerate
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def _make_accelerator(config):
    from accelerate import Accelerator
    trackers = None if config.report_to == "none" else config.report_to
    # On a machine without a GPU, cpu=True is what makes accelerate join a torchrun/accelerate-launch
    # group (MULTI_CPU) instead of running every process as a lone main process.
    accelerator = Accelerator(cpu=config.cpu or not torch.cuda.is_available(), log_with=trackers,
                              project_dir=config.output_dir)
    init_distributed(accelerator.device)
    return accelerator


def _claim_output(config, accelerator) -> RunFolder:
    """Check every path the run will write before any work (nothing computed is lost to a bad
    path later), take the output folder's lock; the main process decides and tells the others."""
    folder = RunFolder(Path(config.output_dir), resume=config.resume, overwrite=config.overwrite)
    problem = None
    if accelerator.is_main_process:
        try:
            folder.claim(training=config.mode == "train")
            if config.log_file:
                check_file_writable(Path(config.log_file), "--log-file")
            if config.mode in ("prune", "train"):
                check_writable(Path(config.pruned_dir), "--pruned-dir")
        except RunFolderError as error:
            folder.release()
            problem = str(error)
    if accelerator.num_processes > 1:
        shared = [problem]
        torch.distributed.broadcast_object_list(shared, src=0)  # in memory between processes, not from disk
        problem = shared[0]
    if problem:
        raise RunFolderError(problem)
    return folder


def run(config) -> int:
    """Run the experiment described by an ExperimentConfig; returns the process exit status."""
    accelerator = _make_accelerator(config)
    device = accelerator.device
    output = Path(config.output_dir)
    folder = _claim_output(config, accelerator)
    try:
        return _run_claimed(config, accelerator, device, output, folder)
    finally:
        folder.release()


def _run_claimed(config, accelerator, device, output: Path, folder: RunFolder) -> int:
    tracker_log = None
    if config.report_to != "none":
        accelerator.init_trackers("extreme-compression", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
        tracker_log = lambda values, step: accelerator.log(values, step=step)  # noqa: E731
    logger = MetricsLogger(output, config.log_file, accelerator.is_main_process, tracker_log)
    quiet_transformers_progress(logger.stream)
    try:
        return _run(config, accelerator, device, output, logger, folder)
    except STOPPING_ERRORS as error:
        logger.info(f"error: {stop_message(error)}")
        logger.log({"event": "error", "kind": type(error).__name__, "message": str(error)})
        return 1
    finally:
        if config.report_to != "none":
            accelerator.end_training()
        logger.close()


def _check_lengths(config, model_config) -> None:
    """Lengths the model's positions cannot hold fail now, not after pruning."""
    limit = position_limit(model_config)
    if limit is None or config.mode == "export":  # an export evaluates nothing
        return
    asked = [("--token-length", config.token_length)]
    if config.mode == "train":
        asked.append(("--block-size", config.block_size))
    for flag, value in asked:
        if value > limit:
            raise ModelError(f"{flag} {value} is longer than the {limit} positions {config.model} supports; "
                             f"use {flag} {limit} or less")


def run_identity(config, model: dict) -> dict:
    """What a run is: a --resume must match it (utils/run_folder.py lists what may change)."""
    return {"model_fingerprint": model["fingerprint"], "density": config.density, "method": config.method,
            "pattern": list(config.pattern) if config.pattern else None, "layer_density": profile_tag(config),
            "schedule": [list(stage) for stage in sparsity_schedule(config).stages],
            "batch_size": config.batch_size, "max_step": config.max_step, "epochs": config.epochs, "lr": config.lr,
            "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
            "max_grad_norm": config.max_grad_norm, "block_size": config.block_size,
            "train_source": config.train_source, "holdout": config.holdout, "seed": config.seed,
            "generation": _generation_identity(config),  # None without generated:N: older runs resume
            "mixed_precision": config.mixed_precision, "loss": config.loss,
            "kd_temperature": config.kd_temperature if config.loss != "ce" else None,
            "kd_weight": config.kd_weight if config.loss != "ce" else None,
            "ce_weight": config.ce_weight if config.loss != "kd" else None,
            "kd_hidden_weight": config.kd_hidden_weight or None,  # None when off: runs saved before it resume
            "calibration": [config.calibration_source, config.nsamples, config.calibration_length]
            if needs_calibration(config.method) else None}


def _generation_identity(config) -> dict | None:
    spec = generation_spec(config)
    return None if spec is None else {"temperature": spec.temperature, "top_p": spec.top_p, "length": spec.length,
                                      "batch_size": spec.batch_size}


def _delivered(output: Path, train_state: dict) -> bool:
    """Whether a finished run also wrote what comes after its last epoch: results.json of all its
    epochs, not interrupted (a stop during the export leaves the older one, or none)."""
    try:
        results = json.loads((output / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return results.get("interrupted") is False and results.get("epochs_completed") == train_state["epoch"] - 1


def _check_resume(config, folder: RunFolder, identity: dict) -> dict | None:
    """The saved state's meta when --resume continues this very run; refuses one that would mix two."""
    if not config.resume or not (folder.state_dir / "train_state.json").exists():
        return None
    meta = read_meta(folder.state_dir)
    differences = resume_differences(meta.get("identity", {}), identity)
    if differences:
        raise RunFolderError(f"--resume would mix two runs in {folder.path}: " + ", ".join(differences)
                             + ". Resume with the saved settings (its run.json), or start a new run with another "
                               "--output-dir (a longer schedule is a new run: --model its best/ folder)")
    return meta


def _run(config, accelerator, device, output: Path, logger: MetricsLogger, folder: RunFolder) -> int:
    world = accelerator.num_processes
    pruning = "" if config.mode in ("eval", "export") else (
        f" | {describe_density(config.density)}" + (f" ({config.pattern[0]}:{config.pattern[1]})" if config.pattern else "")
        + f" | method {config.method}")
    logger.info(f"Model: {config.model}{pruning} | device {device} × {world}")
    if config.mode == "train":
        logger.info(f"Schedule: batch size {config.batch_size} → max_step {config.max_step} per epoch, "
                    f"lr {config.lr:.3g}, {config.epochs} epochs")
    source = resolve_model(config.model)
    model_config = load_config(source)
    _check_lengths(config, model_config)
    identity = model_identity(source)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(source)
    bos = bos_per_window(config.bos_per_window, model_config, tokenizer)
    run = {**run_identity(config, identity), "bos_per_window": bos is not None}
    meta = _check_resume(config, folder, run)
    if meta is not None and meta["train_state"].get("finished"):
        if _delivered(output, meta["train_state"]):
            logger.info(f"The run in {output} is already finished; its summary:")
            for line in PerplexityHistory.from_dict(meta["train_state"]["history"]).summary_lines():
                logger.info(line)
            return 0
        logger.info(f"The run in {output} finished training but stopped before its results were all written "
                    "(results.json, the export): writing them now, from the saved state")
    if accelerator.is_main_process:
        if meta is None:
            write_json(output / "run.json", {"config": dataclasses.asdict(config), "identity": run,
                                             "model": identity, "versions": _versions(), "device": str(device),
                                             "processes": world,
                                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})
        else:
            state = meta["train_state"]
            dropped = drop_events_after(output / "metrics.jsonl", state["global_step"], state["epoch"])
            logger.log({"event": "resume", "step": state["global_step"], "epoch": state["epoch"],
                        "dropped_events": dropped})
    if config.mode == "export":
        return _export_only(config, source, tokenizer, identity, output, logger, accelerator)
    with accelerator.main_process_first():  # names and data checked before any work
        tasks = load_tasks(list(config.tasks), config.task_dir) if config.tasks else None
    if bos is not None:
        logger.info("Every evaluation window, calibration window and training block starts with the BOS token "
                    f"({config.bos_per_window}: this model family needs it)")
    with accelerator.main_process_first():
        eval_tokens = tokenize_source(config.eval_source, tokenizer, split="test")
    eval_dtype = parse_dtype(config.dtype, device)
    evaluate = dict(token_length=config.token_length, stride=config.stride, batch_size=config.eval_batch_size,
                    compile=_eval_compile(config.eval_compile, training_compiles=False), bos_id=bos)
    history = PerplexityHistory()

    if config.mode == "eval":
        model, _ = load_model(source, dtype=eval_dtype)
        model.to(device)
        logger.info(f"{count_parameters(model):,} parameters, {model.dtype}")
        result = evaluate_and_log(model, eval_tokens, logger, title="Perplexity", **evaluate)
        if accelerator.is_main_process:
            extras = _deliver(config, model, tokenizer, device, logger, output, tasks, info=None, export=False)
            write_json(output / "results.json", {"model": config.model, "eval_source": config.eval_source,
                                                 "bos_per_window": bos is not None, **dataclasses.asdict(result),
                                                 **extras})
        return 0

    schedule = sparsity_schedule(config)
    if schedule.kind != "oneshot":
        logger.info(f"Sparsity schedule: {schedule.describe()}")
    # The first stage's density is what is pruned (and cached) before training.
    model, info, report = pruned_model(dataclasses.replace(config, density=schedule.initial), source, identity,
                                        tokenizer, accelerator, logger, eval_tokens, evaluate,
                                        dtype=eval_dtype if config.mode == "prune" else torch.float32, bos=bos)
    history.dense = info.get("dense_perplexity")
    for line in report.lines():
        logger.info(line)
    if config.mode == "prune":
        model.to(device)
        result = evaluate_and_log(model, eval_tokens, logger, title="Pruned Model Evaluation",
                                  density=config.density, **evaluate)
        history.baseline = result.perplexity
        extras = _deliver(config, model, tokenizer, device, logger, output, tasks,
                          info={"model": config.model, "pruning": info}) if accelerator.is_main_process else {}
        for line in history.summary_lines()[1:3]:
            logger.info(line)
        if accelerator.is_main_process:
            write_json(output / "results.json", {**history.to_dict(), "bos_per_window": bos is not None,
                                                 "pruning": info, **extras})
        return 1 if "export_error" in extras else 0
    return _train(config, source, model, tokenizer, accelerator, device, output, logger, eval_tokens, evaluate,
                  history, info, run, resuming=meta is not None, bos=bos, schedule=schedule, tasks=tasks)


def _deliver(config, model, tokenizer, device, logger, output: Path, tasks: TaskSet | None, info: dict | None,
             export: bool = True, which: str = "") -> dict:
    """What a run leaves besides perplexity (main process): zero-shot task scores of `model`, and
    `model` exported to OUTPUT/compressed.  Returns them for results.json."""
    extras = {}
    if tasks is not None:
        logger.info(f"Zero-shot tasks (lm-eval) on the {which or 'model'}: {', '.join(tasks.names)} ...")
        scores = evaluate_tasks(model.to(device), tokenizer, tasks, device, config.task_batch_size, config.task_limit,
                                config.seed)
        logger.info(f"Zero-shot tasks: {describe_scores(scores)}")
        logger.log({"event": "tasks", "model": which or "model", "scores": scores, "limit": config.task_limit})
        extras["tasks"] = scores
    if export and config.export != "none":
        try:
            report = export_model(config.export, model, tokenizer, output / "compressed",
                                  getattr(torch, config.export_dtype), info)
        except OSError as error:  # a full disk: what was computed stays; the export can be made again later
            extras["export_error"] = (f"could not write {output / 'compressed'}: {error.strerror or error} "
                                      f"({error.filename or ''}); the other results are kept. Free space, then "
                                      "--export-only --model THE_MODEL_FOLDER")
            logger.info(f"error: {extras['export_error']}")
            return extras
        for line in report.lines():
            logger.info(line)
        logger.log({"event": "export", **report.to_dict()})
        extras["export"] = report.to_dict()
    return extras


def _export_only(config, source, tokenizer, identity: dict, output: Path, logger, accelerator) -> int:
    """--export-only: --model as it is (its own dtype), written compressed; its sparsity printed first."""
    model, _ = load_model(source)
    for line in sparsity_report(model).lines():
        logger.info(line)
    if accelerator.is_main_process:
        extras = _deliver(config, model, tokenizer, accelerator.device, logger, output, None,
                          info={"model": config.model, "model_identity": identity})
        write_json(output / "results.json", {"model": config.model, **extras})
        return 1 if "export_error" in extras else 0
    return 0


def _eval_compile(requested: str, training_compiles: bool) -> str:
    """--eval-compile → evaluate_perplexity's level.  auto compiles the scoring only for the
    evaluations of a compiled training run (every epoch); a single evaluation before training pays
    more to compile than it saves."""
    if requested != "auto":
        return requested
    return "scoring" if training_compiles else "off"


def generation_spec(config) -> GenerationSpec | None:
    """The `generated:N` part of --train-source with its sampling settings, or None."""
    generated = split_sources(config.train_source)[1]
    if generated is None:
        return None
    return GenerationSpec.parse(generated, temperature=config.gen_temperature, top_p=config.gen_top_p,
                                length=config.gen_length or config.block_size, batch_size=config.gen_batch_size,
                                seed=config.seed)


def _training_text(config, tokenizer, accelerator, logger, bos: int | None = None,
                   dense: Callable[[], torch.nn.Module] | None = None, model_key: str = "",
                   device: torch.device | None = None):
    """Training and held-out blocks of --train-source, its budget printed (utils/training_text.py)."""
    text = read_training_text(config.train_source, tokenizer, generation_spec(config), dense, model_key, device,
                              logger, first=accelerator.main_process_first)
    blocks, holdout = training_blocks(text, config.block_size, config.holdout, bos)
    report_budget(text, blocks, holdout, config.holdout, config.epochs, config.max_step, config.batch_size, logger,
                  loss=config.loss)
    return blocks, holdout


def _dense_model(source, mixed: str) -> torch.nn.Module:
    """The dense --model in the compute precision."""
    return load_model(source, dtype=compute_dtype(mixed) or torch.float32)[0]


def _teacher(config, source, mixed: str, logger, dense: torch.nn.Module | None = None):
    """The dense model the run started from, frozen, in the compute precision (distillation only);
    `dense`: that model when it is loaded already (it sampled a generated:N text)."""
    spec = LossSpec(config.loss, config.kd_temperature, config.ce_weight, config.kd_weight, config.kd_hidden_weight)
    logger.info(f"Loss: {spec.describe()}" + (f" (--loss auto: the loss of the best recovery measured near density "
                                             f"{config.density:g}, utils/recipes.py)" if config.loss_auto else ""))
    if not spec.needs_teacher:
        return spec, None
    teacher = dense if dense is not None else _dense_model(source, mixed)
    logger.info(f"Teacher: the dense {config.model} ({count_parameters(teacher):,} parameters, {teacher.dtype}), frozen")
    return spec, teacher


def _train(config, source, model, tokenizer, accelerator, device, output, logger, eval_tokens, evaluate, history,
           info, identity: dict, resuming: bool, bos: int | None = None,
           schedule: SparsitySchedule | None = None, tasks: TaskSet | None = None) -> int:
    world = accelerator.num_processes
    micro = config.micro_batch_size or max(1, config.batch_size // world)
    if config.batch_size % (micro * world):
        logger.info(f"error: --batch-size {config.batch_size} is not a multiple of micro-batch {micro} × "
                    f"{world} processes; pick --micro-batch-size so that it is")
        return 2
    if config.schedule != "oneshot" and world > 1 and config.parallel == "fsdp":
        logger.info(f"error: --schedule {config.schedule} needs the whole model in each process (the pruning driver "
                    "is not sharded); add --parallel ddp, or use --schedule oneshot")
        return 2
    mixed = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    loaded: list[torch.nn.Module] = []  # the dense model, once loaded to sample from: distillation's teacher too

    def dense() -> torch.nn.Module:  # the dense --model, to sample a generated:N training text from
        loaded.append(_dense_model(source, mixed).to(device))
        return loaded[0]
    blocks, holdout = _training_text(config, tokenizer, accelerator, logger, bos, dense=dense,
                                     model_key=identity["model_fingerprint"], device=device)
    loss, teacher = _teacher(config, source, mixed, logger, loaded[0] if loaded else None)
    loaded.clear()  # a sampler that is not the teacher is not kept through training
    shards = world if config.parallel == "fsdp" else 1
    compile_mode, compile_note = resolve_compile_mode(config.compile, device, shards,
                                                      accumulation=config.batch_size // (micro * world))
    parallel = f" | parallel: {config.parallel} × {world} processes" if world > 1 else ""
    logger.info(f"Precision: {mixed} | torch.compile: {compile_note}{parallel}")
    if shards > 1 and device.type == "cuda":
        logger.info("Note: FSDP steps run without CUDA graphs; a model that fits one GPU may train faster with "
                    "--parallel ddp (a whole copy per process, CUDA graphs kept) or on one GPU (BENCHMARKS.md)")
    note = recipe_note(config)
    if note:
        logger.info(note)
    prepared = prepare_model(model, device, mixed, compile_mode, config.parallel, teacher=teacher, loss=loss)
    evaluate = {**evaluate, "compile": _eval_compile(config.eval_compile, compile_mode is not None)}
    schedule = schedule or SparsitySchedule.oneshot(config.density)
    reprune = repruner(config, prepared.module, tokenizer, device, bos) if schedule.kind != "oneshot" else None
    if schedule.kind != "oneshot":  # only epochs at the final density compete for the best model
        history.final_from = math.ceil((schedule.stages[-1][0] + 1) / config.max_step)
    train_config = TrainConfig(
        epochs=config.epochs, max_step=config.max_step, lr=config.lr, batch_size=config.batch_size,
        micro_batch_size=micro, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, mixed_precision=mixed, compile_mode=compile_mode,
        eval_compile=evaluate["compile"], patience=config.patience, min_delta=config.min_delta,
        token_length=config.token_length, stride=config.stride, eval_batch_size=config.eval_batch_size,
        output_dir=str(output), resume=resuming, save_best=config.save_best,
        interrupt_after_steps=config.interrupt_after_steps, interrupt_signal=config.interrupt_signal,
        identity=identity, loss=config.loss, bos_id=bos)
    if not resuming:
        if config.resume:
            logger.info(f"--resume: no saved state in {output / 'state'}; starting from the beginning")
        with prepared.precision():
            baseline = evaluate_and_log(prepared.module, eval_tokens, logger, title="Baseline Evaluation (Before Training)",
                                        density=schedule.initial, **evaluate)
        history.baseline = baseline.perplexity
    best_info = lambda: {"model": config.model, "density": config.density, "method": config.method,  # noqa: E731
                         "pattern": info.get("pattern"), "loss": loss.to_dict(),
                         "pruning": {k: v for k, v in info.items() if k != "layer_density"}}
    if compile_mode:
        logger.info("The first training steps compile the model (minutes on a cold compile cache, seconds when "
                    "cached); --compile off skips it")
    result = finetune(prepared, tokenizer, blocks, eval_tokens, train_config, config.density, logger, device,
                      history, best_info, holdout=holdout, schedule=schedule, reprune=reprune)
    history = result.history
    if result.error:
        logger.info(f"error: {result.error}")
        logger.log({"event": "error", "message": result.error})
    extras, which = {}, ""
    if accelerator.is_main_process and not result.interrupted and (tasks is not None or config.export != "none"):
        final, which = _final_model(config, output, prepared.module if world == 1 else None, device)
        if final is not None:
            extras = _deliver(config, final, tokenizer, device, logger, output, tasks, which=which,
                              info={**best_info(), "model_from": which})
    for line in history.summary_lines():
        logger.info(line)
    if "tasks" in extras:
        logger.info(f"Zero-shot tasks ({which}): {describe_scores(extras['tasks'])}")
    if "export" in extras:
        logger.info(f"Compressed: {extras['export']['folder']} ({extras['export']['ratio']:.1%} of the dense size)")
    if accelerator.is_main_process:
        write_json(output / "results.json", {**history.to_dict(), **extras, "density": config.density, "loss": loss.to_dict(),
                                             "bos_per_window": bos is not None,
                                             "schedule": [list(stage) for stage in schedule.stages],
                                             "epochs_completed": result.state.epoch - 1,
                                             "stopped_early": result.stopped_early, "interrupted": result.interrupted,
                                             "error": result.error,
                                             "pruning": {k: v for k, v in info.items() if k != "layer_density"}})
    return 130 if result.interrupted else 1 if result.error or "export_error" in extras else 0


def _final_model(config, output: Path, module, device) -> tuple[torch.nn.Module | None, str]:
    """The model a training run delivers: best/ when it was saved, else the trained module itself
    (one process; under FSDP its weights are sharded and only best/ has them whole)."""
    best = output / "best"
    if (best / "config.json").exists():
        model, _ = load_model(resolve_model(str(best)), dtype=parse_dtype(config.dtype, device))
        return model, "best model"
    return module, ("final model" if module is not None else "")
