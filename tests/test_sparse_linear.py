"""The sparse decode layout, its reference, SparseLinear, the swap and load_sparse, on the CPU.

The Triton kernels run here in Triton's interpreter (`bench_decode.py check --device cpu`: software
popcount, fp32 products); their compiled form runs on the GPU only, where benchmarks/bench_decode.py
checks it against `reference_linear` (docs/benchmark-log.md). These tests pin what it is checked against.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.export.bitmask import compress_matrix
from utils.export.sparse_layout import (EllMatrix, SparseRule, pack, pack_parts, reference_linear, slot_columns,
                                        unpack)
from utils.export.sparse_linear import SparseLinear, route, to_sparse_linears
from utils.export.sparse_model import load_sparse

ENCODINGS_TESTED = ["delta8", "col16", "col32", "bitmask"]


def pruned(rows, cols, density, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    keep = torch.rand(rows, cols, generator=generator) < density
    return torch.where(keep, weight, torch.zeros((), dtype=dtype))  # +0.0 where pruned


def bits(tensor):
    return tensor.view(torch.int16) if tensor.element_size() == 2 else tensor.view(torch.int32)


@pytest.mark.parametrize("encoding", ENCODINGS_TESTED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols,density", [(37, 600, 0.1), (64, 300, 0.5), (9, 1000, 0.01), (16, 8, 1.0),
                                               (5, 70, 0.0), (40, 2100, 0.03)])
def test_unpack_of_pack_is_the_weight_bit_for_bit(encoding, dtype, rows, cols, density):
    weight = pruned(rows, cols, density, dtype)
    if density > 0:
        weight[0, 0], weight[-1, -1] = 1.5, -2.0  # first and last column
        weight[1, :] = 0  # an empty row
        weight[2, 3] = float("nan")
        weight[2, 5] = float("inf")
    packed = pack(weight, encoding, rows_per_block=4 if rows < 20 else 8)
    assert packed.nnz == int((weight != 0).sum())
    assert torch.equal(bits(unpack(packed)), bits(weight))


def test_long_gaps_take_gap_slots_and_come_back():
    weight = torch.zeros(3, 5000)
    weight[0, [0, 255, 256, 511, 767, 4999]] = torch.arange(1.0, 7.0)
    weight[2, 4000] = 3.0
    packed = pack(weight, "delta8", rows_per_block=2)
    # row 0: gaps 0, 255, 1, 255, 256 (2 slots), 4232 (17 slots) → 6 kept + 17 gap slots
    row, column = slot_columns(packed)
    kept = packed.values != 0
    assert column[kept].tolist() == [0, 255, 256, 511, 767, 4999, 4000]
    assert int((row == 0).sum()) >= 6 + 1 + 16
    assert int(packed.index.max()) == 255
    assert torch.equal(unpack(packed), weight)


def test_negative_zero_is_not_kept_and_comes_back_as_zero():
    weight = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 2.0, 0.0]])
    packed = pack(weight)
    assert packed.nnz == 2
    back = unpack(packed)
    assert torch.equal(back, weight) and not torch.signbit(back).any()


def test_pack_parts_from_the_bitmask_export_equals_pack_of_the_weight():
    weight = pruned(50, 130, 0.2, torch.bfloat16)
    parts = compress_matrix(weight)
    from utils.export.bitmask import unpack_bitmask
    from_parts = pack_parts(parts["compressed"], unpack_bitmask(parts["bitmask"], 130))
    direct = pack(weight)
    for field in ("values", "index", "block_ptr"):
        assert torch.equal(getattr(from_parts, field), getattr(direct, field))


def test_layout_rows_are_aligned_blocks_and_small():
    weight = pruned(100, 4096, 0.1, torch.bfloat16)
    packed = pack(weight, "delta8", rows_per_block=8)
    pointer = packed.block_ptr.long()
    per_row = (pointer[1:] - pointer[:-1]) // 8
    assert pointer[0] == 0 and ((pointer[1:] - pointer[:-1]) % 8 == 0).all() and (per_row % 8 == 0).all()
    assert packed.block_ptr.numel() == 100 // 8 + 2  # 13 blocks, the last one padded with empty rows
    # 3 bytes a kept weight and the padding to each block's longest row: far under dense bf16's 2 bytes a weight
    assert packed.nbytes < 0.2 * weight.numel() * 2
    assert pack(weight, "col16").nbytes > packed.nbytes  # 4 bytes a kept weight


@pytest.mark.parametrize("bad,message", [
    (lambda: pack(torch.zeros(3)), "2-D"),
    (lambda: pack(torch.ones(2, 2), "delta4"), "encoding"),
    (lambda: pack(torch.ones(2, 2), rows_per_block=3), "rows_per_block"),
    (lambda: pack_parts(torch.ones(3), torch.ones(2, 2, dtype=torch.bool)), "keeps 4"),
    (lambda: pack_parts(torch.tensor([1.0, 0.0]), torch.eye(2, dtype=torch.bool)), "zero"),
    (lambda: SparseRule(max_density=1.5), "max_density"),
])
def test_bad_inputs_fail_with_a_message(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_corrupt_layout_is_refused():
    packed = pack(pruned(8, 64, 0.3))
    broken = EllMatrix(packed.values, packed.index, packed.block_ptr, (8, 16), packed.encoding,
                       packed.rows_per_block, packed.nnz)
    with pytest.raises(ValueError, match="does not describe"):
        unpack(broken)


def test_bitmask_offsets_point_at_each_chunks_first_kept_value_and_are_checked():
    weight = torch.zeros(3, 600)  # 19 words a row: chunks of 8 words = columns 0-255, 256-511, 512-599
    weight[0, [5, 300, 599]] = torch.tensor([1.0, 2.0, 3.0])
    weight[2, [0, 255, 256, 512]] = torch.tensor([4.0, 5.0, 6.0, 7.0])
    packed = pack(weight, "bitmask")
    # row 0: values 0 | 1 | 2; row 1 (empty): 3 3 3; row 2: 3 (cols 0, 255) | 5 (256) | 6 (512)
    assert packed.block_ptr.tolist() == [0, 1, 2, 3, 3, 3, 3, 5, 6]
    assert packed.block_ptr.dtype == torch.int32 and torch.equal(unpack(packed), weight)
    tampered = packed.block_ptr.clone()
    tampered[7] += 1  # a value offset the kernel would read from, off by one: the layout is refused
    with pytest.raises(ValueError, match="does not describe"):
        unpack(EllMatrix(packed.values, packed.index, tampered, packed.shape, "bitmask", packed.rows_per_block,
                         packed.nnz))


@pytest.mark.parametrize("encoding", ENCODINGS_TESTED)
def test_reference_linear_is_x_times_w_transposed(encoding):
    weight, bias = pruned(70, 300, 0.1, seed=1), torch.randn(70)
    x = torch.randn(5, 300)
    y = reference_linear(x, pack(weight, encoding), bias, accumulate=torch.float64, round_to_input=False)
    assert torch.allclose(y, x.double() @ weight.double().T + bias.double(), rtol=0, atol=1e-12)


def test_the_rule_holds_sparse_layers_as_ell_and_denser_ones_as_bitmask():
    assert SparseRule().encoding_for(0.1) == "col16" and SparseRule().encoding_for(0.9) == "col16"
    rule = SparseRule(bitmask_above=0.2, ell_encoding="delta8")
    assert rule.encoding_for(0.1) == "delta8" and rule.encoding_for(0.3) == "bitmask"
    for density, encoding in ((0.1, "delta8"), (0.4, "bitmask")):
        linear = nn.Linear(256, 32)
        with torch.no_grad():
            linear.weight.copy_(pruned(32, 256, density, seed=3))
        sparse = SparseLinear.from_linear(linear, rule)
        assert sparse.encoding == encoding and torch.equal(sparse.dense_weight(), linear.weight)
    bitmask = pack(pruned(16, 100, 0.5, torch.bfloat16), "bitmask")  # 4 words a row: 100 columns padded to 128 bits
    assert bitmask.index.dtype == torch.int32 and bitmask.index.numel() == 16 * 4
    assert bitmask.nbytes < 16 * 100 * (0.6 * 2 + 1 / 8) + 16 * 4  # one value offset (int32) a row


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only (requirements-test.txt)")
def test_every_layouts_triton_kernel_matches_the_reference_in_tritons_interpreter(tmp_path):
    """bf16 and fp32, M = 1 to 64, ELL and the tiled bitmask kernel, unpack kernels exact: the check
    exits 1 when any case is past its tolerance (its own logic: benchmarks/bench_decode.py)."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_decode.py"), "check", "--device", "cpu"],
                          env={**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path)}, cwd=repo,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "kernel checks: all within tolerance" in done.stdout and done.stdout.count("bitmask |") == 6
    assert json.loads((tmp_path / "bench_decode_check.json").read_text())["max_rel_err"] < 1e-2


