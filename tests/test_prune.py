import pytest
import torch

from helpers import smollm2_gguf, tiny_model, wikitext_dir
from utils.models.sparsity import sparsity_report
from utils.models.structure import find_decoder_layers, prunable_linears
from utils.pruning.criteria import InputStats, Solver, magnitude_keep, parse_pattern, sparsegpt_prune, wanda_keep
from utils.pruning.driver import prune_model
from utils.pruning.methods import METHODS, SparseGPTOptions


def _correlated_inputs(columns: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, columns // 2, generator=generator) @ torch.randn(columns // 2, columns, generator=generator)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    stats = InputStats(x.shape[1], torch.device("cpu"), hessian=True)
    for part in x.split(512):
        stats.add_batch(part)
    return stats.hessian


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(None) is None
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


def test_magnitude_is_exact_per_matrix_and_keeps_the_largest():
    weight = torch.randn(48, 80)
    keep = magnitude_keep(weight, 0.1)
    assert int(keep.sum()) == round(48 * 80 * 0.1)
    assert weight.abs()[keep].min() >= weight.abs()[~keep].max()


def test_wanda_is_exact_per_row_and_uses_input_norms():
    weight = torch.ones(8, 20)
    norms = torch.arange(20, dtype=torch.float32)
    keep = wanda_keep(weight, norms, 0.25)
    assert torch.all(keep.sum(1) == 5)
    assert torch.all(keep[:, 15:]) and not keep[:, :15].any()  # the largest input norms win


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_every_method_keeps_exactly_n_of_every_m(pattern):
    n, m = pattern
    weight = torch.randn(16, 64)
    x = _correlated_inputs(64)
    masks = {"magnitude": magnitude_keep(weight, n / m, pattern),
             "wanda": wanda_keep(weight, x.square().sum(0), n / m, pattern),
             "sparsegpt": sparsegpt_prune(weight, _hessian(x), n / m, pattern)[1]}
    for method, keep in masks.items():
        groups = keep.reshape(16, 64 // m, m).sum(-1)
        assert torch.all(groups == n), method


def test_sparsegpt_is_exact_per_block_and_writes_positive_zeros():
    weight = torch.randn(30, 300)
    pruned, keep = sparsegpt_prune(weight, _hessian(_correlated_inputs(300)), 0.3, solver=Solver(blocksize=128))
    for start, width in ((0, 128), (128, 128), (256, 44)):
        assert int(keep[:, start:start + width].sum()) == 30 * width - round(30 * width * 0.7)
    assert torch.equal(pruned == 0, ~keep | (pruned == 0))
    zeros = pruned[~keep]
    assert torch.all(zeros == 0) and not torch.signbit(zeros).any()


def _reference_sparsegpt(W, H, prunen, prunem, blocksize=128, percdamp=0.01):
    """The published algorithm written plainly (N:M branch), column by column."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_matches_the_published_algorithm():
    weight = torch.randn(40, 256)
    hessian = _hessian(_correlated_inputs(256))
    ours, _ = sparsegpt_prune(weight, hessian, 0.5, (2, 4))
    reference = _reference_sparsegpt(weight, hessian, 2, 4)  # prune 2 of 4 = keep 2 of 4
    assert torch.equal(ours == 0, reference == 0)
    assert (ours - reference).norm() / reference.norm() < 1e-4


def test_sparsegpt_reconstructs_better_than_magnitude():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=generator) * torch.linspace(0.1, 3, 128)  # inputs of unequal scale
    weight = torch.randn(32, 128, generator=generator)
    pruned, _ = sparsegpt_prune(weight, _hessian(x), 0.3)
    magnitude = weight * magnitude_keep(weight, 0.3)
    assert ((weight - pruned) @ x.T).norm() < 0.8 * ((weight - magnitude) @ x.T).norm()


@pytest.mark.parametrize("family", ["llama", "opt", "opt-350m"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_prune_model_on_tiny_models(family, method):
    model = tiny_model(family, vocab_size=97)
    untouched = {n: p.clone() for n, p in model.named_parameters() if "layers" not in n}
    calibration = torch.randint(0, 97, (6, 32))
    report = prune_model(model, method, 0.25, calibration=calibration, options=METHODS[method].options(batch_size=4),
                         progress=False)
    measured = sparsity_report(model)
    assert measured.density == pytest.approx(0.25, abs=0.01)
    assert set(report.layer_density) == {name for name, _, _ in measured.layers}
    for name, param in model.named_parameters():  # embeddings, norms and the LM head stay as they were
        if name in untouched:
            assert torch.equal(param, untouched[name]), name
    logits = model(torch.randint(0, 97, (1, 16))).logits
    assert torch.isfinite(logits).all()


def test_layers_are_found_by_structure():
    for family, prefix in [("llama", "model.layers"), ("opt", "model.decoder.layers")]:
        name, layers = find_decoder_layers(tiny_model(family, 50, layers=3))
        assert name == prefix and len(layers) == 3
    assert len(prunable_linears(tiny_model("llama", 50, layers=3))) == 3 * 7


def test_sparsegpt_on_three_layers_of_smollm2():
    from utils.data.sources import calibration_windows, tokenize_source
    from utils.models.loading import load_model, resolve_model
    model, tokenizer = load_model(resolve_model(str(smollm2_gguf())), dtype=torch.float32)
    _, layers = find_decoder_layers(model)
    del layers[3:]
    model.config.num_hidden_layers = 3
    valid = tokenize_source(str(wikitext_dir() / "wiki.valid.raw"), tokenizer, split="train")
    calibration = calibration_windows(valid.ids, 8, 256, seed=0)
    prune_model(model, "sparsegpt", 0.5, (2, 4), calibration=calibration, options=SparseGPTOptions(batch_size=4),
                progress=False)
    for linear in prunable_linears(model).values():
        keep = linear.weight != 0
        assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2)
    assert sparsity_report(model).density == pytest.approx(0.5, abs=0.001)


def test_owl_densities_average_exactly_to_the_request_and_follow_the_outliers():
    from utils.pruning.criteria import owl_densities
    ratios, sizes = [0.01, 0.05, 0.03, 0.02], [100, 300, 200, 400]
    profile = owl_densities(ratios, sizes, density=0.3, lam=0.08)
    weighted = sum(d * n for d, n in zip(profile, sizes)) / sum(sizes)
    assert weighted == pytest.approx(0.3, abs=1e-12)
    assert sorted(range(4), key=lambda i: profile[i]) == sorted(range(4), key=lambda i: ratios[i])
    assert max(profile) - min(profile) == pytest.approx(0.16)  # the band is 2·λ
    assert owl_densities([0.02] * 3, [1, 1, 1], 0.1, 0.08) == pytest.approx([0.1] * 3)  # no outliers: uniform
    # A band wider than the density allows: clipped at the floor, the mean still exact.
    clipped = owl_densities([0.0, 1.0, 1.0, 1.0], [1, 1, 1, 1], density=0.05, lam=0.2)
    assert min(clipped) == pytest.approx(1e-3) and sum(clipped) / 4 == pytest.approx(0.05, abs=1e-12)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    from utils.pruning.criteria import outlier_ratio
    weight = torch.tensor([[1.0, 1.0, 1.0, 20.0]])  # scores |w|·‖x‖ with ‖x‖ = 1: mean 5.75
    assert outlier_ratio([weight], [torch.ones(4)], m=3.0) == pytest.approx(0.25)  # 20 > 17.25
    assert outlier_ratio([weight], [torch.ones(4)], m=4.0) == pytest.approx(0.0)  # 20 < 23


def test_owl_prunes_each_layer_to_its_profile_and_gets_its_own_cache_entry(tmp_path, tiny_llama_dir, text_file):
    import json

    from extreme_compression_experiment import main
    from utils.models.sparsity import sparsity_report
    from transformers import AutoModelForCausalLM
    base = ["--prune-only", "--model", str(tiny_llama_dir), "--sparsity", "0.3", "--method", "wanda",
            "--eval-source", str(text_file), "--calibration-source", str(text_file), "--token-length", "64",
            "--nsamples", "4", "--calibration-length", "64", "--pruned-dir", str(tmp_path / "pruned")]
    assert main(base + ["--layer-density", "owl", "--owl-lambda", "0.1", "--owl-m", "2",
                        "--output-dir", str(tmp_path / "owl")]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "uniform")]) == 0
    folders = sorted((tmp_path / "pruned").iterdir())
    owl = [f for f in folders if "-owl-0.1-2-" in f.name]
    assert len(folders) == 2 and len(owl) == 1
    info = json.loads((owl[0] / "pruning.json").read_text())
    profile = info["layer_density_profile"]
    assert len(profile) == 2 and profile[0] != profile[1]
    report = sparsity_report(AutoModelForCausalLM.from_pretrained(owl[0]))
    # Wanda keeps a whole number of weights per row: 64 inputs round each layer by up to 1/64.
    assert sum(profile) / 2 == pytest.approx(0.3, abs=1e-12)  # equal-sized layers: the plain mean is the weighted one
    assert report.density == pytest.approx(0.3, abs=1 / 64)
    for (_, nonzeros, numel), density in zip(report.layers, profile):
        assert nonzeros / numel == pytest.approx(density, abs=1 / 64)


def test_one_method_table_drives_the_choices_the_layer_pruners_and_calibration():
    """A method is a row of utils/pruning/methods.METHODS: the CLI offers exactly those names, and a
    method the table marks uncalibrated prunes without any calibration text (a calibrated one refuses to)."""
    from extreme_compression_experiment import build_parser
    from utils.pruning.driver import prune_model
    from utils.pruning.methods import METHODS
    choices = next(a.choices for a in build_parser()._actions if "--method" in a.option_strings)
    assert list(choices) == list(METHODS)
    for name, method in METHODS.items():
        model = tiny_model("llama", 96)
        if method.calibrated:
            with pytest.raises(ValueError, match="needs calibration data"):
                prune_model(model, name, 0.5, calibration=None)
        else:
            prune_model(model, name, 0.5, calibration=None, progress=False)
            assert sparsity_report(model).density == pytest.approx(0.5, abs=1 / 64)


def test_a_new_method_with_a_knob_of_its_own_is_one_table_row(monkeypatch):
    """The row's options dataclass gives the flag, the config carries the value to the prune
    function, and the cache key and the run identity name it: nothing else is edited."""
    from dataclasses import dataclass, field

    from extreme_compression_experiment import build_parser
    from utils.config.validate import validate
    from utils.pipeline.identity import PruneSpec, RunIdentity
    from utils.pruning.criteria import magnitude_keep
    from utils.pruning.driver import prune_model
    from utils.pruning.methods import METHODS, MethodOptions, PruningMethod
    from utils.pruning.schedule import SparsitySchedule

    @dataclass(frozen=True)
    class HalfOptions(MethodOptions):
        scale: float = field(default=1.0, metadata={"flag": "--half-scale", "help": "a knob"})

    seen = []

    def half(weights, stats, density, pattern, options, sweep=None):
        seen.append(options.scale)
        for weight in weights:
            weight.masked_fill_(~magnitude_keep(weight, density, pattern), 0.0)

    monkeypatch.setitem(METHODS, "half", PruningMethod("half", "none", half, "a test method", options=HalfOptions))
    parser = build_parser()
    config = validate(parser.parse_args(["--method", "half", "--half-scale", "0.25", "--sparsity", "0.5"]))
    assert config.prune.options == HalfOptions(scale=0.25)
    model = tiny_model("llama", 96)
    prune_model(model, "half", 0.5, options=config.prune.options, progress=False)
    assert seen and set(seen) == {0.25} and sparsity_report(model).density == pytest.approx(0.5, abs=1 / 64)
    assert PruneSpec.of(config, "tiny", "0" * 16, None).folder("p").name == "tiny-0.5-half-scale0.25-0000000000"
    identity = RunIdentity.of(config, "0" * 16, SparsitySchedule.oneshot(0.5), None)
    assert identity.method_options == {"scale": 0.25}
    default = validate(parser.parse_args(["--method", "half", "--sparsity", "0.5"]))
    assert RunIdentity.of(default, "0" * 16, SparsitySchedule.oneshot(0.5), None).to_json()["method_options"] is None
