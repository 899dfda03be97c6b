"""Sparse decode: y = x @ W.T with a pruned W kept compressed on the GPU, never dense.

    swapped = to_sparse_linears(model, SparseRule())   # decoder nn.Linear → SparseLinear where sparse enough
    y = sparse_linear(x, packed, bias, max_rows=16)    # the kernel for few rows, dense cuBLAS for many

The layout and its exact packing are sparse_layout.py; the Triton kernels triton_kernels.py,
imported the first time a CUDA input reaches them (the CPU path runs the pure-torch reference).
Under torch.compile the layer is the custom op `extreme_compression::sparse_linear`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.export.sparse_layout import ENCODINGS, EllMatrix, SparseRule, pack, reference_linear, unpack


def _triton():
    from utils.export import triton_kernels  # Triton: the GPU path only
    return triton_kernels


def route(rows: int, max_rows: int, on_cuda: bool) -> str:
    """Which path a call takes: "kernel", "materialize" (dense temporary + cuBLAS) or "reference" (CPU)."""
    if not on_cuda:
        return "reference"
    return "kernel" if rows <= max_rows else "materialize"


def sparse_linear(x: torch.Tensor, packed: EllMatrix, bias: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """x (..., K) → (..., N) through whichever path `route` picks."""
    rows, cols = packed.shape
    x2 = x.reshape(-1, cols)
    path = route(x2.shape[0], max_rows, x.is_cuda)
    if path == "reference":
        y = reference_linear(x2, packed, bias)
    elif x2.shape[0] == 0:
        y = x2.new_zeros(0, rows)
    elif path == "kernel":
        y = _triton().kernel_linear(x2, packed, bias)
    else:
        y = F.linear(x2, _triton().kernel_unpack(packed).to(x2.dtype), None if bias is None else bias.to(x2.dtype))
    return y.reshape(*x.shape[:-1], rows)


def _register_op():
    """`extreme_compression::sparse_linear`: the layer as one opaque op for torch.compile; `layout`
    is [rows, cols, encoding id, rows per block, nnz, max rows]."""
    names = {number: name for name, number in ENCODINGS.items()}

    @torch.library.custom_op("extreme_compression::sparse_linear", mutates_args=())
    def sparse_linear_op(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, block_ptr: torch.Tensor,
                         bias: Optional[torch.Tensor], layout: list[int]) -> torch.Tensor:
        rows, cols, encoding, rows_per_block, nnz, max_rows = layout
        packed = EllMatrix(values, index, block_ptr, (rows, cols), names[encoding], rows_per_block, nnz)
        return sparse_linear(x, packed, bias, max_rows)

    @sparse_linear_op.register_fake
    def _(x, values, index, block_ptr, bias, layout):
        return x.new_empty(*x.shape[:-1], layout[0])

    return sparse_linear_op


try:
    _SPARSE_LINEAR_OP = _register_op()
except RuntimeError:  # the module imported a second time under another name: the op exists
    _SPARSE_LINEAR_OP = torch.ops.extreme_compression.sparse_linear


def traced_sparse_linear(x: torch.Tensor, packed: EllMatrix, bias: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """sparse_linear as the one opaque node torch.compile traces (the custom op)."""
    rows, cols = packed.shape
    return _SPARSE_LINEAR_OP(x, packed.values, packed.index, packed.block_ptr, bias,
                             [rows, cols, ENCODINGS[packed.encoding], packed.rows_per_block, packed.nnz, max_rows])


# --------------------------------------------------------------------------- the module and the swap

class SparseLinear(nn.Module):
    """An nn.Linear whose weight is an EllMatrix (buffers values, index, block_ptr); no dense copy."""

    def __init__(self, packed: EllMatrix, bias: torch.Tensor | None = None, max_rows: int = 16):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.encoding, self.rows_per_block, self.nnz = packed.encoding, packed.rows_per_block, packed.nnz
        self.max_rows = max_rows
        self.register_buffer("values", packed.values)
        self.register_buffer("index", packed.index)
        self.register_buffer("block_ptr", packed.block_ptr)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rule: SparseRule = SparseRule()) -> "SparseLinear":
        weight = linear.weight.detach()
        density = int(torch.count_nonzero(weight)) / max(1, weight.numel())
        packed = pack(weight, rule.encoding_for(density), rule.rows_per_block)
        return cls(packed, linear.bias, rule.max_rows)

    @property
    def packed(self) -> EllMatrix:
        return EllMatrix(self.values, self.index, self.block_ptr, (self.out_features, self.in_features),
                         self.encoding, self.rows_per_block, self.nnz)

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return traced_sparse_linear(x, self.packed, self.bias, self.max_rows)
        return sparse_linear(x, self.packed, self.bias, self.max_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.3f}, "
                f"encoding={self.encoding}, max_rows={self.max_rows}")


def _embedding_weights(model: nn.Module) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            ids.add(id(module.weight))
    return ids


@torch.no_grad()
def to_sparse_linears(model: nn.Module, rule: SparseRule = SparseRule(),
                      predicate: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace every nn.Linear that `predicate(name, module)` accepts (by default: each one that is not
    the LM head or tied to an embedding) and whose density is at most `rule.max_density` by a
    SparseLinear on the same device; its dense weight is dropped. Returns the names replaced."""
    embeddings = _embedding_weights(model)
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if predicate is not None and not predicate(name, module):
            continue
        if predicate is None and (id(module.weight) in embeddings or name.rsplit(".", 1)[-1] == "lm_head"):
            continue
        if int(torch.count_nonzero(module.weight)) > rule.max_density * module.weight.numel():
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, SparseLinear.from_linear(module, rule))
        swapped.append(name)
    return swapped
