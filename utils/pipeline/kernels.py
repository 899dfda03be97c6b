"""How a compressed export runs (--kernels) and the generation benchmark (--generate).

    model, kind = model_for(context, "perplexity")       # dense linears, or SparseLinear (utils/export)
    record = generation_benchmark(model, tokenizer, "The history", 128, device)   # tokens/s (cache "auto")
    record = generation_benchmark(model, tokenizer, "The history", 128, device, cache="dynamic")  # eager steps
    extras["kernels"] = both_kernels(context, export_folder)   # the export's perplexity both ways

--kernels auto runs perplexity dense (its 2048-token windows are prefill, where the sparse kernels
take a dense temporary per call) and generation sparse on a GPU with Triton, where decoding reads
each weight once per token and the compressed layout moves a fraction of the bytes.  --generate-cache
static lets transformers compile the decode step (the norms, adds and attention between the sparse
kernels, which otherwise take about half of the step at density 0.1); `auto`, the default, picks it on
a CUDA GPU (SmolLM2's export on an H100: 290 tokens/s against 11-13 with eager steps, docs/benchmark-log.md).
"""
from __future__ import annotations

import importlib.util
import time

import torch
from torch import nn

from utils.eval_utils import Heading, evaluate_and_log
from utils.export.registry import load_source, resolve_source
from utils.export.sparse_layout import SparseRule
from utils.export.sparse_linear import SparseLinear
from utils.export.sparse_model import load_sparse
from utils.models.hub import ModelError
from utils.models.loading import parse_dtype
from utils.pipeline.context import Context


def kernels_for(context: Context, use: str) -> str:
    """dense or sparse, for `use` ("perplexity" or "generate"), from --kernels and the model."""
    requested = context.config.model.kernels
    compressed = context.source.kind == "compressed"
    if requested == "sparse" and not compressed:
        raise ModelError(f"--kernels sparse runs a compressed export; --model {context.config.model.name} is not one "
                         "(export it: --export-only --model THAT_FOLDER, then --model OUTPUT/compressed)")
    if requested != "auto":
        return requested
    gpu = context.device.type == "cuda" and importlib.util.find_spec("triton") is not None
    return "sparse" if compressed and gpu and use == "generate" else "dense"


def model_for(context: Context, use: str) -> tuple[nn.Module, str]:
    """--model on the device with the kernels `use` calls for; the kind is reported once."""
    kind = kernels_for(context, use)
    dtype = parse_dtype(context.config.model.dtype, context.device)
    if kind == "sparse":
        model = load_sparse(context.source.location, device=context.device, dtype=dtype)
    else:
        model = load_source(context.source, dtype)[0].to(context.device)
    sparse = sum(isinstance(module, SparseLinear) for module in model.modules())
    where = "" if context.device.type == "cuda" else " (on the CPU: the pure-torch reference of the layout, for " \
                                                      "checking, not for speed)"
    if kind == "sparse" and not sparse:
        where = (f": no linear is sparse enough (SparseRule keeps those above density {SparseRule().max_density:g} "
                 "dense, where the kernel is slower than cuBLAS), so this runs on dense kernels")
    context.logger.report(f"Kernels ({use}): {kind}" + (f", {sparse} linears as SparseLinear{where}" if kind == "sparse"
                                                       else ""), {"event": "kernels", "use": use, "kind": kind,
                                                                  "sparse_linears": sparse})
    return model, kind


def generation_cache(model: nn.Module, device: torch.device, asked: str = "auto") -> str:
    """The KV cache --generate uses: `asked`, or for "auto" a static one on a CUDA GPU for a model
    whose class declares its forward compilable in one graph (transformers' `_can_compile_fullgraph`:
    Llama, OPT and most decoder families), where transformers compiles the decode step of a static
    cache, and a dynamic one elsewhere (on the CPU nothing compiles, and a static cache only attends
    over its whole length every step).  A step that still fails to compile falls back to the dynamic
    cache under "auto" (modes._generate)."""
    if asked != "auto":
        return asked
    return "static" if device.type == "cuda" and getattr(model, "_can_compile_fullgraph", False) else "dynamic"


@torch.no_grad()
def generation_benchmark(model: nn.Module, tokenizer, prompt: str, new_tokens: int, device: torch.device,
                         cache: str = "auto") -> dict:
    """Greedy decoding of `new_tokens` tokens after `prompt` (batch 1, KV cache), timed after a
    warm-up: the prompt's prefill and every decode step.  `cache` "static": a static KV cache, for
    which transformers compiles the decode step on a GPU (torch.compile, mode reduce-overhead: CUDA
    graphs); the warm-up then generates as many tokens as the timed call, so that the step it
    compiles is the one timed (a cache of another length would compile again).  `compiled` in the
    record: whether transformers compiled the step (it does for a static cache on a GPU); `cache`:
    the one used (generation_cache() picks it for "auto")."""
    cache = generation_cache(model, device, cache)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    settings = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id)
    if cache == "static" or getattr(model.generation_config, "cache_implementation", None) not in (None, cache):
        settings["cache_implementation"] = cache  # dynamic too where the model's own config asks for another
    warm_up = new_tokens if cache == "static" else 2
    model.generate(**inputs, max_new_tokens=warm_up, min_new_tokens=warm_up, **settings)
    _sync(device)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    _sync(device)
    seconds = time.perf_counter() - start
    made = output.shape[1] - inputs["input_ids"].shape[1]
    return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(made), "seconds": seconds,
            "tokens_per_second": made / seconds if seconds else None, "cache": cache,
            # where transformers compiled the step (a static cache's; one left from a failed try is not this one's)
            "compiled": cache == "static" and getattr(model, "_compiled_call", None) is not None,
            "text": tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def both_kernels(context: Context, folder) -> dict:
    """The export in `folder` evaluated with dense and with sparse kernels, the same bf16 weights
    both times (--kernels sparse at the end of a training or --prune-only run).  The protocol's
    windows are prefill, where each SparseLinear scatters its weight into a dense temporary (and a
    linear above SparseRule.max_density loads dense), so the difference is the compressed layout's
    round trip (0.0 on recovered exports), not the decode kernel's arithmetic: `bench_decode.py
    smol` forces the kernel at every row count for that."""
    dtype = parse_dtype(context.config.model.dtype, context.device)
    results = {}
    for kind, model in (("dense", lambda: load_source(resolve_source(str(folder)), dtype)[0].to(context.device)),
                        ("sparse", lambda: load_sparse(folder, device=context.device, dtype=dtype))):
        result = evaluate_and_log(model(), context.eval_tokens, context.logger,
                                  Heading(f"The Export With {kind.title()} Kernels"), context.protocol,
                                  distributed=False)
        results[kind] = result.perplexity
    results["relative_difference"] = abs(results["sparse"] - results["dense"]) / results["dense"]
    context.logger.report(f"Export: perplexity {results['dense']:.4f} with dense kernels, {results['sparse']:.4f} "
                          f"with sparse kernels (relative difference {results['relative_difference']:.2e})",
                          {"event": "kernels_compared", **results})
    return results
