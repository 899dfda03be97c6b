"""Sibling linears stacked into one matrix (utils/export/siblings.py): the same outputs, one computation
per input, nothing kept after it, and the custom op under torch.compile."""
import copy

import pytest
import torch
from torch import nn

import utils.export.siblings as siblings
from utils.export.siblings import SiblingLinear, StackedLinears, stack_siblings
from utils.export.sparse_layout import SparseRule, block_rows, pack, stack_rows, unpack
from utils.export.sparse_linear import SparseLinear, to_sparse_linears

from helpers import tiny_model
from test_sparse_linear import export, prune_decoder_linears, pruned


@pytest.mark.parametrize("encoding", ["col16", "delta8"])
def test_stacked_rows_unpack_to_the_rows_in_turn_and_each_block_range_to_its_part(encoding):
    weights = [pruned(rows, 300, 0.2) for rows in (16, 8, 24)]
    parts = [pack(w, encoding, 8) for w in weights]
    stacked = stack_rows(parts)
    assert torch.equal(unpack(stacked), torch.cat(weights)) and stacked.nnz == sum(p.nnz for p in parts)
    first = 0
    for part, weight in zip(parts, weights):
        own = block_rows(stacked, first, first + weight.shape[0] // 8, part.nnz)
        assert torch.equal(unpack(own), weight) and own.values.data_ptr() >= stacked.values.data_ptr()
        first += weight.shape[0] // 8
    assert stack_rows([pack(pruned(12, 300, 0.2), encoding, 8), parts[0]]) is None  # 12 rows: a padded block
    assert stack_rows([parts[0], pack(pruned(8, 200, 0.2), encoding, 8)]) is None  # another input width
    assert stack_rows([pack(weights[0], "bitmask"), pack(weights[1], "bitmask")]) is None


def sparse_attention(bias: bool = True):
    """q, k and v of one input, as a model's attention calls them (the widths of grouped-query attention)."""
    module = nn.Module()
    for name, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        linear = nn.Linear(96, rows, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(pruned(rows, 96, 0.2))
        setattr(module, name, SparseLinear.from_linear(linear))
    return module


def test_the_stack_computes_once_per_input_in_any_order_and_keeps_nothing_after(monkeypatch):
    attention = sparse_attention()
    plain = copy.deepcopy(attention)
    names = ("q_proj", "k_proj", "v_proj")
    x = torch.randn(3, 96)
    assert stack_siblings(attention) == [""]
    assert all(type(getattr(attention, n)) is SiblingLinear for n in names)
    calls = []
    real = siblings.sparse_linear
    monkeypatch.setattr(siblings, "sparse_linear", lambda *args: calls.append(1) or real(*args))
    for order in (names, ("v_proj", "q_proj", "k_proj")):
        calls.clear()
        got = {name: getattr(attention, name)(x) for name in order}
        assert len(calls) == 1 and all(torch.allclose(got[n], getattr(plain, n)(x), atol=1e-6) for n in order)
        group = attention.q_proj.group
        assert group._input is None and group._parts == ()  # every part taken: nothing kept alive
    assert not group.unstacked and set(dict(attention.named_children())) == {
        "q_proj", "k_proj", "v_proj", "stacked_q_proj_k_proj_v_proj"}
    keys = list(attention.state_dict())  # the stack's tensors once, under the parent
    assert sum(key.endswith(".values") for key in keys) == 1 and not any("_proj.group" in key for key in keys)
    attention.q_proj(x)
    x.add_(1.0)  # changed in place after q: k must not take the part computed before
    assert torch.allclose(attention.k_proj(x), plain.k_proj(x), atol=1e-6)
    assert group.unstacked and group._parts == ()  # a surprise turns the stack off: each runs its own rows
    for y in (x, torch.randn(2, 96)):
        assert all(torch.allclose(getattr(attention, n)(y), getattr(plain, n)(y), atol=1e-6) for n in names)


def test_siblings_called_apart_or_on_inference_tensors_still_give_their_own_outputs():
    attention = sparse_attention()
    plain = copy.deepcopy(attention)
    stack_siblings(attention)
    with torch.inference_mode():  # no version counter to check: each sibling runs its own rows
        x = torch.randn(3, 96)
        assert all(torch.allclose(getattr(attention, n)(x), getattr(plain, n)(x), atol=1e-6)
                   for n in ("q_proj", "k_proj", "v_proj"))
    assert not attention.q_proj.group.unstacked
    first, second = torch.randn(3, 96), torch.randn(3, 96)  # a decoder that calls only q (cross-attention decode)
    attention.q_proj(first)
    assert torch.allclose(attention.q_proj(second), plain.q_proj(second), atol=1e-6)
    assert attention.q_proj.group.unstacked and attention.q_proj.group._input is None


def test_siblings_that_do_not_stack_stay_as_they_are():
    attention = sparse_attention()
    attention.v_proj = SparseLinear.from_linear(nn.Linear(96, 32, bias=False))  # no bias where the others have one
    assert stack_siblings(attention) == [] and type(attention.q_proj) is SparseLinear
    mlp = nn.Module()
    rows = 3 * SparseRule().rows_per_block + 1  # not whole blocks of the layout: the rows cannot be split back
    mlp.gate_proj, mlp.up_proj = (SparseLinear.from_linear(nn.Linear(64, rows)) for _ in range(2))
    assert stack_siblings(mlp) == []


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_model_with_stacked_siblings_gives_the_same_logits_and_generates_the_same_tokens(family):
    model = tiny_model(family, 300)
    prune_decoder_linears(model, 0.25)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        to_sparse_linears(model, SparseRule(max_density=1.0))
        unstacked = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        stacked = stack_siblings(model)
        assert len(stacked) == (4 if family == "llama" else 2)  # q,k,v (and gate,up) in each of 2 layers
        assert torch.allclose(model(ids).logits, dense, atol=1e-4)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), unstacked)


