"""The command line's meaning: argparse's namespace checked and resolved into one typed RunConfig.

    config = validate(build_parser().parse_args(argv), world_size=1)   # ConfigError lists every problem

Every value that parses but makes no sense is found here at once, before any model or text is
loaded, and refused in one line; `--recipe measured` and the `auto` choices are resolved here
too, so the pipeline only ever sees concrete settings.  This is the only module that reads the
namespace: below it, everything takes the sections of utils/config/sections.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

from utils.config.inputs import input_problems
from utils.config.recipes import RECIPES, default_loss, measured_recipe
from utils.config.sections import (BASE_SAMPLES, DEFAULT_EPOCHS, CalibrationCfg, EvalProtocol, GenerationCfg, LossCfg, ModelCfg,
                                   OutputCfg, PruneCfg, RunConfig, ScheduleCfg, TaskCfg, TrainCfg)
from utils.data.generated import split_sources, token_count
from utils.data.sources import DataError, test_text_in
from utils.models.loading import safe_name
from utils.pruning.criteria import parse_pattern
from utils.pruning.methods import METHODS, needs_calibration, option_flags
from utils.pruning.profile import resolve_layer_density
from utils.pruning.schedule import GRADUAL_RAMP, ITERATIVE_START
from utils.task_eval import lm_eval_missing
from utils.training.losses import TERMS, optional_terms
from utils.training.parallel import SHARDED, MeshError, launcher_local_size, mesh_shape

BASE_LR = 5e-6  # the brief's lr rule: BASE_LR·sqrt(batch_size)
# Bounds of values that parse but break the arithmetic (measured: --lr 1e300 overflows float32 in
# AdamW, --kd-temperature 1e300 overflows T², --gen-temperature 1e-300 makes the sampling
# probabilities inf, a seed past 2^64 / 1_000_003 overflows the per-rank seed).
MAX_LR = 1e30  # beyond ~3e38 AdamW overflows float32: a traceback instead of the NaN stop
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e3
MAX_SEED = 2 ** 32 - 1
MAX_GENERATED_ROW = 1 << 20
MAX_GRADUAL_UPDATES = 100_000  # a gradual schedule's stages are a list: this many at most


class ConfigError(ValueError):
    """Every problem of a command line, one clause each; the CLI prints them as one line, exit 2."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def derive_schedule(batch_size: int, base_samples: int = BASE_SAMPLES, base_lr: float = BASE_LR) -> tuple[int, float]:
    """max_step = base_samples // batch_size, lr = base_lr·sqrt(batch_size): every batch size sees
    the same number of samples per epoch."""
    return max(1, base_samples // batch_size), base_lr * math.sqrt(batch_size)


def world_size_from_launcher() -> int:
    """How many processes accelerate launch / torchrun started (WORLD_SIZE), 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def _problems(args: argparse.Namespace, world_size: int) -> list[str]:
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
    if args.kernels == "sparse" and not args.eval_only and args.export != "compressed":
        problems.append("argument --kernels sparse: a training or --prune-only run evaluates its compressed export "
                        "with both kernels; keep --export compressed")
    if args.generate and not args.eval_only:
        problems.append("argument --generate: the generation benchmark runs with --eval-only (on an export: "
                        "--eval-only --model runs/x/compressed --generate 128)")
    finite("--dist-timeout", args.dist_timeout, 0, low_open=True, what="a positive number of minutes")
    if args.parallel == "hsdp" and world_size > 1:
        try:
            mesh_shape(world_size, launcher_local_size())
        except MeshError as error:
            problems.append(f"argument --parallel: {error}")
    finite("--weight-decay", args.weight_decay, 0, what="a finite number >= 0")
    finite("--min-delta", args.min_delta, 0, 1, what="a fraction in [0, 1) (relative perplexity drop)")
    finite("--holdout", args.holdout, 0, 0.5, what="a fraction in [0, 0.5) of the training text (0 = off)")
    finite("--kd-temperature", args.kd_temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, high_open=False,
           what=f"a temperature in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (beyond, the scaled logits overflow)")
    finite("--kd-weight", args.kd_weight, 0, what="a finite number >= 0")
    finite("--ce-weight", args.ce_weight, 0, what="a finite number >= 0")
    for term in optional_terms():
        finite(term.flag, getattr(args, term.dest), 0, what="a finite number >= 0 (0 = off)")
    problems += _zero_loss(args)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        problems.append("argument --warmup-steps: must be 0 or more")
    problems += _patience_problems(args)
    if args.seed > MAX_SEED:
        problems.append(f"argument --seed: {args.seed} is larger than {MAX_SEED} (seeds are 32-bit here)")
    for flag, value in (("--lr", args.lr), ("--base-lr", args.base_lr)):
        if value is not None and value > MAX_LR:
            problems.append(f"argument {flag}: {value:g} is no learning rate (at most {MAX_LR:g}; "
                            "the derived one is 5e-06 × √batch)")
    for flag, value in (("--token-length", args.token_length), ("--block-size", args.block_size),
                        ("--calibration-length", args.calibration_length)):
        if value < 2:
            problems.append(f"argument {flag}: {value} is too short: a window needs 2 tokens or more (one to "
                            "predict the next)")
    if args.gen_length is not None and args.gen_length > MAX_GENERATED_ROW:
        problems.append(f"argument --gen-length: {args.gen_length:,} tokens per sampled row is more than any model's "
                        f"positions hold (at most {MAX_GENERATED_ROW:,} here; the model's own limit is checked too)")
    calibrated_updates = (args.reprune_method in METHODS and needs_calibration(args.reprune_method)
                          or args.layer_density == "owl")  # OWL's profile at every update reads windows too
    if args.reprune_nsamples != ScheduleCfg().reprune_nsamples and not (args.schedule == "gradual"
                                                                         and calibrated_updates):
        problems.append("argument --reprune-nsamples: only calibrated gradual updates (--schedule gradual "
                        "--reprune-method sparsegpt or wanda, or --layer-density owl) read calibration windows; "
                        "drop it")
    if args.ramp_end is not None and args.schedule != "gradual":
        problems.append("argument --ramp-end: only --schedule gradual ramps its density; drop it")
    finite("--ramp-end", args.ramp_end, 0, 1, low_open=True, high_open=False, what="a fraction in (0, 1] of the steps")
    if args.reprune_method != "auto" and args.schedule == "oneshot":
        problems.append("argument --reprune-method: only a schedule's later prunes use it; add --schedule gradual "
                        "or iterative")
    if args.density_steps and args.schedule == "oneshot":
        problems.append("argument --density-steps: a one-shot prune has one density (--sparsity); add --schedule "
                        "iterative or --schedule gradual, or drop --density-steps")
    if args.seed < 0:
        problems.append(f"argument --seed: {args.seed} must be 0 or more")
    finite("--gen-temperature", args.gen_temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, high_open=False,
           what=f"a temperature in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (beyond, sampling divides by ~0)")
    finite("--gen-top-p", args.gen_top_p, 0, 1, low_open=True, high_open=False, what="in (0, 1]")
    problems += _evaluation_text_problems(args)
    if "generated:" in args.train_source:
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
        if args.eval_only or args.prune_only or args.export_only:
            problems.append(f"{schedule}: prunes between training steps; it needs a training run")
        if args.schedule == "gradual" and calibrated_updates and args.reprune_nsamples > args.nsamples:
            problems.append(f"argument --reprune-nsamples: {args.reprune_nsamples} is more than the --nsamples "
                            f"{args.nsamples} calibration windows it takes them from")
        processes = world_size
        if processes > 1 and args.parallel in SHARDED:
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
    if args.overwrite and args.output_dir and _inside(Path(args.model), Path(args.output_dir)):
        problems.append(f"argument --overwrite: --model {args.model} lies inside --output-dir {args.output_dir}, "
                        "which --overwrite empties; copy the model elsewhere first")
    if args.resume and args.overwrite:
        problems.append("arguments --resume and --overwrite: choose one (continue the run, or start it over)")
    stride = args.stride or args.token_length
    if stride > args.token_length:
        problems.append(f"argument --stride: {stride} is larger than --token-length {args.token_length}")
    if args.micro_batch_size and args.batch_size % args.micro_batch_size:
        problems.append(f"argument --micro-batch-size: {args.micro_batch_size} does not divide --batch-size "
                        f"{args.batch_size}")
    elif not (args.eval_only or args.prune_only or args.export_only):
        micro = args.micro_batch_size or max(1, args.batch_size // world_size)
        if args.batch_size % (micro * world_size):
            problems.append(f"argument --batch-size: {args.batch_size} is not a multiple of micro-batch {micro} × "
                            f"{world_size} processes; pick --micro-batch-size so that it is")
    for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if args.report_to == tracker and importlib.util.find_spec(package) is None:
            problems.append(f"argument --report-to {tracker}: the {package} package is not installed "
                            f"(pip install {package})")
    return problems + input_problems(args)


def _evaluation_text_problems(args: argparse.Namespace) -> list[str]:
    """Training or calibration text that is WikiText-2's test text: every perplexity after it is meaningless."""
    if args.eval_only or args.export_only or args.compare:
        return []
    sources = [("--calibration-source", args.calibration_source)]
    try:
        sources += [] if args.prune_only else [("--train-source", split_sources(args.train_source)[0])]
    except DataError:  # two generated parts: said below
        pass
    return [f"argument {flag}: {found} is WikiText-2's test text, what the papers' perplexity is measured on; "
            f"{'training' if flag == '--train-source' else 'calibrating'} on it makes that perplexity meaningless. "
            f"Use other text, e.g. {_valid_beside(found)}" for flag, spec in sources for found in test_text_in(spec)]


def _valid_beside(found: str) -> str:
    """The validation file beside the test text (a link's, beside its target), else its name."""
    for valid in ([] if found.startswith("hf:") else [Path(found).with_name("wiki.valid.raw"),
                                                       Path(found).resolve().with_name("wiki.valid.raw")]):
        if valid.exists():
            return str(valid)
    return "wiki.valid.raw (the validation split)"


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.exists() and path.resolve().is_relative_to(folder.resolve())
    except OSError:  # a name too long to resolve: reported where it is used
        return False


def _zero_loss(args: argparse.Namespace) -> list[str]:
    """A loss whose every active term has weight 0 trains nothing: refused, naming the weights."""
    if any(getattr(args, term.dest) for term in optional_terms()):
        return []
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError:  # reported on its own
        pattern = None
    kind = args.loss if args.loss != "auto" else default_loss(pattern[0] / pattern[1] if pattern else args.sparsity)
    weights = {"ce": ("--ce-weight", args.ce_weight), "kd": ("--kd-weight", args.kd_weight)}
    active = [weights[name] for name in kind.split("+")]
    if all(value == 0 for _, value in active):
        names = " and ".join(name for name, _ in active)
        return [f"argument{'s' if len(active) > 1 else ''} {names}: the loss --loss {kind} would be 0 "
                f"({'both are' if len(active) > 1 else 'it is'} 0), so nothing would be trained"]
    return []


def _apply_recipe(args: argparse.Namespace) -> list[str]:
    """--recipe measured: the measured row's settings wherever the command left them unset (None, or
    "auto"; the lr only without --lr).  Then what is still unset: one-shot, DEFAULT_EPOCHS.  Returns the problems."""
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
                            f"(rows up to {RECIPES[-1].up_to:g}, utils/config/recipes.py); drop --recipe measured")
        else:
            for name, value in recipe.settings().items():  # (the schedule before its reprune method)
                if name == "reprune_method" and args.schedule == "oneshot":
                    continue  # a one-shot schedule given explicitly has no later prunes
                if getattr(args, name) in (None, "auto") and not (name == "base_lr" and args.lr is not None):
                    setattr(args, name, value)
    args.schedule, args.epochs = args.schedule or "oneshot", args.epochs or DEFAULT_EPOCHS
    return problems


