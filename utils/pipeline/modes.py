"""The modes that do not train: evaluate --model, prune it, or export it; and the evaluation setup
every evaluating mode shares (the training mode is utils/pipeline/train.py).

    status = evaluate_only(context, start)     # --eval-only
    status = prune_only(context, start)        # --prune-only
    status = export_only(context, start)       # --export-only
"""
from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch._dynamo.exc import TorchDynamoException

from utils.data.sources import tokenize_source
from utils.eval_utils import CompiledKernels, Heading, evaluate_and_log
from utils.export.registry import load_source
from utils.io.events import first_line
from utils.io.files import write_json
from utils.io.history import PerplexityHistory
from utils.models.loading import parse_dtype
from utils.models.sparsity import sparsity_report
from utils.models.structure import count_parameters
from utils.pipeline.context import Context, Start
from utils.pipeline.deliver import deliver
from utils.pipeline.prune_step import pruned_model
from utils.pipeline.kernels import generation_benchmark, generation_cache, kernels_for, model_for
from utils.pipeline.record import quick_note, run_record
from utils.task_eval import load_tasks
from utils.training.stopping import STOPPING_ERRORS


def eval_compile(requested: str, training_compiles: bool) -> str:
    """--eval-compile → evaluate_perplexity's level.  auto compiles the scoring only for the
    evaluations of a compiled training run (every epoch); a single evaluation before training pays
    more to compile than it saves."""
    if requested != "auto":
        return requested
    return "scoring" if training_compiles else "off"


def prepare_evaluation(context: Context) -> None:
    """The tasks (names and data checked before any work), the evaluation text and the protocol."""
    config = context.config
    with context.first():
        context.tasks = load_tasks(list(config.tasks.names), config.tasks.task_dir) if config.tasks.names else None
    if context.bos is not None:
        context.logger.info("Every evaluation window, calibration window and training block starts with the BOS "
                            f"token ({config.model.bos_per_window}: this model family needs it)")
    with context.first():
        context.eval_tokens = tokenize_source(config.eval.source, context.tokenizer, split="test")
    context.protocol = replace(config.eval, compile=eval_compile(config.eval.compile, training_compiles=False),
                               bos_id=context.bos)
    context.kernels = CompiledKernels()


def evaluate_only(context: Context, start: Start) -> int:
    """--eval-only: the perplexity of --model as it is (and its task scores)."""
    prepare_evaluation(context)
    config, logger = context.config, context.logger
    model, kind = model_for(context, "perplexity")
    logger.info(f"{count_parameters(model):,} parameters, {model.dtype}")
    result = evaluate_and_log(model, context.eval_tokens, logger, Heading("Perplexity"), context.protocol,
                              kernels=context.kernels)
    if context.is_main:
        extras = deliver(context, model, info=None, export=False)

        def save() -> None:
            write_json(context.output / "results.json", {**run_record(context), "eval_source": config.eval.source,
                                                         "bos_per_window": context.bos is not None, **asdict(result),
                                                         "quick_look": quick_note(context.protocol), **extras})
        save()  # before --generate too: a failure there loses nothing computed
        if config.tasks.generate:
            if kernels_for(context, "generate") != kind:  # the other kernels: this copy goes before that one loads
                del model
                model, kind = model_for(context, "generate")
            try:
                extras["generate"] = _generate(context, model, kind)
            except GenerationFailed as failed:  # out of memory, or a decode step that does not compile
                error = failed.error
                extras["generate_error"] = {"kind": type(error).__name__, "message": str(error)[:2000],
                                            "cache": failed.cache, "static_error": failed.static_error}
                save()
                logger.info(f"error: {_generation_failed(failed, context.output / 'results.json')}")
                logger.log({"event": "error", "kind": type(error).__name__, "message": str(error)})
                return 1
            save()
        logger.info(f"Results: {context.output / 'results.json'}")
    return 0


class GenerationFailed(RuntimeError):
    """--generate's error (out of memory, a decode step that does not compile), the KV cache it had
    and, for the eager retry under auto, why the compiled step failed before it (`static_error`)."""

    def __init__(self, error: BaseException, cache: str, static_error: str | None = None):
        super().__init__(f"{type(error).__name__}: {first_line(error)}")
        self.error, self.cache, self.static_error = error, cache, static_error