def test_stacked_siblings_compile_without_graph_breaks():
    attention = sparse_attention()
    x = torch.randn(4, 96)
    eager = torch.cat([getattr(attention, n)(x) for n in ("q_proj", "k_proj", "v_proj")], -1)
    stack_siblings(attention)

    class Three(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.cat([self.inner.q_proj(x), self.inner.k_proj(x), self.inner.v_proj(x)], -1)

    compiled = torch.compile(Three(attention), backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager, atol=1e-6)


def test_load_sparse_stacks_the_siblings_the_rule_asks_for(tmp_path):
    from utils.export.sparse_model import load_sparse
    model = tiny_model("llama", 300)
    prune_decoder_linears(model, 0.25)
    export(model, tmp_path / "export", torch.float32)
    ids = torch.randint(0, 300, (1, 10))
    plain = load_sparse(tmp_path / "export", device="cpu", rule=SparseRule(max_density=1.0))
    stacked = load_sparse(tmp_path / "export", device="cpu", rule=SparseRule(max_density=1.0, stack_siblings=True))
    groups = {id(m) for m in stacked.modules() if type(m) is StackedLinears}
    assert len(groups) == 4 and not any(type(m) is StackedLinears for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(stacked(ids).logits, plain(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family, stacked", [("llama", False), ("llama", True), ("opt", False), ("opt", True)])
def test_generate_compiles_the_decode_step_of_a_sparse_model_in_one_graph(family, stacked):
    """What `--generate-cache static` asks of transformers on a GPU: generate() with a static cache
    compiles the decode step (fullgraph=True: a graph break fails); here on the CPU, which
    transformers compiles for only when its CompileConfig says so (`_compile_all_devices`)."""
    from transformers import CompileConfig
    model = tiny_model(family, 300)
    prune_decoder_linears(model, 0.25)
    to_sparse_linears(model, SparseRule(max_density=1.0))
    if stacked:
        assert stack_siblings(model)
    ids = torch.randint(0, 300, (1, 7))
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager = model.generate(ids, **settings)
        config = CompileConfig(fullgraph=True, backend="aot_eager")
        config._compile_all_devices = True
        assert not hasattr(model, "_compiled_call")
        assert torch.equal(model.generate(ids, compile_config=config, **settings), eager)
    assert hasattr(model, "_compiled_call")  # the step did go through torch.compile (what the record reads)
