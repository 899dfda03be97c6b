"""Sparse decode kernels on the GPU (issue 24): utils/export/sparse_linear.py against dense bf16 cuBLAS.

    python benchmarks/bench_decode.py sweep                 # kernel vs reference, torch.compile, launch tuning
    python benchmarks/bench_decode.py full                  # + the tables: linears, break-even rule, whole model
    python benchmarks/bench_decode.py full --smol M.gguf --text wiki.txt --two-four
    python benchmarks/bench_decode.py smol --smol M.gguf --text wiki.txt   # only SmolLM2's perplexity, default rule
    python benchmarks/bench_decode.py fit                   # col16 over 6 densities: fixed part + bandwidth
    python benchmarks/bench_decode.py pdl                   # programmatic dependent launch, q,k,v in one call
    python benchmarks/bench_decode.py rows                  # block heights x launches (persistent grids): the floor
    python benchmarks/bench_decode.py pdl --compile-model   # + the whole model's decode through torch.compile
    python benchmarks/bench_decode.py pdl --model-only --compile-model --shapes opt-6.7b   # the model rows alone
    python benchmarks/bench_decode.py memory --device cpu   # the weights' bytes only (no GPU needed)
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py check --device cpu   # kernels in Triton's interpreter

Shapes: opt-1.3b (hidden 2048, ffn 8192, 24 layers) and opt-6.7b (4096, 16384, 32), random weights
magnitude-pruned per matrix to each density. Every time is the median of CUDA-graph replays:
- "linears": one decoder layer's six linears (q, k, v, o, fc1, fc2, with bias) at M rows, called in
  turn on COPIES distinct copies of the weights so that they come from memory, not the 50 MB L2;
- "model": one greedy decode step of OPTForCausalLM (bf16, static KV cache, the step's mask,
  positions and argmax inside the graph), or the prefill of 2048 tokens (eager, no cache).
The kernel is checked against the float64 reference of the same layout (max relative error).
Nothing here asserts a time. Imports nothing of the project but utils.export.sparse_linear (and bitmask).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.export.sparse_layout import EllMatrix, SparseRule, pack, reference_linear, unpack  # noqa: E402
from utils.export.siblings import stack_siblings  # noqa: E402
from utils.export.sparse_linear import SparseLinear, sparse_linear, to_sparse_linears  # noqa: E402


def _kernels():
    """utils/export/triton_kernels.py (it imports Triton: GPU phases only)."""
    import utils.export.triton_kernels as kernels
    return kernels

LAYOUTS = ("col16", "delta8", "bitmask")

SHAPES = {"opt-1.3b": (2048, 8192, 24, 32), "opt-6.7b": (4096, 16384, 32, 32)}  # hidden, ffn, layers, heads
COPIES = {"opt-1.3b": 16, "opt-6.7b": 4}  # distinct weight copies timed in a row: far more bytes than the L2
OUT = Path(os.environ.get("OUT", "/tmp"))
DEVICE = "cuda"
BF16, FP32 = torch.bfloat16, torch.float32
CHECK_CASES = [((300, 1000), 0.02, BF16), ((4096, 4096), 0.1, BF16), ((2048, 8192), 0.3, BF16),
               ((8192, 2048), 0.5, BF16), ((1000, 40000), 0.1, BF16), ((1000, 3000), 0.3, FP32)]
INTERPRETER_CASES = [((40, 300), 0.1, BF16), ((64, 1000), 0.5, BF16), ((17, 513), 0.02, BF16), ((33, 600), 0.9, BF16),
                     ((40, 300), 0.1, FP32), ((64, 1000), 0.5, FP32)]  # `check --device cpu`
TOLERANCE = {BF16: 1e-2, FP32: 1e-5}  # max |y - ref| / max |ref|: one bf16 ulp (2^-7) and some; fp32 sums
CHAIN_TOLERANCE = 5e-2  # six bf16 roundings in a row (check_pdl_chain)
RESULTS: dict = {}


def log(*parts):
    print(*parts, flush=True)


# --------------------------------------------------------------------------- measuring

def graph_seconds(fn, replays: int = 20, repeats: int = 7) -> float:
    """Median seconds of one fn() as replays of a captured CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    del graph
    return statistics.median(times)


