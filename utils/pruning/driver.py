"""The layer-wise pruning driver: hooks, devices and calibration around the methods of methods.py.

    calibration = calibration_windows(ids, nsamples=128, length=2048, seed=0)
    report = prune_model(model, "sparsegpt", density=0.5, calibration=calibration, device="cuda")
    report = prune_model(model, "wanda", density=0.5, pattern=(2, 4), ...)   # keep 2 of every 4

Methods are functions of tensors (methods.py, with the math in criteria.py); the driver owns
hooks and devices.  Each decoder layer is calibrated on the outputs of
the already-pruned layers before it, and only that layer sits on the accelerator.  With options'
`sequential=False` (a gradual Wanda update: methods.py's `updates_at_once`) every layer calibrates
on the model as it stands instead: one forward of each layer gives its statistics and the next
layer's inputs (for a change of a few weights in a hundred, half the forwards: no second pass).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from utils.io.events import Progress
from utils.models.hub import ModelError
from utils.models.sparsity import nonzero_counts
from utils.models.structure import find_decoder_layers, find_linears, in_features, prunable_linears, weight_matrix
from utils.pruning.criteria import InputStats, Pattern, float32_matmul_precision, outlier_ratio, owl_densities
from utils.pruning.methods import METHODS, MethodOptions, PruningMethod


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


@torch.no_grad()
def _input_stats(layer: nn.Module, linears: dict[str, nn.Module], inputs: list[tuple[torch.Tensor, tuple, dict]],
                 hessian: bool, keep_outputs: bool = False
                 ) -> tuple[dict[str, InputStats], list[list[str]], list[tuple[torch.Tensor, tuple, dict]] | None]:
    """Run `layer` over `inputs` with every linear of `linears` recording its input statistics.  A
    linear fed the very tensor an earlier one got in the same forward (q/k/v, gate/up) shares that
    one's statistics and adds nothing.  Returns the statistics by linear (one object a group), the
    groups, and with `keep_outputs` the layer's outputs as the next layer's inputs (not kept
    otherwise: they are as large as all the calibration activations)."""
    device = next(layer.parameters()).device
    stats: dict[str, InputStats] = {}
    leaders: dict[str, str] = {}
    # this forward's inputs by the linear that took each first: the tensors themselves, held for one
    # forward (their addresses would not do: the allocator reuses them)
    seen: list[tuple[torch.Tensor, str]] = []

    def record(name: str, linear: nn.Module):
        def hook(module, inp, output) -> None:  # returning a value would replace the output
            leader = leaders.get(name)
            if leader is None:  # the first forward: the earlier linear fed this very tensor, if any
                leader = leaders[name] = next((owner for tensor, owner in seen if tensor is inp[0]), name)
            if leader == name:
                seen.append((inp[0], name))
                stats.setdefault(name, InputStats(in_features(linear), device, hessian=hessian)).add_batch(inp[0])
        return hook

    handles = [linear.register_forward_hook(record(name, linear)) for name, linear in linears.items()]
    try:
        outputs = [] if keep_outputs else None
        for hidden, args, kwargs in inputs:
            output = layer(hidden, *args, **kwargs)
            seen.clear()
            if keep_outputs:
                outputs.append((_layer_output(output), args, kwargs))
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, list[str]] = {}
    for name, linear in linears.items():
        leader = leaders.get(name, name)
        if leader not in stats:  # a linear no input reached: the statistics of nothing, all zero
            stats[leader] = InputStats(in_features(linear), device, hessian=hessian)
        stats[name] = stats[leader]
        groups.setdefault(leader, []).append(name)
    return stats, list(groups.values()), outputs


@torch.no_grad()
def _prune_layer(layer: nn.Module, job: "_Job", density: float, inputs: list[tuple[torch.Tensor, tuple, dict]],
                 keep_outputs: bool) -> list | None:
    """Prune one layer in place.  Not `sequential` (and `keep_outputs`): returns the layer's outputs
    from the forward that collected its statistics, before this prune; else None."""
    linears = find_linears(layer)
    method = job.method
    if not method.calibrated:  # no activations: every matrix on its own
        for linear in linears.values():
            method.prune([weight_matrix(linear)], None, density, job.pattern, job.options, job.sweep)
        return None
    # not sequential: the outputs of the forward that gathered the statistics feed the next layer
    stats, groups, outputs = _input_stats(layer, linears, inputs, hessian=method.hessian,
                                          keep_outputs=keep_outputs and not job.options.sequential)
    for group in groups:
        stat = stats[group[0]]
        method.prune([weight_matrix(linears[name]) for name in group], stat, density, job.pattern,  # (out, in) views
                     job.options, job.sweep)
        stat.free()
    return outputs


def check_feasible_density(model: nn.Module, density: float, pattern: Pattern = None) -> None:
    """Refuse, before any work, a density so small that some decoder linear would keep no weight
    at all, or an N:M pattern whose M does not divide a linear's input width."""
    linears = prunable_linears(model)
    if pattern:
        odd = {name: in_features(linear) for name, linear in linears.items() if in_features(linear) % pattern[1]}
        if odd:
            name, width = next(iter(odd.items()))
            raise ModelError(f"--pattern {pattern[0]}:{pattern[1]} needs input widths that are multiples of "
                             f"{pattern[1]}; {name} has {width} inputs (e.g. use 2:4)")
        return
    if density >= 1:
        return
    sizes = {name: linear.weight.numel() for name, linear in linears.items()}
    name, smallest = min(sizes.items(), key=lambda item: item[1])
    if round(smallest * density) < 1:
        raise ModelError(f"--sparsity {density:g} keeps no weight of {name} ({smallest:,} weights); the smallest "
                         f"density that keeps one weight in every layer is {1 / smallest:.2g}")


