"""Sparse decode layouts: a pruned W kept compressed, packed and unpacked exactly, with a pure-torch y = x @ W.T.

    packed = pack(weight)                            # EllMatrix; unpack(packed) equals weight bit for bit
    y = reference_linear(x, packed)                  # pure torch, what the kernel is checked against
    swapped = to_sparse_linears(model, SparseRule()) # decoder nn.Linear → SparseLinear where sparse enough

The layout, row-blocked ELL: rows are cut in blocks of `rows_per_block`; every row of a block gets the
same number of slots (the block's longest row, rounded up to 8 so that each row starts 16-byte
aligned), and a block's slots lie row-major in one run, `block_ptr[b]` its first. A slot holds a value
and its column: "col16" stores the column (int16, 4 bytes a kept weight), "delta8" one byte, the gap
to the previous column (a row's columns are the running sum; a gap over 255 takes extra slots of
delta 255 and value 0; 3 bytes a kept weight). Padding slots hold value 0. "col16" is the default:
on the H200 it beat "delta8" at every point timed although it moves a third more bytes, because the
kernel is bound by its gathers of x, not by memory (docs/benchmark-log.md, "Sparse decode kernels").
"bitmask" holds the export's own values + bitmask (1 bit a weight + 2 bytes a kept one) and, per row
and chunk of 8 words (256 columns), the index of the chunk's first kept value (4 bytes per 256 weights).
Its kernel decodes a dense tile of W per step and multiplies it on tensor cores ("load as sparse, compute
as dense"), for several rows of x and mid densities; checked in Triton's interpreter, not yet timed.

Which weights are kept is `weight != 0`, as in the bitmask export (utils/export/bitmask.py): a -0.0
is not kept and comes back as +0.0, equal to it; every other value comes back bit for bit.

The ELL kernel (Triton, imported only on the GPU path) runs one row block per program: it streams
the block's slots, gathers x at their columns and accumulates in fp32, so its work and its bytes grow
with the kept weights, not with the matrix. It serves calls of up to `SparseRule.max_rows` rows
(decode); a call with more rows (prefill) scatters the weight into a dense temporary for that call
alone and runs cuBLAS. Both are graph-capturable (no host reads; shapes fixed by the input's), and
under torch.compile the layer is the custom op `extreme_compression::sparse_linear` (both seen working
on the H200: CUDA-graph replay and mode="reduce-overhead", fullgraph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from utils.export.bitmask import pack_bitmask, unpack_bitmask

ENCODINGS = {"delta8": 0, "col16": 1, "col32": 2, "bitmask": 3}
ELL_ENCODINGS = ("delta8", "col16", "col32")
SLOT_ALIGN = 8  # slots per row come in multiples of 8: 16-byte aligned bf16 rows
BITMASK_CHUNK = 8  # bitmask words (of 32 columns) per value offset, and per step of its kernel
MAX_DELTA = 255


@dataclass(frozen=True)
class SparseRule:
    """When and how a linear runs sparse (benchmarks/bench_decode.py measures it; docs/benchmark-log.md).

    max_density: a linear denser than this stays a dense nn.Linear. Measured on the H200 at one row
        (bench_decode.py full's break-even sweep, commit 7b869d3): the col16 kernel against cuBLAS
        2.41x at density 0.1 (2.39x in the same run's linears table), 1.54x at 0.2, 1.18x at 0.3, 0.95x
        at 0.4 on the opt-6.7b layer; 1.87x, 1.35x, 1.04x, 0.86x on the opt-1.3b layer. 0.3 is the densest point that won on both; the default is 0.31 so that a
        matrix pruned to 0.3 whose rounding kept a few weights more (Wanda keeps round(0.3·576) = 173
        of SmolLM2's 576 a row: 0.30035) still runs sparse.
    max_rows: calls with at most this many rows (batch × new tokens) run the sparse kernel; more rows
        materialize the weight for the call and run cuBLAS (prefill). Measured: the kernel beats the
        dense temporary up to 32 rows at density 0.1 and up to 16 at 0.5, on both shapes (opt-6.7b layer,
        16 rows: 163 against 565 µs at 0.1, 614 against 946 at 0.5); 16 is the smaller. (cuBLAS on a
        dense copy, 130 µs at 16 rows, would win there: SparseLinear holds none, to keep the memory.)
    ell_encoding: the ELL index ("col16" measured faster than "delta8" at every point timed).
    rows_per_block: the ELL block height (rows of W a program takes, each padded to the longest of them).
        Measured on an H100 (bench_decode.py rows, the opt-6.7b layer at density 0.1): 55.3 µs at 2 against
        58.1 at 8 for one row of x, 136.4 against 161.0 µs for 16; a height of 1 is slower (72.4). Fitted
        over densities (bench_decode.py fit): the bytes stream faster at 2 (90% of copy against 84%) and
        a call's floor is higher (fc1's 16384 rows: 7.9 against 4.8 µs), so 2 wins from density 0.05 up
        (0.5: 175.0 against 184.1 µs) and loses at 0.02 (32.8 against 29.8).
    stack_siblings: stack linears that read the same input (q, k, v; gate, up) into one matrix, one
        kernel call (utils/export/siblings.py). Off: on an H100 it takes opt-6.7b's six linears at 0.1
        from 58.0 to 53.1 µs and the whole eager decode step from 298 to 313 tokens/s (+5%); under
        torch.compile (386 tokens/s) each sibling runs its own rows anyway.
    bitmask_above: hold linears denser than this as values + bitmask instead of ELL slots (None:
        never. Its first kernel, a word of each row a step with a running count, measured 0.15-0.28x of
        cuBLAS at one row, slower than col16 at every density; the tiled tensor-core kernel that replaced
        it is checked, not yet timed).
    """
    max_density: float = 0.31
    max_rows: int = 16
    ell_encoding: str = "col16"
    bitmask_above: Optional[float] = None
    rows_per_block: int = 2
    stack_siblings: bool = False

    def __post_init__(self):
        for name in ("max_density", "bitmask_above"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction of kept weights in [0, 1], not {value}")
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, not {self.max_rows}")
        if self.ell_encoding not in ELL_ENCODINGS:
            raise ValueError(f"ell_encoding {self.ell_encoding!r} is not one of {list(ELL_ENCODINGS)}")
        _check_rows_per_block(self.rows_per_block)

    def encoding_for(self, density: float) -> str:
        return "bitmask" if self.bitmask_above is not None and density > self.bitmask_above else self.ell_encoding


def _check_rows_per_block(rows_per_block: int) -> None:
    if rows_per_block not in (1, 2, 4, 8, 16, 32, 64):
        raise ValueError(f"rows_per_block must be a power of two up to 64, not {rows_per_block}")


@dataclass
class EllMatrix:
    """A (rows, cols) matrix as row-blocked ELL slots, or as values + bitmask (module docstring).

    ELL: values (slots,) with zeros in padding and gap slots; index (slots,) uint8 deltas (delta8),
    int16 (col16) or int32 (col32) columns; block_ptr (blocks + 1,) the first slot of each row block.
    bitmask: values (nnz,) row-major; index (rows * words,) int32, bit b of word w of a row is its
    column 32w + b; block_ptr (rows * chunks,) the index of the first kept value of each row's chunk of
    BITMASK_CHUNK words (int32, int64 from 2^31 values)."""
    values: torch.Tensor
    index: torch.Tensor
    block_ptr: torch.Tensor
    shape: tuple[int, int]
    encoding: str
    rows_per_block: int
    nnz: int

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.index, self.block_ptr))

    def to(self, device) -> "EllMatrix":
        return EllMatrix(self.values.to(device), self.index.to(device), self.block_ptr.to(device), self.shape,
                         self.encoding, self.rows_per_block, self.nnz)


# --------------------------------------------------------------------------- the layout

def pack(weight: torch.Tensor, encoding: str = "col16", rows_per_block: int = SparseRule.rows_per_block) -> EllMatrix:
    """A 2-D weight (dense, with its pruned entries zero) → EllMatrix, on the weight's device."""
    if weight.ndim != 2:
        raise ValueError(f"pack takes a 2-D weight, not shape {tuple(weight.shape)}")
    mask = weight != 0
    return pack_parts(weight[mask], mask, encoding, rows_per_block)


def pack_parts(values: torch.Tensor, mask: torch.Tensor, encoding: str = "col16",
               rows_per_block: int = SparseRule.rows_per_block) -> EllMatrix:
    """The kept values in row-major order and the (rows, cols) bool mask (the bitmask export's
    `NAME.compressed` and unpacked `NAME.bitmask`) → EllMatrix, without a dense matrix."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not one of {sorted(ENCODINGS)}")
    _check_rows_per_block(rows_per_block)
    rows, cols = mask.shape
    if encoding == "col16" and cols > 1 << 16:
        raise ValueError(f"col16 holds columns below 65536, not {cols}; use col32")
    device, long = mask.device, torch.int64
    row_ids, col_ids = mask.nonzero(as_tuple=True)  # row-major: the order of `values`
    if row_ids.numel() != values.numel():
        raise ValueError(f"the mask keeps {row_ids.numel()} weights for {values.numel()} values")
    nnz = row_ids.numel()
    if bool((values == 0).any()):
        raise ValueError("a kept value is zero: the layout tells kept slots by their non-zero value")
    if encoding == "bitmask":
        return _pack_bitmask(values, mask, rows_per_block)
    if encoding == "delta8":
        first = torch.ones(nnz, dtype=torch.bool, device=device)
        first[1:] = row_ids[1:] != row_ids[:-1]
        previous = torch.zeros_like(col_ids)
        previous[1:] = col_ids[:-1]
        gap = col_ids - torch.where(first, torch.zeros_like(previous), previous)  # the first: its column
        gaps = torch.div(gap - 1, MAX_DELTA, rounding_mode="floor").clamp_min(0)  # extra slots of delta 255
        code = gap - MAX_DELTA * gaps
        index_dtype = torch.uint8
    else:
        gaps = torch.zeros_like(col_ids)
        code = col_ids - (col_ids >= 1 << 15).to(long) * (1 << 16) if encoding == "col16" else col_ids
        index_dtype = torch.int16 if encoding == "col16" else torch.int32
    width = gaps + 1
    row_slots = torch.zeros(rows, dtype=long, device=device).index_add_(0, row_ids, width)
    blocks = -(-rows // rows_per_block)
    padded = torch.zeros(blocks * rows_per_block, dtype=long, device=device)
    padded[:rows] = row_slots
    per_row = (padded.view(blocks, rows_per_block).amax(1) + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    block_ptr = torch.zeros(blocks + 1, dtype=long, device=device)
    block_ptr[1:] = torch.cumsum(per_row * rows_per_block, 0)
    total = int(block_ptr[-1])
    row_start = _row_starts(block_ptr, per_row, rows_per_block)[:rows]
    # each kept weight sits after every slot before it in its row, its own gap slots included
    before_row = torch.cumsum(row_slots, 0) - row_slots
    slot = row_start[row_ids] + torch.cumsum(width, 0) - before_row[row_ids] - 1
    out_values = torch.zeros(total, dtype=values.dtype, device=device)
    out_values[slot] = values
    out_index = torch.zeros(total, dtype=index_dtype, device=device)
    out_index[slot] = code.to(index_dtype)
    extra = int(gaps.sum()) if nnz else 0
    if extra:
        owner = slot.repeat_interleave(gaps) - gaps.repeat_interleave(gaps)
        rank = torch.arange(extra, device=device) - (torch.cumsum(gaps, 0) - gaps).repeat_interleave(gaps)
        out_index[owner + rank] = MAX_DELTA
    pointer_dtype = torch.int32 if total < 2 ** 31 else torch.int64
    return EllMatrix(out_values, out_index, block_ptr.to(pointer_dtype), (rows, cols), encoding, rows_per_block, nnz)


def _pack_bitmask(values: torch.Tensor, mask: torch.Tensor, rows_per_block: int) -> EllMatrix:
    rows, cols = mask.shape
    words = -(-cols // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.bool, device=mask.device)
    padded[:, :cols] = mask
    packed = pack_bitmask(padded)  # (rows, 4 * words) uint8: bit i of byte j is column 8j + i
    # little-endian words: bit b of word w is byte 4w + b // 8, bit b % 8, column 32w + b
    return EllMatrix(values.contiguous(), packed.view(torch.int32).flatten(), chunk_offsets(mask), (rows, cols),
                     "bitmask", rows_per_block, values.numel())


def chunk_offsets(mask: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool → (rows * chunks,): the row-major index of the first kept weight at or after
    each row's chunk of BITMASK_CHUNK words (int32 while the kept weights are fewer than 2^31)."""
    rows, cols = mask.shape
    span = BITMASK_CHUNK * 32
    chunks = max(1, -(-cols // span))
    padded = F.pad(mask, (0, chunks * span - cols))  # bool: no 8-byte copy of the mask
    per_chunk = padded.view(rows, chunks, span).sum(-1, dtype=torch.int64).flatten()
    offsets = torch.cumsum(per_chunk, 0) - per_chunk
    return offsets.to(torch.int32 if int(per_chunk.sum()) < 2 ** 31 else torch.int64)


def _row_starts(block_ptr: torch.Tensor, per_row: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """The first slot of every row (padding rows of the last block included)."""
    local = torch.arange(rows_per_block, device=block_ptr.device, dtype=torch.int64)
    return (block_ptr[:-1, None].to(torch.int64) + local[None, :] * per_row[:, None]).flatten()


def slot_columns(packed: EllMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every slot, int64; padding and gap slots included (their value is zero)."""
    block_ptr = packed.block_ptr.to(torch.int64)
    rows_per_block = packed.rows_per_block
    per_row = (block_ptr[1:] - block_ptr[:-1]) // rows_per_block
    lengths = per_row.repeat_interleave(rows_per_block)
    row = torch.arange(lengths.numel(), device=block_ptr.device).repeat_interleave(lengths)
    code = packed.index.to(torch.int64)
    if packed.encoding == "delta8":
        running = torch.zeros(code.numel() + 1, dtype=torch.int64, device=code.device)
        running[1:] = torch.cumsum(code, 0)
        starts = _row_starts(block_ptr, per_row, rows_per_block)
        column = running[1:] - running[starts][row]
    else:
        column = code & 0xFFFF if packed.encoding == "col16" else code
    return row, column


def unpack(packed: EllMatrix) -> torch.Tensor:
    """EllMatrix → the dense (rows, cols) matrix, on its device (pure torch)."""
    rows, cols = packed.shape
    if packed.encoding == "bitmask":
        mask = unpack_bitmask(packed.index.view(torch.uint8).view(rows, -1), cols)
        if int(mask.sum()) != packed.nnz or packed.values.numel() != packed.nnz or \
                not torch.equal(packed.block_ptr.to(torch.int64), chunk_offsets(mask).to(torch.int64)):
            raise ValueError(f"the layout does not describe a {rows} x {cols} matrix of {packed.nnz} kept weights")
        dense = torch.zeros(rows, cols, dtype=packed.values.dtype, device=packed.values.device)
        dense[mask] = packed.values
        return dense
    row, column = slot_columns(packed)
    kept = packed.values != 0
    row, column = row[kept], column[kept]
    if kept.sum() != packed.nnz or (row.numel() and (int(row.max()) >= rows or int(column.max()) >= cols)):
        raise ValueError(f"the layout does not describe a {rows} x {cols} matrix of {packed.nnz} kept weights")
    dense = torch.zeros(rows, cols, dtype=packed.values.dtype, device=packed.values.device)
    dense[row, column] = packed.values[kept]
    return dense


def stack_rows(parts: list[EllMatrix]) -> EllMatrix | None:
    """ELL matrices of the same columns, encoding and row blocks as one matrix of their rows in turn (what
    one kernel call on the input they share computes), or None where they differ or a part's rows are
    not a whole number of blocks (its last block would be padded inside the stack)."""
    first = parts[0]
    if first.encoding not in ELL_ENCODINGS or any(
            (p.shape[1], p.encoding, p.rows_per_block, p.values.dtype, p.values.device) !=
            (first.shape[1], first.encoding, first.rows_per_block, first.values.dtype, first.values.device)
            or p.shape[0] % p.rows_per_block for p in parts):
        return None
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p.values.numel())
    block_ptr = torch.cat([first.block_ptr[:1].to(torch.int64)] +
                          [p.block_ptr[1:].to(torch.int64) + start for p, start in zip(parts, offsets)])
    return EllMatrix(torch.cat([p.values for p in parts]), torch.cat([p.index for p in parts]),
                     block_ptr.to(torch.int32 if offsets[-1] < 2 ** 31 else torch.int64),
                     (sum(p.shape[0] for p in parts), first.shape[1]), first.encoding, first.rows_per_block,
                     sum(p.nnz for p in parts))


def block_rows(stacked: EllMatrix, first_block: int, end_block: int, nnz: int) -> EllMatrix:
    """Row blocks [first_block, end_block) of an ELL matrix as a matrix of their own (`nnz` kept weights):
    its values and index are views of the stacked ones, its block pointers a small copy counted from 0."""
    pointers = stacked.block_ptr[first_block:end_block + 1]
    start, end = int(pointers[0]), int(pointers[-1])
    return EllMatrix(stacked.values[start:end], stacked.index[start:end], pointers - start,
                     ((end_block - first_block) * stacked.rows_per_block, stacked.shape[1]), stacked.encoding,
                     stacked.rows_per_block, nnz)


def reference_linear(x: torch.Tensor, packed: EllMatrix, bias: torch.Tensor | None = None,
                     accumulate: torch.dtype = torch.float32, round_to_input: bool = True) -> torch.Tensor:
    """x @ W.T (+ bias) in `accumulate` precision (rounded to x's dtype unless told not to): the
    kernel's reference."""
    out = x.to(accumulate) @ unpack(packed).to(accumulate).T
    if bias is not None:
        out = out + bias.to(accumulate)
    return out.to(x.dtype) if round_to_input else out