def eager_seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    source = torch.randint(0, 255, (int(gib * 2 ** 30),), dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    seconds = eager_seconds(lambda: target.copy_(source), repeats=10)
    return 2 * gib * 2 ** 30 / seconds


def magnitude_prune(weight: torch.Tensor, density: float) -> torch.Tensor:
    """The weight with all but its `density` largest magnitudes set to zero."""
    if density >= 1.0:
        return weight
    keep = max(1, round(density * weight.numel()))
    threshold = weight.abs().flatten().float().kthvalue(weight.numel() - keep + 1).values
    return weight * (weight.abs() >= threshold)


def clone_packed(packed: EllMatrix) -> EllMatrix:
    return EllMatrix(packed.values.clone(), packed.index.clone(), packed.block_ptr.clone(), packed.shape,
                     packed.encoding, packed.rows_per_block, packed.nnz)


def layer_shapes(name: str) -> list[tuple[int, int]]:
    hidden, ffn = SHAPES[name][:2]
    return [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]  # (out, in): q, k, v, o, fc1, fc2


# --------------------------------------------------------------------------- correctness

def relative_errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |y - ref| / max |ref|, ||y - ref|| / ||ref||); NaN anywhere gives inf."""
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return math.inf, math.inf
    diff = (y - ref).abs()
    return float(diff.max() / ref.abs().max()), float(diff.norm() / ref.norm())


@torch.no_grad()
def check_kernels() -> list[str]:
    """Kernel and scatter against the float64 reference on random inputs (seeded); the cases that failed
    (RESULTS["max_rel_err"]: the worst max relative error). On the CPU (`check --device cpu` with
    TRITON_INTERPRET=1): small cases through Triton's interpreter (its popcount and fp32 tl.dot: the
    compiled tensor-core path runs on the GPU only)."""
    torch.manual_seed(0)
    worst, failed = 0.0, []
    # the rule's block height on the GPU; 8 in the interpreter, which runs each program in Python (every
    # height is checked there by tests/test_sparse_linear.py's rows test)
    height = SparseRule().rows_per_block if DEVICE == "cuda" else 8
    log("\n## kernel vs float64 reference (fresh inputs; output poisoned with NaN before each call)")
    for (rows, cols), density, dtype in CHECK_CASES if DEVICE == "cuda" else INTERPRETER_CASES:
        weight = magnitude_prune(torch.randn(rows, cols, device=DEVICE), density).to(dtype)
        bias = torch.randn(rows, device=DEVICE).to(dtype)
        for encoding in LAYOUTS:
            packed = pack(weight, encoding, height)
            poisoned = torch.full_like(weight, float("nan"))  # every entry written (bitmask) or zeroed first (ELL)
            scatter_exact = (torch.equal(_kernels().kernel_unpack(packed, out=poisoned), weight)
                             and torch.equal(unpack(packed), weight))
            errors = []
            for m in (1, 3, 16, 17, 64):
                x = torch.randn(m, cols, device=DEVICE).to(dtype)
                out = torch.full((m, rows), float("nan"), device=DEVICE, dtype=dtype)
                y = _kernels().kernel_linear(x, packed, bias, out=out)
                ref = reference_linear(x, packed, bias, accumulate=torch.float64, round_to_input=False)
                errors.append(relative_errors(y, ref))
            materialized = sparse_linear(x, packed, bias, max_rows=16)  # 64 rows: the dense temporary
            errors.append(relative_errors(materialized, ref))
            worst_max = max(e[0] for e in errors)
            worst = max(worst, worst_max)
            name = f"{rows:>6} x {cols:<6} density {density:<4} {str(dtype)[6:]:8} {encoding:6}"
            log(f"{name} | max rel err {worst_max:.2e} | norm rel err {max(e[1] for e in errors):.2e} | "
                f"scatter/unpack exact {scatter_exact} (M = 1, 3, 16, 17, 64 kernel; 64 "
                f"{'materialized' if DEVICE == 'cuda' else 'reference'})")
            if not (scatter_exact and worst_max <= TOLERANCE[dtype]):  # a NaN or inf error fails too
                failed.append(" ".join(name.split()))
    RESULTS["max_rel_err"] = worst
    if DEVICE != "cuda":
        return failed
    # graph capture: new inputs copied into the captured buffers give the new outputs
    weight = magnitude_prune(torch.randn(4096, 4096, device=DEVICE), 0.1).bfloat16()
    packed = pack(weight)
    static = {m: torch.randn(m, 4096, device=DEVICE).bfloat16() for m in (1, 16, 100)}
    outputs = {}
    graph = torch.cuda.CUDAGraph()
    for m, x in static.items():  # warm up (compiles)
        sparse_linear(x, packed, None, 16)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for m, x in static.items():
            outputs[m] = sparse_linear(x, packed, None, 16)
    graph_errors = []
    for _ in range(2):
        for x in static.values():
            x.copy_(torch.randn_like(x))
        graph.replay()
        for m, x in static.items():
            graph_errors.append(relative_errors(outputs[m], x.double() @ weight.double().T)[0])
    log(f"CUDA graph replay with fresh inputs (M = 1, 16 kernel; 100 materialized): max rel err {max(graph_errors):.2e}")
    RESULTS["max_rel_err"] = max(worst, max(graph_errors))
    if not max(graph_errors) <= TOLERANCE[BF16]:
        failed.append("CUDA graph replay")
    return failed


@torch.no_grad()
def check_compile() -> None:
    """torch.compile (inductor, CUDA graphs through mode reduce-overhead, no graph break) of two SparseLinears."""
    first, second = (magnitude_prune(torch.randn(out, inp, device=DEVICE), 0.1).bfloat16()
                     for out, inp in ((1024, 512), (512, 1024)))
    module = torch.nn.Sequential(SparseLinear(pack(first)), torch.nn.ReLU(), SparseLinear(pack(second)))
    started = time.time()
    try:
        compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
        errors = []
        for m in (1, 16, 64, 1, 16):
            x = torch.randn(m, 512, device=DEVICE).bfloat16()
            expected = (torch.relu(x.double() @ first.double().T).bfloat16().double() @ second.double().T)
            errors.append(relative_errors(compiled(x), expected)[0])
        log(f"torch.compile(mode='reduce-overhead', fullgraph=True): M = 1, 16, 64, 1, 16 max rel err {max(errors):.2e} "
            f"({time.time() - started:.0f} s with compilation)")
    except Exception as error:  # noqa: BLE001 - recorded, the run goes on
        log(f"torch.compile failed: {type(error).__name__}: {error}"[:800])


# --------------------------------------------------------------------------- the linears alone

@torch.no_grad()
def build_layer(name: str, density: float, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    return [(magnitude_prune(torch.randn(out, inp, device=DEVICE), density).bfloat16(),
             torch.randn(out, device=DEVICE).bfloat16() * 0.01) for out, inp in layer_shapes(name)]


@torch.no_grad()
def time_linears(name: str, layer, layout: str, m: int, rows_per_block: int = SparseRule().rows_per_block,
                 launch=None, path: str = "kernel", columns: str = "real") -> dict:
    """Per-layer seconds of the six linears at M rows; layout 'dense' or an encoding; `path` "kernel" or
    "materialize" (the dense temporary + cuBLAS); `columns`: the packed columns as they are, or replaced
    (`with_columns`, the gathers diagnostic)."""
    copies = COPIES[name]
    inputs = [torch.randn(m, w.shape[1], device=DEVICE).bfloat16() for w, _ in layer]
    if layout == "dense":
        weights = [[(w.clone(), b.clone()) for w, b in layer] for _ in range(copies)]
        nbytes = sum(w.numel() * 2 for w, _ in layer)

        def run():
            for copy in weights:
                for (w, b), x in zip(copy, inputs):
                    F.linear(x, w, b)
    else:
        packed = [pack(w, layout, rows_per_block) for w, _ in layer]
        packed = packed if columns == "real" else [with_columns(p, columns) for p in packed]
        weights = [[(clone_packed(p), b.clone()) for p, (_, b) in zip(packed, layer)] for _ in range(copies)]
        nbytes = sum(p.nbytes for p in packed)

        def run():
            for copy in weights:
                for (p, b), x in zip(copy, inputs):
                    if path == "kernel":
                        _kernels().kernel_linear(x, p, b, launch=launch)
                    else:
                        F.linear(x, _kernels().kernel_unpack(p), b)
    seconds = graph_seconds(run) / copies
    return {"seconds": seconds, "bytes": nbytes, "bandwidth": nbytes / seconds}


CANDIDATES = {("ell", 1): [(64, 2, False), (128, 2, False), (128, 4, False), (256, 4, False), (512, 8, False),
                          (1024, 8, False),  # ell_matmul, vectorized slots
                          (128, 4, True), (256, 4, True), (512, 8, True), (1024, 8, True)],  # ell_matvec
              ("ell", 16): [(32, 2), (64, 2), (64, 4)],
              ("bitmask", 1): [(4, 2, 2), (8, 4, 2), (8, 4, 3), (16, 4, 2), (16, 8, 3), (32, 8, 2)],
              ("bitmask", 16): [(16, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 8, 3), (128, 8, 2)]}


def tune(args) -> None:
    """The launch parameters of each kernel on the opt-6.7b layer (ELL at density 0.1, bitmask at 0.5);
    the best replace _kernels().LAUNCH for the rest of the run (other block heights: the `rows` phase)."""
    name = "opt-6.7b"
    log(f"\n## launch tuning, {name} layer's six linears (µs per layer, CUDA graph)")
    for density, layouts in ((0.1, ("col16", "delta8", "bitmask")), (0.5, ("bitmask", "delta8"))):
        layer = build_layer(name, density)
        for m in (1, 16):
            dense = time_linears(name, layer, "dense", m)["seconds"]
            for layout in layouts:
                kind = "bitmask" if layout == "bitmask" else "ell"
                cells, best = [], None
                for launch in CANDIDATES[(kind, 1 if m == 1 else 16)]:
                    try:
                        seconds = time_linears(name, layer, layout, m, args.rows_per_block, launch)["seconds"]
                    except Exception as error:  # noqa: BLE001 - a launch the compiler refuses is a cell
                        cells.append(f"{launch}: {type(error).__name__}")
                        continue
                    cells.append(f"{launch}: {seconds * 1e6:.1f}")
                    best = min(best or (seconds, launch), (seconds, launch))
                if best is None:
                    log(f"density {density} M {m} {layout:7}: every launch failed | " + ", ".join(cells))
                    continue
                log(f"density {density} M {m} {layout:7}: dense {dense * 1e6:.1f} | best {best[1]} {best[0] * 1e6:.1f} µs "
                    f"({dense / best[0]:.2f}x) | " + ", ".join(cells))
                if (density == 0.1) == (kind == "ell") and layout != "delta8":
                    _kernels().LAUNCH[(kind, 1 if m == 1 else 16)] = best[1]
        del layer
    log(f"launch parameters used from here on: {_kernels().LAUNCH}")
    RESULTS["launch"] = {str(k): v for k, v in _kernels().LAUNCH.items()}


ROWS_PER_BLOCK = (1, 2, 4, 8, 16, 32)
# the `rows` phase's launches by M: ell_matmul with one program a row block, ell_matvec (spread, M = 1),
# and ell_matmul on a persistent grid of 2, 4 or 8 programs per SM (the fourth entry)
ROWS_LAUNCHES = {1: [(128, 4), (256, 4), (512, 8), (256, 4, True), (128, 4, False, 4), (256, 4, False, 2),
                     (256, 4, False, 4), (256, 4, False, 8)],
                 16: [(32, 2), (64, 2), (64, 2, False, 2), (64, 2, False, 4), (64, 2, False, 8)]}
MAX_TILE = 16384  # rows × slots × inputs of a program's tile: a larger one is not timed (its registers spill;
# on an H100 the 16-input tiles of exactly this size spilled too: 2,873-3,139 µs cells)


def rows_phase(args, bandwidth: float) -> None:
    """`rows`: whether another block height or a persistent grid lowers the per-call floor that keeps
    density 0.1 from 4x. col16 on the opt-6.7b layer at every ROWS_LAUNCHES launch and every rows per
    block, at density 0.1 and at 0.002 (the floor: the programs and their dependent loads are all that
    is left), M = 1 and 16; then the block height whose best M = 1 launch is fastest at 0.1 against the
    default (SparseRule's rows per block, LAUNCH): both fitted over densities (fixed part + bandwidth),
    and the whole model's decode step with each. Into RESULTS["rows"], kept after every line."""
    name = "opt-6.7b"
    table = RESULTS.setdefault("rows", {})
    table["check_max_rel_err"] = error = check_launches()
    log(f"\n## every rows-phase launch at 1, 2, 8 and 32 rows per block against the float64 reference (4000 x "
        f"16384, density 0.1, M = 1, 3 and 16): max rel err {error:.2e} "
        f"({'within' if error <= TOLERANCE[BF16] else 'OVER, the times below time wrong results:'} "
        f"{TOLERANCE[BF16]:g})")
    layers = {"0.1": build_layer(name, 0.1), "0.002": build_layer(name, 0.002)}
    log(f"\n## rows per block x launch, col16, {name} layer's six linears, µs per layer (CUDA graph)")
    for m in (1, 16):
        for label, layer in layers.items():
            table[f"{label} M {m}"] = rows_sweep(name, label, layer, m, ROWS_LAUNCHES[m])
            keep(args.phase)
    chosen = best_rows(table)
    default = {"rows": SparseRule().rows_per_block, **{m: tuple(_kernels().LAUNCH[("ell", m)]) for m in (1, 16)}}
    table["chosen"], table["default"] = chosen, default
    log(f"chosen: {chosen}; default: {default}")
    if chosen is None:
        return
    dense = time_linears(name, build_layer(name, 1.0), "dense", 1)["seconds"]
    for label, config in (("default", default), ("chosen", chosen)):
        points = col16_points(name, (0.5, 0.3, 0.1, 0.05, 0.02), config["rows"], config[1])
        fit = cost_fit(points)
        table[f"fit {label}"] = {"points": points, "fit": fit, "dense": dense}
        log(f"{label} M=1 over densities 0.5, 0.3, 0.1, 0.05, 0.02: "
            + ", ".join(f"{t * 1e6:.1f} µs ({dense / t:.2f}x)" for _, t in points)
            + (f"; fixed {fit[0] * 1e6:.1f} µs a layer + {fit[1] / 1e9:,.0f} GB/s ({fit[1] / bandwidth:.0%} of copy)"
               if fit else ""))
        keep(args.phase)
    rows_model(args, name, {"default": default, "chosen": chosen}, table)


def check_launches() -> float:
    """The worst max relative error of col16 at every ROWS_LAUNCHES launch against the float64 reference
    (a launch that fails counts as inf), on a 4000 x 16384 matrix at density 0.1 (a last block short of
    rows at 32 a block), 1, 2, 8 and 32 rows a block, 1, 3 and 16 rows of x (3: the masked inputs);
    a persistent grid's programs take several blocks each at 1, 2 and 8 rows a block (132 SMs)."""
    torch.manual_seed(0)
    weight = magnitude_prune(torch.randn(4000, 16384, device=DEVICE), 0.1).bfloat16()
    worst = 0.0
    for rows in (1, 2, 8, 32):
        packed = pack(weight, "col16", rows)
        for m in (1, 3, 16):
            x = torch.randn(m, 16384, device=DEVICE).bfloat16()
            ref = reference_linear(x, packed, None, accumulate=torch.float64, round_to_input=False)
            for launch in ROWS_LAUNCHES[1 if m == 1 else 16]:
                try:
                    y = _kernels().kernel_linear(x, packed, None, launch=launch)
                    error = relative_errors(y, ref)[0]
                except Exception as failure:  # noqa: BLE001 - the sweep records it as the cell's error
                    log(f"  {rows} rows per block, M {m}, {launch}: {type(failure).__name__}")
                    error = math.inf
                if not error <= TOLERANCE[BF16]:
                    log(f"  {rows} rows per block, M {m}, {launch}: max rel err {error:.2e} OVER {TOLERANCE[BF16]:g}")
                worst = max(worst, error)
    return worst


def rows_sweep(name: str, label: str, layer, m: int, launches: list) -> dict:
    """col16 at M rows, every launch at every rows per block, µs per layer: {launch: {rows: cell}}."""
    grid = {}
    for launch in launches:
        cells = {rows: rows_cell(name, layer, m, rows, launch) for rows in ROWS_PER_BLOCK}
        grid[str(tuple(launch))] = cells
        log(f"  density {label} M {m} {tuple(launch)}, rows per block (µs): "
            + ", ".join(f"{rows}: {cell}" for rows, cell in cells.items()))
    timed = [(cell, launch, rows) for launch, cells in grid.items() for rows, cell in cells.items()
             if isinstance(cell, float)]
    if timed:
        log(f"  best at density {label} M {m}: %.1f µs, launch %s, %d rows per block" % min(timed))
    return grid


def rows_cell(name: str, layer, m: int, rows: int, launch) -> float | str:
    """col16 with `rows` rows per block at `launch`, µs per layer; a tile past MAX_TILE: "skipped"; a
    launch that fails: its error's name."""
    if rows * launch[0] * min(16, m) > MAX_TILE:
        return "skipped"
    try:
        return round(time_linears(name, layer, "col16", m, rows, launch)["seconds"] * 1e6, 1)
    except Exception as error:  # noqa: BLE001
        return type(error).__name__


def best_rows(table: dict) -> dict | None:
    """The rows per block whose best M = 1 launch is fastest at density 0.1, with that launch and the best
    M = 16 launch at the same height (one layout serves both): {"rows", 1, 16}; None where none was timed."""
    best = {}
    for m in (1, 16):
        for launch, cells in table.get(f"0.1 M {m}", {}).items():
            for rows, cell in cells.items():
                if isinstance(cell, float) and cell < best.get((m, rows), (math.inf,))[0]:
                    best[(m, rows)] = (cell, ast.literal_eval(launch))  # the str() of a launch tuple
    heights = [rows for (m, rows) in best if m == 1 and (16, rows) in best]
    if not heights:
        return None
    rows = min(heights, key=lambda r: best[(1, r)][0])
    return {"rows": rows, 1: best[(1, rows)][1], 16: best[(16, rows)][1]}


@torch.no_grad()
def rows_model(args, name: str, configs: dict, table: dict) -> None:
    """The whole model's greedy decode step (static KV cache, CUDA graph) at batch 1 and 16: dense, then
    density 0.1 under each config's block height and launches."""
    model = opt_model(name)
    linears = decoder_linears(model)
    dense = table["model dense"] = {b: b / decode_seconds(model, b) for b in (1, 16)}
    log(f"\n## whole model {name}, one greedy decode step, tokens/s: dense batch 1 {dense[1]:,.0f}, batch 16 "
        f"{dense[16]:,.0f}")
    for linear in linears.values():
        linear.weight.copy_(magnitude_prune(linear.weight, 0.1))
    launch = dict(_kernels().LAUNCH)
    for label, config in configs.items():
        swapped = to_sparse_linears(model, SparseRule(max_density=1.0, rows_per_block=config["rows"]))
        _kernels().LAUNCH.update({("ell", 1): config[1], ("ell", 16): config[16]})
        try:
            cell = table[f"model {label}"] = {b: b / decode_seconds(model, b) for b in (1, 16)}
        finally:
            _kernels().LAUNCH.update(launch)
        put_back(model, swapped, linears)
        log(f"{name} 0.1 {label} {config}: batch 1 {cell[1]:,.0f} ({cell[1] / dense[1]:.2f}x), batch 16 "
            f"{cell[16]:,.0f} ({cell[16] / dense[16]:.2f}x)")
        keep(args.phase)


def with_columns(packed: EllMatrix, columns: str) -> EllMatrix:
    """A col16 layout of the same bytes and slots whose columns are replaced: "runs" gives a row's slots
    consecutive columns (coalesced gathers), each row its own run (row r starts at r·width: rows do not
    share cache lines more than real ones would); "one" gives every slot column 0 (one address). Its
    results are wrong on purpose: only its time is read (is the kernel bound by its gathers of x?)."""
    index = torch.zeros_like(packed.index)
    if columns == "runs":  # slot s of the block is row s // width's slot s % width: column s, from the block's row
        block_ptr = packed.block_ptr.long()
        width = (block_ptr[1:] - block_ptr[:-1]) // packed.rows_per_block
        slots = width * packed.rows_per_block
        start = block_ptr[:-1].repeat_interleave(slots)
        first_row = (torch.arange(width.numel(), device=index.device) * packed.rows_per_block).repeat_interleave(slots)
        slot = torch.arange(index.numel(), device=index.device) - start
        column = (first_row * width.repeat_interleave(slots) + slot) % packed.shape[1]
        index = (column - (column >= 1 << 15).long() * (1 << 16)).to(index.dtype)
    return EllMatrix(packed.values, index, packed.block_ptr, packed.shape, packed.encoding, packed.rows_per_block,
                     packed.nnz)


@torch.no_grad()
def gathers(args) -> None:
    """col16 at density 0.1, M = 1, on the opt-6.7b layer with its real columns against the same bytes
    gathering x at consecutive columns and at one column: how much of the time the gathers take."""
    name = "opt-6.7b"
    layer = build_layer(name, 0.1)
    cells = [f"{columns} {time_linears(name, layer, 'col16', 1, args.rows_per_block, columns=columns)['seconds'] * 1e6:.1f}"
             for columns in ("real", "runs", "one")]
    log(f"\n## gathers: col16, density 0.1, M = 1, {name} layer, µs (real columns / consecutive / one): "
        + ", ".join(cells))
    RESULTS["gathers"] = cells


# --------------------------------------------------------------------------- the full table

def linears_table(args, bandwidth: float) -> dict:
    log("\n## linears alone: one layer's q, k, v, o, fc1, fc2 (bias), CUDA graph over distinct weight copies;"
        " prefill = 2048 rows through the dense temporary + cuBLAS")
    log("| shape | density | layout | MB/layer | decode M=1 µs (×dense) | GB/s | M=16 µs (×dense) | prefill 2048 µs (×dense) |")
    log("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    for name in args.shapes:
        reference = {}
        for density in (1.0, 0.5, 0.3, 0.1):
            layer = build_layer(name, density)
            for layout in ("dense",) if density == 1.0 else LAYOUTS:
                cells = {m: time_linears(name, layer, layout, m, args.rows_per_block) for m in (1, 16)}
                prefill = time_linears(name, layer, layout, 2048, args.rows_per_block, path="materialize")
                if layout == "dense":
                    reference = {1: cells[1]["seconds"], 16: cells[16]["seconds"], 2048: prefill["seconds"]}
                row = {"mb": cells[1]["bytes"] / 1e6, **{m: c["seconds"] for m, c in cells.items()},
                       "prefill": prefill["seconds"], "bandwidth": cells[1]["bandwidth"]}
                table[f"{name} {density} {layout}"] = row
                log(f"| {name} | {density} | {layout} | {row['mb']:.1f} | {row[1] * 1e6:.1f} "
                    f"({reference[1] / row[1]:.2f}x) | {row['bandwidth'] / 1e9:.0f} | {row[16] * 1e6:.1f} "
                    f"({reference[16] / row[16]:.2f}x) | {row['prefill'] * 1e6:.0f} ({reference[2048] / row['prefill']:.2f}x) |")
            del layer
    log(f"(copy bandwidth {bandwidth / 1e9:.0f} GB/s read + write: a layer's bytes over it is its floor)")
    log("\n## where the time of one row goes: seconds = fixed + bytes / bandwidth, fitted over the densities")
    for name in args.shapes:
        for layout in LAYOUTS:
            rows = [table[key] for key in table if key.startswith(f"{name} ") and key.endswith(f" {layout}")]
            fit = cost_fit([(row["mb"] * 1e6, row[1]) for row in rows]) if len(rows) > 1 else None
            if fit is None:
                log(f"{name} {layout} M=1: not bound by its bytes (its time does not grow with them)")
            else:
                fixed, streaming = fit
                last = rows[-1]  # density 0.1
                log(f"{name} {layout} M=1: {fixed * 1e6:.1f} µs a layer whatever its bytes "
                    f"({fixed / len(layer_shapes(name)) * 1e6:.1f} µs a linear), then {streaming / 1e9:,.0f} GB/s "
                    f"({streaming / bandwidth:.0%} of copy); at density 0.1 the fixed part is "
                    f"{fixed / last[1]:.0%} of {last[1] * 1e6:.1f} µs")
    return table


def fit_table(args, bandwidth: float) -> dict:
    """`fit`: col16 at one row over more densities than the table's, the line through them per shape."""
    log("\n## col16, M=1, one layer's six linears over densities: time = fixed + bytes / bandwidth")
    table = {}
    for name in args.shapes:
        dense = time_linears(name, build_layer(name, 1.0), "dense", 1)
        densities = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
        points = col16_points(name, densities, args.rows_per_block)
        for density, (nbytes, seconds) in zip(densities, points):
            log(f"{name} {density}: {nbytes / 1e6:.1f} MB {seconds * 1e6:.1f} µs "
                f"({dense['seconds'] / seconds:.2f}x dense {dense['seconds'] * 1e6:.1f} µs)")
        fit = cost_fit(points)
        table[name] = {"dense": dense["seconds"], "points": points, "fit": fit}
        if fit is not None:
            fixed, streaming = fit
            residuals = [seconds - fixed - nbytes / streaming for nbytes, seconds in points]
            log(f"{name}: fixed {fixed * 1e6:.1f} µs a layer, {streaming / 1e9:,.0f} GB/s ({streaming / bandwidth:.0%} "
                f"of copy); residuals (µs) {', '.join(f'{r * 1e6:+.1f}' for r in residuals)}")
    log("\n## col16, M=1, one call per matrix shape (8 copies a graph, no bias): the fixed part of a call")
    for out, inp in sorted({shape for name in args.shapes for shape in layer_shapes(name)}):
        points = []
        for density in (0.002, 0.02, 0.1):
            packed = pack(magnitude_prune(torch.randn(out, inp, device=DEVICE), density).bfloat16(), "col16",
                          args.rows_per_block)
            copies, x = [clone_packed(packed) for _ in range(8)], torch.randn(1, inp, device=DEVICE).bfloat16()
            points.append((packed.nbytes, graph_seconds(lambda: [_kernels().kernel_linear(x, c) for c in copies]) / 8))
        fit = cost_fit(points)
        table[f"{out}x{inp}"] = {"points": points, "fit": fit}
        log(f"{out} x {inp}: " + ", ".join(f"{b / 1e6:.2f} MB {t * 1e6:.2f} µs" for b, t in points) +
            (f"; fixed {fit[0] * 1e6:.2f} µs a call, {fit[1] / 1e9:,.0f} GB/s" if fit else "; not bound by its bytes"))
    one = torch.empty(1, device=DEVICE)
    table["empty_kernel"] = graph_seconds(lambda: [one.add_(1) for _ in range(8)]) / 8
    log(f"a one-element kernel, for the floor of a graph node: {table['empty_kernel'] * 1e6:.2f} µs")
    return table


def col16_points(name: str, densities, rows_per_block: int, launch=None) -> list[tuple[float, float]]:
    """(bytes, seconds) of the shape's layer in col16 at one row of x, a point a density (cost_fit's input)."""
    cells = [time_linears(name, build_layer(name, density), "col16", 1, rows_per_block, launch)
             for density in densities]
    return [(cell["bytes"], cell["seconds"]) for cell in cells]


def cost_fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The least-squares line seconds = fixed + bytes / bandwidth through (bytes, seconds) points:
    (fixed seconds, bandwidth in bytes/s), or None where the time does not grow with the bytes (or
    the bytes do not vary). A kernel bound by its bytes has fixed ≈ 0; a large fixed part is a cost
    no byte saved removes (per call or per program: launch, latency, the last wave)."""
    n = len(points)
    mean_bytes = sum(b for b, _ in points) / n
    mean_seconds = sum(s for _, s in points) / n
    spread = sum((b - mean_bytes) ** 2 for b, _ in points)
    slope = sum((b - mean_bytes) * (s - mean_seconds) for b, s in points) / spread if spread else 0.0
    return (mean_seconds - slope * mean_bytes, 1 / slope) if slope > 0 else None


def break_even(args) -> SparseRule:
    """bitmask_above: the density from which the bitmask kernel beats ELL (M = 1); max_density: where the
    better of the two stops beating dense cuBLAS (M = 1); max_rows: up to where the kernel beats the
    dense temporary + cuBLAS."""
    log("\n## break-even (M = 1, then 16, by density: speed-up over dense of col16 / bitmask; by rows: kernel / "
        "materialize µs)")
    ell_below, max_density, max_rows = [], [], []
    for name in args.shapes:
        dense_layer = build_layer(name, 1.0)
        dense, dense16 = (time_linears(name, dense_layer, "dense", m)["seconds"] for m in (1, 16))
        del dense_layer
        cells, cells16, crossing, loses = [], [], None, None
        for density in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            layer = build_layer(name, density)
            ell, ell16 = (time_linears(name, layer, args.ell, m, args.rows_per_block)["seconds"] for m in (1, 16))
            bitmask, bitmask16 = (time_linears(name, layer, "bitmask", m, args.rows_per_block)["seconds"]
                                  for m in (1, 16))
            cells.append(f"{density}: {dense / ell:.2f}/{dense / bitmask:.2f}")
            cells16.append(f"{density}: {dense16 / ell16:.2f}/{dense16 / bitmask16:.2f}")
            if crossing is None and bitmask < ell:
                crossing = density
            if loses is None and min(ell, bitmask) > dense:
                loses = density
            del layer
        ell_below.append(crossing or 1.0)
        max_density.append(round((loses or 0.8) - 0.1, 2))
        log(f"{name}: " + ", ".join(cells))
        log(f"{name} at M = 16 (not in the rule: one layout a matrix): " + ", ".join(cells16))
        for density in (0.1, 0.5):
            layer = build_layer(name, density)
            layout = args.ell if density < min(ell_below) else "bitmask"
            cells, last = [], 0
            for m in (1, 2, 4, 8, 16, 32, 64, 128):
                kernel = time_linears(name, layer, layout, m, args.rows_per_block)["seconds"]
                materialize = time_linears(name, layer, layout, m, args.rows_per_block, path="materialize")["seconds"]
                cells.append(f"M{m}: {kernel * 1e6:.0f}/{materialize * 1e6:.0f}")
                if kernel < materialize and last == m // 2:
                    last = m
            max_rows.append(last)
            log(f"{name} density {density} {layout}: " + ", ".join(cells))
            del layer
    bitmask_above = None if min(ell_below) >= 1.0 else round(min(ell_below) - 0.05, 2)
    rule = SparseRule(max_density=min(max_density), max_rows=min(max_rows), ell_encoding=args.ell,
                      bitmask_above=bitmask_above, rows_per_block=args.rows_per_block)
    log(f"measured rule: {rule}")
    RESULTS["rule"] = rule.__dict__
    return rule


def opt_model(name: str):
    from transformers import OPTConfig, OPTForCausalLM
    hidden, ffn, layers, heads = SHAPES[name]
    config = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                       vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                       do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def put_back(model, swapped: list[str], linears: dict) -> None:
    """The dense linears `to_sparse_linears` swapped out (their names in `swapped`) back in their places."""
    for name in swapped:
        model.set_submodule(name, linears[name])


def decoder_linears(model) -> dict:
    """The model's nn.Linear modules by name, the LM head left out."""
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith("lm_head")}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


@torch.no_grad()
def decode_seconds(model, batch: int, prompt: int = 64, steps: int = 32, compiled=None) -> float:
    """Seconds of one greedy decode step (static KV cache) as CUDA-graph replays; `compiled`: the step
    through this torch.compile'd model instead (its norms, adds and attention fused; no graphs of its own)."""
    from transformers import StaticCache
    max_len = prompt + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
    token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    layers = cache.layers
    positions = torch.arange(max_len, device=DEVICE)

    def step():
        seen = layers[0].cumulative_length  # tokens in the cache = the new token's position
        mask = (positions <= seen).view(1, 1, 1, max_len).expand(batch, 1, 1, max_len)
        runner = model if compiled is None else compiled  # not `or`: bool() of a compiled module asks len()
        out = runner(token, attention_mask=mask, position_ids=seen.clone().view(1, 1).expand(batch, 1),
                     past_key_values=cache, use_cache=True)
        token.copy_(out.logits[:, -1:].argmax(-1))

    def rewind():
        for layer in layers:
            layer.cumulative_length.fill_(prompt)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(steps // 4):
        rewind()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(4):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 4)
    return statistics.median(times)


@torch.no_grad()
def model_table(args, rule: SparseRule, bandwidth: float) -> dict:
    log("\n## whole model: OPTForCausalLM random init bf16; decode = one greedy step, static KV cache, CUDA graph;"
        " prefill = 2048 tokens, batch 1, eager")
    log("| shape | density | kernels | weights GiB (% dense) | decode@1 tok/s (×dense) | decode@16 tok/s (×dense) | prefill tok/s (×dense) |")
    log("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    rows = {}
    for name in args.shapes:
        model = opt_model(name)
        linears = decoder_linears(model)
        ids = torch.randint(0, model.config.vocab_size, (1, 2048), device=DEVICE)
        reference = None
        for density in (1.0, 0.5, 0.3, 0.1):
            for n, linear in linears.items():  # nested magnitude pruning: the same masks as from the dense weights
                linear.weight.copy_(magnitude_prune(linear.weight, density))
            forced = SparseRule(max_density=1.0, max_rows=rule.max_rows, bitmask_above=rule.bitmask_above,
                                ell_encoding=rule.ell_encoding, rows_per_block=rule.rows_per_block)
            swapped = [] if density == 1.0 else to_sparse_linears(model, forced)
            layouts = sorted({model.get_submodule(n).encoding for n in swapped})
            torch.cuda.synchronize()
            row = {"bytes": weight_bytes(model),
                   "decode1": 1 / decode_seconds(model, 1), "decode16": 16 / decode_seconds(model, 16),
                   "prefill": 2048 / eager_seconds(lambda: model(ids, use_cache=False), repeats=3)}
            reference = reference or row
            rows[f"{name} {density}"] = row
            log(f"| {name} | {density} | {'cuBLAS' if density == 1.0 else '+'.join(layouts)} | {row['bytes'] / 2 ** 30:.2f} "
                f"({row['bytes'] / reference['bytes']:.0%}) | {row['decode1']:,.0f} ({row['decode1'] / reference['decode1']:.2f}x) | "
                f"{row['decode16']:,.0f} ({row['decode16'] / reference['decode16']:.2f}x) | "
                f"{row['prefill']:,.0f} ({row['prefill'] / reference['prefill']:.2f}x) |")
            put_back(model, swapped, linears)  # the dense modules for the next density
        log(f"{name}: decode@1 floor at {bandwidth / 1e9:.0f} GB/s: dense {reference['bytes'] / bandwidth * 1e3:.2f} ms/token")
        model = linears = None  # the next shape's model takes its place
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def memory_table(args) -> None:
    """The weights' bytes of the whole OPT model with its decoder linears packed (no time: runs on the CPU
    as well, `--device cpu`): one layer's six matrices packed, times the layers, plus what stays dense
    (embeddings, positions, layer norms, biases; the LM head is tied to the embeddings)."""
    log("\n## weights' memory, whole OPT model (decoder linears packed, the rest dense bf16)")
    log("| shape | density | layout | linears MB/layer | model GiB | % of dense bf16 |")
    log("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in args.shapes:
        hidden, ffn, layers, _ = SHAPES[name]
        linear_weights = sum(out * inp for out, inp in layer_shapes(name))
        # embeddings + positions (2048 + 2) + final norm; per layer two norms and the biases
        other = (50272 + 2050) * hidden + 2 * hidden + layers * (4 * hidden + 5 * hidden + ffn)
        dense = 2 * (other + layers * linear_weights)
        log(f"| {name} | 1.0 | dense | {2 * linear_weights / 1e6:.1f} | {dense / 2 ** 30:.2f} | 100% |")
        for density in (0.5, 0.3, 0.1):
            layer = build_layer(name, density)
            for layout in LAYOUTS:
                per_layer = sum(pack(w, layout, args.rows_per_block).nbytes for w, _ in layer)
                total = 2 * other + layers * per_layer
                log(f"| {name} | {density} | {layout} | {per_layer / 1e6:.1f} | {total / 2 ** 30:.2f} | {total / dense:.1%} |")
            del layer


# --------------------------------------------------------------------------- SmolLM2 and 2:4

@torch.no_grad()
def smol_perplexity(args, rule: SparseRule) -> None:
    """Perplexity of the same bf16 weights through dense cuBLAS and through the sparse kernel at every
    row count. --smol is a compressed export folder (a run's compressed/: the issue's target, a
    recovered model) or a GGUF, magnitude-pruned here to 0.1 (far from a usable model: its perplexity
    is in the millions, so its relative difference says little)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = Path(args.smol)
    forced = SparseRule(max_density=1.0, max_rows=10 ** 9, bitmask_above=rule.bitmask_above,
                        ell_encoding=rule.ell_encoding)
    if source.is_dir():
        from utils.export.compressed import load_compressed
        from utils.export.sparse_model import load_sparse
        log(f"\n## SmolLM2 export {source} (bf16): dense cuBLAS against the sparse kernel at every M")
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = load_compressed(source, dtype=torch.bfloat16).to(DEVICE).eval()
        sparse_model = lambda: load_sparse(source, device=DEVICE, rule=forced, dtype=torch.bfloat16).eval()  # noqa: E731
    else:
        log(f"\n## SmolLM2-135M ({source.name}, dequantized to bf16), decoder linears magnitude-pruned to 0.1")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=torch.bfloat16).to(DEVICE).eval()
        for name, linear in model.named_modules():
            if type(linear) is torch.nn.Linear and not name.endswith("lm_head"):
                linear.weight.copy_(magnitude_prune(linear.weight, 0.1))

        def sparse_model():
            to_sparse_linears(model, forced)
            return model
    ids = tokenizer(Path(args.text).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    window = 512
    windows = ids[: (ids.numel() // window) * window].view(-1, window)[: args.windows].to(DEVICE)

    def perplexity(net) -> float:
        total, count = 0.0, 0
        for chunk in windows.split(8):
            logits = net(chunk).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            count += chunk[:, 1:].numel()
        return math.exp(total / count)

    dense = perplexity(model)
    net = sparse_model()
    swapped = sum(isinstance(module, SparseLinear) for module in net.modules())
    sparse = perplexity(net)
    log(f"{swapped} linears as SparseLinear | {windows.numel():,} tokens in {windows.shape[0]} windows of {window}")
    log(f"perplexity dense kernels {dense:.4f} | sparse kernel {sparse:.4f} | relative difference "
        f"{abs(sparse - dense) / dense:.2e} (target <= 1e-3)")
    RESULTS["smol"] = {"source": str(source), "dense": dense, "sparse": sparse, "tokens": windows.numel()}


def two_four(args, bandwidth: float) -> None:
    """torchao's sm90 paths on 2:4 weights: fp8 dense and fp8 2:4 (CUTLASS) against bf16 dense, linears alone."""
    log("\n## 2:4 on Hopper through torchao (linears alone, same method as above)")
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        log(f"torchao {torchao.__version__}")
    except Exception as error:  # noqa: BLE001 - record exactly what failed
        log(f"torchao import failed: {type(error).__name__}: {error}")
        return

    def fp8_two_four():
        """fp8 weights and activations (rowwise) on 2:4 weights, CUTLASS: torchao 0.17.0 names it a packing
        format of the fp8 config (it has no Float8DynamicActivationFloat8SemiSparseWeightConfig)."""
        try:
            from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                             packing_format=Float8PackingFormat.SPARSE_CUTLASS)
        except (ImportError, AttributeError):  # other versions spell it otherwise: the older config
            from torchao.quantization import Float8DynamicActivationFloat8SemiSparseWeightConfig
            return Float8DynamicActivationFloat8SemiSparseWeightConfig()

    configs = {"bf16 dense": None,
               "fp8 dense (rowwise)": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
               "fp8 2:4 CUTLASS": fp8_two_four}
    for name in args.shapes:
        two_four_shape(name, configs, quantize_)


def two_four_shape(name: str, configs: dict, quantize_) -> None:
    """One shape's rows of `two_four`: each of `configs` (label → torchao config maker, None for bf16
    dense) on 2:4-pruned weights, at 1, 16 and 2048 rows."""
    for label, config in configs.items():
        try:
            copies = COPIES[name]
            modules = []
            for _ in range(copies):
                layer = torch.nn.ModuleList()
                for out, inp in layer_shapes(name):
                    linear = torch.nn.Linear(inp, out, device=DEVICE, dtype=torch.bfloat16)
                    weight = linear.weight.detach().view(out, -1, 4)
                    keep = weight.abs().topk(2, dim=-1).indices
                    mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(-1, keep, True)
                    linear.weight.data = (weight * mask).view(out, inp)
                    layer.append(linear)
                if config is not None:
                    quantize_(layer, config())
                modules.append(layer)
            cells = []
            for m in (1, 16, 2048):
                inputs = [torch.randn(m, inp, device=DEVICE, dtype=torch.bfloat16) for _, inp in layer_shapes(name)]

                def run():
                    for layer in modules:
                        for linear, x in zip(layer, inputs):
                            linear(x)
                try:
                    seconds, how = graph_seconds(run) / copies, "graph"
                except Exception as error:  # noqa: BLE001
                    torch.cuda.synchronize()
                    seconds, how = eager_seconds(run) / copies, f"eager ({type(error).__name__})"
                cells.append(f"M={m}: {seconds * 1e6:.1f} µs [{how}]")
            log(f"{name} {label}: " + " | ".join(cells))
            RESULTS.setdefault("two_four", {}).setdefault(name, {})[label] = cells
        except Exception as error:  # noqa: BLE001
            log(f"{name} {label}: failed: {type(error).__name__}: {error}"[:600])
            RESULTS.setdefault("two_four", {}).setdefault(name, {})[label] = f"failed: {type(error).__name__}"

def fuse_qkv(layer: list) -> list:
    """The layer with q, k and v as one matrix (their rows stacked: one call where the model makes three)."""
    (q, bq), (k, bk), (v, bv) = layer[:3]
    return [(torch.cat([q, k, v]), torch.cat([bq, bk, bv]))] + layer[3:]


def _chain_reference(x: torch.Tensor, weights: list) -> torch.Tensor:
    reference = x.double()
    for w in weights:
        reference = (reference @ w.double().T).bfloat16().double()
    return reference


@torch.no_grad()
def check_pdl_chain() -> float:
    """Kernels that read the kernel before them: a chain of six col16 calls (4096² at 0.1, one row and 16;
    at one row nothing runs between two of them), each input the last output, eager and as a CUDA-graph
    replay on fresh inputs, against the float64 chain rounded to bf16 at each step. The worst max relative
    error (a wait in the wrong place reads a stale x: an error near 1; rounding compounds to a few 1e-3)."""
    weights = [(magnitude_prune(torch.randn(4096, 4096, device=DEVICE), 0.1) / 8).bfloat16() for _ in range(6)]
    packed = [pack(w, "col16") for w in weights]
    worst = 0.0
    for m in (1, 16):
        x = torch.randn(m, 4096, device=DEVICE).bfloat16()

        def chain():
            y = x
            for p in packed:
                y = _kernels().kernel_linear(y, p)
            return y
        worst = max(worst, relative_errors(chain(), _chain_reference(x, weights))[0])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = chain()
        for _ in range(3):
            x.copy_(torch.randn_like(x))  # fresh inputs: the replay must carry them through the chain
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, relative_errors(replayed, _chain_reference(x, weights))[0])
    return worst


def pdl_table(args) -> dict:
    """`pdl`: one layer's linears at M = 1 with the kernel launched as a programmatic dependent launch
    (its weights read before it waits for the kernel before it) or not, and with q, k, v as one call or three."""
    table = {}
    _kernels().PDL = True
    try:
        error = check_pdl_chain()
        table["chain_max_rel_err"] = error
        log(f"\n## PDL: a chain of six col16 calls, each reading the one before (eager and graph replay, M = 1 and "
            f"16): max rel err {error:.2e} ({'under' if error <= CHAIN_TOLERANCE else 'OVER'} {CHAIN_TOLERANCE:g})")
        failed = check_kernels()
        table["check_failed"] = failed
        log(f"kernel checks with PDL: {'FAILED ' + str(failed) if failed else 'all within tolerance'}")
    except Exception as error:  # noqa: BLE001 - recorded; no timing with PDL then
        log(f"PDL failed: {type(error).__name__}: {error}"[:1500])
        table["error"] = repr(error)[:1500]
    finally:
        _kernels().PDL = False
    modes = (False,) if "error" in table else (False, True)
    log("\n## one layer's linears, M = 1, µs (× dense six calls): col16, PDL off / on, six calls / q,k,v fused")
    for name in args.shapes:
        dense_layer = build_layer(name, 1.0)
        dense = time_linears(name, dense_layer, "dense", 1)["seconds"]
        dense_fused = time_linears(name, fuse_qkv(dense_layer), "dense", 1)["seconds"]
        del dense_layer
        log(f"{name} dense: six calls {dense * 1e6:.1f}, q,k,v fused {dense_fused * 1e6:.1f}")
        table[name] = {"dense": dense, "dense_fused": dense_fused}
        for density in (0.3, 0.1, 0.05):
            layer = build_layer(name, density)
            cells = {}
            for fused in (False, True):
                for pdl in modes:
                    _kernels().PDL = pdl
                    cell = time_linears(name, fuse_qkv(layer) if fused else layer, "col16", 1, args.rows_per_block)
                    cells[f"{'fused' if fused else 'six'} pdl={pdl}"] = cell["seconds"]
            _kernels().PDL = False
            table[name][density] = cells
            log(f"{name} {density}: " + ", ".join(f"{key} {t * 1e6:.1f} ({dense / t:.2f}x)" for key, t in cells.items())
                + f"; {cell['bytes'] / 1e6:.1f} MB")
            del layer
    return table


@torch.no_grad()
def pdl_model(args, pdl_modes: tuple[bool, ...]) -> dict:
    """`pdl`: the last shape's whole model, one decode step at density 1.0 (cuBLAS) and 0.1 (col16), with PDL
    in each of `pdl_modes`, q, k, v as three calls and stacked as one; RESULTS kept after every row."""
    rows = RESULTS.setdefault("pdl_model", {})
    name = args.shapes[-1]
    model = opt_model(name)
    linears = decoder_linears(model)
    log(f"\n## whole model {name}, one greedy decode step (static KV cache, CUDA graph), tokens/s")
    rows["dense"] = {b: b / decode_seconds(model, b) for b in (1, 16)}
    log(f"{name} 1.0 cuBLAS: batch 1 {rows['dense'][1]:,.0f}, batch 16 {rows['dense'][16]:,.0f}")
    keep(args.phase)
    for linear in linears.values():
        linear.weight.copy_(magnitude_prune(linear.weight, 0.1))
    swapped = to_sparse_linears(model, SparseRule(max_density=1.0))
    for stacked in (False, True):
        if stacked:
            log(f"q, k, v stacked into one call in {len(stack_siblings(model))} layers (utils/export/siblings.py)")
        for pdl in pdl_modes:
            _kernels().PDL = pdl
            try:
                label = f"0.1{' stacked' if stacked else ''} pdl={pdl}"
                rows[label] = cell = {b: b / decode_seconds(model, b) for b in (1, 16)}
            finally:
                _kernels().PDL = False
            log(f"{name} {label} (col16): batch 1 {cell[1]:,.0f} ({cell[1] / rows['dense'][1]:.2f}x), "
                f"batch 16 {cell[16]:,.0f} ({cell[16] / rows['dense'][16]:.2f}x)")
            keep(args.phase)
    if args.compile_model:  # under torch.compile each sibling runs its own rows
        compiled_decode(args, model, swapped, linears, rows)
    return rows


def compiled_decode(args, model, swapped: list[str], linears: dict, rows: dict) -> None:
    """`pdl --compile-model`: the same decode step through torch.compile (default mode: Triton kernels for
    the norms, adds and attention; SparseLinear stays its custom op), sparse at 0.1, then dense (the
    swapped linears put back: cuBLAS on the pruned weights, the bytes of dense), into `rows`, kept after
    each. A failure is recorded."""
    name = args.shapes[-1]
    for label in ("compiled 0.1", "compiled dense"):
        if label == "compiled dense":
            put_back(model, swapped, linears)
        started = time.time()
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=False)
            rows[label] = cell = {b: b / decode_seconds(model, b, compiled=compiled) for b in (1, 16)}
            log(f"{name} {label}: batch 1 {cell[1]:,.0f}, batch 16 {cell[16]:,.0f} tokens/s "
                f"({time.time() - started:.0f} s with compilation)")
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            rows[label] = f"failed: {type(error).__name__}: {error}"[:600]
            log(f"{name} {label}: {rows[label]}")
        keep(args.phase)
    if isinstance(rows["compiled dense"], dict) and isinstance(rows["compiled 0.1"], dict):
        log(f"{name} compiled, 0.1 against dense: batch 1 {rows['compiled 0.1'][1] / rows['compiled dense'][1]:.2f}x, "
            f"batch 16 {rows['compiled 0.1'][16] / rows['compiled dense'][16]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("check", "sweep", "full", "smol", "memory", "two-four", "fit", "pdl", "rows"),
                        help="check: the kernels against the reference only (--device cpu: through Triton's "
                             "interpreter, TRITON_INTERPRET=1); two-four: torchao's sm90 rows alone (--two-four "
                             "adds them to full)")
    parser.add_argument("--device", default="cuda", help="memory and smol run on the CPU too")
    parser.add_argument("--shapes", default="opt-1.3b,opt-6.7b")
    parser.add_argument("--ell", default="col16", choices=("delta8", "col16"), help="the ELL encoding of the rule")
    parser.add_argument("--rows-per-block", type=int, default=SparseRule().rows_per_block)
    parser.add_argument("--smol", help="a compressed export folder, or the SmolLM2 GGUF (pruned here by magnitude): "
                                       "perplexity of sparse against dense kernels")
    parser.add_argument("--text", help="text for the perplexity")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--two-four", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--compile-model", action="store_true", help="pdl: the decode step through torch.compile too")
    parser.add_argument("--model-only", action="store_true", help="pdl: the whole model's rows alone (PDL off)")
    args = parser.parse_args()
    args.shapes = args.shapes.split(",")
    global DEVICE
    DEVICE = args.device
    if args.phase == "memory":
        torch.manual_seed(0)
        memory_table(args)
        return
    if args.phase == "smol" and DEVICE == "cpu":  # the path checked on the CPU (the layout's torch reference)
        smol_perplexity(args, SparseRule())
        return
    if args.phase == "check" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("check --device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if DEVICE == "cpu" and args.phase != "check":
        sys.exit(f"{args.phase} times kernels on a GPU; on the CPU: memory, smol, check")
    import transformers
    log(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU, Triton interpreter'} | torch "
        f"{torch.__version__} | transformers {transformers.__version__} | triton {__import__('triton').__version__}")
    started = time.time()
    if DEVICE == "cuda":
        RESULTS["bandwidth"] = bandwidth = copy_bandwidth()
        log(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    failed = check_kernels()
    keep(args.phase)
    log(f"kernel checks: {'FAILED ' + str(failed) if failed else 'all within tolerance'} "
        f"(worst max rel err {RESULTS['max_rel_err']:.2e})")
    if args.phase == "check":
        sys.exit(1 if failed else 0)
    if args.phase == "smol":
        smol_perplexity(args, SparseRule())
    if args.phase == "two-four":
        two_four(args, bandwidth)
    if args.phase == "fit":
        RESULTS["fit"] = fit_table(args, bandwidth)
    if args.phase == "pdl":
        if not args.model_only:
            RESULTS["pdl"] = pdl_table(args)
            keep(args.phase)
        table = RESULTS.get("pdl", {})  # PDL in the model only where the chain and the checks held with it
        pdl_works = bool(table) and "error" not in table and not table["check_failed"] and \
            table["chain_max_rel_err"] <= CHAIN_TOLERANCE
        if not args.skip_model:
            pdl_model(args, (False, True) if pdl_works else (False,))
    if args.phase == "rows":
        rows_phase(args, bandwidth)
    if args.phase == "sweep":
        check_compile()
    if args.phase in ("sweep", "full"):
        gathers(args)
        keep(args.phase)
        tune(args)
        keep(args.phase)
    if args.phase == "full":
        RESULTS["linears"] = linears_table(args, bandwidth)
        keep(args.phase)
        rule = break_even(args)
        keep(args.phase)
        sections = [] if args.skip_model else [lambda: RESULTS.setdefault("model", model_table(args, rule, bandwidth))]
        sections += [lambda: smol_perplexity(args, rule)] if args.smol else []
        sections += [lambda: two_four(args, bandwidth)] if args.two_four else []
        for section in sections:  # one that fails prints why; the others still run
            try:
                section()
            except Exception:  # noqa: BLE001
                import traceback
                log(traceback.format_exc()[-3000:])
                torch.cuda.synchronize()
            keep(args.phase)
    log(f"\n{time.time() - started:.0f} s")
    keep(args.phase)


def keep(phase: str) -> None:
    """RESULTS so far into OUT (after every section: a run cut short by its time limit keeps them)."""
    (OUT / f"bench_decode_{phase}.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
