"""The compressed export: exact round trips, the size it really has, and the CLI around it."""
import json

import numpy as np
import pytest
import torch

from extreme_compression_experiment import main
from helpers import smollm2_gguf, tiny_model, wikitext_dir
from utils.config.sections import EvalProtocol
from utils.eval_utils import evaluate_perplexity
from utils.export.bitmask import compress_matrix, decompress_matrix, pack_bitmask, unpack_bitmask
from utils.export.compressed import export_compressed, load_compressed
from utils.export.registry import reader_for, resolve_source
from utils.models.loading import load_model, resolve_model
from utils.pruning.driver import prune_model


@pytest.mark.parametrize("shape", [(5, 13), (3, 8), (1, 1), (4, 17)])
def test_bitmask_is_numpy_packbits_little_endian_and_round_trips(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=generator) > 0.6
    mask[0] = True  # a full row and (when there are two) an empty one
    if shape[0] > 1:
        mask[1] = False
    packed = pack_bitmask(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, shape[1]), mask)
    weight = torch.randn(shape) * mask
    parts = compress_matrix(weight)
    assert parts["compressed"].numel() == int(mask.sum())
    assert torch.equal(decompress_matrix(parts["compressed"], parts["bitmask"], parts["shape"]), weight)


def test_a_bitmask_that_does_not_match_its_values_is_refused():
    parts = compress_matrix(torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="2 ones for 1 values"):
        decompress_matrix(parts["compressed"][:1], parts["bitmask"], parts["shape"])


@pytest.mark.parametrize("family", ["llama", "opt-350m", "gpt2"])
@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2of4"])
def test_export_round_trips_bit_for_bit_and_keeps_the_perplexity(tmp_path, tokenizer, family, pattern):
    model = tiny_model(family, len(tokenizer))
    prune_model(model, "magnitude", 0.1, pattern, progress=False)
    ids = torch.randint(0, len(tokenizer), (600,), generator=torch.Generator().manual_seed(0))

    # float32: the trained master weights, exactly
    report = export_compressed(model, tokenizer, tmp_path / "fp32", torch.float32)
    back = load_compressed(tmp_path / "fp32")
    expected, got = model.state_dict(), back.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    decoder_matrices = [n for n, p in model.named_parameters() if (".layers." in n or ".h." in n) and p.ndim == 2]
    assert report.compressed_tensors == len(decoder_matrices)
    # bfloat16 (the default): what a plain bf16 checkpoint of the same model holds, the same perplexity
    export_compressed(model, tokenizer, tmp_path / "bf16", torch.bfloat16)
    model.save_pretrained(tmp_path / "plain")
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    exported = load_compressed(tmp_path / "bf16")
    assert exported.dtype == torch.bfloat16
    assert all(torch.equal(exported.state_dict()[name], value) for name, value in plain.state_dict().items())
    scores = [evaluate_perplexity(m, ids, EvalProtocol(token_length=128, stride=128, batch_size=2), progress=False).perplexity for m in (plain, exported)]
    assert scores[0] == scores[1]


def test_export_stores_only_the_sparse_matrices_compressed(tmp_path, tokenizer):
    """Every decoder linear is stored as values + bitmask, the embeddings and norms dense; the file
    is smaller than the dense one by what the arithmetic says."""
    from safetensors import safe_open
    model = tiny_model("llama", len(tokenizer), hidden=64)
    prune_model(model, "magnitude", 0.1, progress=False)
    report = export_compressed(model, tokenizer, tmp_path / "c", torch.bfloat16)
    manifest = json.loads((tmp_path / "c" / "compression.json").read_text())
    linears = [name for name, p in model.named_parameters() if ".layers." in name and p.ndim == 2]
    assert sorted(manifest["compressed"]) == sorted(linears)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as handle:
        assert "model.embed_tokens.weight" in handle.keys() and f"{linears[0]}.bitmask" in handle.keys()
        assert linears[0] not in handle.keys()
    nonzeros = sum(int(torch.count_nonzero(p)) for n, p in model.named_parameters() if n in linears)
    weights = sum(p.numel() for n, p in model.named_parameters() if n in linears)
    assert report.value_bytes == 2 * nonzeros
    assert report.bitmask_bytes == weights // 8  # widths 64 and 128: whole bytes per row
    assert report.file_bytes < report.dense_bytes * 0.5


