"""Evaluation speed on the GPU: full WikiText-2-sized perplexity (287,644 tokens, 2048-token windows).

    python benchmarks/bench_eval.py [--batch-size 8] [--models opt-125m opt-1.3b] [--compile] [--profile]

Prints seconds and MFU against this GPU's measured bf16 matmul rate, for evaluate_perplexity in
fp16 (eager; with --compile also compile="scoring" and compile="layers", the latter with and
without the ReLU in the GEMM's epilogue) and for the seed
lineage's loop (batch 1, fp32, labels passed to the model).  --profile prints where the GPU time
of the last variant goes.
"""
from __future__ import annotations

import argparse
import math

import torch

from common import forward_flops_per_token, matmul_tflops, opt_model, print_profile, timed
from utils.config.sections import EvalProtocol
from utils.eval_utils import evaluate_perplexity

TOKENS = 287_644


def lineage_loop(model, ids: torch.Tensor, seqlen: int) -> float:
    """The seed lineage: one window at a time, the model computes the loss from labels."""
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            batch = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).cuda()
            nlls.append(model(batch, labels=batch).loss.float() * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (nsamples * seqlen))


def argmax_token_stats(scores: torch.Tensor, targets: torch.Tensor):
    """The scoring as it was before (argmax for the accuracy), to compare against."""
    wide = scores.float()
    nll = torch.logsumexp(wide, dim=-1) - wide.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll, scores.argmax(-1) == targets


def scoring_milliseconds(fn, batch: int, vocab: int = 50272) -> float:
    """One batch's scoring alone: (batch, 2047, vocab) fp16 logits, compiled."""
    scores = torch.randn(batch, 2047, vocab, device="cuda", dtype=torch.float16)
    targets = torch.randint(0, vocab, (batch, 2047), device="cuda")
    compiled = torch.compile(fn)
    return timed(lambda: [compiled(scores, targets) for _ in range(10)]) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["opt-125m", "opt-1.3b"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-lineage", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time compile='scoring' and compile='layers'")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of the last variant")
    args = parser.parse_args()
    peak = matmul_tflops()
    print(f"GPU: {torch.cuda.get_device_name()} | measured bf16 matmul: {peak:.0f} TFLOP/s")
    ids = torch.randint(0, 50272, (TOKENS,))
    print(f"{'model':10} {'loop':36} {'seconds':>8} {'MFU':>6}")

    def report(name: str, loop: str, seconds: float) -> None:
        print(f"{name:10} {loop:36} {seconds:8.3f} {flops / seconds / 1e12 / peak * 100:5.1f}%", flush=True)

    if args.compile:
        from utils.eval_utils import score_tokens as _token_stats
        print(f"scoring one batch of {args.batch_size} × 2047 × 50272 fp16 logits, compiled: "
              f"{scoring_milliseconds(_token_stats, args.batch_size):.2f} ms (top score) against "
              f"{scoring_milliseconds(argmax_token_stats, args.batch_size):.2f} ms (argmax)", flush=True)
    for name in args.models:
        model = opt_model(name, torch.float16)
        windows = TOKENS // 2048
        flops = forward_flops_per_token(model, 2048) * windows * 2048
        seconds = timed(lambda model=model: evaluate_perplexity(model, ids, EvalProtocol(token_length=2048, stride=2048, batch_size=args.batch_size), progress=False))
        report(name, f"evaluate_perplexity fp16 batch {args.batch_size}", seconds)
        # (compile level, ReLU fused into the GEMM) beyond eager; --profile looks at the last
        variants = [("scoring", True), ("layers", False), ("layers", True)] if args.compile else []
        for level, fused in variants:
            seconds = timed(lambda model=model, level=level, fused=fused: evaluate_perplexity(model, ids, EvalProtocol(token_length=2048, stride=2048, batch_size=args.batch_size, compile=level), progress=False, fuse_relu=fused))
            report(name, f"  compile={level}" + ("" if fused else " (ReLU not fused)"), seconds)
        if args.profile:
            profiled = variants[-1][0] if variants else "off"
            print_profile(lambda _, model=model: evaluate_perplexity(model, ids, EvalProtocol(token_length=2048, stride=2048, batch_size=args.batch_size, compile=profiled), progress=False), steps=1)
        if not args.skip_lineage:
            model = model.float()
            seconds = timed(lambda model=model: lineage_loop(model, ids, 2048), repeats=1)
            report(name, "lineage loop fp32 batch 1", seconds)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
