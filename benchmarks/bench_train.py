"""Masked fine-tuning speed on the GPU: tokens/s, MFU and peak memory, with masks on and off.

    python benchmarks/bench_train.py [--models opt-350m opt-1.3b] [--smollm2 PATH] [--steps 20]

The loop is the tool's own (`fsdp_finetune.train_step` on an FSDP2-sharded model, bf16 compute,
fp32 master weights, fused AdamW; FSDP2 under several processes, the plain module in one); masks keep 10% of each decoder linear.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import forward_flops_per_token, gib, matmul_tflops, opt_model
import contextlib

from fsdp_finetune import TrainConfig, init_distributed, make_optimizer, prepare_model, shard_model, train_step
from utils.mask_utils import MaskSet
from utils.model_utils import load_model, prunable_linears, resolve_model
from utils.prune_utils import magnitude_keep


def bench(model, batch: int, block: int, steps: int, masked: bool, peak_tflops: float,
          fsdp: bool = False) -> tuple[float, float, float]:
    device = torch.device("cuda")
    if masked:
        with torch.no_grad():
            for linear in prunable_linears(model).values():
                linear.weight.masked_fill_(~magnitude_keep(linear.weight, 0.1), 0.0)
    flops_per_token = 3 * forward_flops_per_token(model, block)
    if fsdp:  # what one process would cost under fully_shard (the tool trains it plain)
        model, precision = shard_model(model, device, "bf16"), contextlib.nullcontext
    else:
        model, precision = prepare_model(model, device, "bf16")
    masks = MaskSet.from_zeros({n: l.weight for n, l in prunable_linears(model).items()}) if masked else None
    optimizer = make_optimizer(model, TrainConfig(), device)
    model.train()
    data = torch.randint(0, model.config.vocab_size, (steps + 3, batch, block))
    for i in range(3):
        train_step(model, [data[i]], optimizer, None, masks, device, 1.0, precision)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        train_step(model, [data[3 + i]], optimizer, None, masks, device, 1.0, precision)
    torch.cuda.synchronize()
    tokens_per_second = steps * batch * block / (time.perf_counter() - start)
    return tokens_per_second, flops_per_token * tokens_per_second / 1e12 / peak_tflops, gib(torch.cuda.max_memory_allocated())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["opt-350m", "opt-1.3b"])
    parser.add_argument("--smollm2", default=None, help="also the real SmolLM2 (--model syntax)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard even in one process")
    args = parser.parse_args()
    init_distributed(torch.device("cuda"))
    peak = matmul_tflops()
    print(f"GPU: {torch.cuda.get_device_name()} | measured bf16 matmul: {peak:.0f} TFLOP/s | "
          f"batch {args.batch_size} × {args.block_size}, bf16 autocast, fused AdamW, 1 process")
    makers = {name: (lambda name=name: opt_model(name, torch.float32)) for name in args.models}
    if args.smollm2:
        makers["smollm2-135m"] = lambda: load_model(resolve_model(args.smollm2), dtype=torch.float32)[0].cuda()
    print(f"{'model':14} {'masks':6} {'tokens/s':>10} {'MFU':>6} {'peak mem':>9}")
    for name, make in makers.items():
        results = {}
        for masked in (False, True):
            tokens, mfu, memory = bench(make(), args.batch_size, args.block_size, args.steps, masked, peak, args.fsdp)
            results[masked] = tokens
            print(f"{name:14} {'on' if masked else 'off':6} {tokens:10,.0f} {mfu * 100:5.1f}% {memory:8.2f}G", flush=True)
            torch.cuda.empty_cache()
        print(f"{name:14} mask overhead: {(results[False] / results[True] - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
