"""The pipeline behind the CLI: set up → the model and its identity → one function per mode.

    config = validate(build_parser().parse_args([...]), world_size=1)
    status = run(config)                       # the process exit status

Every process of an `accelerate launch` runs this; the main process prunes and writes files,
the others wait for it (`main_process_first`) and then read what it wrote.  The modes are
utils/pipeline/modes.py (evaluate, prune, export) and utils/pipeline/train.py (prune and train).
"""
from __future__ import annotations

import platform
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch

from utils.config.sections import RunConfig, TrainCfg
from utils.data.generated import split_sources
from utils.export.registry import resolve_source
from utils.io.events import MetricsLogger, describe_density, quiet_transformers_progress
from utils.io.files import read_json_object, write_json
from utils.io.history import PerplexityHistory, finished_title
from utils.io.run_folder import RunFolder, RunFolderError, check_file_writable, check_writable, drop_events_after
from utils.models.families import bos_per_window
from utils.models.hub import ModelError
from utils.models.loading import load_config, load_tokenizer, model_identity, position_limit
from utils.pipeline.context import Context, Start
from utils.pipeline.identity import RunIdentity, changed_flags
from utils.pipeline.modes import evaluate_only, export_only, prune_only
from utils.pipeline.train import train
from utils.pipeline.prune_step import sparsity_schedule
from utils.training.parallel import MainFirst, init_distributed
from utils.training.stopping import STOPPING_ERRORS, stop_message
from utils.training.state import TrainState, check_position, read_meta


# One function per mode: (context, start) → the exit status.
MODES = {"eval": evaluate_only, "prune": prune_only, "export": export_only, "train": train}


def _versions() -> dict:
    import accelerate
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def _make_accelerator(config: RunConfig):
    from accelerate import Accelerator
    report_to = config.output.report_to
    # On a machine without a GPU, cpu=True is what makes accelerate join a torchrun/accelerate-launch
    # group (MULTI_CPU) instead of running every process as a lone main process.
    from accelerate.utils import InitProcessGroupKwargs
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=config.train.dist_timeout))
    accelerator = Accelerator(cpu=config.model.cpu or not torch.cuda.is_available(), kwargs_handlers=[timeout],
                              log_with=None if report_to == "none" else report_to, project_dir=config.output.dir)
    init_distributed(accelerator.device)
    return accelerator


def _claim_output(config: RunConfig, accelerator) -> RunFolder:
    """Check every path the run will write before any work (nothing computed is lost to a bad
    path later), take the output folder's lock; the main process decides and tells the others."""
    output = config.output
    folder = RunFolder(Path(output.dir), resume=output.resume, overwrite=output.overwrite)
    problem, folder.run_key = None, uuid.uuid4().hex  # names this run's waits on the process group's store
    if accelerator.is_main_process:
        try:
            folder.claim(training=config.mode == "train")
            if output.log_file:
                check_file_writable(Path(output.log_file), "--log-file")
            if config.mode in ("prune", "train"):
                check_writable(Path(config.prune.cache_dir), "--pruned-dir")
        except RunFolderError as error:
            folder.release()
            problem = str(error)
    if accelerator.num_processes > 1:
        shared = [problem, folder.run_key]
        torch.distributed.broadcast_object_list(shared, src=0)  # in memory between processes, not from disk
        problem, folder.run_key = shared
    if problem:
        raise RunFolderError(problem)
    return folder


def run(config: RunConfig, callbacks=()) -> int:
    """Run the experiment `config` describes; returns the process exit status.  `callbacks` see
    the training loop after every optimizer step (fsdp_finetune.Callback)."""
    accelerator = _make_accelerator(config)
    folder = _claim_output(config, accelerator)
    try:
        return _run_logged(config, accelerator, folder, callbacks)
    finally:
        folder.release()


def _run_logged(config: RunConfig, accelerator, folder: RunFolder, callbacks) -> int:
    tracker_log = None
    if config.output.report_to != "none":
        accelerator.init_trackers("extreme-compression",
                                  config={name: str(value) for name, value in config.flat().items()})
        tracker_log = lambda values, step: accelerator.log(values, step=step)  # noqa: E731
    logger = MetricsLogger(folder.path, config.output.log_file, accelerator.is_main_process, tracker_log)
    quiet_transformers_progress(logger.stream)
    try:
        return _run(config, accelerator, folder, logger, callbacks)
    except STOPPING_ERRORS as error:
        logger.info(f"error: {stop_message(error)}")
        logger.log({"event": "error", "kind": type(error).__name__, "message": str(error)})
        return 1
    finally:
        if config.output.report_to != "none":
            accelerator.end_training()
        logger.close()


def _check_lengths(config: RunConfig, model_config) -> None:
    """Lengths the model's positions cannot hold fail now, not after pruning."""
    limit = position_limit(model_config)
    if limit is None or config.mode == "export":  # an export evaluates nothing
        return
    asked = [("--token-length", config.eval.token_length)]
    if config.mode == "train":
        asked.append(("--block-size", config.train.block_size))
        if split_sources(config.train.train_source)[1] is not None:  # a sampled row: its start token, then its tokens
            flag = "--gen-length" if config.train.generation.length else "--block-size (the sampled rows' length)"
            asked.append((flag, 1 + config.train.sampled_length))
    for flag, value in asked:
        if value > limit:
            raise ModelError(f"{flag} {value} is longer than the {limit} positions {config.model.name} supports; "
                             f"use {flag} {limit} or less")