def _generate(context: Context, model: torch.nn.Module, kind: str) -> dict:
    """--generate: greedy tokens/s of `model` (with `kind` kernels).  Under --generate-cache auto, a
    compiled decode step that fails to compile is timed again with eager steps, and the record says why
    (`static_error`); a cache asked for by name is not replaced."""
    tasks = context.config.tasks

    def timed(cache: str, static_error: str | None = None) -> dict:
        try:
            return generation_benchmark(model, context.tokenizer, tasks.prompt, tasks.generate, context.device, cache)
        except STOPPING_ERRORS as error:
            raise GenerationFailed(error, cache, static_error) from error
    cache, static_error = generation_cache(model, context.device, tasks.generate_cache), None
    try:
        record = timed(cache)
    except GenerationFailed as failed:
        compile_failed = isinstance(failed.error, TorchDynamoException)
        if not (tasks.generate_cache == "auto" and cache == "static" and compile_failed):
            raise
        static_error = str(failed)  # out of the except block: the failed attempt's frames go before the retry
    if static_error is not None:
        context.logger.info(f"warning: the compiled decode step failed ({static_error}); generating with eager "
                            "steps (--generate-cache dynamic) instead")
        torch._dynamo.reset()  # the failed step's compiled code and its graphs' memory
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
        record = {**timed("dynamic", static_error), "static_error": static_error}
    record["kernels"] = kind
    step = f"{record['cache']} cache{', compiled step' if record['compiled'] else ''}"
    context.logger.report(f"Generation: {record['new_tokens']} new tokens in {record['seconds']:.2f} s = "
                          f"{record['tokens_per_second']:,.1f} tokens/s (batch 1, greedy, {kind} kernels, {step}, "
                          f"after a {record['prompt_tokens']}-token prompt): {record['text']!r}",
                          {"event": "generate", **record})
    return record


def _generation_failed(failed: GenerationFailed, results) -> str:
    """What a failed --generate says: the error's first line and its cache, where the perplexity is,
    what to try (eager steps only where the compiled ones failed)."""
    eager = "--generate-cache dynamic (nothing compiled), " if failed.cache == "static" else ""
    return (f"--generate failed with a {failed.cache} KV cache ({failed}). The perplexity is saved in {results}. To "
            f"time generation, run again with another --output-dir and {eager}fewer --generate tokens or --kernels "
            "dense.")


def prune_only(context: Context, start: Start) -> int:
    """--prune-only: the pruned model (cached or made now), its perplexity against the dense
    model's, its export."""
    prepare_evaluation(context)
    config, logger = context.config, context.logger
    model, info, report = pruned_model(context, context.schedule.initial,
                                       parse_dtype(config.model.dtype, context.device))
    history = PerplexityHistory(dense=info.get("dense_perplexity"), quick=quick_note(context.protocol))
    for line in report.lines():
        logger.info(line)
    model.to(context.device)
    result = evaluate_and_log(model, context.eval_tokens, logger,
                              Heading("Pruned Model Evaluation", density=config.prune.density), context.protocol,
                              kernels=context.kernels)
    history.baseline = result.perplexity
    extras = deliver(context, model, info={"model": config.model.name, "pruning": info}) if context.is_main else {}
    for line in history.summary_lines()[1:3 + bool(history.quick)]:  # dense and pruned (and the quick-look note)
        logger.info(line)
    if context.is_main:
        write_json(context.output / "results.json", {**run_record(context), **history.to_dict(),
                                                     "bos_per_window": context.bos is not None, "pruning": info,
                                                     **extras})
        logger.info(f"Results: {context.output / 'results.json'}")
    return 1 if "export_error" in extras else 0


def export_only(context: Context, start: Start) -> int:
    """--export-only: --model as it is (its own dtype), written by --export; its sparsity printed first."""
    model, _ = load_source(context.source)
    for line in sparsity_report(model).lines():
        context.logger.info(line)
    if not context.is_main:
        return 0
    extras = deliver(context, model, info={"model": context.config.model.name,
                                           "model_identity": context.model_identity})
    write_json(context.output / "results.json", {**run_record(context), **extras})
    context.logger.info(f"Results: {context.output / 'results.json'}")
    return 1 if "export_error" in extras else 0


def dense_model(context: Context, dtype: torch.dtype | None) -> torch.nn.Module:
    """The dense --model in `dtype` (float32 when None)."""
    return load_source(context.source, dtype or torch.float32)[0]