def _loss(args: argparse.Namespace, density: float) -> LossCfg:
    kind = default_loss(density) if args.loss == "auto" else args.loss
    extra = {name: getattr(args, term.dest) for name, term in TERMS.items() if term.flag}
    return LossCfg.of(kind, temperature=args.kd_temperature, auto=args.loss == "auto", ce=args.ce_weight,
                      kd=args.kd_weight, **extra)


def _method_options(args: argparse.Namespace):
    """The --method's options dataclass, with the values of its flags (utils/pruning/methods.py)."""
    method = METHODS[args.method]
    values = {option.name: getattr(args, _dest(name, option.name)) for name, option in option_flags()
              if name == args.method}
    return method.options(**values)


def _dest(method: str, option: str) -> str:
    return f"{method}_{option}".replace("-", "_")


def _patience_problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.cooldown_steps < 0:
        problems.append("argument --cooldown-steps: must be 0 or more")
    if args.cooldown_steps and args.patience is None:
        problems.append("argument --cooldown-steps: it cools the lr down when --patience runs out; add --patience N")
    if args.patience and args.patience_on == "holdout" and not args.holdout:
        problems.append("argument --patience-on holdout: the run holds no text out (--holdout 0); give --holdout "
                        "0.05, or --patience-on perplexity")
    return problems