def _header(config: RunConfig, accelerator, logger: MetricsLogger) -> None:
    prune, train = config.prune, config.train
    pruning = "" if config.mode in ("eval", "export") else (
        f" | {describe_density(prune.density)}" + (f" ({prune.pattern[0]}:{prune.pattern[1]})" if prune.pattern
                                                   else "") + f" | method {prune.method}")
    logger.report(f"Model: {config.model.name}{pruning} | device {accelerator.device} × {accelerator.num_processes}",
                  {"event": "start", "mode": config.mode, "model": config.model.name, "device": str(accelerator.device),
                   "processes": accelerator.num_processes})
    if config.mode == "train":
        logger.report(f"Schedule: batch size {train.batch_size} → max_step {train.max_step} per epoch, "
                      f"lr {train.lr:.3g}, {train.epochs} epochs",
                      {"event": "schedule", "batch_size": train.batch_size, "max_step": train.max_step, "lr": train.lr,
                       "epochs": train.epochs})


def _run(config: RunConfig, accelerator, folder: RunFolder, logger: MetricsLogger, callbacks) -> int:
    started = time.monotonic()
    _header(config, accelerator, logger)
    source = resolve_source(config.model.name)
    model_config = load_config(source)
    _check_lengths(config, model_config)
    identity = model_identity(source)
    first = MainFirst(accelerator.is_main_process, accelerator.num_processes, run=folder.run_key)
    with first():
        tokenizer = load_tokenizer(source)
    bos = bos_per_window(config.model.bos_per_window, model_config, tokenizer)
    schedule = sparsity_schedule(config)
    context = Context(config, accelerator, logger, folder, source, identity, tokenizer, bos, schedule, model_config,
                      started=started, first=first)
    run_identity = RunIdentity.of(config, identity["fingerprint"], schedule, bos, identity.get("content")).to_json()
    meta = _check_resume(config, folder, run_identity)
    if meta is None and config.mode == "train" and config.output.resume and \
            _finished(folder, logger, run_identity, config.train):
        return 0
    if meta is not None and meta["train_state"].get("finished"):
        if _delivered(folder.path, meta["train_state"]):
            logger.info(f"The run in {folder.path} is already finished; its summary:")
            state = TrainState(**meta["train_state"])
            title = finished_title(state.stopped_early(config.train.epochs), state.global_step, config.train.total_steps)
            for line in PerplexityHistory.from_dict(state.history).summary_lines(title):
                logger.info(line)
            return 0
        logger.info(f"The run in {folder.path} finished training but stopped before its results were all written "
                    "(results.json, the export): writing them now, from the saved state")
    if accelerator.is_main_process:
        if meta is None:
            device = accelerator.device
            write_json(folder.path / "run.json", {
                "config": config.to_json(), "identity": run_identity, "model": identity, "versions": _versions(),
                "device": str(device), "processes": accelerator.num_processes,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})
        else:
            state = meta["train_state"]
            dropped = drop_events_after(folder.path / "metrics.jsonl", state["global_step"], state["epoch"])
            logger.log({"event": "resume", "step": state["global_step"], "epoch": state["epoch"],
                        "dropped_events": dropped})
    return MODES[config.mode](context, Start(run_identity, resuming=meta is not None, callbacks=tuple(callbacks)))


def _finished(folder: RunFolder, logger: MetricsLogger, identity: dict, train: TrainCfg) -> bool:
    """A finished run whose state/ was removed at its end (without --keep-state): --resume prints
    its summary from results.json instead of starting it again; a command that would change the
    run is refused as for any resume (its identity is run.json's)."""
    output = folder.path
    results = read_json_object(output / "results.json")
    if results is None or results.get("finished") is not True:
        return False
    # run.json gone or damaged: nothing to compare, nothing retrained
    saved = (read_json_object(output / "run.json") or {}).get("identity", {})
    _refuse_changes(folder, saved, identity)
    logger.info(f"The run in {output} is already finished; its summary (from results.json):")
    step = int(results.get("tokens_trained") or 0) // (train.batch_size * train.block_size)  # the same run: its sizes
    for line in PerplexityHistory.from_dict(results).summary_lines(
            finished_title(results.get("stopped_early") is True, step, train.total_steps)):
        logger.info(line)
    return True


def _refuse_changes(folder: RunFolder, saved: dict, identity: dict) -> None:
    differences = changed_flags(RunIdentity.from_json(saved if isinstance(saved, dict) else {}),
                                RunIdentity.from_json(identity))
    if differences:
        raise RunFolderError(f"--resume would mix two runs in {folder.path}: " + ", ".join(differences)
                             + ". Resume with the saved settings (its run.json), or start a new run with another "
                               "--output-dir (a longer schedule is a new run: --model its best/ folder)")


def _delivered(output: Path, train_state: dict) -> bool:
    """Whether a finished run also wrote what comes after its last epoch: results.json of all its
    epochs, not interrupted (a stop during the export leaves the last epoch's, in progress)."""
    results = read_json_object(output / "results.json")
    return (results is not None and results.get("interrupted") is False
            and results.get("epochs_completed") == train_state["epoch"] - 1
            and results.get("finished") is not False and not results.get("in_progress")  # an epoch's, not the end's
            and "export_error" not in results)  # a failed export: again


def _check_resume(config: RunConfig, folder: RunFolder, identity: dict) -> dict | None:
    """The saved state's meta when --resume continues this very run; refuses one that would mix two."""
    if not config.output.resume or not (folder.state_dir / "train_state.json").exists():
        return None
    meta = read_meta(folder.state_dir)
    _refuse_changes(folder, meta.get("identity", {}), identity)
    check_position(meta, folder.state_dir, config.train.max_step, config.train.epochs)
    return meta

