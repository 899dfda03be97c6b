"""2:4 models on the GPU's sparse tensor cores: each 2:4 linear's weight as PyTorch's
semi-structured sparse tensor (cuSPARSELt, or CUTLASS on Ampere), for inference.

    problems = semi_structured_problems(model)      # [] when every decoder linear can be swapped
    swapped = to_semi_structured(model)             # how many linears now run sparse kernels

Measured by benchmarks/bench_sparse.py (docs/benchmark-log.md). PyTorch's semi-structured tensors are a
prototype: CUTLASS kernels exist for sm80 only, and cuSPARSELt's Hopper support came later
(pytorch/pytorch#132009). The swap therefore says what it needs and refuses anything else.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.models.structure import prunable_linears

SPARSE_DTYPES = (torch.float16, torch.bfloat16)
MIN_WIDTH = 64  # the kernels tile rows and columns by 64 (32 for 16-bit columns); narrower is padded or refused


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights of each row has at most 2 non-zeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def semi_structured_problems(model: nn.Module, backend: str = "cusparselt") -> list[str]:
    """Why the decoder linears of `model` cannot run on semi-structured kernels here ([] when they can)."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("semi-structured sparse kernels need an NVIDIA GPU (sm80 or newer)")
    elif backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        problems.append("PyTorch's CUTLASS 2:4 kernels are built for sm80 (Ampere) only; use cuSPARSELt")
    for name, linear in prunable_linears(model).items():
        weight = linear.weight
        if not isinstance(linear, nn.Linear):
            problems.append(f"{name} is a {type(linear).__name__}, not nn.Linear")
        elif weight.dtype not in SPARSE_DTYPES:
            problems.append(f"{name} is {weight.dtype}; load the model in float16 or bfloat16 (--dtype)")
        elif min(weight.shape) < MIN_WIDTH:
            problems.append(f"{name} is {tuple(weight.shape)}: narrower than {MIN_WIDTH}")
        elif not is_two_four(weight):
            problems.append(f"{name} is not 2:4 sparse (prune with --pattern 2:4)")
        if len(problems) >= 3:
            break
    return problems


@torch.no_grad()
def to_semi_structured(model: nn.Module, backend: str = "cusparselt") -> int:
    """Swap every 2:4 decoder linear's weight for a semi-structured sparse tensor (inference
    only: the weight no longer takes gradients). Returns how many were swapped."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    problems = semi_structured_problems(model, backend)
    if problems:
        raise ValueError("; ".join(problems))
    # The backend's own subclass, rather than torch's process-wide _FORCE_CUTLASS switch.
    kind = SparseSemiStructuredTensorCUTLASS if backend == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    linears = prunable_linears(model)
    for linear in linears.values():
        linear.weight = nn.Parameter(kind.from_dense(linear.weight.detach()), requires_grad=False)
    return len(linears)
