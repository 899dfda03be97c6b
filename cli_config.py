"""The command line's meaning: argparse's namespace checked and resolved into one typed config.

    config = validate(build_parser().parse_args(argv), parser)   # exits 2 with one line on bad input

Every value that parses but makes no sense is found here at once, before any model or text is
loaded; `--recipe measured` and the `auto` choices are resolved here too, so the pipeline only
ever sees concrete settings (`ExperimentConfig`).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

from utils.layer_density import resolve_layer_density
from utils.recipes import RECIPES, default_loss, measured_recipe
from utils.schedules import GRADUAL_RAMP, ITERATIVE_START

BASE_LR = 5e-6  # the brief's lr rule: BASE_LR·sqrt(batch_size)


@dataclass(frozen=True)
class ExperimentConfig:
    mode: str  # eval | prune | export | train
    model: str
    dtype: str
    cpu: bool
    density: float
    method: str
    pattern: tuple[int, int] | None
    calibration_source: str
    nsamples: int
    calibration_length: int
    pruned_dir: str
    schedule: str
    density_steps: tuple[float, ...] | None
    prune_stages: int
    prune_every: int
    layer_density: str
    owl_lambda: float
    owl_m: float
    batch_size: int
    micro_batch_size: int | None
    epochs: int
    max_step: int
    lr: float
    lr_derived: bool  # neither --lr, --base-lr nor --recipe measured: the brief's lr, BASE_LR·sqrt(batch_size)
    recipe: str  # "brief" or "measured" (whose settings are filled in where the command left them unset)
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float | None
    block_size: int
    train_source: str
    holdout: float
    gen_temperature: float
    gen_top_p: float
    gen_length: int | None
    gen_batch_size: int
    loss: str
    loss_auto: bool  # --loss auto: `loss` is the measured recipe's for this density
    kd_temperature: float
    kd_weight: float
    ce_weight: float
    kd_hidden_weight: float
    mixed_precision: str
    compile: str
    parallel: str
    seed: int
    patience: int | None
    min_delta: float
    eval_source: str
    token_length: int
    stride: int
    eval_batch_size: int
    eval_compile: str
    skip_dense_eval: bool
    bos_per_window: str
    output_dir: str
    log_file: str | None
    resume: bool
    overwrite: bool
    report_to: str
    save_best: bool
    export: str
    export_dtype: str
    tasks: tuple[str, ...]
    task_dir: str | None
    task_limit: int | None
    task_batch_size: int
    interrupt_after_steps: int | None
    interrupt_signal: str = "int"


def derive_schedule(batch_size: int, base_samples: int = 10000, base_lr: float = BASE_LR) -> tuple[int, float]:
    """max_step = base_samples // batch_size, lr = base_lr·sqrt(batch_size): every batch size sees
    the same number of samples per epoch."""
    return max(1, base_samples // batch_size), base_lr * math.sqrt(batch_size)


def _problems(args: argparse.Namespace) -> list[str]:
    """Every value that parses but makes no sense, found at once (one line lists them all)."""
    problems = []

    def finite(name: str, value: float | None, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = True, what: str = "") -> None:
        if value is None:
            return
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if math.isnan(value) or math.isinf(value) or too_low or too_high:
            problems.append(f"argument {name}: {value:g} is not {what}")

    finite("--max-grad-norm", args.max_grad_norm, 0, what="a finite number >= 0 (0 turns clipping off)")
    finite("--weight-decay", args.weight_decay, 0, what="a finite number >= 0")
    finite("--min-delta", args.min_delta, 0, 1, what="a fraction in [0, 1) (relative perplexity drop)")
    finite("--holdout", args.holdout, 0, 0.5, what="a fraction in [0, 0.5) of the training text (0 = off)")
    finite("--kd-temperature", args.kd_temperature, 0, low_open=True, what="a finite number > 0")
    finite("--kd-weight", args.kd_weight, 0, what="a finite number >= 0")
    finite("--ce-weight", args.ce_weight, 0, what="a finite number >= 0")
    finite("--kd-hidden-weight", args.kd_hidden_weight, 0, what="a finite number >= 0 (0 = off)")
    if args.loss in ("ce+kd", "auto") and args.kd_weight == 0 and args.ce_weight == 0:
        problems.append("arguments --ce-weight and --kd-weight: both are 0, so nothing would be trained")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        problems.append("argument --warmup-steps: must be 0 or more")
    if args.seed < 0:
        problems.append(f"argument --seed: {args.seed} must be 0 or more")
    if args.interrupt_after_steps is not None and args.interrupt_after_steps < 1:
        problems.append("argument --interrupt-after-steps: must be at least 1")
    finite("--gen-temperature", args.gen_temperature, 0, low_open=True, what="a finite number > 0")
    finite("--gen-top-p", args.gen_top_p, 0, 1, low_open=True, high_open=False, what="in (0, 1]")
    if "generated:" in args.train_source:
        from utils.data_utils import DataError
        from utils.generated_text import split_sources, token_count
        try:
            generated = split_sources(args.train_source)[1]  # None: "generated:" was only inside a path
            if generated is not None:
                token_count(generated)
        except DataError as error:
            problems.append(f"argument --train-source: {error}")
    finite("--owl-lambda", args.owl_lambda, 0, 0.5, low_open=True, high_open=False, what="in (0, 0.5]")
    finite("--owl-m", args.owl_m, 0, low_open=True, what="a finite number > 0")
    if args.layer_density == "owl" and args.pattern:
        problems.append("argument --layer-density owl: an N:M --pattern has one density everywhere; drop one of them")
    if args.schedule != "oneshot":
        schedule = f"argument --schedule {args.schedule}"
        if args.pattern:
            problems.append(f"{schedule}: works with unstructured densities for now (drop --pattern)")
        if args.schedule == "gradual" and args.layer_density == "owl":
            problems.append(f"{schedule}: re-prunes with one density everywhere for now (drop --layer-density owl, "
                            "or use --schedule iterative with it)")
        if args.eval_only or args.prune_only or args.export_only:
            problems.append(f"{schedule}: prunes between training steps; it needs a training run")
        processes = int(os.environ.get("WORLD_SIZE") or 1)  # what accelerate launch / torchrun start
        if processes > 1 and args.parallel == "fsdp":
            problems.append(f"{schedule}" + (" (--recipe measured)" if args.recipe == "measured" else "") +
                            f": needs the whole model in each of the {processes} processes (the pruning driver "
                            "is not sharded); add --parallel ddp (a whole copy per process), or --schedule oneshot" +
                            (" (the rest of the recipe stays)" if args.recipe == "measured" else ""))
        if not args.density_steps and args.sparsity >= ITERATIVE_START:
            problems.append(f"{schedule}: --sparsity {args.sparsity:g} is not below the default "
                            f"first density ({ITERATIVE_START:g}); give the densities with --density-steps")
        if args.schedule == "gradual" and args.density_steps and len(args.density_steps) != 2:
            problems.append("argument --density-steps: --schedule gradual takes two, START,FINAL (e.g. 0.5,0.1)")
    steps = args.density_steps
    if steps and (any(not 0 < d <= 1 for d in steps) or any(b >= a for a, b in zip(steps, steps[1:]))
                  or (args.pattern is None and abs(steps[-1] - args.sparsity) > 1e-12)):
        problems.append(f"argument --density-steps: '{','.join(f'{d:g}' for d in steps)}' must be decreasing "
                        f"densities in (0, 1] ending at --sparsity {args.sparsity:g}")
    if args.tasks:
        from utils.task_eval import lm_eval_missing
        missing = lm_eval_missing()
        if missing:
            problems.append(f"argument --tasks: {missing}")
        if args.export_only:
            problems.append("argument --tasks: --export-only writes a checkpoint and evaluates nothing; "
                            "run --eval-only --model THE_EXPORT --tasks ... afterwards")
    if args.task_dir and not Path(args.task_dir).is_dir():
        problems.append(f"argument --task-dir: {args.task_dir} is not a folder (of lm-eval task YAML files)")
    if args.export_only and args.export == "none":
        problems.append("arguments --export-only and --export none: there would be nothing to do")
    if args.resume and args.overwrite:
        problems.append("arguments --resume and --overwrite: choose one (continue the run, or start it over)")
    stride = args.stride or args.token_length
    if stride > args.token_length:
        problems.append(f"argument --stride: {stride} is larger than --token-length {args.token_length}")
    if args.micro_batch_size and args.batch_size % args.micro_batch_size:
        problems.append(f"argument --micro-batch-size: {args.micro_batch_size} does not divide --batch-size "
                        f"{args.batch_size}")
    for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if args.report_to == tracker and importlib.util.find_spec(package) is None:
            problems.append(f"argument --report-to {tracker}: the {package} package is not installed "
                            f"(pip install {package})")
    return problems


def _apply_recipe(args: argparse.Namespace) -> list[str]:
    """--recipe measured: the measured row's settings wherever the command left them unset (None, or
    "auto"; the lr only without --lr).  Then the unset schedule is one-shot.  Returns the problems."""
    problems = []
    if args.recipe == "measured":
        recipe = measured_recipe(args.sparsity)
        if args.eval_only or args.prune_only or args.export_only:
            problems.append("argument --recipe measured: a recovery recipe needs a training run; drop it (or "
                            "--eval-only, --prune-only, --export-only)")
        elif args.pattern:
            problems.append("argument --recipe measured: the measured recipes are unstructured; drop --pattern")
        elif recipe is None:
            problems.append(f"argument --recipe measured: no recovery was measured near density {args.sparsity:g} "
                            f"(rows up to {RECIPES[-1].up_to:g}, utils/recipes.py); drop --recipe measured")
        else:
            for name, value in recipe.settings().items():
                if getattr(args, name) in (None, "auto") and not (name == "base_lr" and args.lr is not None):
                    setattr(args, name, value)
    args.schedule = args.schedule or "oneshot"
    return problems


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExperimentConfig:
    from utils.prune_utils import parse_pattern
    lr_derived = args.lr is None and args.base_lr is None and args.recipe == "brief"
    problems = _apply_recipe(args) + _problems(args)
    args.base_lr = args.base_lr or BASE_LR
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError as error:
        problems.insert(0, f"argument --pattern: {error}")
        pattern = None
    if problems:
        parser.error("; ".join(problems))
    density = pattern[0] / pattern[1] if pattern else args.sparsity
    stride = args.stride or args.token_length
    max_step, lr = derive_schedule(args.batch_size, args.base_samples, args.base_lr)
    max_step, lr = args.max_step or max_step, args.lr or lr
    total = max_step * args.epochs
    stages = len(args.density_steps) if args.density_steps else args.prune_stages
    if args.schedule == "iterative" and stages > total:
        parser.error(f"argument --prune-stages: {stages} stages do not fit in {total} optimizer steps")
    if args.schedule == "gradual" and args.prune_every > GRADUAL_RAMP * total:
        parser.error(f"argument --prune-every: {args.prune_every} steps between updates leave no update in the first "
                     f"{GRADUAL_RAMP:.0%} of {total} optimizer steps; lower it")
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, total // 20)
    mode = "eval" if args.eval_only else "prune" if args.prune_only else "export" if args.export_only else "train"
    method_tag = f"{args.method}-{pattern[0]}of{pattern[1]}" if pattern else args.method
    from utils.model_utils import safe_name
    model_tag = safe_name(Path(args.model).stem if args.model.endswith(".gguf") else args.model)
    default_dir = f"{model_tag}-export" if mode == "export" else f"{model_tag}-{density:g}-{method_tag}"
    output_dir = args.output_dir or str(Path("runs") / default_dir)
    return ExperimentConfig(
        mode=mode, model=args.model, dtype=args.dtype, cpu=args.cpu, density=density, method=args.method,
        pattern=pattern, calibration_source=args.calibration_source, nsamples=args.nsamples,
        calibration_length=args.calibration_length, pruned_dir=args.pruned_dir, schedule=args.schedule,
        density_steps=args.density_steps,
        prune_stages=args.prune_stages, prune_every=args.prune_every,
        layer_density=resolve_layer_density(args.layer_density, density, pattern, args.schedule, args.method),
        owl_lambda=args.owl_lambda, owl_m=args.owl_m, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, epochs=args.epochs, max_step=max_step, lr=lr,
        lr_derived=lr_derived, recipe=args.recipe,
        warmup_steps=warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, block_size=args.block_size,
        train_source=args.train_source, holdout=args.holdout, gen_temperature=args.gen_temperature,
        gen_top_p=args.gen_top_p, gen_length=args.gen_length, gen_batch_size=args.gen_batch_size,
        loss=default_loss(density) if args.loss == "auto" else args.loss, loss_auto=args.loss == "auto",
        kd_temperature=args.kd_temperature,
        kd_weight=args.kd_weight, ce_weight=args.ce_weight, kd_hidden_weight=args.kd_hidden_weight,
        mixed_precision=args.mixed_precision,
        compile=args.compile, parallel=args.parallel, seed=args.seed,
        patience=args.patience, min_delta=args.min_delta, eval_source=args.eval_source,
        token_length=args.token_length, stride=stride,
        eval_batch_size=args.eval_batch_size, eval_compile=args.eval_compile, skip_dense_eval=args.skip_dense_eval,
        bos_per_window=args.bos_per_window, output_dir=output_dir, log_file=args.log_file, resume=args.resume, overwrite=args.overwrite,
        report_to=args.report_to, save_best=not args.no_save_best, export=args.export, export_dtype=args.export_dtype,
        tasks=args.tasks, task_dir=args.task_dir, task_limit=args.task_limit, task_batch_size=args.task_batch_size,
        interrupt_after_steps=args.interrupt_after_steps, interrupt_signal=args.interrupt_signal)
