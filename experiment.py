"""The pipeline behind the CLI: set up → pruned model (cached or made) → evaluate → fine-tune → summarize.

    from extreme_compression_experiment import build_parser, validate
    from experiment import run
    run(validate(build_parser().parse_args([...]), parser))

Every process of an `accelerate launch` runs this; the main process prunes and writes files,
the others wait for it (`main_process_first`) and then read what it wrote.
"""
from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import torch

from fsdp_finetune import (STOPPING_ERRORS, TrainConfig, finetune, init_distributed, prepare_model,
                           resolve_compile_mode, stop_message)
from utils.checkpoint_utils import (import_lineage_checkpoint, lineage_checkpoint, load_pruned_model,
                                    make_pruned_model, pruned_model_dir)
from utils.data_utils import calibration_windows, pack_blocks, tokenize_source
from utils.eval_utils import PerplexityHistory, evaluate_and_log
from utils.logging_utils import MetricsLogger, describe_density, write_json
from utils.mask_utils import sparsity_report
from utils.model_utils import count_parameters, load_model, load_tokenizer, parse_dtype, resolve_model



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


def run(config) -> int:
    """Run the experiment described by an ExperimentConfig; returns the process exit status."""
    accelerator = _make_accelerator(config)
    device = accelerator.device
    output = Path(config.output_dir)
    tracker_log = None
    if config.report_to != "none":
        accelerator.init_trackers("extreme-compression", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
        tracker_log = lambda values, step: accelerator.log(values, step=step)  # noqa: E731
    logger = MetricsLogger(output, config.log_file, accelerator.is_main_process, tracker_log)
    try:
        return _run(config, accelerator, device, output, logger)
    except STOPPING_ERRORS as error:
        logger.info(f"error: {stop_message(error)}")
        logger.log({"event": "error", "kind": type(error).__name__, "message": str(error)})
        return 1
    finally:
        if config.report_to != "none":
            accelerator.end_training()
        logger.close()


def _run(config, accelerator, device, output: Path, logger: MetricsLogger) -> int:
    world = accelerator.num_processes
    pruning = "" if config.mode == "eval" else (
        f" | {describe_density(config.density)}" + (f" ({config.pattern[0]}:{config.pattern[1]})" if config.pattern else "")
        + f" | method {config.method}")
    logger.info(f"Model: {config.model}{pruning} | device {device} × {world}")
    if config.mode == "train":
        logger.info(f"Schedule: batch size {config.batch_size} → max_step {config.max_step} per epoch, "
                    f"lr {config.lr:.3g}, {config.epochs} epochs")
    if accelerator.is_main_process:
        write_json(output / "run.json", {"config": dataclasses.asdict(config), "versions": _versions(),
                                         "device": str(device), "processes": world,
                                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None})
    source = resolve_model(config.model)
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(source)
        eval_tokens = tokenize_source(config.eval_source, tokenizer, split="test")
    eval_dtype = parse_dtype(config.dtype, device)
    evaluate = dict(token_length=config.token_length, stride=config.stride, batch_size=config.eval_batch_size,
                    compile=_eval_compile(config.eval_compile, training_compiles=False))
    history = PerplexityHistory()

    if config.mode == "eval":
        model, _ = load_model(source, dtype=eval_dtype)
        model.to(device)
        logger.info(f"{count_parameters(model):,} parameters, {model.dtype}")
        result = evaluate_and_log(model, eval_tokens, logger, title="Perplexity", **evaluate)
        if accelerator.is_main_process:
            write_json(output / "results.json", {"model": config.model, "eval_source": config.eval_source,
                                                 **dataclasses.asdict(result)})
        return 0

    model, info = _pruned_model(config, source, tokenizer, accelerator, logger, eval_tokens, evaluate,
                                dtype=eval_dtype if config.mode == "prune" else torch.float32)
    history.dense = info.get("dense_perplexity")
    for line in sparsity_report(model).lines():
        logger.info(line)
    if config.mode == "prune":
        model.to(device)
        result = evaluate_and_log(model, eval_tokens, logger, title="Pruned Model Evaluation",
                                  density=config.density, **evaluate)
        history.baseline = result.perplexity
        for line in history.summary_lines()[1:3]:
            logger.info(line)
        if accelerator.is_main_process:
            write_json(output / "results.json", {**history.to_dict(), "pruning": info})
        return 0
    return _train(config, model, tokenizer, accelerator, device, output, logger, eval_tokens, evaluate, history, info)


def _pruned_model(config, source, tokenizer, accelerator, logger, eval_tokens, evaluate, dtype):
    """Load the cached pruned model for (model, density, method, pattern), or make it now."""
    folder = pruned_model_dir(config.pruned_dir, source.name, config.density, config.method, config.pattern)
    lineage = lineage_checkpoint(config.pruned_dir, source.name, config.density)
    protocol = f"{config.eval_source}|{config.token_length}|{config.stride}"
    if config.density == 1 and not config.pattern:  # nothing to prune: the dense model is the baseline
        model, _ = load_model(source, dtype=dtype)
        return model, {"method": "none", "density": 1.0}
    with accelerator.main_process_first():
        if (folder / "pruning.json").exists():
            logger.info(f"Loading pruned model from {folder}")
            model, _, info = load_pruned_model(source, folder, dtype=dtype)
        elif lineage.exists() and not config.pattern:
            logger.info(f"Importing the seed lineage's pruned state dict {lineage}")
            model, _ = load_model(source, dtype=dtype)
            import_lineage_checkpoint(model, lineage)
            info = {"method": "lineage", "density": config.density, "source": str(lineage)}
        else:
            if not accelerator.is_main_process:  # pragma: no cover - the main process failed first
                raise RuntimeError(f"the main process did not write {folder}")
            model, info = _prune_now(config, source, tokenizer, accelerator.device, logger, eval_tokens, evaluate,
                                     folder, dtype)
    if info.get("dense_protocol") != protocol and not config.skip_dense_eval:
        info["dense_perplexity"] = None  # measured on other text; not comparable
    return model, info


def _prune_now(config, source, tokenizer, device, logger, eval_tokens, evaluate, folder, dtype):
    logger.info(f"No pruned model at {folder}: pruning now with {config.method} ({describe_density(config.density)})")
    model, _ = load_model(source, dtype=dtype)
    dense = None
    if not config.skip_dense_eval:
        model.to(device)
        # Only this process holds the dense model: the other ranks wait for the pruned one.
        dense = evaluate_and_log(model, eval_tokens, logger, title="Dense Model Evaluation", distributed=False,
                                 **evaluate).perplexity
        model.to("cpu")
    calibration, calibration_info = None, {}
    if config.method != "magnitude" and config.density < 1:
        length = min(config.calibration_length, getattr(model.config, "max_position_embeddings", None) or 10 ** 9)
        ids = tokenize_source(config.calibration_source, tokenizer, split="train")
        calibration = calibration_windows(ids.ids, config.nsamples, length, config.seed)
        calibration_info = {"source": config.calibration_source, "nsamples": config.nsamples, "length": length,
                            "seed": config.seed}
    info = make_pruned_model(model, tokenizer, folder, method=config.method, density=config.density,
                             pattern=config.pattern, calibration=calibration, device=device,
                             calibration_info=calibration_info,
                             extra_info={"model": config.model, "dense_perplexity": dense,
                                         "dense_protocol": f"{config.eval_source}|{config.token_length}|{config.stride}"})
    logger.info(f"Pruned in {info['seconds']:.1f} s; saved to {folder}")
    logger.log({"event": "pruning", **{k: v for k, v in info.items() if k != "layer_density"}})
    return model, info


def _eval_compile(requested: str, training_compiles: bool) -> str:
    """--eval-compile → evaluate_perplexity's level.  auto compiles the scoring only for the
    evaluations of a compiled training run (every epoch); a single evaluation before training pays
    more to compile than it saves."""
    if requested != "auto":
        return requested
    return "scoring" if training_compiles else "off"


def _train(config, model, tokenizer, accelerator, device, output, logger, eval_tokens, evaluate, history, info) -> int:
    world = accelerator.num_processes
    micro = config.micro_batch_size or max(1, config.batch_size // world)
    if config.batch_size % (micro * world):
        logger.info(f"error: --batch-size {config.batch_size} is not a multiple of micro-batch {micro} × "
                    f"{world} processes; pick --micro-batch-size so that it is")
        return 2
    with accelerator.main_process_first():
        train_ids = tokenize_source(config.train_source, tokenizer, split="train")
    blocks = pack_blocks(train_ids.ids, config.block_size)
    logger.info(f"Training text: {train_ids.ids.numel():,} tokens → {blocks.shape[0]:,} blocks of {config.block_size}")
    mixed = config.mixed_precision if config.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    shards = world if config.parallel == "fsdp" else 1
    compile_mode, compile_note = resolve_compile_mode(config.compile, device, shards,
                                                      accumulation=config.batch_size // (micro * world))
    parallel = f" | parallel: {config.parallel} × {world} processes" if world > 1 else ""
    logger.info(f"Precision: {mixed} | torch.compile: {compile_note}{parallel}")
    if shards > 1 and device.type == "cuda":
        logger.info("Note: FSDP steps run without CUDA graphs; a model that fits one GPU may train faster with "
                    "--parallel ddp (a whole copy per process, CUDA graphs kept) or on one GPU (BENCHMARKS.md)")
    prepared = prepare_model(model, device, mixed, compile_mode, config.parallel)
    evaluate = {**evaluate, "compile": _eval_compile(config.eval_compile, compile_mode is not None)}
    train_config = TrainConfig(
        epochs=config.epochs, max_step=config.max_step, lr=config.lr, batch_size=config.batch_size,
        micro_batch_size=micro, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, mixed_precision=mixed, compile_mode=compile_mode,
        eval_compile=evaluate["compile"],
        patience=config.patience,
        min_delta=config.min_delta,
        token_length=config.token_length, stride=config.stride, eval_batch_size=config.eval_batch_size,
        output_dir=str(output), resume=config.resume, save_best=config.save_best,
        interrupt_after_steps=config.interrupt_after_steps)
    resuming = config.resume and (output / "state" / "train_state.json").exists()
    if not resuming:
        if config.resume:
            logger.info(f"--resume: no saved state in {output / 'state'}; starting from the beginning")
        with prepared.precision():
            baseline = evaluate_and_log(prepared.module, eval_tokens, logger, title="Baseline Evaluation (Before Training)",
                                        density=config.density, **evaluate)
        history.baseline = baseline.perplexity
    best_info = lambda: {"model": config.model, "density": config.density, "method": config.method,  # noqa: E731
                         "pattern": info.get("pattern"), "pruning": {k: v for k, v in info.items() if k != "layer_density"}}
    if compile_mode:
        logger.info("The first training steps compile the model (minutes on a cold compile cache, seconds when "
                    "cached); --compile off skips it")
    result = finetune(prepared, tokenizer, blocks, eval_tokens, train_config, config.density, logger, device,
                      history, best_info)
    history = result.history
    if result.error:
        logger.info(f"error: {result.error}")
        logger.log({"event": "error", "message": result.error})
    for line in history.summary_lines():
        logger.info(line)
    if accelerator.is_main_process:
        write_json(output / "results.json", {**history.to_dict(), "density": config.density,
                                             "epochs_completed": result.state.epoch - 1,
                                             "stopped_early": result.stopped_early, "interrupted": result.interrupted,
                                             "error": result.error,
                                             "pruning": {k: v for k, v in info.items() if k != "layer_density"}})
    return 130 if result.interrupted else 1 if result.error else 0
