"""Pruning methods as pure functions of tensors: a weight (and statistics of its input) → a
pruned weight and a keep mask.  No hooks, no devices, no models: `driver.py` drives these.

    keep = magnitude_keep(weight, density=0.1)                      # per matrix
    keep = wanda_keep(weight, stats.sq_norm, density=0.5, pattern=(2, 4))
    pruned, keep = sparsegpt_prune(weight, stats.hessian, density=0.5)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

Pattern = tuple[int, int] | None  # (n, m): keep n of every m consecutive inputs of a row


def parse_pattern(text: str | None) -> Pattern:
    """'2:4' → (2, 4): keep 2 of every 4.  None/'' → unstructured."""
    if not text:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError as error:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), got '{text}'") from error
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {text}")
    return n, m


def _prune_count(total: int, density: float) -> int:
    return total - int(round(total * density))


def allocate(total: int, fixed: list[int], sizes: list[int]) -> list[int]:
    """`total` prunes split over groups of `sizes` weights, `fixed` of which must be pruned in
    each (weights already zero that stay zero): each group its fixed ones plus a share of the rest
    in proportion to its free weights, rounded so that the counts sum to `total` exactly.  When
    the fixed ones are more than `total` (a density asked for a rounding above what the weights
    hold), exactly the fixed ones: a zero never comes back."""
    return allocate_counts(total, torch.tensor(fixed, dtype=torch.int64),
                           torch.tensor(sizes, dtype=torch.int64)).tolist()


def allocate_counts(total: int, fixed: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """`allocate` on tensors, on their device and without a host read (a gradual update's per-row
    counts were a Python loop quadratic in the rows: a second of every Wanda update on SmolLM2).
    Each group's share is the running share of the free weights up to it, rounded half to even,
    less the one before; in int64 arithmetic, so exact while the extra prunes times the free
    weights stay below 2^63 (matrices of up to about 3·10^9 weights)."""
    fixed = fixed.to(torch.int64)
    free = sizes.to(fixed.device, torch.int64) - fixed
    extra = (total - fixed.sum()).clamp(min=0)
    cumulative = free.cumsum(0)
    whole = cumulative[-1:].clamp(min=1)
    running = extra * cumulative
    quotient = torch.div(running, whole, rounding_mode="floor")
    twice_rest = 2 * (running - quotient * whole)
    share = quotient + ((twice_rest > whole) | ((twice_rest == whole) & (quotient % 2 == 1))).to(torch.int64)
    return fixed + share - torch.cat([share.new_zeros(1), share[:-1]])


def _pruned_first(score: torch.Tensor, frozen: torch.Tensor | None) -> torch.Tensor:
    """Scores in which the `frozen` positions (weights that must stay zero) rank below every other."""
    return score if frozen is None else score.masked_fill(frozen, -1.0)


def _row_keep(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the `counts[r]` lowest scores of each row r."""
    rows, cols = score.shape
    pruned = torch.arange(cols, device=score.device).expand(rows, cols) < counts.to(score.device).unsqueeze(1)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, score.argsort(dim=1, stable=True), ~pruned)
    return keep


def _nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive columns in each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def magnitude_keep(weight: torch.Tensor, density: float, pattern: Pattern = None,
                   frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the largest |w|: per matrix (unstructured) or per group of m (N:M).  `frozen`: positions
    pruned whatever their value (a calibrated update keeps earlier zeros at zero; unstructured only)."""
    score = weight.detach().abs().float()
    if pattern:
        return _nm_keep(score, *pattern)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    count = _prune_count(score.numel(), density)
    if frozen is not None:
        count = max(count, int(frozen.sum()))  # at least the frozen ones
    score = _pruned_first(score, frozen)
    if count:
        keep[score.flatten().topk(count, largest=False).indices] = False
    return keep.view_as(score)


def wanda_keep(weight: torch.Tensor, input_sq_norm: torch.Tensor, density: float,
               pattern: Pattern = None, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Wanda: score |W_ij|·‖X_j‖₂, ranked within each output row (or each group of m).  `frozen`:
    positions pruned whatever their score; each row then prunes its frozen ones plus a share of the
    matrix's rest (`allocate`), the matrix's count the same as without."""
    score = weight.detach().abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)
    if pattern:
        return _nm_keep(score, *pattern)
    count = _prune_count(score.shape[1], density)
    if frozen is not None:
        rows, cols = score.shape
        counts = allocate_counts(rows * count, frozen.sum(dim=1), torch.full((rows,), cols, device=frozen.device))
        return _row_keep(_pruned_first(score, frozen), counts)
    keep = torch.ones_like(score, dtype=torch.bool)
    if count:
        keep.scatter_(1, score.topk(count, dim=1, largest=False).indices, False)
    return keep


