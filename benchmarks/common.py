"""Shared pieces of the GPU benchmarks: model shapes, the measured matmul ceiling, timing."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Published OPT shapes: (hidden, layers, heads, ffn).
OPT_SHAPES = {"opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192),
              "opt-6.7b": (4096, 32, 32, 16384)}


def opt_model(name: str, dtype: torch.dtype, device: str = "cuda"):
    """Random-weight OPT of a published shape (speed does not depend on the values)."""
    from transformers import OPTConfig, OPTForCausalLM
    hidden, layers, heads, ffn = OPT_SHAPES[name]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512 if name == "opt-350m" else hidden,
                       do_layer_norm_before=name != "opt-350m", dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(config)
    return model.to(dtype).eval()


# SmolLM2-135M (Llama): hidden 576, 30 layers, 9 query / 3 key-value heads, MLP 1536, tied 49152 vocabulary.
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True)


def smollm2_shaped(dtype: torch.dtype, device: str = "cuda"):
    """Random-weight Llama with SmolLM2-135M's shape (the real GGUF needs two transfers to the GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE))
    return model.to(dtype).eval()


def bench_model(name: str, dtype: torch.dtype, device: str = "cuda"):
    """An OPT shape by name, or 'smollm2-shape'."""
    return smollm2_shaped(dtype, device) if name == "smollm2-shape" else opt_model(name, dtype, device)


def matmul_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 20) -> float:
    """The GPU's measured dense matmul rate: the ceiling MFU is reported against."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every Linear, the LM head included."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_flops_per_token(model, seq_len: int) -> float:
    """2·(matmul parameters) + attention scores and values (4·layers·seq·hidden), PaLM's convention."""
    config = model.config
    return 2 * matmul_params(model) + 4 * config.num_hidden_layers * seq_len * config.hidden_size


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `fn()` after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gib(num_bytes: int) -> float:
    return num_bytes / 1024 ** 3


def print_profile(step, steps: int = 5) -> None:
    """Where a step's time goes: wall time against GPU-busy time, and the top operators."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3 / steps
    print(f"  profile: {wall * 1e3:.1f} ms a step wall, {gpu:.1f} ms of GPU kernels")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
