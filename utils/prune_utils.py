"""One-shot pruning: pure mask methods + a sequential layer-wise calibration driver.

    calibration = calibration_windows(ids, nsamples=128, length=2048, seed=0)
    report = prune_model(model, "sparsegpt", density=0.5, calibration=calibration, device="cuda")
    report = prune_model(model, "wanda", density=0.5, pattern=(2, 4), ...)   # keep 2 of every 4

Methods are functions of tensors (a weight and its input statistics → a pruned weight and a keep
mask); the driver owns hooks and devices.  Each decoder layer is calibrated on the outputs of
the already-pruned layers before it, and only that layer sits on the accelerator.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .logging_utils import Progress
from .model_utils import find_decoder_layers, find_linears

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


def _nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive columns in each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def magnitude_keep(weight: torch.Tensor, density: float, pattern: Pattern = None) -> torch.Tensor:
    """Keep the largest |w|: per matrix (unstructured) or per group of m (N:M)."""
    score = weight.detach().abs().float()
    if pattern:
        return _nm_keep(score, *pattern)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    count = _prune_count(score.numel(), density)
    if count:
        keep[score.flatten().topk(count, largest=False).indices] = False
    return keep.view_as(score)


def wanda_keep(weight: torch.Tensor, input_sq_norm: torch.Tensor, density: float,
               pattern: Pattern = None) -> torch.Tensor:
    """Wanda: score |W_ij|·‖X_j‖₂, ranked within each output row (or each group of m)."""
    score = weight.detach().abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)
    if pattern:
        return _nm_keep(score, *pattern)
    count = _prune_count(score.shape[1], density)
    keep = torch.ones_like(score, dtype=torch.bool)
    if count:
        keep.scatter_(1, score.topk(count, dim=1, largest=False).indices, False)
    return keep


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, density: float, pattern: Pattern = None,
                    row_splits: list[int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01, sweep: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune column blocks with an adaptive mask and
    compensate the error in the columns not yet processed.

    weight: (rows, cols), several matrices that share one input may be stacked by rows;
    `row_splits` gives their row counts so the unstructured mask is chosen per matrix.
    `sweep` runs the column loop of one block (default: `column_sweep`, eagerly).
    Returns (pruned weight in float32 with exact zeros, keep mask).
    """
    rows, cols = weight.shape
    row_splits = row_splits or [rows]
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    prune_fraction = 1 - density
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
            for size in row_splits:
                part = score[:, start:start + size]
                count = int(round(part.numel() * prune_fraction))
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


METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass
class PruneReport:
    method: str
    density: float
    pattern: Pattern
    seconds: float = 0.0
    layer_density: dict[str, float] = field(default_factory=dict)


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first decoder layer and records what the model passes it."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.layer = layer
        self.store = store

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)  # attributes the model reads off its layers

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        raise _StopForward


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calibration: torch.Tensor, device: torch.device,
                         batch_size: int) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Run the model up to its first decoder layer; return (hidden, args, kwargs) per batch.

    Only the modules outside the decoder layers go to `device`, so the whole model never has to."""
    prefix, layers = find_decoder_layers(model)
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    store: list = []
    home = next(model.parameters()).device
    setattr(parent, attr, nn.ModuleList([_Catcher(layers[0], store)]))
    try:
        model.to(device)
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        model.to(home)
        setattr(parent, attr, layers)
    return store


def _group_by_input(layer: nn.Module, linears: dict[str, nn.Linear], first: tuple) -> list[list[str]]:
    """Linears fed the very same tensor (q/k/v, gate/up) share one set of input statistics."""
    # Holding the input tensors themselves (not their addresses, which the allocator reuses)
    # keeps identity checks honest for the length of this one forward.
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returning a value would replace the output
            seen.setdefault(name, inputs[0])
        return hook

    handles = [linear.register_forward_hook(record(name)) for name, linear in linears.items()]
    try:
        hidden, args, kwargs = first
        layer(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in linears:
        for group in groups:
            if name in seen and seen.get(group[0]) is seen[name]:
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


@torch.no_grad()
def _prune_layer(layer: nn.Module, method: str, density: float, pattern: Pattern,
                 inputs: list[tuple[torch.Tensor, tuple, dict]], blocksize: int, percdamp: float,
                 sweep: Callable | None = None) -> None:
    linears = find_linears(layer)
    if method == "magnitude":
        for linear in linears.values():
            keep = magnitude_keep(linear.weight, density, pattern)
            linear.weight.masked_fill_(~keep, 0.0)
        return
    groups = _group_by_input(layer, linears, inputs[0])
    device = next(layer.parameters()).device
    stats = {group[0]: InputStats(linears[group[0]].in_features, device, hessian=method == "sparsegpt")
             for group in groups}
    handles = [linears[leader].register_forward_hook(lambda mod, inp, out, s=stat: s.add_batch(inp[0]))
               for leader, stat in stats.items()]
    try:
        for hidden, args, kwargs in inputs:
            layer(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for group in groups:
        stat = stats[group[0]]
        weights = [linears[name].weight for name in group]
        if method == "wanda":
            for weight in weights:
                weight.masked_fill_(~wanda_keep(weight, stat.sq_norm, density, pattern), 0.0)
        else:
            stacked = torch.cat([w.float() for w in weights])
            pruned, _ = sparsegpt_prune(stacked, stat.hessian, density, pattern,
                                        row_splits=[w.shape[0] for w in weights],
                                        blocksize=blocksize, percdamp=percdamp, sweep=sweep)
            for weight, part in zip(weights, pruned.split([w.shape[0] for w in weights])):
                weight.copy_(part.to(weight.dtype))
        stat.free()


@torch.no_grad()
def prune_model(model: nn.Module, method: str, density: float, pattern: Pattern = None,
                calibration: torch.Tensor | None = None, device: str | torch.device = "cpu",
                batch_size: int = 8, blocksize: int = 128, percdamp: float = 0.01,
                progress: bool = True, on_layer: Callable[[int, int], None] | None = None,
                cuda_graphs: bool = True) -> PruneReport:
    """Prune every linear of every decoder layer in place (embeddings and LM head untouched)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method '{method}'; choose from {', '.join(METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    device = torch.device(device)
    start = time.perf_counter()
    prefix, layers = find_decoder_layers(model)
    report = PruneReport(method, density, pattern)
    if density == 1 and pattern is None:
        return report
    with float32_matmul_precision("high"):  # float32 layer forwards in TF32, as fast as the papers' fp16
        sweep = GraphedSweeps(device) if cuda_graphs and device.type == "cuda" and method == "sparsegpt" else None
        _prune_layers(model, prefix, layers, method, density, pattern, calibration, device, batch_size,
                      blocksize, percdamp, progress, on_layer, report, sweep)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    return report


def _prune_layers(model, prefix, layers, method, density, pattern, calibration, device, batch_size, blocksize,
                  percdamp, progress, on_layer, report, sweep) -> None:
    inputs = None
    if method != "magnitude":
        if calibration is None:
            raise ValueError(f"{method} needs calibration data")
        inputs = capture_layer_inputs(model, calibration, device, batch_size)
    with Progress(len(layers), f"Pruning ({method})", enabled=progress) as bar:
        for index, layer in enumerate(layers):
            home = next(layer.parameters()).device
            layer.to(device)
            _prune_layer(layer, method, density, pattern, inputs or [], blocksize, percdamp, sweep)
            if inputs is not None and index + 1 < len(layers):
                # The next layer sees what this pruned layer really produces.
                inputs = [(_layer_output(layer(h, *a, **k)), a, k) for h, a, k in inputs]
            weights = [lin.weight for lin in find_linears(layer).values()]
            report.layer_density[f"{prefix}.{index}"] = (
                sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights))
            layer.to(home)
            bar.update(1)
            if on_layer:
                on_layer(index, len(layers))
