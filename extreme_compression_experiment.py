"""Prune a causal LM to extreme sparsity, fine-tune it with the pruned weights held at zero,
and measure WikiText-2 perplexity before training and after every epoch.

    python extreme_compression_experiment.py --sparsity 0.1 --model opt-350m --batch-size 8
    python extreme_compression_experiment.py --model smollm2-135m --eval-only \\
        --eval-source ../shared/data/wikitext-2-raw
    accelerate launch --num_processes 2 extreme_compression_experiment.py --sparsity 0.1 ...

`--sparsity` is the fraction of weights KEPT (0.1 keeps 10%, prunes 90%); inside the code it is
called `density`.
"""
from __future__ import annotations

import argparse
import errno
import math
import signal
import sys
import threading

from utils.config.recipes import auto_loss_rule, recipe_epochs
from utils.config.sections import BASE_SAMPLES, DEFAULT_EPOCHS
from utils.config.validate import BASE_LR, ConfigError, validate, world_size_from_launcher
from utils.export.registry import EXPORTERS
from utils.io.events import make_console_safe
from utils.pruning.methods import METHODS, option_flags
from utils.training.losses import optional_terms
from utils.pruning.profile import LAYER_DENSITIES, OWL_AUTO_MAX_DENSITY
from utils.pruning.schedule import GRADUAL_RAMP, ITERATIVE_START, SCHEDULES

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, instead of the usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give the fraction of weights to keep, "
                                         "e.g. 0.1 keeps 10% (prunes 90%)") from None
    if not (0 < value <= 1) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]: --sparsity is the fraction of weights KEPT "
                                         "(0.1 keeps 10%, prunes 90%; 1.0 = no pruning)")
    return value


