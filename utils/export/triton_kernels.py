"""The Triton kernels of the sparse layouts in sparse_layout.py, for the GPU path only (this module
imports Triton; sparse_linear.py imports it the first time a CUDA input reaches a kernel).

    y = kernel_linear(x2, packed, bias)     # (M, K) CUDA input → (M, N), fp32 accumulation
    dense = kernel_unpack(packed)           # the dense matrix, one kernel

The kernels' long parameter lists are Triton's calling convention (pointers, sizes and compile-time
constants, each its own argument): the one named exception to the eight-parameter rule.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from utils.export.sparse_layout import BITMASK_CHUNK, ENCODINGS, EllMatrix

# Launch parameters by kernel and rows of x per call (1, or up to 16 a program), from bench_decode.py:
# "ell": (BLOCK_P slots a row per step, num_warps[, spread[, programs per SM]]): spread runs ell_matvec;
# programs per SM 0 is one program a row block, and so is a grid (programs per SM × SMs) that would reach
# the blocks. ELL tiles have the layout's rows_per_block rows. The ELL entries are the H200 sweep's best at
# 8 rows a block (docs/benchmark-log.md); at 2 (SparseRule's now) they were the best on an H100 too.
# "bitmask": (ROWS a program, num_warps, num_stages); spread (ell_matvec) and the bitmask entries are untimed.
LAUNCH = {("ell", 1): (256, 4, False), ("ell", 16): (64, 2), ("bitmask", 1): (8, 4, 2), ("bitmask", 16): (32, 4, 2)}


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

@triton.jit(do_not_specialize=["BLOCKS"])
def ell_matmul(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N, BLOCKS,
               ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ENCODING: tl.constexpr,
               HAS_BIAS: tl.constexpr, EVEN_M: tl.constexpr, GDC: tl.constexpr, PERSISTENT: tl.constexpr):
    # x_ptr: (K, M) = x transposed, so the M inputs of one column are one contiguous gather.
    # PERSISTENT: fewer programs than row blocks (the launch's programs per SM), each taking every
    # num_programs-th block: fewer programs to start and retire for the same bytes; otherwise one a block.
    # (Persistent with GDC has not run on a GPU: bench_decode.py times PDL with LAUNCH's grids only.)
    # GDC (launched with launch_pdl, Hopper on): programmatic dependent launch. The next kernel may start
    # at once, and this one reads its weights (never written by a kernel) before it waits for the one
    # before it: the waits come before the first read of x and the store of y, which are the only memory
    # another kernel writes or reads (y's memory may be the last kernel's freed input). This holds while no
    # load of x is issued ahead of its iteration's wait (the x gathers depend on that iteration's columns;
    # bench_decode.py's check_pdl_chain tests it on the device) and while no kernel writes the weights.
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    if PERSISTENT:
        for block in range(tl.program_id(0), BLOCKS, tl.num_programs(0)):
            _ell_block(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N, block, m,
                       ROWS, BLOCK_P, BLOCK_M, ENCODING, HAS_BIAS, EVEN_M, GDC)
    else:
        _ell_block(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N, tl.program_id(0), m,
                   ROWS, BLOCK_P, BLOCK_M, ENCODING, HAS_BIAS, EVEN_M, GDC)


@triton.jit
def _ell_block(x_ptr, values_ptr, index_ptr, block_ptr_ptr, bias_ptr, y_ptr, M, N, block, m,
               ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ENCODING: tl.constexpr,
               HAS_BIAS: tl.constexpr, EVEN_M: tl.constexpr, GDC: tl.constexpr):
    # ell_matmul's work on one block of ROWS rows, for the inputs m (inlined by Triton)
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
        if GDC:
            tl.extra.cuda.gdc_wait()  # returns at once after the first
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
    if GDC:
        tl.extra.cuda.gdc_wait()  # a block of empty rows has read no x: y's memory is free only now
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
def bitmask_matmul(x_ptr, values_ptr, words_ptr, chunk_ptr_ptr, bias_ptr, y_ptr, M, N, K, WORDS,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DENSE_OUT: tl.constexpr, NATIVE: tl.constexpr, DOT_FP32: tl.constexpr):
    # Load as sparse, compute as dense: each step decodes a (ROWS, 32·CHUNK) tile of W from ROWS rows'
    # CHUNK bitmask words and each row's value offset at the chunk (a kept weight's value sits after
    # the kept bits before it in the chunk: popc), then multiplies the tile with x's on tensor cores
    # (tl.dot; BLOCK_M = 1: fp32 products, summed once at the end). No count runs from step to step,
    # so a later step's loads need not wait for this one's. x_ptr: (K, M) = x transposed.
    # DENSE_OUT: write the tiles into the dense (N, K) matrix at y_ptr instead. NATIVE: compiled, not
    # Triton's interpreter (no popc there). DOT_FP32: both tiles in fp32, IEEE products (fp32 weights,
    # x of another dtype than W, or the interpreter, whose tl.dot multiplies bf16 bit patterns:
    # triton-lang/triton#11584); otherwise W's 16-bit dtype on tensor cores.
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = row < N
    words_at = words_ptr + row.to(tl.int64)[:, None] * WORDS
    chunks = tl.cdiv(WORDS, CHUNK)
    offsets_at = chunk_ptr_ptr + row.to(tl.int64) * chunks
    word = tl.arange(0, CHUNK)
    bit = tl.arange(0, 32).to(tl.uint32)[None, None, :]
    below = (tl.full((1, 1, 32), 1, tl.uint32) << bit) - 1  # the bits under each
    if BLOCK_M == 1:
        acc = tl.zeros((ROWS, CHUNK * 32), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BLOCK_M), dtype=tl.float32)
    for c in range(0, chunks):
        inside = row_ok[:, None] & (c * CHUNK + word < WORDS)[None, :]
        words = tl.load(words_at + c * CHUNK + word[None, :], mask=inside, other=0).to(tl.uint32, bitcast=True)
        counts = _popcount(words, NATIVE)
        # int32 offsets (fewer than 2^31 values) keep the index math in 32 bits
        first = tl.load(offsets_at + c, mask=row_ok, other=0)[:, None] + (tl.cumsum(counts, 1) - counts)
        kept = ((words[:, :, None] >> bit) & 1) != 0
        index = first[:, :, None] + _popcount(words[:, :, None] & below, NATIVE)
        tile = tl.reshape(tl.load(values_ptr + index, mask=kept, other=0.0), (ROWS, CHUNK * 32))
        col = c * CHUNK * 32 + tl.arange(0, CHUNK * 32)
        if DENSE_OUT:
            tl.store(y_ptr + row.to(tl.int64)[:, None] * K + col[None, :], tile,
                     mask=row_ok[:, None] & (col < K)[None, :])
        elif BLOCK_M == 1:
            xs = tl.load(x_ptr + col, mask=col < K, other=0.0)
            acc += tile.to(tl.float32) * xs.to(tl.float32)[None, :]
        else:
            xs = tl.load(x_ptr + col[:, None] * M + m[None, :], mask=(col < K)[:, None] & (m < M)[None, :],
                         other=0.0)
            if DOT_FP32:
                acc = tl.dot(tile.to(tl.float32), xs.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tile, xs, acc)
    if not DENSE_OUT:
        if BLOCK_M == 1:
            total = tl.sum(acc, axis=1)[:, None]
        else:
            total = acc
        if HAS_BIAS:
            total += tl.load(bias_ptr + row, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + m[None, :] * N + row[:, None], total.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (m < M)[None, :])


def _compiled() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1"


# Programmatic dependent launch of ell_matmul (Hopper and later, compiled only; on elsewhere it is off):
# bench_decode.py's `pdl` phase times the kernels with it and without.
PDL = False


def _pdl(device: torch.device) -> bool:
    return bool(PDL) and _compiled() and _capability(device.index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


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
        tile_rows, warps, stages = launch
        block_m = 1 if m == 1 else 16  # rows past m are masked (a tensor-core tile has 16)
        grid = (triton.cdiv(rows, tile_rows), triton.cdiv(m, block_m))
        bitmask_matmul[grid](xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, m, rows, cols,
                             packed.index.numel() // rows, ROWS=tile_rows, BLOCK_M=block_m, CHUNK=BITMASK_CHUNK,
                             HAS_BIAS=bias is not None, DENSE_OUT=False, NATIVE=_compiled(),
                             DOT_FP32=not _compiled() or packed.values.dtype == torch.float32
                             or x2.dtype != packed.values.dtype,
                             num_warps=warps, num_stages=stages)
        return y
    block_p, warps, spread, per_sm = (*launch, False, 0)[:4]
    blocks = packed.block_ptr.numel() - 1
    if m == 1 and spread:
        ell_matvec[(blocks,)](
            xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, rows, 1, ROWS=packed.rows_per_block,
            BLOCK_P=block_p, ENCODING=ENCODINGS[packed.encoding], HAS_BIAS=bias is not None, num_warps=warps)
        return y
    programs = min(blocks, per_sm * _multiprocessors(x2.device)) if per_sm else blocks
    pdl = {"launch_pdl": True} if _pdl(x2.device) else {}  # the keyword only where the kernel is compiled with it
    ell_matmul[(programs, triton.cdiv(m, block_m))](
        xt, packed.values, packed.index, packed.block_ptr, bias_ptr, y, m, rows, blocks,
        ROWS=packed.rows_per_block, BLOCK_P=block_p, BLOCK_M=block_m, ENCODING=ENCODINGS[packed.encoding],
        HAS_BIAS=bias is not None, EVEN_M=m % block_m == 0, GDC=bool(pdl), PERSISTENT=programs < blocks,
        num_warps=warps, **pdl)
    return y


def _multiprocessors(device: torch.device) -> int:
    """The SMs of a CUDA device; 1 for a CPU tensor in Triton's interpreter (so that a persistent launch's
    few programs each take several blocks)."""
    return _sm_count(device.index) if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def kernel_unpack(packed: EllMatrix, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense matrix of a CUDA EllMatrix through one kernel (ELL: a zeroed temporary and a scatter),
    into `out` where given: a contiguous matrix of the shape and dtype, whatever it holds."""
    if out is not None and (tuple(out.shape) != tuple(packed.shape) or out.dtype != packed.values.dtype
                            or not out.is_contiguous() or out.device != packed.values.device):
        raise ValueError(f"out must be a contiguous {tuple(packed.shape)} {packed.values.dtype} matrix on "
                         f"{packed.values.device}, not {tuple(out.shape)} {out.dtype} on {out.device}")
    rows, cols = packed.shape
    if packed.encoding == "bitmask":
        dense = out if out is not None else torch.empty(rows, cols, dtype=packed.values.dtype,
                                                        device=packed.values.device)
        bitmask_matmul[(triton.cdiv(rows, 16), 1)](
            packed.values, packed.values, packed.index, packed.block_ptr, packed.values, dense, 1, rows, cols,
            packed.index.numel() // rows, ROWS=16, BLOCK_M=1, CHUNK=BITMASK_CHUNK, HAS_BIAS=False, DENSE_OUT=True,
            NATIVE=_compiled(), DOT_FP32=True, num_warps=4)
        return dense
    dense = out.zero_() if out is not None else torch.zeros(rows, cols, dtype=packed.values.dtype,
                                                              device=packed.values.device)
    ell_scatter[(packed.block_ptr.numel() - 1,)](
        packed.values, packed.index, packed.block_ptr, dense, rows, cols, ROWS=packed.rows_per_block,
        BLOCK_P=64, ENCODING=ENCODINGS[packed.encoding], num_warps=4)
    return dense