PDL_IN_THE_INTERPRETER = """
import torch
import utils.export.triton_kernels as kernels
from utils.export.sparse_layout import pack
torch.manual_seed(0)
weight = torch.randn(40, 300) * (torch.rand(40, 300) < 0.1)
packed, x = pack(weight, "col16", 8), torch.randn(1, 300)
off = kernels.kernel_linear(x, packed)
kernels.PDL = True
on = kernels.kernel_linear(x, packed)
print("pdl", kernels._pdl(x.device), "equal", torch.equal(on, off), "close", torch.allclose(on, x @ weight.T, atol=1e-4))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only (requirements-test.txt)")
def test_a_programmatic_dependent_launch_is_left_out_where_the_kernel_is_not_compiled():
    """PDL (triton_kernels.PDL) asks the compiled kernel to wait on griddepcontrol, which the interpreter has
    not: there it must stay off, and the kernel give the same result as without it."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PDL_IN_THE_INTERPRETER], env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.split() == ["pdl", "False", "equal", "True", "close", "True"]


EVERY_LAUNCH_IN_THE_INTERPRETER = """
import importlib.util, sys, torch
import utils.export.triton_kernels as kernels
from utils.export.sparse_layout import pack, reference_linear
spec = importlib.util.spec_from_file_location("bench_decode", "benchmarks/bench_decode.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
launched = []  # (programs, blocks, PERSISTENT) of every ell_matmul launch, as the kernel was asked for it


class Counted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launched.append((grid[0], args[8], kwargs["PERSISTENT"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


kernels.ell_matmul = Counted(kernels.ell_matmul)
torch.manual_seed(0)
weight = torch.randn(72, 300) * (torch.rand(72, 300) < 0.1)
worst, cases = 0.0, 0
for rows in bench.ROWS_PER_BLOCK:
    packed = pack(weight, "col16", rows)
    for m in (1, 3, 16):
        x = torch.randn(m, 300)
        ref = reference_linear(x, packed, None, accumulate=torch.float64, round_to_input=False)
        tuned = bench.CANDIDATES[("ell", 1 if m == 1 else 16)] if m != 3 else []  # 3: the masked inputs, once
        for launch in bench.ROWS_LAUNCHES[1 if m == 1 else 16] + tuned:
            y = kernels.kernel_linear(x, packed, None, launch=launch)
            worst = max(worst, ((y.double() - ref).abs().max() / ref.abs().max()).item())
            cases += 1
persistent = sum(1 for programs, blocks, flag in launched if flag and programs < blocks)
wrong = sum(1 for programs, blocks, flag in launched if flag != (programs < blocks))
print("worst", worst, "heights", len(bench.ROWS_PER_BLOCK), "persistent", persistent, "cases", cases, "wrong", wrong)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Triton publishes wheels for Linux only (requirements-test.txt)")
def test_every_launch_and_block_height_the_decode_sweep_times_is_right_in_tritons_interpreter():
    """bench_decode.py's rows phase times col16 at every launch (persistent grids too: fewer programs than
    blocks, each taking several) and every rows per block; each must compute x @ W.T (fp32, the
    interpreter) before its time means anything."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EVERY_LAUNCH_IN_THE_INTERPRETER], cwd=repo, capture_output=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    words = done.stdout.split()
    assert words[0] == "worst" and float(words[1]) < 1e-5 and int(words[3]) >= 6
    assert int(words[5]) >= 10 and int(words[7]) > int(words[5])  # some launches ran persistent, some not
    assert words[8:] == ["wrong", "0"]  # a grid of fewer programs than blocks, and only then, is persistent