def density_tolerance(model: nn.Module) -> float:
    """How far a pruned model's measured density may sit from the requested one by rounding alone:
    row-wise methods keep a whole number of weights per row (1 / the narrowest input width)."""
    return max(1e-3, 1.0 / min(in_features(linear) for linear in prunable_linears(model).values()))


@torch.no_grad()
def owl_profile(model: nn.Module, calibration: torch.Tensor, density: float, lam: float = 0.08, m: float = 5.0,
                device: str | torch.device = "cpu", batch_size: int = 8, ceiling: list[float] | None = None) -> list[float]:
    """Per-layer densities by OWL from the model's activation outliers (one calibration pass,
    layer by layer, nothing pruned): their parameter-weighted mean is exactly `density`.  A model
    pruned before passes its layers' densities as `ceiling` (no layer is asked for more than it holds)."""
    device = torch.device(device)
    _, layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, calibration, device, batch_size)
    ratios, sizes = [], []
    with float32_matmul_precision("high"):
        for layer in layers:
            home = next(layer.parameters()).device
            layer.to(device)
            linears = find_linears(layer)
            stats, _, inputs = _input_stats(layer, linears, inputs, hessian=False, keep_outputs=True)
            ratios.append(outlier_ratio([weight_matrix(linears[n]) for n in linears], [stats[n].sq_norm for n in linears], m))
            sizes.append(sum(weight_matrix(linear).numel() for linear in linears.values()))
            layer.to(home)
    return owl_densities(ratios, sizes, density, lam, ceiling=ceiling)


@dataclass
class _Job:
    """One prune_model call: the method's entry and options, the pattern, and where layers run."""
    method: PruningMethod
    pattern: Pattern
    options: MethodOptions
    device: torch.device
    sweep: Callable | None


@torch.no_grad()
def prune_model(model: nn.Module, method: str, density: float | list[float], pattern: Pattern = None,
                calibration: torch.Tensor | None = None, device: str | torch.device = "cpu", *,
                options: MethodOptions | None = None, progress: bool = True) -> PruneReport:
    """Prune every linear of every decoder layer in place (embeddings and LM head untouched).
    `density`: one for every layer, or a profile with one per decoder layer (e.g. `owl_profile`);
    `options`: the method's own (METHODS[method].options), its defaults when None (with
    `keep_zeros`, the weights zero already stay zero)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method '{method}'; choose from {', '.join(METHODS)}")
    entry = METHODS[method]
    options = options if options is not None else entry.options()
    device = torch.device(device)
    start = time.perf_counter()
    prefix, layers = find_decoder_layers(model)
    profile = list(density) if isinstance(density, (list, tuple)) else [density] * len(layers)
    if len(profile) != len(layers) or not all(0 < d <= 1 for d in profile):
        raise ValueError(f"density must be in (0, 1], one value or one per decoder layer ({len(layers)}); "
                         f"got {density}")
    report = PruneReport(method, sum(profile) / len(profile), pattern)
    if all(d == 1 for d in profile) and pattern is None:
        return report
    with float32_matmul_precision("high"):  # float32 layer forwards in TF32, as fast as the papers' fp16
        job = _Job(entry, pattern, options, device, entry.sweeper(device, options) if entry.sweeper else None)
        inputs = None
        if entry.calibrated:
            if calibration is None:
                raise ValueError(f"{method} needs calibration data")
            inputs = capture_layer_inputs(model, calibration, device, options.batch_size)
        with Progress(len(layers), f"Pruning ({method})", enabled=progress, unit="layers") as bar:
            for index, layer in enumerate(layers):
                inputs = _prune_in_turn(layer, job, profile[index], inputs, last=index + 1 == len(layers))
                bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.seconds = time.perf_counter() - start
    groups = [[linear.weight for linear in find_linears(layer).values()] for layer in layers]
    report.layer_density = {f"{prefix}.{index}": nonzeros / sum(w.numel() for w in weights)
                            for index, (nonzeros, weights) in enumerate(zip(nonzero_counts(groups), groups))}
    return report


def _prune_in_turn(layer: nn.Module, job: _Job, density: float, inputs: list | None, last: bool) -> list | None:
    """Prune one decoder layer on the accelerator; returns the next layer's inputs: what this
    pruned layer really produces (not `sequential`: what it produced before this prune; None without
    calibration, or after the last layer)."""
    home = next(layer.parameters()).device
    layer.to(job.device)
    more = inputs is not None and not last
    outputs = _prune_layer(layer, job, density, inputs or [], keep_outputs=more)
    # Under autocast (a schedule's prune runs in training's precision) a float32 weight's
    # low-precision copy is cached until the autocast region ends: without this, the forwards after
    # this prune, the driver's own and the caller's, would still multiply by the weights before it.
    torch.clear_autocast_cache()
    if more:
        inputs = outputs if outputs is not None else [(_layer_output(layer(h, *a, **k)), a, k) for h, a, k in inputs]
    layer.to(home)
    return inputs
