"""Pruning speed and quality on the GPU: seconds and peak GPU memory per method (128 × 2048
calibration), and with --quality the WikiText-2 perplexity table for SmolLM2.

    python benchmarks/bench_prune.py --smollm2 path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data path/to/wikitext-2-raw [--quality] [--opt]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from common import gib, opt_model
from utils.data.sources import calibration_windows, tokenize_source
from utils.config.sections import EvalProtocol
from utils.eval_utils import evaluate_perplexity
from utils.models.sparsity import sparsity_report
from utils.models.loading import load_model, resolve_model
from utils.pruning.criteria import parse_pattern
from utils.pruning.driver import prune_model
from utils.pruning.methods import METHODS


def prune_timed(model, method, density, pattern, calibration):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    start = time.perf_counter()
    prune_model(model, method, density, pattern, calibration=calibration, device="cuda", progress=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", default="smollm2-135m", help="the SmolLM2 model (--model syntax)")
    parser.add_argument("--data", required=True, help="folder with wiki.valid.raw and wiki.test.raw")
    parser.add_argument("--quality", action="store_true", help="also the perplexity table (densities × methods)")
    parser.add_argument("--opt", action="store_true", help="also time an opt-1.3b-shaped random model")
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}")
    dense, tokenizer = load_model(resolve_model(args.smollm2), dtype=torch.float32)
    valid = tokenize_source(f"{args.data}/wiki.valid.raw", tokenizer, split="train")
    test = tokenize_source(args.data, tokenizer, split="test")
    calibration = calibration_windows(valid.ids, args.nsamples, 2048, seed=0)
    print(f"calibration: {args.nsamples} × 2048 tokens of wiki.valid.raw (seed 0); evaluation: "
          f"{test.ids.numel():,} tokens of wiki.test.raw")
    print(f"{'model':10} {'method':10} {'target':>6} {'seconds':>8} {'peak GPU':>9}")
    for method in METHODS:
        model = copy.deepcopy(dense)
        seconds, peak = prune_timed(model, method, 0.5, None, calibration)
        print(f"{'smollm2':10} {method:10} {'50%':>6} {seconds:8.2f} {gib(peak):8.2f}G", flush=True)
    eager = copy.deepcopy(dense)
    torch.cuda.synchronize()
    start = time.perf_counter()
    prune_model(eager, "sparsegpt", 0.5, None, calibration=calibration, device="cuda", progress=False, cuda_graphs=False)
    torch.cuda.synchronize()
    graphed = copy.deepcopy(dense)
    prune_model(graphed, "sparsegpt", 0.5, None, calibration=calibration, device="cuda", progress=False)
    difference = max((a - b).abs().max().item() for a, b in zip(eager.parameters(), graphed.parameters()))
    print(f"{'smollm2':10} {'sparsegpt':10} {'50%':>6} {time.perf_counter() - start:8.2f}  (no CUDA graphs); "
          f"largest weight difference to the graphed run: {difference:.2e}", flush=True)
    del eager, graphed
    if args.opt:
        shaped = opt_model("opt-1.3b", torch.float16, device="cpu")
        random_calibration = torch.randint(0, 50272, (args.nsamples, 2048))
        for method in METHODS:
            model = copy.deepcopy(shaped)
            seconds, peak = prune_timed(model, method, 0.5, None, random_calibration)
            print(f"{'opt-1.3b':10} {method:10} {'50%':>6} {seconds:8.2f} {gib(peak):8.2f}G", flush=True)
        del shaped
    if not args.quality:
        return
    evaluate = lambda m: evaluate_perplexity(m.cuda(), test, EvalProtocol(token_length=2048, stride=2048, batch_size=8), progress=False).perplexity  # noqa: E731
    print(f"dense perplexity: {evaluate(copy.deepcopy(dense)):.3f}", flush=True)
    print(f"{'target':8} " + " ".join(f"{m:>10}" for m in METHODS) + "   (WikiText-2 test perplexity, fp32)")
    for target in ["0.5", "2:4", "0.3", "0.1"]:
        pattern = parse_pattern(target if ":" in target else None)
        density = pattern[0] / pattern[1] if pattern else float(target)
        cells = []
        for method in METHODS:
            model = copy.deepcopy(dense)
            prune_model(model, method, density, pattern, calibration=calibration, device="cuda", progress=False)
            assert abs(sparsity_report(model).density - density) < 0.01
            cells.append(evaluate(model))
            del model
        print(f"{target:8} " + " ".join(f"{c:10.3f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
