"""The pipeline's pruning steps: the pruned model a run starts from (the cache, a lineage `.pt`,
or a prune now with its OWL profile), the calibration windows, the sparsity schedule of the
config and the repruner its later stages call.

    schedule = sparsity_schedule(config)
    model, info, report = pruned_model(config, source, identity, tokenizer, accelerator, logger, eval_tokens,
                                       evaluate, dtype, bos)
    reprune = repruner(config, model, tokenizer, device, bos)     # reprune(density), in place

`config` is the CLI's ExperimentConfig (read only); `evaluate` the evaluation keywords of the run.
"""
from __future__ import annotations

import torch

from .checkpoint_utils import (check_density, check_pruned_info, import_lineage_checkpoint, lineage_checkpoint,
                               load_pruned_model, make_pruned_model, pruned_model_dir)
from .data_utils import calibration_windows, tokenize_source, with_bos
from .eval_utils import evaluate_and_log
from .logging_utils import describe_density
from .mask_utils import sparsity_report
from .model_utils import check_prunable, load_model, position_limit
from .prune_utils import check_feasible_density, density_tolerance, owl_profile, prune_model
from .pruning_methods import needs_calibration
from .schedules import SparsitySchedule


def profile_tag(config) -> str:
    """The per-layer density rule, as the cache key and the run identity name it."""
    return "uniform" if config.layer_density == "uniform" else f"owl-{config.owl_lambda:g}-{config.owl_m:g}"


def sparsity_schedule(config) -> SparsitySchedule:
    """--schedule → the densities over the run's optimizer steps."""
    if config.schedule == "oneshot":
        return SparsitySchedule.oneshot(config.density)
    if config.schedule == "gradual":
        return SparsitySchedule.gradual(config.density, config.epochs * config.max_step, config.prune_every,
                                        config.density_steps[0] if config.density_steps else None)
    return SparsitySchedule.iterative(config.density, config.epochs * config.max_step, config.prune_stages,
                                      list(config.density_steps) if config.density_steps else None)


def pruned_model(config, source, identity, tokenizer, accelerator, logger, eval_tokens, evaluate, dtype, bos=None):
    """Load the cached pruned model for (model identity, density, method, pattern), or make it now;
    whatever is loaded is checked against the model and its density measured.  Returns
    (model, info, its measured sparsity report)."""
    folder = pruned_model_dir(config.pruned_dir, source.name, config.density, config.method, config.pattern,
                              identity["fingerprint"],
                              variant=("" if config.layer_density == "uniform" else f"-{profile_tag(config)}")
                              + ("-bos" if bos is not None else ""))
    lineage = lineage_checkpoint(config.pruned_dir, source.name, config.density)
    protocol = f"{config.eval_source}|{config.token_length}|{config.stride}|{bos}"
    if config.density == 1 and not config.pattern:  # nothing to prune: the dense model is the baseline
        model, _ = load_model(source, dtype=dtype)
        return model, {"method": "none", "density": 1.0}, sparsity_report(model)
    loaded_from = None  # where a model pruned earlier came from: its density is checked
    with accelerator.main_process_first():
        if (folder / "pruning.json").exists():
            logger.info(f"Loading pruned model from {folder}")
            model, _, info = load_pruned_model(source, folder, dtype=dtype)
            check_pruned_info(info, folder, identity)
            loaded_from = folder
        elif lineage.exists() and not config.pattern:
            logger.info(f"Importing the seed lineage's pruned state dict {lineage}")
            model, _ = load_model(source, dtype=dtype)
            import_lineage_checkpoint(model, lineage)
            info = {"method": "lineage", "density": config.density, "source": str(lineage)}
            loaded_from = lineage
        else:
            if not accelerator.is_main_process:  # pragma: no cover - the main process failed first
                raise RuntimeError(f"the main process did not write {folder}")
            model, info = prune_now(config, source, identity, tokenizer, accelerator.device, logger, eval_tokens,
                                     evaluate, folder, dtype, bos, protocol)
    check_prunable(model)  # also a cached or lineage model: fused expert tensors would hide from the density
    report = sparsity_report(model)
    if loaded_from is not None:
        check_density(report.density, config.density, config.pattern, str(loaded_from), density_tolerance(model))
    if info.get("dense_protocol") != protocol and not config.skip_dense_eval:
        info["dense_perplexity"] = None  # measured on other text; not comparable
    return model, info, report