def _train(args: argparse.Namespace, lr_derived: bool) -> TrainCfg:
    max_step, lr = derive_schedule(args.batch_size, args.base_samples, args.base_lr)
    max_step, lr = args.max_step or max_step, args.lr or lr
    total = max_step * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, total // 20)
    generation = GenerationCfg(temperature=args.gen_temperature, top_p=args.gen_top_p, length=args.gen_length,
                               batch_size=args.gen_batch_size)
    return TrainCfg(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, epochs=args.epochs,
                    max_step=max_step, lr=lr, lr_derived=lr_derived, recipe=args.recipe, warmup_steps=warmup,
                    weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                    block_size=args.block_size, train_source=args.train_source, holdout=args.holdout,
                    generation=generation, mixed_precision=args.mixed_precision, compile=args.compile,
                    parallel=args.parallel, seed=args.seed, patience=args.patience, min_delta=args.min_delta,
                    patience_on=args.patience_on if args.patience_on != "auto" else
                    ("holdout" if args.holdout else "perplexity"), cooldown_steps=args.cooldown_steps,
                    log_every=args.log_every, dist_timeout=args.dist_timeout)


def _schedule_problems(schedule: ScheduleCfg, train: TrainCfg) -> list[str]:
    """What only the derived step count can tell: stages or updates that do not fit the run."""
    total, ramp = train.total_steps, schedule.ramp_end
    stages = len(schedule.density_steps) if schedule.density_steps else schedule.stages
    if schedule.kind == "iterative" and stages > total:
        return [f"argument --prune-stages: {stages} stages do not fit in {total} optimizer steps"]
    if schedule.kind == "gradual" and schedule.every > ramp * total:
        return [f"argument --prune-every: {schedule.every} steps between updates leave no update in the first "
                f"{ramp:.0%} of {total} optimizer steps; lower it"]
    if schedule.kind == "gradual" and ramp * total / schedule.every > MAX_GRADUAL_UPDATES:
        return [f"argument --prune-every: {schedule.every} steps between updates make "
                f"{ramp * total / schedule.every:,.0f} mask updates over {total:,} optimizer steps (at most "
                f"{MAX_GRADUAL_UPDATES:,}); raise --prune-every"]
    return []