@dataclass(frozen=True)
class Solver:
    """How SparseGPT solves: columns pruned together, the Hessian's dampening (a fraction of its
    mean diagonal), and what runs one block's column loop (None: `column_sweep`, eagerly)."""
    blocksize: int = 128
    percdamp: float = 0.01
    sweep: Callable | None = None


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern = None,
                    row_splits: list[int] | None = None, solver: Solver = Solver(),
                    frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune column blocks with an adaptive mask and
    compensate the error in the columns not yet processed.

    weight: (rows, cols), several matrices that share one input may be stacked by rows;
    `row_splits` gives their row counts so the unstructured mask is chosen per matrix.
    `solver`: block size, dampening and the column loop's runner.
    `frozen` (unstructured only): positions pruned whatever their score, e.g. the zeros of an
    earlier prune, which the error updates of earlier columns would otherwise bring back; each
    block then prunes its frozen ones plus a share of the rest (`allocate`), each matrix's count
    the same as without.
    Returns (pruned weight in float32 with exact zeros, keep mask).
    """
    rows, cols = weight.shape
    row_splits = row_splits or [rows]
    blocksize, percdamp, sweep = solver.blocksize, solver.percdamp, solver.sweep
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    prune_fraction = 1 - density
    counts = _block_counts(frozen, rows, cols, row_splits, blocksize, prune_fraction) if frozen is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # Columns are rows here: column i of the block is the contiguous row WT[i].
        WT = W[:, i1:i2].t().contiguous()  # (count, rows)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        pruned = torch.zeros_like(WT, dtype=torch.bool)
        if pattern is None:
            score = WT.square() / d.square().unsqueeze(1)
            start = 0
            if frozen is not None:
                score = _pruned_first(score, frozen[:, i1:i2].t())
            for split, size in enumerate(row_splits):
                part = score[:, start:start + size]
                count = int(round(part.numel() * prune_fraction)) if counts is None else counts[split][i1 // blocksize]
                if count:
                    flat = torch.zeros(part.numel(), dtype=torch.bool, device=W.device)
                    flat[part.reshape(-1).topk(count, largest=False).indices] = True
                    pruned[:, start:start + size] = flat.view_as(part)
                start += size
        scale = pruned.float() / d.unsqueeze(1)
        ErrT = torch.zeros_like(WT)
        (sweep or column_sweep)(WT, Hinv1, d, pruned, scale, ErrT, pattern)
        WT.masked_fill_(pruned, 0.0)
        W[:, i1:i2] = WT.t()
        keep[:, i1:i2] = ~pruned.t()
        W[:, i2:].addmm_(ErrT.t(), Hinv[i1:i2, i2:], alpha=-1)
    W.masked_fill_(~keep, 0.0)
    return W, keep


def _block_counts(frozen: torch.Tensor, rows: int, cols: int, row_splits: list[int], blocksize: int,
                  prune_fraction: float) -> list[list[int]]:
    """Per matrix of the stack, per block of columns: how many to prune, the frozen ones included,
    summing to what the blocks prune without `frozen`."""
    starts = list(range(0, cols, blocksize))
    counts, top = [], 0
    for size in row_splits:
        columns = frozen[top:top + size].sum(dim=0).tolist()  # one host read a matrix
        sizes = [size * (min(i1 + blocksize, cols) - i1) for i1 in starts]
        fixed = [int(sum(columns[i1:i1 + blocksize])) for i1 in starts]
        counts.append(allocate(sum(int(round(n * prune_fraction)) for n in sizes), fixed, sizes))
        top += size
    return counts


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def full_fp32_matmul():
    return float32_matmul_precision("highest")


def column_sweep(WT: torch.Tensor, Hinv1: torch.Tensor, d: torch.Tensor, pruned: torch.Tensor, scale: torch.Tensor,
                 ErrT: torch.Tensor, pattern: Pattern) -> None:
    """SparseGPT's sequential loop over the columns of one block, in place.

    WT: (count, rows), the block's columns as contiguous rows.  Zeroing column i's pruned entries
    costs err = w·pruned/d; the columns after i absorb -err ⊗ Hinv1[i, i:].  With N:M the mask of
    every group of m columns is chosen when the sweep reaches it, from the updated weights."""
    count, rows = WT.shape
    n, m = pattern or (0, 0)
    for i in range(count):
        if pattern and i % m == 0:
            group = WT[i:i + m].square() / d[i:i + m].square().unsqueeze(1)  # (m, rows)
            low = group.t().topk(m - n, dim=1, largest=False).indices  # (rows, m-n)
            block = torch.zeros(rows, m, dtype=torch.bool, device=WT.device).scatter_(1, low, True)
            pruned[i:i + m] = block.t()
            scale[i:i + m] = pruned[i:i + m].float() / d[i:i + m].unsqueeze(1)
        torch.mul(WT[i], scale[i], out=ErrT[i])
        WT[i:].addr_(Hinv1[i, i:], ErrT[i], alpha=-1)


class GraphedSweeps:
    """`column_sweep` captured once per block shape as a CUDA graph and replayed.

    The sweep is 2 tiny kernels per column (about 100k columns for SmolLM2): launch-bound from
    Python, a fraction of that as a graph replay.  Any capture failure falls back to eager."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __call__(self, WT, Hinv1, d, pruned, scale, ErrT, pattern: Pattern) -> None:
        key = (tuple(WT.shape), pattern)
        if not self.failed and key not in self.graphs:
            try:
                self.graphs[key] = self._capture(WT.shape, pattern)
            except RuntimeError as error:  # pragma: no cover - depends on the CUDA runtime
                print(f"CUDA graph capture failed ({error}); running the SparseGPT sweep eagerly")
                self.failed = True
        if self.failed:
            return column_sweep(WT, Hinv1, d, pruned, scale, ErrT, pattern)
        graph, buffers = self.graphs[key]
        for static, value in zip(buffers[:5], (WT, Hinv1, d, pruned, scale)):
            static.copy_(value)
        graph.replay()
        WT.copy_(buffers[0])
        pruned.copy_(buffers[3])
        ErrT.copy_(buffers[5])

    def _capture(self, shape, pattern: Pattern):
        count, rows = shape
        zeros = lambda *size, dtype=torch.float32: torch.zeros(*size, dtype=dtype, device=self.device)  # noqa: E731
        buffers = (zeros(count, rows), torch.eye(count, device=self.device), torch.ones(count, device=self.device),
                   zeros(count, rows, dtype=torch.bool), zeros(count, rows), zeros(count, rows))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            column_sweep(*buffers, pattern)  # capture wants a warmed-up side stream
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            column_sweep(*buffers, pattern)
        return graph, buffers