def calibration_of(config, tokenizer, model_config, bos: int | None) -> tuple[torch.Tensor, dict]:
    """The calibration windows (the papers': random windows of the calibration text, `--seed`) and their description."""
    length = min(config.calibration_length, position_limit(model_config) or 10 ** 9)
    ids = tokenize_source(config.calibration_source, tokenizer, split="train")
    text_length = length - 1 if bos is not None else length
    windows = with_bos(calibration_windows(ids.ids, config.nsamples, text_length, config.seed), bos)
    return windows, {"source": config.calibration_source, "nsamples": config.nsamples, "length": length,
                     "seed": config.seed, "bos_per_window": bos is not None}


def prune_now(config, source, identity, tokenizer, device, logger, eval_tokens, evaluate, folder, dtype, bos,
               protocol: str):
    logger.info(f"No pruned model at {folder}: pruning now with {config.method} ({describe_density(config.density)})")
    model, _ = load_model(source, dtype=dtype)
    check_prunable(model)
    check_feasible_density(model, config.density, config.pattern)
    dense = None
    if not config.skip_dense_eval:
        model.to(device)
        # Only this process holds the dense model: the other ranks wait for the pruned one.
        dense = evaluate_and_log(model, eval_tokens, logger, title="Dense Model Evaluation", distributed=False,
                                 **evaluate).perplexity
        model.to("cpu")
    calibration, calibration_info = None, {}
    if (needs_calibration(config.method) or config.layer_density == "owl") and config.density < 1:
        calibration, calibration_info = calibration_of(config, tokenizer, model.config, bos)
    profile = None
    if config.layer_density == "owl" and config.density < 1:
        profile = owl_profile(model, calibration, config.density, config.owl_lambda, config.owl_m, device=device)
        logger.info(f"OWL densities per layer (λ {config.owl_lambda:g}, M {config.owl_m:g}): "
                    + " ".join(f"{value:.3f}" for value in profile))
        check_feasible_density(model, min(profile))
    info = make_pruned_model(model, tokenizer, folder, method=config.method, density=config.density, profile=profile,
                             pattern=config.pattern, calibration=calibration, device=device,
                             calibration_info=calibration_info,
                             extra_info={"model": config.model, "model_identity": identity, "dense_perplexity": dense,
                                         "dense_protocol": protocol})
    logger.info(f"Pruned in {info['seconds']:.1f} s; saved to {folder}")
    logger.log({"event": "pruning", **{k: v for k, v in info.items() if k != "layer_density"}})
    return model, info


def repruner(config, model, tokenizer, device, bos: int | None):
    """A schedule's step: prune the trained model in place to a density.  Iterative: with --method,
    re-calibrated on it (the same calibration windows as the first prune), per-layer by OWL when
    asked; gradual: by magnitude (many small updates, each too small to be worth a calibration pass)."""
    method = "magnitude" if config.schedule == "gradual" else config.method
    owl = config.layer_density == "owl"
    calibrated = needs_calibration(method) or owl
    calibration = calibration_of(config, tokenizer, model.config, bos)[0] if calibrated else None

    def reprune(density: float) -> None:  # OWL: the profile anew for this density, from the trained model,
        # no layer above the density it holds now (its pruned weights cannot come back)
        held = [nonzeros / numel for _, nonzeros, numel in sparsity_report(model).layers] if owl else None
        target = (owl_profile(model, calibration, density, config.owl_lambda, config.owl_m, device=device,
                              ceiling=held) if owl else density)
        prune_model(model, method, target, calibration=calibration, device=device, progress=False)
    return reprune
