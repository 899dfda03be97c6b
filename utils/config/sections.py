"""What a run is, as typed, frozen sections: the contract between the command line and the library.

    config = validate(args, world_size)          # utils/config/validate.py: the only place flags are read
    config.prune.density, config.train.lr, config.eval.token_length
    config.to_json()                             # run.json's "config", grouped by section

Nothing below the edge reads argparse's namespace: each layer takes the section it needs (or plain
values from it).  Each field's `flag` metadata names the command-line flag that sets it, so a
message can name the flag without a second list to keep in step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BASE_SAMPLES = 10_000  # the brief's samples per epoch: max_step = BASE_SAMPLES // batch_size
DEFAULT_EPOCHS = 5  # the brief's budget: 5 epochs of BASE_SAMPLES (25.6M tokens at 512 a block)


def flag(name: str, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field set by the command-line flag `name`."""
    return field(default=default, metadata={"flag": name}, **kwargs)


@dataclass(frozen=True)
class ModelCfg:
    name: str = flag("--model", "opt-125m")
    dtype: str = flag("--dtype", "auto")  # evaluation and pruning weights; training keeps float32 masters
    cpu: bool = flag("--cpu", False)
    bos_per_window: str = flag("--bos-per-window", "auto")
    kernels: str = flag("--kernels", "auto")  # dense | sparse | auto (utils/pipeline/kernels.py)


@dataclass(frozen=True)
class CalibrationCfg:
    source: str = flag("--calibration-source", "wikitext2")
    nsamples: int = flag("--nsamples", 128)
    length: int = flag("--calibration-length", 2048)
    seed: int = flag("--seed", 0)


@dataclass(frozen=True)
class PruneCfg:
    density: float = flag("--sparsity", 0.1)  # the fraction of weights KEPT
    method: str = flag("--method", "sparsegpt")
    pattern: tuple[int, int] | None = flag("--pattern", None)  # N:M, keep N of every M
    layer_density: str = flag("--layer-density", "uniform")  # resolved: "uniform" | "owl"
    owl_lambda: float = flag("--owl-lambda", 0.08)
    owl_m: float = flag("--owl-m", 5.0)
    options: Any = flag("--method", None)  # the method's options dataclass (utils/pruning/methods.py)
    calibration: CalibrationCfg = field(default_factory=CalibrationCfg)
    cache_dir: str = flag("--pruned-dir", "pruned_models")
    skip_dense_eval: bool = flag("--skip-dense-eval", False)


@dataclass(frozen=True)
class ScheduleCfg:
    kind: str = flag("--schedule", "oneshot")  # oneshot | iterative | gradual
    density_steps: tuple[float, ...] | None = flag("--density-steps", None)
    stages: int = flag("--prune-stages", 4)
    every: int = flag("--prune-every", 50)
    # a later prune's method: auto = the kind's (gradual: magnitude; iterative: --method)
    reprune_method: str = flag("--reprune-method", "auto")
    reprune_nsamples: int = flag("--reprune-nsamples", 16)  # calibration windows of a calibrated gradual update
    ramp_end: float = flag("--ramp-end", 0.6)  # gradual: the fraction of the steps at which --sparsity is reached


@dataclass(frozen=True)
class LossTerm:
    name: str  # a key of utils/training/losses.TERMS: "ce", "kd", "hidden"
    weight: float


@dataclass(frozen=True)
class LossCfg:
    """The training objective: weighted terms summed in their order (cross-entropy, distillation,
    hidden-state distillation), and the distillation temperature."""
    terms: tuple[LossTerm, ...] = (LossTerm("ce", 1.0),)
    temperature: float = flag("--kd-temperature", 1.0)
    auto: bool = flag("--loss", False)  # --loss auto chose the terms (utils/config/recipes.py)
    # --ce-weight and --kd-weight as given, also where --loss has no such term (results.json records them)
    given: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, kind: str = "ce", *, temperature: float = 1.0, auto: bool = False, **weights: float) -> "LossCfg":
        """The terms of `--loss KIND` ("ce", "kd" or "ce+kd"; weight 1 unless given), then every
        other term of `weights` whose weight is not 0, in their order: LossCfg.of("ce+kd", kd=2, hidden=0.5)."""
        if kind not in ("ce", "kd", "ce+kd"):
            raise ValueError(f"loss must be one of ce, kd, ce+kd, got {kind!r}")
        main = kind.split("+")
        terms = [LossTerm(name, weights.get(name, 1.0)) for name in main]
        terms += [LossTerm(name, weight) for name, weight in weights.items() if name not in ("ce", "kd") and weight]
        given = tuple((name, weights.get(name, 1.0)) for name in ("ce", "kd"))
        return cls(terms=tuple(terms), temperature=temperature, auto=auto, given=given)

    def weight(self, name: str) -> float | None:
        return next((term.weight for term in self.terms if term.name == name), None)

    @property
    def kind(self) -> str:
        """"ce", "kd" or "ce+kd": the --loss the terms come from (hidden-state distillation aside)."""
        return "+".join(name for name in ("ce", "kd") if self.weight(name) is not None)


@dataclass(frozen=True)
class GenerationCfg:
    """Sampling settings of a `generated:N` training text."""
    temperature: float = flag("--gen-temperature", 1.0)
    top_p: float = flag("--gen-top-p", 0.95)
    length: int | None = flag("--gen-length", None)  # None: --block-size
    batch_size: int = flag("--gen-batch-size", 32)