def test_route_sends_few_rows_to_the_kernel_and_many_to_a_dense_temporary():
    assert route(1, 16, True) == "kernel" and route(16, 16, True) == "kernel"
    assert route(17, 16, True) == "materialize" and route(2048, 16, True) == "materialize"
    assert route(1, 16, False) == "reference"


def test_sparse_linear_matches_the_linear_and_holds_no_dense_weight():
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(pruned(40, 96, 0.2))
    sparse = SparseLinear.from_linear(linear, SparseRule(max_rows=4))
    assert not any(t.numel() == 40 * 96 for t in list(sparse.parameters()) + list(sparse.buffers()))
    for shape in [(1, 96), (3, 7, 96), (0, 96)]:
        x = torch.randn(shape)
        assert torch.allclose(sparse(x), linear(x), atol=1e-5)
    assert torch.equal(sparse.dense_weight(), linear.weight)


def test_sparse_linear_compiles_without_graph_breaks():
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(pruned(32, 64, 0.3))
    sparse = SparseLinear.from_linear(linear)
    x = torch.randn(4, 64)
    compiled = torch.compile(sparse, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), sparse(x), atol=1e-6)
    assert torch.allclose(compiled(x), linear(x), atol=1e-5)


def tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def prune_decoder_linears(model, density):
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not name.endswith("lm_head"):
            weight = module.weight
            keep = weight.numel() - max(1, round(density * weight.numel())) + 1
            threshold = weight.abs().flatten().kthvalue(keep).values
            weight.mul_(weight.abs() >= threshold)


