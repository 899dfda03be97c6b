"""The pipeline's pruning step: the pruned model a run starts from (the cache, a lineage `.pt`, or a
prune now with its per-layer profile), the calibration windows, the config's sparsity schedule and
the repruner its later stages call.

    schedule = sparsity_schedule(config)
    model, info, report = pruned_model(context, schedule.initial, dtype)
    reprune = repruner(context, model)                       # reprune(density), in place
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn

from utils.config.sections import RunConfig
from utils.data.sources import calibration_windows, tokenize_source, with_bos
from utils.eval_utils import Heading, evaluate_and_log
from utils.export.registry import load_source
from utils.io.events import describe_density
from utils.io.files import CheckpointError, save_pretrained_atomic
from utils.models.loading import position_limit
from utils.models.sparsity import SparsityReport, sparsity_report
from utils.models.structure import check_prunable
from utils.pipeline.context import Context
from utils.pipeline.identity import PruneSpec, profile_of
from utils.pruning.cache import (check_density, check_pruned_info, import_lineage_checkpoint, load_pruned_model,
                                 read_info)
from utils.pruning.driver import check_feasible_density, density_tolerance, prune_model
from utils.pruning.methods import needs_calibration
from utils.pruning.schedule import Repruner, SparsitySchedule


def sparsity_schedule(config: RunConfig) -> SparsitySchedule:
    """--schedule → the densities over the run's optimizer steps."""
    schedule, density, total = config.schedule, config.prune.density, config.train.total_steps
    if schedule.kind == "oneshot":
        return SparsitySchedule.oneshot(density)
    if schedule.kind == "gradual":
        return SparsitySchedule.gradual(density, total, schedule.every,
                                        schedule.density_steps[0] if schedule.density_steps else None,
                                        ramp=schedule.ramp_end)
    return SparsitySchedule.iterative(density, total, schedule.stages,
                                      list(schedule.density_steps) if schedule.density_steps else None)


def _dense_protocol(context: Context) -> str:
    """The text and protocol a cached prune's dense perplexity was measured with."""
    protocol = context.config.eval
    quick = f"|first {protocol.windows} windows" if protocol.quick else ""  # the full protocol's key as before
    return f"{protocol.source}|{protocol.token_length}|{protocol.window_stride}|{context.bos}{quick}"


def pruned_model(context: Context, density: float, dtype: torch.dtype | None
                 ) -> tuple[nn.Module, dict, SparsityReport]:
    """Load the cached pruned model for (model identity, density, method, pattern, profile), or
    make it now; whatever is loaded is checked against the model and its density measured.
    Returns (model, info, its measured sparsity report)."""
    config, logger = context.config, context.logger
    spec = PruneSpec.of(config, context.source.name, context.model_identity["fingerprint"], context.bos, density,
                        calibration_length=_calibration_length(config, context.model_config))
    folder, lineage = _cache_entry(spec, config.prune.cache_dir), spec.lineage_file(config.prune.cache_dir)
    if density == 1 and not config.prune.pattern:  # nothing to prune: the dense model is the baseline
        model, _ = load_source(context.source, dtype)
        return model, {"method": "none", "density": 1.0}, sparsity_report(model)
    loaded_from = None  # where a model pruned earlier came from: its density is checked
    with context.first():  # the others look once the main process pruned (a store wait, not a collective)
        stale = _stale(folder, context.model_identity)
        if stale:
            logger.info(f"The cached prune in {folder} was made from other weights than --model has now ({stale}); "
                        "pruning again")
        if (folder / "pruning.json").exists() and not stale:
            logger.info(f"Loading pruned model from {folder}")
            model, _, info = load_pruned_model(context.source, folder, dtype=dtype)
            check_pruned_info(info, folder, context.model_identity)  # pruned from another model: its own message
            differences = spec.differences(PruneSpec.from_json(info))
            if differences:
                raise CheckpointError(f"{folder}/pruning.json records another prune: {', '.join(differences)}; "
                                      f"delete it to prune again: rm -r {folder}")
            loaded_from = folder
        elif lineage.exists() and not config.prune.pattern:
            logger.info(f"Importing the seed lineage's pruned state dict {lineage}")
            model, _ = load_source(context.source, dtype)
            import_lineage_checkpoint(model, lineage)
            info = {"method": "lineage", "density": density, "source": str(lineage)}
            loaded_from = lineage
        else:
            if not context.is_main:  # pragma: no cover - the main process failed first
                raise RuntimeError(f"the main process did not write {folder}")
            model, info = _prune_now(context, spec, folder, dtype, replace=bool(stale))
    check_prunable(model)  # also a cached or lineage model: fused expert tensors would hide from the density
    report = sparsity_report(model)
    if loaded_from is not None:
        check_density(report.density, density, config.prune.pattern, str(loaded_from), density_tolerance(model))
    if info.get("dense_protocol") != _dense_protocol(context) and not config.prune.skip_dense_eval:
        info["dense_perplexity"] = None  # measured on other text; not comparable
    return model, info, report


