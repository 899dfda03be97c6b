"""--parallel ddp's gradient exchange, overlapped with the backward or after it, timed in 2 processes.

    python benchmarks/bench_exchange.py                      # gloo on the CPU: 2 processes
    python benchmarks/bench_exchange.py --device cuda        # NCCL, one GPU per process (2 GPUs)

Every step: forward and backward of a SmolLM2-shaped model (smaller with --layers/--hidden) on this
process's own batch, then GradientExchange.finish(). The two ways alternate in rounds, so a busy
machine slows both alike; the median seconds a step of each are printed, and whether both gave the
same gradients to the last bit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.training.exchange import GradientExchange  # noqa: E402


def worker(rank: int, args, store: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, intermediate_size=args.hidden * 8 // 3,
                         vocab_size=args.vocab, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device).train()
    batch = torch.randint(0, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(rank))
    batch = batch.to(device)
    exchanges = {name: GradientExchange(model, overlap=name == "overlapped") for name in ("overlapped", "after")}
    times = {name: [] for name in exchanges}
    grads = {}
    for round_ in range(args.rounds):
        for name, exchange in exchanges.items():
            for other in exchanges.values():
                other.armed = False
            for step in range(args.steps):
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dist.barrier()
                start = time.perf_counter()
                exchange.arm(last=True)
                model(input_ids=batch, labels=batch).loss.backward()
                exchange.finish()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
            grads[name] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{args.device}, 2 processes, {parameters / 1e6:.1f}M parameters, batch {args.batch} × {args.length} "
              f"a process, {args.rounds} rounds × {args.steps} steps each way")
        for name, values in times.items():
            print(f"  {name:>10}: {statistics.median(values) * 1000:8.1f} ms a step (median; min "
                  f"{min(values) * 1000:.1f})")
        same = all(torch.equal(a, b) for a, b in zip(grads["overlapped"], grads["after"]))
        print(f"  the same averaged gradients both ways: {same}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp()) / "store"
    mp.spawn(worker, args=(args, str(store)), nprocs=2)


if __name__ == "__main__":
    main()