def test_to_sparse_linears_swaps_the_sparse_decoder_linears_only():
    model = tiny_llama()
    prune_decoder_linears(model, 0.3)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert to_sparse_linears(model, SparseRule(max_density=0.2)) == []
    swapped = to_sparse_linears(model, SparseRule(max_density=0.35))
    assert len(swapped) == 14 and not any("lm_head" in name for name in swapped)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected_tokens)
    only_mlp = tiny_llama()
    prune_decoder_linears(only_mlp, 0.3)
    names = to_sparse_linears(only_mlp, SparseRule(), predicate=lambda name, module: ".mlp." in name)
    assert len(names) == 6 and all(".mlp." in name for name in names)


def test_the_default_rule_takes_a_matrix_pruned_to_0_3_whose_rows_round_up():
    """Wanda at 0.3 keeps round(0.3 · 576) = 173 of SmolLM2's 576 inputs a row: density 0.30035."""
    holder = nn.Sequential(nn.Linear(576, 8, bias=False))
    with torch.no_grad():
        weight = torch.randn(8, 576)
        threshold = weight.abs().topk(173, dim=1).values[:, -1:]
        holder[0].weight.copy_(weight * (weight.abs() >= threshold))
    assert int(torch.count_nonzero(holder[0].weight)) == 8 * 173
    assert to_sparse_linears(holder, SparseRule(), predicate=lambda name, module: True) == ["0"]


def export(model, folder, dtype):
    """The bitmask export format, written here from its description (compression.json + safetensors)."""
    from safetensors.torch import save_file
    state, tied, seen, compressed = {}, {}, {}, []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied[name] = seen[tensor.data_ptr()]
            continue
        seen[tensor.data_ptr()] = name
        tensor = tensor.to(dtype)
        if name.endswith("proj.weight"):  # the pruned decoder linears
            state.update({f"{name}.{part}": value for part, value in compress_matrix(tensor).items()})
            compressed.append(name)
        else:
            state[name] = tensor.contiguous()
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))
    manifest = {"format": "extreme-compression/sparse-bitmask", "version": 1, "dtype": str(dtype).split(".")[1],
                "compressed": compressed, "tied": tied}
    (folder / "compression.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("tied", [True, False])
def test_load_sparse_gives_the_dense_models_logits(tmp_path, tied):
    model = tiny_llama(tied)
    prune_decoder_linears(model, 0.25)
    manifest = export(model, tmp_path / "export", torch.float32)
    assert (manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}) == tied
    loaded = load_sparse(tmp_path / "export", device="cpu")
    sparse = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and not any(type(m) is nn.Linear and m is not loaded.lm_head for m in loaded.modules())
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
        assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False),
                           model.generate(ids, max_new_tokens=8, do_sample=False))