@dataclass(frozen=True)
class TrainCfg:
    batch_size: int = flag("--batch-size", 8)
    micro_batch_size: int | None = flag("--micro-batch-size", None)
    epochs: int = flag("--epochs", DEFAULT_EPOCHS)
    max_step: int = flag("--max-step", 1250)
    lr: float = flag("--lr", 5e-6 * 8 ** 0.5)
    lr_derived: bool = flag("--lr", True)  # neither --lr, --base-lr nor --recipe measured: the brief's rule
    recipe: str = flag("--recipe", "default")
    warmup_steps: int = flag("--warmup-steps", 0)
    weight_decay: float = flag("--weight-decay", 0.0)
    max_grad_norm: float | None = flag("--max-grad-norm", 1.0)  # None: no clipping
    block_size: int = flag("--block-size", 512)
    train_source: str = flag("--train-source", "wikitext2")
    holdout: float = flag("--holdout", 0.05)
    generation: GenerationCfg = field(default_factory=GenerationCfg)
    mixed_precision: str = flag("--mixed-precision", "auto")
    compile: str = flag("--compile", "auto")
    parallel: str = flag("--parallel", "fsdp")
    seed: int = flag("--seed", 0)
    patience: int | None = flag("--patience", None)
    patience_on: str = flag("--patience-on", "holdout")  # resolved from auto: holdout where text is held out
    cooldown_steps: int = flag("--cooldown-steps", 0)
    min_delta: float = flag("--min-delta", 0.0)
    log_every: int | None = flag("--log-every", None)  # None: every 10 steps or 30 s (utils/training/progress.py)
    dist_timeout: float = flag("--dist-timeout", 30.0)  # minutes a collective may wait (pruning waits apart)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.max_step

    @property
    def sampled_length(self) -> int:
        """Tokens per row of a generated:N text: --gen-length, else --block-size."""
        return self.generation.length or self.block_size


@dataclass(frozen=True)
class EvalProtocol:
    """How perplexity is measured (the SparseGPT/Wanda protocol by default: 2048-token windows,
    stride 2048).  `bos_id` is the model's, filled in once its tokenizer is loaded."""
    token_length: int = flag("--token-length", 2048)
    stride: int | None = flag("--stride", None)  # None: token_length (non-overlapping windows)
    batch_size: int = flag("--eval-batch-size", 1)
    compile: str = flag("--eval-compile", "off")  # off | scoring | layers (auto resolved by the pipeline)
    source: str = flag("--eval-source", "wikitext2")
    bos_id: int | None = flag("--bos-per-window", None)
    windows: int | None = flag("--eval-windows", None)  # only the first N windows: a quick look, not the protocol

    @property
    def window_stride(self) -> int:
        return self.stride or self.token_length

    @property
    def quick(self) -> bool:
        """Only part of the text is scored: the numbers are a quick look, not the papers' protocol."""
        return self.windows is not None


@dataclass(frozen=True)
class TaskCfg:
    names: tuple[str, ...] = flag("--tasks", ())
    task_dir: str | None = flag("--task-dir", None)
    limit: int | None = flag("--task-limit", None)
    batch_size: int = flag("--task-batch-size", 8)
    generate: int | None = flag("--generate", None)  # new tokens of the generation benchmark (--eval-only)
    prompt: str = flag("--prompt", "The history of the city")
    generate_cache: str = flag("--generate-cache", "auto")  # auto | dynamic | static (the step compiled on a GPU)


@dataclass(frozen=True)
class OutputCfg:
    dir: str = flag("--output-dir", "runs/latest")
    log_file: str | None = flag("--log-file", None)
    resume: bool = flag("--resume", False)
    overwrite: bool = flag("--overwrite", False)
    report_to: str = flag("--report-to", "none")
    save_best: bool = flag("--no-save-best", True)
    export: str = flag("--export", "compressed")
    export_dtype: str = flag("--export-dtype", "bfloat16")
    keep_state: bool = flag("--keep-state", False)  # a finished run's state/ stays (else it is removed)
    save_dtype: str = flag("--save-dtype", "float32")  # best/'s weights (float32: the trained master weights)


MODES = ("eval", "prune", "export", "train")


@dataclass(frozen=True)
class RunConfig:
    mode: str  # one of MODES
    model: ModelCfg = field(default_factory=ModelCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    tasks: TaskCfg = field(default_factory=TaskCfg)
    output: OutputCfg = field(default_factory=OutputCfg)

    def to_json(self) -> dict:
        """The config as run.json records it, by section (the method options by their own names)."""
        data = asdict(self)
        options = self.prune.options
        data["prune"]["options"] = None if options is None else {  # a per-call setting (keep_zeros) is no option
            "type": type(options).__name__, **{option.name: getattr(options, option.name) for option in fields(options)
                                               if option.metadata.get("recorded", True)}}
        return data

    def flat(self) -> dict:
        """Every setting under one dotted name ("prune.density"), for trackers' hyperparameter tables."""
        def walk(prefix: str, value) -> dict:
            if isinstance(value, dict):
                return {key: leaf for name, inner in value.items() for key, leaf in walk(f"{prefix}.{name}", inner).items()}
            return {prefix: value}
        return {key: leaf for section, value in self.to_json().items()
                for key, leaf in walk(section, value).items()}