def _cache_entry(spec: PruneSpec, root: str) -> Path:
    """The cache folder of `spec`: its own, or the one the code before the calibration joined the
    key wrote, when its pruning.json says it was calibrated the same way."""
    folder, legacy = spec.folder(root), spec.legacy_folder(root)
    if not (folder / "pruning.json").exists() and (legacy / "pruning.json").exists():
        try:
            if spec.calibrated_as(read_info(legacy)):
                return legacy
        except CheckpointError:
            pass  # a damaged legacy entry is not this spec's; pruning now writes the new one
    return folder


def _stale(folder: Path, identity: dict) -> str:
    """Why a cache entry no longer matches the model's files ("" when it does, or cannot tell: one
    written before whole-file digests were recorded)."""
    try:
        recorded = (read_info(folder).get("model_identity") or {}).get("content")
    except CheckpointError:
        return ""  # missing or damaged: the load says so
    current = identity.get("content")
    return f"their digest was {recorded}, now {current}" if recorded and current and recorded != current else ""


def _calibration_length(config: RunConfig, model_config) -> int:
    """--calibration-length as the model's positions cap it (what the windows hold, and the cache key)."""
    return min(config.prune.calibration.length, position_limit(model_config) or 10 ** 9)


def calibration_of(context: Context, model_config) -> tuple[torch.Tensor, dict]:
    """The calibration windows (the papers': random windows of the calibration text, `--seed`) and their description."""
    calibration, bos = context.config.prune.calibration, context.bos
    length = _calibration_length(context.config, model_config)
    ids = tokenize_source(calibration.source, context.tokenizer, split="train")
    text_length = length - 1 if bos is not None else length
    windows = with_bos(calibration_windows(ids.ids, calibration.nsamples, text_length, calibration.seed), bos)
    return windows, {"source": calibration.source, "nsamples": calibration.nsamples, "length": length,
                     "seed": calibration.seed, "bos_per_window": bos is not None}


def _prune_now(context: Context, spec: PruneSpec, folder, dtype: torch.dtype | None,
               replace: bool = False) -> tuple[nn.Module, dict]:
    """Prune --model now (its dense perplexity measured first) and save it to the cache `folder`
    (`replace`: over a stale entry; otherwise an entry another process finished first is kept)."""
    config, logger, device = context.config, context.logger, context.device
    prune, density = config.prune, spec.density
    logger.info(f"No pruned model at {folder}: pruning now with {prune.method} ({describe_density(density)})")
    model, _ = load_source(context.source, dtype)
    check_prunable(model)
    check_feasible_density(model, density, prune.pattern)
    dense = None
    if not prune.skip_dense_eval:
        model.to(device)
        # Only this process holds the dense model: the other ranks wait for the pruned one.
        dense = evaluate_and_log(model, context.eval_tokens, logger, Heading("Dense Model Evaluation"),
                                 context.protocol, distributed=False).perplexity
        model.to("cpu")
    profile = profile_of(config)
    calibration, calibration_info = None, {}
    if (needs_calibration(prune.method) or profile.owl) and density < 1:
        calibration, calibration_info = calibration_of(context, model.config)
    densities = profile.densities(model, calibration, density, device)
    if profile.owl and density < 1:
        logger.report(f"OWL densities per layer (λ {profile.lam:g}, M {profile.m:g}): "
                      + " ".join(f"{value:.3f}" for value in densities),
                      {"event": "owl_profile", "lambda": profile.lam, "m": profile.m, "densities": densities})
        check_feasible_density(model, min(densities))
    report = prune_model(model, prune.method, densities, prune.pattern, calibration=calibration, device=device,
                         options=prune.options)
    import transformers
    info = {**spec.to_json(), "calibration": calibration_info, "seconds": report.seconds,
            "measured_density": sparsity_report(model).density, "layer_density": report.layer_density,
            "layer_density_profile": densities if isinstance(densities, list) else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "model": config.model.name, "model_identity": context.model_identity, "dense_perplexity": dense,
            "dense_protocol": _dense_protocol(context)}
    save_pretrained_atomic(model, context.tokenizer, folder, info=info, keep_existing=not replace)  # runs prune at once
    logger.info(f"Pruned in {info['seconds']:.1f} s; saved to {folder}")
    logger.log({"event": "pruning", **{k: v for k, v in info.items() if k != "layer_density"}})
    return model, info


def repruner(context: Context, model: nn.Module) -> Repruner:
    """The schedule's later prunes of `model` (utils/pruning/schedule.Repruner), calibrated on the
    same windows as the first prune where the method or the profile reads activations."""
    config = context.config
    return Repruner.for_schedule(config.schedule, model, config.prune.method, profile_of(config),
                                 lambda: calibration_of(context, model.config)[0], context.device,
                                 config.prune.options)