def test_smollm2_at_density_0_1_exports_below_40_percent_and_reads_back(tmp_path):
    """The real model: magnitude-pruned to density 0.1, exported in bf16 at ≤ 40% of its dense bf16
    size (the embeddings, 28M parameters, stay dense), and read back exactly."""
    gguf = smollm2_gguf()
    model, tokenizer = load_model(resolve_model(str(gguf)), dtype=torch.float32)
    prune_model(model, "magnitude", 0.1, progress=False)
    report = export_compressed(model, tokenizer, tmp_path / "smol", torch.bfloat16)
    assert report.ratio <= 0.40, report.lines()
    assert report.largest_dense[0][0] == "model.embed_tokens.weight"
    back = load_compressed(tmp_path / "smol", dtype=torch.float32)
    # the reference: the same weights rounded to bf16 (buffers such as RoPE's inv_freq stay as computed)
    model.load_state_dict({name: value.to(torch.bfloat16).float() for name, value in model.state_dict().items()})
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in back.state_dict().items())
    ids = torch.tensor(tokenizer(wikitext_dir().joinpath("wiki.valid.raw").read_text()[:4000]).input_ids[:256])
    assert evaluate_perplexity(back, ids, EvalProtocol(token_length=256, stride=256), progress=False).perplexity == \
        evaluate_perplexity(model, ids, EvalProtocol(token_length=256, stride=256), progress=False).perplexity


def test_prune_only_exports_and_the_export_is_a_model_again(tmp_path, tiny_llama_dir, text_file, capsys):
    common = ["--token-length", "64", "--eval-source", text_file, "--eval-batch-size", "4"]
    run = tmp_path / "run"
    assert main([str(a) for a in ["--prune-only", "--model", tiny_llama_dir, "--sparsity", "0.1", "--nsamples", "4",
                                  "--calibration-length", "64", "--calibration-source", text_file,
                                  "--pruned-dir", tmp_path / "pruned", "--output-dir", run, *common]]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    export = results["export"]
    assert f"{export['ratio']:.1%} of the dense bfloat16 checkpoint" in out
    assert export["file_bytes"] == (run / "compressed" / "model.safetensors").stat().st_size
    assert resolve_source(str(run / "compressed")).kind == "compressed" == reader_for(run / "compressed").name
    # --eval-only on the export: the pruned model's perplexity up to bf16 rounding of its weights
    assert main([str(a) for a in ["--eval-only", "--model", run / "compressed", "--output-dir", tmp_path / "e",
                                  *common]]) == 0
    again = json.loads((tmp_path / "e" / "results.json").read_text())["perplexity"]
    assert again == pytest.approx(results["baseline"], rel=5e-3)
    # --export-only of the export, in float32: the same weights, written again
    assert main([str(a) for a in ["--export-only", "--model", run / "compressed", "--export-dtype", "float32",
                                  "--output-dir", tmp_path / "x"]]) == 0
    first, second = load_compressed(run / "compressed"), load_compressed(tmp_path / "x" / "compressed")
    assert second.dtype == torch.float32
    assert all(torch.equal(second.state_dict()[k].to(torch.bfloat16), v) for k, v in first.state_dict().items())


def test_semi_structured_swap_says_what_it_needs(tokenizer):
    """The 2:4 kernel path refuses, with the reason, what it cannot run: no GPU, a float32 model,
    a weight that is not 2:4 (these checks are all a CPU can see of it)."""
    from utils.export.semi_structured import is_two_four, semi_structured_problems
    model = tiny_model("opt", len(tokenizer), hidden=64)
    prune_model(model, "magnitude", 0.5, (2, 4), progress=False)
    weight = model.model.decoder.layers[0].fc1.weight
    assert is_two_four(weight) and not is_two_four(torch.ones(4, 8))
    problems = semi_structured_problems(model.to(torch.bfloat16))
    assert problems == ([] if torch.cuda.is_available() else
                        ["semi-structured sparse kernels need an NVIDIA GPU (sm80 or newer)"])
    unstructured = tiny_model("opt", len(tokenizer), hidden=64)
    prune_model(unstructured, "magnitude", 0.5, progress=False)
    assert any("float32; load the model in float16" in p for p in semi_structured_problems(unstructured))
    assert any("is not 2:4 sparse" in p for p in semi_structured_problems(unstructured.to(torch.bfloat16)))


def test_a_full_disk_while_exporting_keeps_the_results_and_says_how_to_export_later(tmp_path, tiny_llama_dir,
                                                                                     text_file, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(safetensors.torch, "save_file", full)  # what the exporter writes with
    run = tmp_path / "run"
    assert main([str(a) for a in ["--prune-only", "--model", tiny_llama_dir, "--sparsity", "0.3", "--method",
                                  "magnitude", "--token-length", "64", "--eval-source", text_file,
                                  "--pruned-dir", tmp_path / "pruned", "--output-dir", run]]) == 1
    assert "error: could not write" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["baseline"] > 0 and "--export-only" in results["export_error"]
    assert not (run / "compressed").exists()
