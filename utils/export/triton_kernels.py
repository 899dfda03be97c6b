"""The Triton kernels of the sparse layouts in sparse_layout.py, for the GPU path only (this module
imports Triton; sparse_linear.py imports it the first time a CUDA input reaches a kernel).

    y = kernel_linear(x2, packed, bias)     # (M, K) CUDA input → (M, N), fp32 accumulation
    dense = kernel_unpack(packed)           # the dense matrix, one kernel

The kernels' long parameter lists are Triton's calling convention (pointers, sizes and compile-time
constants, each its own argument): the one named exception to the eight-parameter rule.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from utils.export.sparse_layout import ENCODINGS, EllMatrix

LAUNCH = {("ell", 1): (256, 4, False), ("ell", 16): (64, 2), ("bitmask", 1): (16, 4), ("bitmask", 16): (8, 4)}


@triton.jit(do_not_specialize=["unit"])
def ell_matvec(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, N, unit,
               ROWS: tl.constexpr, BLOCK_P: tl.constexpr, ENCODING: tl.constexpr, HAS_BIAS: tl.constexpr):
    # One input row. The tile is (slots, rows) and its offsets are multiplied by `unit` (1, hidden
    # from the compiler): unable to vectorize, it lays a warp's lanes on 32 consecutive slots of one
    # row, whose x gathers then fall in a few cache lines instead of 32 (the L1 limit of this kernel).
    block = tl.program_id(0)
    start = tl.multiple_of(tl.load(block_ptr_ptr + block).to(tl.int64), 8)
    end = tl.load(block_ptr_ptr + block + 1).to(tl.int64)
    width = tl.multiple_of(((end - start) // ROWS).to(tl.int32), 8)
    row = tl.arange(0, ROWS)
    slot = tl.arange(0, BLOCK_P)
    row_ptr = start + row.to(tl.int64)[None, :] * width
    acc = tl.zeros((BLOCK_P, ROWS), dtype=tl.float32)
    column = tl.zeros((ROWS,), dtype=tl.int32)
    for p in range(0, width, BLOCK_P):
        inside = (p + slot)[:, None] < width
        offsets = row_ptr + (p + slot)[:, None] * unit
        value = tl.load(values_ptr + offsets, mask=inside, other=0.0)
        code = tl.load(index_ptr + offsets, mask=inside, other=0).to(tl.int32)
        if ENCODING == 0:
            cols = column[None, :] + tl.cumsum(code, axis=0)
            column += tl.sum(code, axis=0)
        elif ENCODING == 1:
            cols = code & 0xFFFF
        else:
            cols = code
        acc += value.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)
    total = tl.sum(acc, axis=0)
    out_row = block * ROWS + row
    if HAS_BIAS:
        total += tl.load(bias_ptr + out_row, mask=out_row < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + out_row, total.to(y_ptr.dtype.element_ty), mask=out_row < N)

@triton.jit
def ell_matmul(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N,
               ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ENCODING: tl.constexpr,
               HAS_BIAS: tl.constexpr, EVEN_M: tl.constexpr):
    # x_ptr: (K, M) = x transposed, so the M inputs of one column are one contiguous gather
    block = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.multiple_of(tl.load(block_ptr_ptr + block).to(tl.int64), 8)
    end = tl.load(block_ptr_ptr + block + 1).to(tl.int64)
    width = tl.multiple_of(((end - start) // ROWS).to(tl.int32), 8)
    row = tl.arange(0, ROWS)
    slot = tl.arange(0, BLOCK_P)
    row_ptr = start + row.to(tl.int64)[:, None] * width
    # products add up per slot and are summed over the slots once, after the loop
    if BLOCK_M == 1:
        acc = tl.zeros((ROWS, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BLOCK_P, BLOCK_M), dtype=tl.float32)
    column = tl.zeros((ROWS,), dtype=tl.int32)
    for p in range(0, width, BLOCK_P):
        inside = (p + slot)[None, :] < width
        offsets = row_ptr + (p + slot)[None, :]
        value = tl.load(values_ptr + offsets, mask=inside, other=0.0)
        code = tl.load(index_ptr + offsets, mask=inside, other=0).to(tl.int32)
        if ENCODING == 0:
            cols = column[:, None] + tl.cumsum(code, axis=1)
            column += tl.sum(code, axis=1)
        elif ENCODING == 1:
            cols = code & 0xFFFF
        else:
            cols = code
        if BLOCK_M == 1:
            acc += value.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)
        else:
            gather = x_ptr + cols[:, :, None] * M + m[None, None, :]
            if EVEN_M:
                xs = tl.load(gather)
            else:
                xs = tl.load(gather, mask=(m < M)[None, None, :], other=0.0)
            acc += value.to(tl.float32)[:, :, None] * xs.to(tl.float32)
    if BLOCK_M == 1:
        total = tl.sum(acc, axis=1)[:, None]
    else:
        total = tl.sum(acc, axis=1)
    out_row = block * ROWS + row
    if HAS_BIAS:
        total += tl.load(bias_ptr + out_row, mask=out_row < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + m[None, :] * N + out_row[:, None], total.to(y_ptr.dtype.element_ty),
             mask=(out_row < N)[:, None] & (m < M)[None, :])

@triton.jit
def ell_scatter(values_ptr, index_ptr, block_ptr_ptr, out_ptr, N, K,
                ROWS: tl.constexpr, BLOCK_P: tl.constexpr, ENCODING: tl.constexpr):
    # out_ptr: a zeroed (N, K) matrix; every kept slot is written to its row and column
    block = tl.program_id(0)
    start = tl.multiple_of(tl.load(block_ptr_ptr + block).to(tl.int64), 8)
    end = tl.load(block_ptr_ptr + block + 1).to(tl.int64)
    width = tl.multiple_of(((end - start) // ROWS).to(tl.int32), 8)
    row = tl.arange(0, ROWS)
    slot = tl.arange(0, BLOCK_P)
    row_ptr = start + row.to(tl.int64)[:, None] * width
    out_row = (block * ROWS + row).to(tl.int64)
    column = tl.zeros((ROWS,), dtype=tl.int32)
    for p in range(0, width, BLOCK_P):
        inside = (p + slot)[None, :] < width
        value = tl.load(values_ptr + row_ptr + (p + slot)[None, :], mask=inside, other=0.0)
        code = tl.load(index_ptr + row_ptr + (p + slot)[None, :], mask=inside, other=0).to(tl.int32)
        if ENCODING == 0:
            cols = column[:, None] + tl.cumsum(code, axis=1)
            column += tl.sum(code, axis=1)
        elif ENCODING == 1:
            cols = code & 0xFFFF
        else:
            cols = code
        keep = inside & (value != 0) & (out_row < N)[:, None]
        tl.store(out_ptr + out_row[:, None] * K + cols, value, mask=keep)


@triton.jit
def _popcount(word, NATIVE: tl.constexpr):
    if NATIVE:
        return tl.extra.cuda.libdevice.popc(word.to(tl.int32, bitcast=True))
    else:  # Triton's interpreter has no popc
        word = word - ((word >> 1) & 0x55555555)
        word = (word & 0x33333333) + ((word >> 2) & 0x33333333)
        return ((((word + (word >> 4)) & 0x0F0F0F0F) * 0x01010101) >> 24).to(tl.int32)

globals()["_popcount"] = _popcount  # a jitted function calls helpers through its module's globals

@triton.jit
def bitmask_matmul(x_ptr, values_ptr, words_ptr, row_ptr_ptr, bias_ptr, y_ptr, M, N, K, WORDS,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DENSE_OUT: tl.constexpr, NATIVE_POPC: tl.constexpr):
    # Values + bitmask, one 32-bit word of each of ROWS rows a step. A row's kept values are
    # contiguous: a weight's value is the row's next one plus the kept bits below it in its word
    # (popc), and every lane of a row carries that row's count itself, so no step talks across
    # lanes. x_ptr: (K, M) = x transposed. DENSE_OUT: write the dense (N, K) matrix instead.
    block = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = block * ROWS + tl.arange(0, ROWS)
    row_ok = row < N
    bit = tl.arange(0, 32)
    below = ((tl.full((32,), 1, tl.uint32) << bit.to(tl.uint32)) - 1)[None, :]  # the bits under each
    first = tl.load(row_ptr_ptr + block * ROWS, mask=block * ROWS < N, other=0)  # the block's first value
    base = (tl.load(row_ptr_ptr + row, mask=row_ok, other=0) - first).to(tl.int32)[:, None] + bit[None, :] * 0
    word_ptr = words_ptr + row.to(tl.int64)[:, None] * WORDS + bit[None, :] * 0  # (ROWS, 32), lanes of a row alike
    values_ptr += first
    if BLOCK_M == 1:
        acc = tl.zeros((ROWS, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, 32, BLOCK_M), dtype=tl.float32)
    for w in range(0, WORDS):
        word = tl.load(word_ptr + w, mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)
        kept = ((word >> bit.to(tl.uint32)[None, :]) & 1) != 0
        value = tl.load(values_ptr + base + _popcount(word & below, NATIVE_POPC), mask=kept, other=0.0)
        base += _popcount(word, NATIVE_POPC)
        col = w * 32 + bit
        if DENSE_OUT:
            tl.store(y_ptr + row.to(tl.int64)[:, None] * K + col[None, :], value,
                     mask=row_ok[:, None] & (col < K)[None, :])
        elif BLOCK_M == 1:
            xs = tl.load(x_ptr + col, mask=col < K, other=0.0)
            acc += value.to(tl.float32) * xs.to(tl.float32)[None, :]
        else:
            xs = tl.load(x_ptr + col[:, None] * M + m[None, :], mask=(col < K)[:, None] & (m < M)[None, :],
                         other=0.0)
            acc += value.to(tl.float32)[:, :, None] * xs.to(tl.float32)[None, :, :]
    if not DENSE_OUT:
        total = tl.sum(acc, axis=1)
        if BLOCK_M == 1:
            total = total[:, None]
        if HAS_BIAS:
            total += tl.load(bias_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + m[None, :] * N + row[:, None], total.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (m < M)[None, :])


def _native_popc() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"


def kernel_linear(x2: torch.Tensor, packed: EllMatrix, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, launch: tuple[int, ...] | None = None) -> torch.Tensor:
    """The sparse kernel on a (M, K) CUDA input: (M, N) = x2 @ W.T (+ bias), fp32 accumulation.
    `launch` overrides the LAUNCH entry (the benchmark's sweep)."""
    rows, cols = packed.shape
    m = x2.shape[0]
    block_m = min(16, 1 << max(0, m - 1).bit_length())
    kind = "bitmask" if packed.encoding == "bitmask" else "ell"
    launch = launch or LAUNCH[(kind, 1 if m == 1 else 16)]
    xt = x2.t().contiguous() if m > 1 else x2.contiguous()  # (K, M): one column's inputs side by side
    y = out if out is not None else torch.empty(m, rows, dtype=x2.dtype, device=x2.device)
    bias_ptr = bias if bias is not None else packed.values
    if kind == "bitmask":
        tile_rows, warps = launch
        grid = (triton.cdiv(rows, tile_rows), triton.cdiv(m, block_m))
        bitmask_matmul[grid](xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, m, rows, cols,
                                 packed.index.numel() // rows, ROWS=tile_rows, BLOCK_M=block_m,
                                 HAS_BIAS=bias is not None, DENSE_OUT=False, NATIVE_POPC=_native_popc(),
                                 num_warps=warps)
    elif m == 1 and launch[2:] == (True,):
        block_p, warps = launch[:2]
        ell_matvec[(packed.block_ptr.numel() - 1,)](
            xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, rows, 1, ROWS=packed.rows_per_block,
            BLOCK_P=block_p, ENCODING=ENCODINGS[packed.encoding], HAS_BIAS=bias is not None, num_warps=warps)
    else:
        block_p, warps = launch[:2]
        grid = (packed.block_ptr.numel() - 1, triton.cdiv(m, block_m))
        ell_matmul[grid](xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, m, rows,
                                ROWS=packed.rows_per_block, BLOCK_P=block_p, BLOCK_M=block_m,
                                ENCODING=ENCODINGS[packed.encoding], HAS_BIAS=bias is not None,
                                EVEN_M=m % block_m == 0, num_warps=warps)
    return y


def kernel_unpack(packed: EllMatrix) -> torch.Tensor:
    """The dense matrix of a CUDA EllMatrix through one kernel (ELL: a zeroed temporary and a scatter)."""
    rows, cols = packed.shape
    if packed.encoding == "bitmask":
        dense = torch.empty(rows, cols, dtype=packed.values.dtype, device=packed.values.device)
        bitmask_matmul[(triton.cdiv(rows, 16), 1)](
            packed.values, packed.values, packed.index, packed.block_ptr, packed.values, dense, 1, rows, cols,
            packed.index.numel() // rows, ROWS=16, BLOCK_M=1, HAS_BIAS=False, DENSE_OUT=True,
            NATIVE_POPC=_native_popc(), num_warps=4)
        return dense
    dense = torch.zeros(rows, cols, dtype=packed.values.dtype, device=packed.values.device)
    ell_scatter[(packed.block_ptr.numel() - 1,)](
        packed.values, packed.index, packed.block_ptr, dense, rows, cols, ROWS=packed.rows_per_block,
        BLOCK_P=64, ENCODING=ENCODINGS[packed.encoding], num_warps=4)
    return dense