def outlier_ratio(weights: list[torch.Tensor], sq_norms: list[torch.Tensor], m: float) -> float:
    """OWL's layer statistic: the fraction of Wanda scores |W_ij|·‖X_j‖ above `m` times the
    layer's mean score, over all of one decoder layer's linears ((out, in) weights, their inputs' ‖X_j‖²)."""
    scores = torch.cat([(w.detach().abs().float() * n.sqrt().unsqueeze(0)).flatten() for w, n in zip(weights, sq_norms)])
    return float((scores > m * scores.mean()).float().mean())


def owl_densities(ratios: list[float], sizes: list[int], density: float, lam: float,
                  floor: float = 1e-3, ceiling: list[float] | None = None) -> list[float]:
    """OWL (Yin et al., 2023): per-layer densities that rise with the layer's outlier ratio, spread
    over a band of width 2·`lam` and shifted so that their mean weighted by the layer sizes is
    exactly `density`; clipped to [floor, ceiling] (`ceiling`: one bound per layer, default 1) with
    the difference spread over the unclipped layers.  A model pruned before (an iterative stage)
    passes its layers' densities as `ceiling`: pruning can only remove weights, so a layer asked
    for more than it holds would keep less and the mean would miss `density`."""
    ratio = torch.tensor(ratios, dtype=torch.float64)
    weight = torch.tensor(sizes, dtype=torch.float64)
    top = torch.ones_like(ratio) if ceiling is None else torch.tensor(ceiling, dtype=torch.float64).clamp(max=1.0)
    held = float((top * weight).sum() / weight.sum())
    if held < density - 1e-12:
        raise ValueError(f"the layers hold a mean density of {held:.4g}, below the requested {density:g}: "
                         "pruning cannot add weights back")
    spread = ratio.max() - ratio.min()
    scaled = (ratio - ratio.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratio)
    values = scaled - (scaled * weight).sum() / weight.sum() + density
    for _ in range(100):
        values = torch.minimum(values.clamp(min=floor), top)
        error = density - float((values * weight).sum() / weight.sum())
        free = (values > floor) & (values < top)
        if abs(error) < 1e-12 or not bool(free.any()):
            break
        values[free] += error * weight.sum() / weight[free].sum()
    return values.tolist()


class InputStats:
    """Statistics of one linear input: the Hessian X^T X (SparseGPT) or ‖X_j‖² (Wanda).
    add_batch → prune → free, as in the reference implementation."""

    def __init__(self, columns: int, device: torch.device, hessian: bool):
        self.tokens = 0
        self.hessian = torch.zeros(columns, columns, device=device) if hessian else None
        self.sq_norm = torch.zeros(columns, device=device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # (tokens, columns)
        new = x.shape[0]
        # Running means keep the sums in a sane range over hundreds of thousands of tokens.
        ratio = self.tokens / (self.tokens + new)
        self.tokens += new
        self.sq_norm.mul_(ratio).add_(x.square().sum(0) / self.tokens)
        if self.hessian is not None:
            x = x * math.sqrt(2 / self.tokens)
            with full_fp32_matmul():  # the layer forward may run in TF32; the Hessian may not
                self.hessian.mul_(ratio).addmm_(x.t(), x)

    def free(self) -> None:
        self.hessian = self.sq_norm = None