def _positive(kind: type):
    """An argparse type: a whole number >= 1 (int) or a finite number > 0 (float)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {'whole ' if kind is int else ''}number") from None
        if kind is int and value < 1:
            raise argparse.ArgumentTypeError(f"{text} must be at least 1")
        if kind is float and (not value > 0 or math.isinf(value)):
            raise argparse.ArgumentTypeError(f"{text} must be a positive number")
        return value
    return parse


_positive_int, _positive_float = _positive(int), _positive(float)


def _densities(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated densities, e.g. 0.5,0.3,0.18,0.1."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of densities, e.g. 0.5,0.3,0.18,0.1") from None


def _names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names, e.g. arc_easy,piqa."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"'{text}' names no task; e.g. --tasks arc_easy,piqa")
    return names


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each default said once: not for a flag without one (None, a switch) or whose help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == () or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="extreme_compression_experiment.py", description=__doc__.split("\n\n")[0],
                     formatter_class=_Help)
    mode = parser.add_argument_group("what to run").add_mutually_exclusive_group()
    mode.add_argument("--eval-only", action="store_true", help="only measure the perplexity of --model (no pruning)")
    mode.add_argument("--prune-only", action="store_true", help="prune, save, report dense and pruned perplexity")
    mode.add_argument("--export-only", action="store_true",
                      help="write --model (e.g. a run's best/ folder) in --export's format (compressed, dense), nothing else")
    mode.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                      help="compare run folders: a markdown table, a JSON file and a plot of their results.json "
                           "into --output-dir (default runs/comparison); quick looks get a table of their own, and finished "
                           "runs whose run identities differ only in --seed their mean ± sd")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="opt-125m",
                       help="opt-125m|opt-350m|opt-1.3b|opt-2.7b|opt-6.7b, smollm2-135m (pip package), a hub id, "
                            "a local folder or a .gguf file")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                       help="weights for evaluation and pruning (auto: float32 on CPU, the checkpoint's own "
                            "dtype on GPU, float16 for OPT); "
                            "training keeps float32 master weights")
    model.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    model.add_argument("--kernels", default="auto", choices=["auto", "dense", "sparse"],
                       help="how a compressed export runs: dense (decompressed into plain linears), sparse "
                            "(SparseLinear: GPU kernels for up to 16 rows, a dense temporary for more; on the CPU the "
                            "pure-torch reference of the same layout), auto: sparse for --generate on a GPU, dense "
                            "for perplexity (2048-token windows are prefill, where the kernels do not win). "
                            "A training or --prune-only run with sparse also evaluates its export both ways")

    prune = parser.add_argument_group("pruning")
    prune.add_argument("--sparsity", type=_density, default=0.1,
                       help="fraction of weights KEPT in (0, 1]: 0.1 keeps 10%% (90%% pruned); 1.0 = dense")
    prune.add_argument("--method", default="sparsegpt", choices=list(METHODS),
                       help="one-shot pruning method used when no pruned checkpoint exists yet: "
                            + "; ".join(method.summary for method in METHODS.values()))
    prune.add_argument("--pattern", default=None, help="N:M semi-structured pattern, keep N of every M (e.g. 2:4); "
                                                        "overrides --sparsity")
    prune.add_argument("--calibration-source", default="wikitext2",
                       help="text for calibration: wikitext2 (hub, train split), a file/folder, or hf:NAME:CONFIG:SPLIT:COLUMN")
    prune.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows")
    prune.add_argument("--calibration-length", type=_positive_int, default=2048,
                       help="tokens per calibration window (capped at the model maximum)")
    prune.add_argument("--pruned-dir", default="pruned_models", help="cache of pruned models")
    prune.add_argument("--schedule", default=None, choices=SCHEDULES,
                       help="oneshot (the default): prune once before training; iterative: prune to a first density, fine-tune, "
                            "prune further (re-calibrated), ... ending at --sparsity, the steps split evenly; "
                            "gradual: prune to a first density, then lower it along a cubic every --prune-every "
                            "steps (magnitude, masks updated in place), reaching --sparsity at --ramp-end of the steps")
    prune.add_argument("--density-steps", type=_densities, default=None,
                       help="iterative: the densities, decreasing and ending at --sparsity (e.g. 0.5,0.3,0.18,0.1; "
                            f"default: --prune-stages geometric steps from {ITERATIVE_START:g}); gradual: START,FINAL "
                            f"(default {ITERATIVE_START:g},--sparsity)")
    prune.add_argument("--prune-stages", type=_positive_int, default=4, help="iterative: how many stages")
    prune.add_argument("--reprune-method", default="auto", choices=["auto", *METHODS],
                       help="the method of a schedule's later prunes (auto: magnitude for gradual, --method for "
                            "iterative); a calibrated one (sparsegpt, wanda) makes gradual updates on the first "
                            "--reprune-nsamples calibration windows, and every update keeps the zeros it finds")
    prune.add_argument("--reprune-nsamples", type=_positive_int, default=16,
                       help="gradual with a calibrated --reprune-method or --layer-density owl: calibration windows "
                            "per update")
    prune.add_argument("--prune-every", type=_positive_int, default=50,
                       help="gradual: optimizer steps between two mask updates")
    prune.add_argument("--ramp-end", type=float, default=None,
                       help=f"gradual: the fraction of the optimizer steps at which the density reaches --sparsity "
                            f"(default {GRADUAL_RAMP:g}); the rest trains at it")
    prune.add_argument("--layer-density", default="auto", choices=LAYER_DENSITIES,
                       help="per-layer densities: uniform (every layer keeps --sparsity), or owl (outlier-weighted: "
                            "layers with more activation outliers keep more; the parameter-weighted mean stays "
                            "exactly --sparsity; with --schedule iterative or gradual, a profile anew at every later "
                            f"prune, no layer above what it holds); auto: owl at density ≤ {OWL_AUTO_MAX_DENSITY:g} "
                            "for a one-shot "
                            "unstructured SparseGPT or Wanda prune (where it was measured to help), else uniform")
    prune.add_argument("--owl-lambda", type=float, default=0.08,
                       help="OWL: per-layer densities spread over --sparsity ± this")
    prune.add_argument("--owl-m", type=float, default=5.0,
                       help="OWL: a weight is an outlier when its Wanda score exceeds this many times its layer's mean")
    for method, option in option_flags():  # a method's own knobs, from its options dataclass
        prune.add_argument(option.metadata["flag"], dest=f"{method}_{option.name}", type=type(option.default),
                           default=option.default, help=f"{method}: {option.metadata.get('help', option.name)}")

    train = parser.add_argument_group("training")
    train.add_argument("--recipe", default="default", choices=["default", "measured"],
                       type=lambda value: "default" if value == "brief" else value,  # the name it had before
                       help="default: each flag at its own default, the lr by the rule 5e-6·√batch (--base-lr); "
                            "measured: the recovery measured best "
                            "near --sparsity (utils/config/recipes.py, BENCHMARKS.md): its --loss, --schedule, "
                            "--layer-density, lr (kept under the √batch rule) and --epochs where it measured fewer; "
                            "a flag given explicitly still wins (auto, as given or by default, takes the row's)")
    train.add_argument("--batch-size", type=_positive_int, default=8, help="effective batch (blocks per optimizer step)")
    train.add_argument("--micro-batch-size", type=_positive_int, default=None,
                       help="blocks per forward per process (default: batch size / processes); "
                            "gradient accumulation makes up the rest")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help=f"epochs of --max-step optimizer steps (default {DEFAULT_EPOCHS}; under --recipe measured "
                            f"the row's: {recipe_epochs()})")
    train.add_argument("--base-samples", type=_positive_int, default=BASE_SAMPLES, help="max_step = base_samples // batch_size")
    train.add_argument("--base-lr", type=_positive_float, default=None,
                       help=f"lr = base_lr * sqrt(batch_size) (default {BASE_LR:g})")
    train.add_argument("--max-step", type=_positive_int, default=None, help="override the derived steps per epoch")
    train.add_argument("--lr", type=_positive_float, default=None, help="override the derived peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of all steps, at most 100)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    train.add_argument("--block-size", type=_positive_int, default=512, help="tokens per packed training block")
    train.add_argument("--train-source", default="wikitext2",
                       help="training text: wikitext2 (hub, train split), a file/folder, or hf:NAME:CONFIG:SPLIT:COLUMN; "
                            "several mixed with commas (a.txt,b.raw,folder/); generated:N (e.g. generated:2M) = N "
                            "tokens sampled from the dense --model (no data needed; cached; pair it with --loss kd)")
    train.add_argument("--gen-temperature", type=float, default=1.0,
                       help="generated:N training text: sampling temperature")
    train.add_argument("--gen-top-p", type=float, default=0.95, help="generated:N: nucleus (top-p) sampling")
    train.add_argument("--gen-length", type=_positive_int, default=None,
                       help="generated:N: tokens per sampled row (default: --block-size)")
    train.add_argument("--gen-batch-size", type=_positive_int, default=32,
                       help="generated:N: rows sampled per generate call")
    train.add_argument("--holdout", type=float, default=0.05,
                       help="fraction of the training text held out (its last blocks) and evaluated every epoch, "
                            "to show memorization without the test set; 0 = off")
    train.add_argument("--loss", default="auto", choices=["auto", "ce", "kd", "ce+kd"],
                       help="ce: cross-entropy on the training text; kd: distillation from the dense --model "
                            "(KL divergence of the next-token distributions); ce+kd: both, weighted; auto: the "
                            f"loss of the best recovery measured near --sparsity ({auto_loss_rule()}: "
                            "utils/config/recipes.py)")
    train.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (> 0)")
    train.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation term")
    train.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy term")
    for term in optional_terms():  # terms beside --loss's, each by its weight (0 = off)
        train.add_argument(term.flag, type=float, default=0.0, help=term.help)
    train.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                       help="compute precision of training (auto: bf16 on GPU, no on CPU)")
    train.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead",
                                                              "max-autotune", "max-autotune-no-cudagraphs"],
                       help="torch.compile the training forward (auto: reduce-overhead, i.e. CUDA graphs, on one "
                            "GPU without gradient accumulation; default under FSDP or with accumulation; off on "
                            "the CPU or without Triton). The first steps compile: minutes on a cold cache")
    train.add_argument("--parallel", default="fsdp", choices=["fsdp", "hsdp", "ddp"],
                       help="how the processes of accelerate launch share the work: fsdp shards weights, gradients "
                            "and optimizer state over all processes (models larger than one GPU); hsdp shards inside "
                            "each machine and replicates across machines (LOCAL_WORLD_SIZE processes a machine; "
                            "several machines); ddp gives each a whole copy and averages gradients after backward, "
                            "so a process keeps CUDA graphs (models that fit)")
    train.add_argument("--dist-timeout", type=_positive_float, default=30.0,
                       help="minutes a collective (an all-reduce, a barrier) may wait for the other processes before "
                            "the job fails; the wait for the main process's pruning is apart (up to 24 h)")
    train.add_argument("--seed", type=int, default=0, help="calibration windows and data order")
    train.add_argument("--patience", type=_positive_int, default=None,
                       help="stop when the number --patience-on names has not improved for this many epochs at "
                            "the final density")
    train.add_argument("--patience-on", default="auto", choices=["auto", "holdout", "perplexity"],
                       help="what --patience watches: the loss on the training text's held-out blocks (holdout: the "
                            "stop is decided without the test set; best/ is still the epoch of lowest evaluation "
                            "perplexity) or the evaluation text's perplexity; auto: holdout where text is held out "
                            "(--holdout above 0)")
    train.add_argument("--cooldown-steps", type=int, default=0,
                       help="when --patience runs out, train this many steps more with the lr falling linearly to 0, "
                            "then stop (0: stop at once)")
    train.add_argument("--min-delta", type=float, default=0.0,
                       help="relative drop (of perplexity, or of the held-out perplexity exp(loss)) that counts as an "
                            "improvement for --patience and the best model")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-source", default="wikitext2",
                            help="evaluation text: wikitext2 (hub, test split), a folder with wiki.test.raw, a file, "
                                 "or hf:NAME:CONFIG:SPLIT:COLUMN")
    evaluation.add_argument("--token-length", type=_positive_int, default=2048, help="tokens per evaluation window")
    evaluation.add_argument("--stride", type=_positive_int, default=None,
                            help="tokens between window starts (default: --token-length, the papers' protocol)")
    evaluation.add_argument("--eval-windows", type=_positive_int, default=None,
                            help="score only the first N windows of the evaluation text: a quick look (minutes on a "
                                 "CPU), labelled everywhere as not the papers' protocol and never compared with it")
    evaluation.add_argument("--eval-batch-size", type=_positive_int, default=4, help="windows per forward")
    evaluation.add_argument("--eval-compile", default="auto", choices=["auto", "off", "scoring", "layers"],
                            help="torch.compile in evaluation: scoring = the loss/accuracy kernel over the logits; "
                                 "layers = also the decoder layers (pays off over several evaluations of a large "
                                 "model); auto = scoring when training compiles, else off")
    evaluation.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the dense model")
    evaluation.add_argument("--tasks", type=_names, default=(),
                            help="zero-shot tasks through lm-eval after the perplexity (e.g. arc_easy,hellaswag,piqa,"
                                 "winogrande; hub tasks need a network), on --model, the pruned or the best model")
    evaluation.add_argument("--task-dir", default=None,
                            help="a folder of lm-eval task YAML files (local tasks: dataset_path: json)")
    evaluation.add_argument("--task-limit", type=_positive_int, default=None,
                            help="at most this many examples per task (a quick look; the papers use all)")
    evaluation.add_argument("--task-batch-size", type=_positive_int, default=8, help="lm-eval requests per forward")
    evaluation.add_argument("--generate", type=_positive_int, default=None,
                            help="--eval-only: also time greedy generation of N new tokens from --prompt (batch 1, KV "
                                 "cache): tokens/s, printed and recorded")
    evaluation.add_argument("--prompt", default="The history of the city", help="--generate's prompt")
    evaluation.add_argument("--generate-cache", default="auto", choices=["auto", "dynamic", "static"],
                            help="--generate's KV cache: static, where transformers compiles the decode step on a "
                                 "GPU (torch.compile + CUDA graphs; the warm-up call compiles, the timed one "
                                 "replays), or dynamic (eager decode steps); auto: static on a CUDA GPU for a model "
                                 "transformers can compile whole (eager steps if it fails to), dynamic otherwise")
    evaluation.add_argument("--bos-per-window", default="auto", choices=["auto", "on", "off"],
                            help="start every evaluation window, calibration window and training block with the "
                                 "BOS token (auto: for families that need it, e.g. Gemma; off: the papers' protocol, "
                                 "one BOS for the whole text)")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default=None, help="run folder (default: runs/{model}-{sparsity}-{method}; --eval-only: "
                                                             "runs/{model}-eval, --prune-only: runs/{model}-{sparsity}-"
                                                             "{method}-pruned, --export-only: runs/{model}-export)")
    output.add_argument("--log-file", default=None, help="also write the console output to this file")
    output.add_argument("--log-every", type=_positive_int, default=None,
                        help="a training progress line (and metrics.jsonl record) every N optimizer steps "
                             "(default: every 10 steps or 30 s, whichever comes first)")
    output.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its saved state (the run's settings must match)")
    output.add_argument("--overwrite", action="store_true",
                        help="start over in an --output-dir that holds another run (its files are deleted)")
    output.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"],
                        help="experiment tracker, through accelerate")
    output.add_argument("--no-save-best", action="store_true", help="do not save the best-perplexity model")
    output.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of best/: float32 keeps the trained master weights bit for bit; bfloat16 "
                             "halves the folder, and its perplexity may then differ slightly from the summary's")
    output.add_argument("--keep-state", action="store_true",
                        help="keep state/ (the resumable optimizer state, about 3× the model in float32) after a "
                             "run finishes; by default it is removed then (best/ and the export stay)")
    output.add_argument("--export", default="compressed", choices=[*EXPORTERS, "none"],
                        help="also write the pruned (--prune-only) or best model in this format into the run folder: "
                             + "; ".join(f"{e.name} (OUTPUT/{e.folder}): {e.summary}" for e in EXPORTERS.values())
                             + "; none: only the dense-format folders")
    output.add_argument("--export-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the exported weights (float32 keeps trained master weights bit for bit)")
    return parser


def flag_reference() -> str:
    """docs/flags.md: every flag by group, its default and its help (a test keeps the file equal to this)."""
    parser, formatter = build_parser(), _Help("")
    lines = ["# Flags", "", "Every flag of `extreme_compression_experiment.py` (also `--help`). Regenerate this page with",
             "`python -c \"import extreme_compression_experiment as e; print(e.flag_reference(), end='')\" > docs/flags.md`.",
             ""]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.option_strings and action.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | what |", "| --- | --- | --- |"]
        for action in actions:
            default = "" if action.default is None or action.default is False or action.default == () \
                else f"`{action.default}`"
            text = " ".join((formatter._get_help_string(action) or "").replace("%%", "%").split())
            text = text.replace("(default: %(default)s)", "").replace("|", "\\|").strip()
            lines.append(f"| `{', '.join(action.option_strings)}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """The command line; `callbacks` see the training loop after every step (fsdp_finetune.Callback)."""
    make_console_safe(sys.stdout)
    make_console_safe(sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:  # reads results.json files only: no model, no torch work
        ignored = [action.option_strings[0] for action in parser._actions if action.option_strings
                   and action.dest not in ("compare", "output_dir", "help") and getattr(args, action.dest) != action.default]
        if ignored:
            parser.error(f"--compare reads run folders only; drop {', '.join(ignored)}")
        from utils.io.report import run_compare
        return run_compare(args.compare, args.output_dir, sys.stderr)
    try:
        config = validate(args, world_size_from_launcher())
    except ConfigError as error:
        parser.error(str(error))
    from utils.data.sources import DataError
    from utils.io.files import CheckpointError
    from utils.models.hub import ModelError
    from utils.pipeline.run import run  # the pipeline (transformers, accelerate) only after the arguments are good
    from utils.task_eval import TaskError
    # SIGTERM (what a cluster scheduler sends before it kills a job) is handled like Ctrl-C:
    # training saves its resumable state, anything else stops cleanly.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        return run(config, callbacks)
    except (ModelError, DataError, CheckpointError, TaskError) as error:  # bad input found after parsing
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a path the file system refuses, a full disk outside training's own handling
        too_long = error.errno == errno.ENAMETOOLONG
        print(f"error: {error.strerror or error}: {error.filename or ''}"
              + (" (shorten the path)" if too_long else "; what was computed before is kept"), file=sys.stderr)
        return EXIT_USAGE if too_long else 1
    except KeyboardInterrupt:  # outside training (which saves its own state): pruning, evaluation, loading
        print("Interrupted. Finished pruned models and run files are kept (they are written atomically); "
              "run the same command again to continue (with --resume, where a training run saved its state).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
