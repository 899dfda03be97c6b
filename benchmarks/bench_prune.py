"""Pruning speed and quality on the GPU: seconds and peak GPU memory per method (128 × 2048
calibration), and with --quality the WikiText-2 perplexity table for SmolLM2; with --updates only
the cost of one gradual update (issue 26).

    python benchmarks/bench_prune.py --smollm2 path/to/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data path/to/wikitext-2-raw [--quality] [--opt] [--updates]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
import warnings

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


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def prune_timed(model, method, density, pattern, calibration):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.synchronize()
    start = time.perf_counter()
    prune_model(model, method, density, pattern, calibration=calibration, device="cuda", progress=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base


def update_times(dense, valid_ids, device: str = "cuda", repeats: int = 3) -> None:
    """One gradual update of SmolLM2 in training's bf16 autocast, 0.5 → 0.492 (the first step of the
    measured recipe's cubic at batch 4), keeping the zeros it finds, on --reprune-nsamples' 16 windows
    of 2048 tokens: each criterion, calibrated ones both sequential (the papers' layer-wise way, the
    tool's gradual updates before) and at once (sequential=False, what a gradual update does now).
    Median of `repeats` on fresh copies, after one warm-up; and how many of the weights the update
    pruned the two ways agree on."""
    start = copy.deepcopy(dense).to(device)
    prune_model(start, "sparsegpt", 0.5, calibration=calibration_windows(valid_ids, 128, 2048, seed=0), device=device,
                progress=False)
    windows = calibration_windows(valid_ids, 16, 2048, seed=1)
    before = _kept(start)
    print(f"{'update':10} {'calibrated':12} {'seconds':>8}  (one update 0.5 → 0.492, 16 × 2048 windows, bf16 autocast)")
    for method, entry in METHODS.items():
        pruned = {}
        for sequential in (True, False) if entry.calibrated else (True,):
            options = dataclasses.replace(entry.options(), keep_zeros=True, sequential=sequential)
            times = []
            for repeat in range(repeats + 1):
                model = copy.deepcopy(start)
                synchronize(device)
                begin = time.perf_counter()
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                    prune_model(model, method, 0.492, calibration=windows, device=device, options=options, progress=False)
                synchronize(device)
                times.append(time.perf_counter() - begin)
            pruned[sequential] = before & ~_kept(model)
            how = ("sequential" if sequential else "at once") if entry.calibrated else "no"
            print(f"{method:10} {how:12} {statistics.median(times[1:]):8.3f}", flush=True)
            del model
        if len(pruned) == 2:
            both = int((pruned[True] & pruned[False]).sum())
            print(f"{method:10} the update's newly pruned weights: {int(pruned[True].sum()):,} sequential, "
                  f"{int(pruned[False].sum()):,} at once, {both:,} by both ({both / max(1, int(pruned[True].sum())):.1%})")
    if torch.device(device).type == "cuda":
        update_profile(start, windows, device)


def _kept(model) -> torch.Tensor:
    """Which weights of the decoder layers' matrices are nonzero, flattened in one vector."""
    return torch.cat([p.flatten() != 0 for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n])


def update_profile(start, windows, device: str) -> None:
    """Where a wanda update's seconds go: its host syncs (each waits for the GPU, and for the other
    runs sharing it) and the operators by GPU time."""
    options = dataclasses.replace(METHODS["wanda"].options(), keep_zeros=True, sequential=False)
    model = copy.deepcopy(start)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.profiler.profile(activities=activities) as profile, torch.autocast("cuda", dtype=torch.bfloat16):
                prune_model(model, "wanda", 0.492, calibration=windows, device=device, options=options, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    events = profile.key_averages()
    print(f"wanda at once, profiled: {len(syncs)} host syncs, {sum(e.count for e in events):,} operators, "
          f"{sum(e.self_device_time_total for e in events) / 1e6:.3f} s of GPU time")
    print(events.table(sort_by="self_cuda_time_total", row_limit=12), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", default="smollm2-135m", help="the SmolLM2 model (--model syntax)")
    parser.add_argument("--data", required=True, help="folder with wiki.valid.raw and wiki.test.raw")
    parser.add_argument("--quality", action="store_true", help="also the perplexity table (densities × methods)")
    parser.add_argument("--opt", action="store_true", help="also time an opt-1.3b-shaped random model")
    parser.add_argument("--updates", action="store_true", help="only the cost of one gradual update per criterion")
    parser.add_argument("--device", default="cuda", help="where --updates runs (cpu: a smoke run, slow)")
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}" if args.device == "cuda" else f"device: {args.device}")
    dense, tokenizer = load_model(resolve_model(args.smollm2), dtype=torch.float32)
    valid = tokenize_source(f"{args.data}/wiki.valid.raw", tokenizer, split="train")
    if args.updates:  # no evaluation: the test text is not read
        return update_times(dense, valid.ids, args.device)
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
