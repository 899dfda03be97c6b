"""Masked fine-tuning speed on the GPU: tokens/s, MFU and peak memory, with masks on and off.

    python benchmarks/bench_train.py [--models opt-350m opt-1.3b smollm2-shape] [--smollm2 PATH] [--steps 20]
                                     [--compile MODE] [--profile] [--variants off on separate eager] [--rounds 3]

The loop is the tool's own (`fsdp_finetune.train_step`: bf16 compute, fp32 master weights, fused
AdamW, the plain module in one process, FSDP2 with --fsdp); masks keep 10% of each decoder linear.
--compile MODE compiles the model as the CLI's --compile does (the CLI's auto = reduce-overhead here).
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from common import bench_model, forward_flops_per_token, gib, matmul_tflops, print_profile

from utils.config.sections import LossCfg, TrainCfg
from utils.training.parallel import Prepared, init_distributed, prepare_model, shard_model
from utils.training.step import Optimization, train_step
from utils.training.losses import TrainingObjective
from utils.training.masks import MaskSet
from utils.models.loading import load_model, resolve_model
from utils.models.structure import prunable_linears
from utils.pruning.criteria import magnitude_keep


VARIANTS = {"off": "no masks", "on": "masks as the tool applies them (in the compiled backward where the model is compiled)",
            "separate": "a compiled mask pass of its own after backward", "eager": "an eager mask pass after backward",
            "kd": "masks as the tool applies them, distillation loss (a frozen bf16 dense teacher, KL), as --loss kd"}


def bench(model, batch: int, block: int, steps: int, variants: tuple[str, ...], peak_tflops: float,
          fsdp: bool = False, compile_mode: str | None = None, profile: bool = False,
          rounds: int = 3) -> tuple[dict[str, float], float]:
    """Tokens/s of each variant (VARIANTS) of one model, their timed rounds interleaved so that
    clocks and neighbours hit all alike; returns the median rate of each and the peak memory of
    the whole run (with a compiled "on", two copies of the model and optimizer state)."""
    device = next(model.parameters()).device
    masked = [variant for variant in variants if variant != "off"]
    teacher = copy.deepcopy(model).to(torch.bfloat16) if "kd" in variants else None  # dense, before pruning
    if masked:
        with torch.no_grad():
            for linear in prunable_linears(model).values():
                linear.weight.masked_fill_(~magnitude_keep(linear.weight, 0.1), 0.0)

    def prepare(model, teacher=None):
        loss = LossCfg.of("kd" if teacher is not None else "ce")
        if fsdp:  # what one process would cost under fully_shard (the tool trains it plain)
            model = shard_model(model, device, "bf16")
            teacher = shard_model(teacher, device, "bf16") if teacher is not None else None
            return Prepared(model, TrainingObjective(model, teacher, loss))
        return prepare_model(model, device, "bf16", compile_mode, teacher=teacher, loss=loss)

    # The tool puts the masks into the compiled backward before the model is first traced; the
    # variant doing that gets a copy of its own, compiled as such (switching one compiled model's
    # linears back and forth relies on guards torch.compile does not promise to keep).
    in_graph = "on" in variants and compile_mode is not None and not fsdp
    own_copy = copy.deepcopy(model) if in_graph else None
    prepared = prepare(model)
    loops = {"off": (prepared, None, Optimization.create(model, TrainCfg(), device))}
    for variant in masked:
        if variant == "kd":
            student = copy.deepcopy(model)
            masks = MaskSet.for_model(student)
            if compile_mode is not None and not fsdp:
                masks.mask_in_backward()
            loops[variant] = prepare(student, teacher), masks, Optimization.create(student, TrainCfg(), device)
        elif variant == "on" and in_graph:
            masks = MaskSet.for_model(own_copy)
            masks.mask_in_backward()
            loops[variant] = prepare(own_copy), masks, Optimization.create(own_copy, TrainCfg(), device)
        else:
            loops[variant] = (replace(prepared, compile_mode=None) if variant == "eager" else prepared,
                              MaskSet.for_model(prepared.module), loops["off"][2])
    for loop, _, _ in loops.values():
        loop.module.train()
    data = torch.randint(0, model.config.vocab_size, (steps + 3, batch, block))

    def step_function(variant: str):
        loop, loop_masks, optimization = loops[variant]
        if loop_masks is not None:  # the "off" rounds moved pruned weights and their moments
            loop_masks.apply()
            loop_masks.mask_optimizer_state(optimization.optimizer)
        return lambda i: train_step(loop, [data[i]], optimization, loop_masks, device, 1.0)

    def run(variant: str, first: int, count: int) -> None:
        step = step_function(variant)
        for i in range(first, first + count):
            step(i)

    for variant in variants:  # warm-up (and compilation)
        run(variant, 0, 3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            run(variant, 3, steps)
            torch.cuda.synchronize()
            rates[variant].append(steps * batch * block / (time.perf_counter() - start))
            if variant != "off":
                assert loops[variant][1].violations() == 0, "pruned weights moved off zero"
    if profile:
        step = step_function(variants[-1])
        print_profile(lambda i: step(i % steps))
    median = {variant: sorted(r)[len(r) // 2] for variant, r in rates.items()}
    return median, gib(torch.cuda.max_memory_allocated())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["opt-350m", "opt-1.3b", "smollm2-shape"])
    parser.add_argument("--smollm2", default=None, help="also the real SmolLM2 (--model syntax)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard even in one process")
    parser.add_argument("--compile", default=None, help="torch.compile mode for the model (default, max-autotune, ...)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (masks on)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["off", "on"],
                        help="; ".join(f"{name}: {what}" for name, what in VARIANTS.items()))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of --steps steps; the median is printed")
    args = parser.parse_args()
    init_distributed(torch.device("cuda"))
    peak = matmul_tflops()
    print(f"GPU: {torch.cuda.get_device_name()} | measured bf16 matmul: {peak:.0f} TFLOP/s | "
          f"batch {args.batch_size} × {args.block_size}, bf16 autocast, fused AdamW, 1 process, "
          f"compile {args.compile or 'off'} | median of {args.rounds} rounds × "
          f"{args.steps} steps")
    makers = {name: (lambda name=name: bench_model(name, torch.float32)) for name in args.models}
    if args.smollm2:
        makers["smollm2-135m"] = lambda: load_model(resolve_model(args.smollm2), dtype=torch.float32)[0].cuda()
    print(f"{'model':14} {'masks':6} {'tokens/s':>10} {'MFU':>6} {'peak mem':>9}")
    for name, make in makers.items():
        model = make()
        flops_per_token = 3 * forward_flops_per_token(model, args.block_size)
        rates, memory = bench(model, args.batch_size, args.block_size, args.steps, tuple(args.variants), peak,
                              args.fsdp, args.compile, args.profile, args.rounds)
        for variant, tokens in rates.items():
            mfu = flops_per_token * tokens / 1e12 / peak
            print(f"{name:14} {variant:6} {tokens:10,.0f} {mfu * 100:5.1f}% {memory:8.2f}G", flush=True)
        for variant in [variant for variant in rates if variant not in ("off", "kd") and "off" in rates]:
            print(f"{name:14} mask overhead ({variant}): {(rates['off'] / rates[variant] - 1) * 100:+.1f}% "
                  "(same model and run, rounds interleaved; peak memory is the run's)")
        if "kd" in rates and "on" in rates:
            print(f"{name:14} KD step cost: {rates['on'] / rates['kd']:.2f}× a cross-entropy step (both masked)")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