def validate(args: argparse.Namespace, world_size: int = 1) -> RunConfig:
    """The RunConfig of a parsed command line, or ConfigError naming every problem at once
    (`world_size`: the processes the launcher started, world_size_from_launcher())."""
    lr_derived = args.lr is None and args.base_lr is None and args.recipe == "default"
    problems = _apply_recipe(args) + _problems(args, world_size)
    args.base_lr = args.base_lr or BASE_LR
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError as error:
        problems.insert(0, f"argument --pattern: {error}")
        pattern = None
    train = _train(args, lr_derived)
    schedule = ScheduleCfg(args.schedule, args.density_steps, args.prune_stages, args.prune_every,
                           args.reprune_method, args.reprune_nsamples, args.ramp_end or GRADUAL_RAMP)
    problems += _schedule_problems(schedule, train)
    if problems:
        raise ConfigError(problems)
    density = pattern[0] / pattern[1] if pattern else args.sparsity
    mode = "eval" if args.eval_only else "prune" if args.prune_only else "export" if args.export_only else "train"
    prune = PruneCfg(density=density, method=args.method, pattern=pattern,
                     layer_density=resolve_layer_density(args.layer_density, density, pattern, args.schedule,
                                                         args.method),
                     owl_lambda=args.owl_lambda, owl_m=args.owl_m, options=_method_options(args),
                     calibration=CalibrationCfg(args.calibration_source, args.nsamples, args.calibration_length,
                                                args.seed),
                     cache_dir=args.pruned_dir, skip_dense_eval=args.skip_dense_eval)
    return RunConfig(
        mode=mode,
        model=ModelCfg(args.model, args.dtype, args.cpu, args.bos_per_window, args.kernels),
        prune=prune,
        schedule=schedule,
        loss=_loss(args, density),
        train=train,
        eval=EvalProtocol(token_length=args.token_length, stride=args.stride or args.token_length,
                          batch_size=args.eval_batch_size, compile=args.eval_compile, source=args.eval_source,
                          windows=args.eval_windows),
        tasks=TaskCfg(tuple(args.tasks), args.task_dir, args.task_limit, args.task_batch_size, args.generate,
                      args.prompt, args.generate_cache),
        output=OutputCfg(dir=args.output_dir or str(Path("runs") / _default_folder(args.model, mode, prune)),
                         log_file=args.log_file, resume=args.resume, overwrite=args.overwrite,
                         report_to=args.report_to, save_best=not args.no_save_best, export=args.export,
                         export_dtype=args.export_dtype, keep_state=args.keep_state, save_dtype=args.save_dtype))


def _default_folder(model: str, mode: str, prune: PruneCfg) -> str:
    pattern = prune.pattern
    method_tag = f"{prune.method}-{pattern[0]}of{pattern[1]}" if pattern else prune.method
    path = Path(model)
    # a local folder: its last two names (runs/x/compressed → x-compressed), not the path with its slashes
    model_tag = safe_name(path.stem if model.endswith(".gguf") else "-".join(path.resolve().parts[-2:])
                          if path.is_dir() else model)
    # each mode its own default folder: a folder with results is never overwritten, so an --eval-only
    # in the training run's default folder would block that run (and the other way round)
    return {"export": f"{model_tag}-export", "eval": f"{model_tag}-eval",
            "prune": f"{model_tag}-{prune.density:g}-{method_tag}-pruned"}.get(
        mode, f"{model_tag}-{prune.density:g}-{method_tag}")
