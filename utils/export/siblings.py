"""Sibling linears: q, k and v read the same input, and so do a gated MLP's gate and up; stacked into one
matrix, one kernel call serves them all (two launches fewer per attention layer).

    stacked = stack_siblings(model)   # after to_sparse_linears: ["model.layers.0.self_attn", ...]

Measured on the opt-6.7b layer at density 0.1, batch 1 (H100, bench_decode.py pdl): the six calls
58.0 µs, with q, k and v as one call 53.1 µs; the whole eager decode step 298 → 313 tokens/s. The model calls
each sibling in turn with the same tensor, so the first call computes the stacked output and hands
the others their parts (views of it) while the input is the same tensor, unchanged (its version
counter). Once every sibling has taken its part the group keeps no reference to it. A call the group
did not see coming (a new input while a part is still waiting: a model that calls only some siblings,
or changes the input in place between them) turns the stack off for good: from then on each sibling
runs its own rows, as it does on inference tensors (no version counter to check) and under
torch.compile (dynamo traces tensors, not their identity). Only ELL layouts of whole row blocks stack
(sparse_layout.stack_rows); others stay as they are. A part is a view of the stacked output: a KV
cache that keeps k and v as they come keeps the whole output alive until it copies them.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.export.sparse_layout import EllMatrix, block_rows, stack_rows
from utils.export.sparse_linear import SparseLinear, sparse_linear, traced_sparse_linear

# Children of one module that read the same input, by the names transformers gives them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class StackedLinears(nn.Module):
    """The siblings' rows as one EllMatrix (buffers values, index, block_ptr; each sibling's own block
    pointers block_ptr_I) and their biases stacked; `part(x, i)` is sibling i's output, computed once
    for all of them per input."""

    def __init__(self, stacked: EllMatrix, siblings: list[SparseLinear]):
        super().__init__()
        self.shape, self.encoding, self.rows_per_block = stacked.shape, stacked.encoding, stacked.rows_per_block
        self.nnz, self.max_rows = stacked.nnz, siblings[0].max_rows
        self.register_buffer("values", stacked.values)
        self.register_buffer("index", stacked.index)
        self.register_buffer("block_ptr", stacked.block_ptr)
        biases = [s.bias for s in siblings]
        self.bias = None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                requires_grad=False)
        self.splits = [s.out_features for s in siblings]
        self.slots, first, start = [], 0, 0  # each sibling's slots in values/index, host ints (no sync when traced)
        for i, sibling in enumerate(siblings):  # the siblings' slots follow each other from 0 (stack_rows)
            blocks = sibling.out_features // self.rows_per_block
            own = block_rows(stacked, first, first + blocks, sibling.nnz)
            self.slots.append((start, start + own.values.numel(), sibling.nnz))
            self.register_buffer(f"block_ptr_{i}", own.block_ptr)
            first, start = first + blocks, start + own.values.numel()
        self._input, self._version, self._parts, self._waiting = None, -1, (), set()
        self.unstacked = False  # set when the siblings turned out not to share their inputs

    @property
    def packed(self) -> EllMatrix:
        return EllMatrix(self.values, self.index, self.block_ptr, self.shape, self.encoding, self.rows_per_block,
                         self.nnz)

    def rows_of(self, index: int) -> EllMatrix:
        """Sibling `index`'s rows as a matrix of its own (views of the stacked values)."""
        start, end, nnz = self.slots[index]
        return EllMatrix(self.values[start:end], self.index[start:end], getattr(self, f"block_ptr_{index}"),
                         (self.splits[index], self.shape[1]), self.encoding, self.rows_per_block, nnz)

    def bias_of(self, index: int) -> torch.Tensor | None:
        first = sum(self.splits[:index])
        return None if self.bias is None else self.bias[first:first + self.splits[index]]

    def own(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output from its rows alone."""
        return sparse_linear(x, self.rows_of(index), self.bias_of(index), self.max_rows)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.unstacked or x.is_inference():
            return self.own(x, index)
        if not (x is self._input and x._version == self._version and index in self._waiting):
            if self._waiting:  # the last input's parts were not all taken: these siblings do not share inputs
                self.unstacked, self._input, self._parts, self._waiting = True, None, (), set()
                return self.own(x, index)
            stacked = sparse_linear(x, self.packed, self.bias, self.max_rows)
            self._input, self._version = x, x._version
            self._parts, self._waiting = stacked.split(self.splits, dim=-1), set(range(len(self.splits)))
        self._waiting.discard(index)
        part = self._parts[index]
        if not self._waiting:  # every sibling has its part: keep nothing alive
            self._input, self._parts = None, ()
        return part


class SiblingLinear(nn.Module):
    """One sibling: its part of the group's output. The group is a submodule of the siblings' parent
    (it moves and saves with the model, once); a sibling holds a plain reference to it."""

    def __init__(self, group: StackedLinears, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule of each sibling: its tensors once in state_dict
        self.index = index
        self.out_features, self.in_features = group.splits[index], group.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return traced_sparse_linear(x, self.group.rows_of(self.index), self.group.bias_of(self.index),
                                        self.group.max_rows)
        return self.group.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a stack"


@torch.no_grad()
def stack_siblings(model: nn.Module, siblings: tuple[tuple[str, ...], ...] = SIBLINGS) -> list[str]:
    """Replace each set of sibling SparseLinears (same input width and max rows, biases all or none,
    layouts that stack) by SiblingLinears of one StackedLinears. Returns the names of the modules
    whose children were stacked."""
    done = []
    for name, module in list(model.named_modules()):
        for names in siblings:
            members = [getattr(module, child, None) for child in names]
            if not all(type(m) is SparseLinear for m in members):
                continue
            if len({(m.in_features, m.max_rows, m.bias is None) for m in members}) > 1:
                continue
            stacked = stack_rows([m.packed for m in members])
            if stacked is None:
                continue
            group = StackedLinears(stacked, members)
            module.add_module("stacked_" + "_".join(names), group)
            for index, child in enumerate(names):
                setattr(module, child, SiblingLinear(group, index))
            done.append(name)
    return done