def test_load_sparse_in_bfloat16_and_a_rule_that_keeps_layers_dense(tmp_path):
    model = tiny_llama()
    prune_decoder_linears(model, 0.25)
    export(model, tmp_path / "export", torch.bfloat16)
    reference = model
    for parameter in reference.parameters():  # as from_pretrained in bf16: buffers (rotary frequencies) stay fp32
        parameter.data = parameter.data.to(torch.bfloat16)
    ids = torch.randint(0, 300, (1, 16))
    loaded = load_sparse(tmp_path / "export", device="cpu")
    dense_kept = load_sparse(tmp_path / "export", device="cpu", rule=SparseRule(max_density=0.1))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, SparseLinear) for m in dense_kept.modules())
    with torch.no_grad():
        expected = reference(ids).logits.float()
        assert torch.equal(dense_kept(ids).logits.float(), expected)
        # fp32 accumulation rounded to bf16 per layer against bf16 matmuls: rounding apart, not more
        assert (loaded(ids).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_load_sparse_refuses_other_formats_and_incomplete_exports(tmp_path):
    model = tiny_llama()
    prune_decoder_linears(model, 0.25)
    export(model, tmp_path / "export", torch.float32)
    manifest = json.loads((tmp_path / "export" / "compression.json").read_text())
    (tmp_path / "export" / "compression.json").write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_sparse(tmp_path / "export", device="cpu")
    (tmp_path / "export" / "compression.json").write_text(json.dumps({**manifest, "compressed": ["nope.weight"]}))
    with pytest.raises(ValueError, match="lacks"):
        load_sparse(tmp_path / "export", device="cpu")


def test_the_librarys_load_compressed_takes_the_kernels_and_the_device(tmp_path):
    """extreme_compression.load_compressed(folder, device=..., kernels="sparse"): the issue's one entry."""
    import extreme_compression
    model = tiny_llama()
    prune_decoder_linears(model, 0.1)
    export(model, tmp_path / "export", torch.float32)
    ids = torch.randint(0, 300, (2, 12))
    sparse = extreme_compression.load_compressed(tmp_path / "export", device="cpu", kernels="sparse")
    dense = extreme_compression.load_compressed(tmp_path / "export", device="cpu")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 14
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    with torch.no_grad():
        assert torch.allclose(sparse(ids).logits, dense(ids).logits, atol=1e-4)
        assert torch.allclose(dense(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="kernels is 'dense' or 'sparse'"):
        extreme_compression.load_compressed(tmp_path / "export", kernels="fast")


def bench_decode():
    """benchmarks/bench_decode.py as a module (it is a script, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_decode_benchmarks_cost_fit_splits_a_fixed_part_from_the_bytes_rate():
    """bench_decode.py's fit of a layer's time over its densities: seconds = fixed + bytes / bandwidth."""
    bench = bench_decode()
    megabytes = [85.6e6, 249.0e6, 410.7e6]  # one opt-6.7b layer in col16 at densities 0.1, 0.3, 0.5
    fixed, bandwidth = bench.cost_fit([(b, 23e-6 + b / 3.0e12) for b in megabytes])
    assert fixed == pytest.approx(23e-6, rel=1e-6) and bandwidth == pytest.approx(3.0e12, rel=1e-6)
    fixed, bandwidth = bench.cost_fit([(b, b / 2.5e12 + noise) for b, noise in zip(megabytes, (1e-7, -1e-7, 1e-7))])
    assert abs(fixed) < 5e-7 and bandwidth == pytest.approx(2.5e12, rel=1e-2)  # bound by its bytes: no fixed part
    assert bench.cost_fit([(b, 4e-4 - b * 1e-13) for b in megabytes]) is None  # slower with fewer bytes: no rate
    assert bench.cost_fit([(85.6e6, 5e-5), (85.6e6, 6e-5)]) is None  # one size: nothing to fit


def test_the_rows_phase_chooses_the_block_height_of_the_fastest_one_row_launch_and_its_16_row_launch():
    """bench_decode.py rows: one layout serves both row counts, so the height is the one whose best M = 1
    launch is fastest at density 0.1, and M = 16 gets its own best launch at that height; cells that
    were skipped or failed (strings) are never chosen."""
    bench = bench_decode()
    table = {"0.1 M 1": {"(256, 4)": {8: 51.8, 16: 49.0, 32: "skipped"}, "(256, 4, False, 4)": {8: 47.5, 16: 50.0}},
             "0.1 M 16": {"(64, 2)": {8: 160.0, 16: 150.0}, "(64, 2, False, 2)": {8: 158.0, 16: "OutOfResources"}},
             "0.002 M 1": {"(256, 4)": {1: 1.0}}}  # the floor's cells choose nothing
    assert bench.best_rows(table) == {"rows": 8, 1: (256, 4, False, 4), 16: (64, 2, False, 2)}
    table["0.1 M 16"] = {"(64, 2)": {16: 150.0}}  # no M = 16 cell at 8 rows: the best height that has both
    assert bench.best_rows(table) == {"rows": 16, 1: (256, 4), 16: (64, 2)}
    assert bench.best_rows({"0.1 M 1": {"(256, 4)": {8: "skipped"}}}) is None
