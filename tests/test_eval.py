import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from helpers import (ConstantLogits, broken_cpp_compiler, distributed_eval_worker, smollm2_gguf, tiny_model,
                     wikitext_dir)
from utils.data.sources import DataError, TokenizedText, tokenize_source
from utils.config.sections import EvalProtocol
from utils.eval_utils import CompiledKernels, evaluate_perplexity, plan_windows
from utils.io.history import PerplexityHistory


def test_paper_protocol_uses_full_windows_and_drops_the_tail():
    windows = plan_windows(10_000, 2048, 2048)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (i * 2048, (i + 1) * 2048, 1) for i in range(4)]


@pytest.mark.parametrize("num_tokens,length,stride", [(1000, 128, 32), (1000, 128, 127), (1031, 100, 64), (257, 256, 1)])
def test_sliding_windows_score_every_token_but_the_first_exactly_once(num_tokens, length, stride):
    counts = torch.zeros(num_tokens, dtype=torch.long)
    for window in plan_windows(num_tokens, length, stride):
        assert window.end - window.begin <= length
        counts[window.begin + window.score_from: window.end] += 1
    assert counts[0] == 0
    assert torch.all(counts[1:] == 1)


def test_uniform_logits_give_the_vocabulary_size():
    vocab = 37
    ids = torch.randint(0, vocab, (1000,))
    result = evaluate_perplexity(ConstantLogits(vocab), TokenizedText(ids, 3000, "x"), EvalProtocol(token_length=128, stride=128, batch_size=2), progress=False)
    assert result.perplexity == pytest.approx(vocab, rel=1e-6)  # float32 log-softmax
    assert result.windows == 7 and result.scored_tokens == 7 * 127 and result.tokens == 1000
    # bits per byte: log2(37) bits per token, 3 bytes per token
    assert result.bits_per_byte == pytest.approx(math.log2(vocab) / 3, rel=1e-6)


def test_an_oracle_scores_perplexity_one_and_full_accuracy():
    vocab = 11
    ids = torch.arange(600) % vocab  # token t is always followed by t + 1
    oracle = ConstantLogits(vocab, next_tokens=(torch.arange(vocab) + 1) % vocab)
    result = evaluate_perplexity(oracle, ids, EvalProtocol(token_length=64, stride=48, batch_size=4), progress=False)
    assert result.perplexity == pytest.approx(1.0, abs=1e-6)
    assert result.accuracy == 1.0
    assert result.scored_tokens == 599


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one window of 2048"):
        evaluate_perplexity(ConstantLogits(5), torch.zeros(100, dtype=torch.long), EvalProtocol(token_length=2048, stride=2048), progress=False)


def test_batching_does_not_change_the_result_and_mode_is_restored(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.train()
    ids = torch.arange(1500) * 13 % model.config.vocab_size
    one = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=100, batch_size=1), progress=False)
    assert model.training
    many = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=100, batch_size=5), progress=False)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert many.accuracy == one.accuracy and many.scored_tokens == one.scored_tokens == 1499


def test_compiled_layers_and_scoring_equal_eager_and_leave_the_model_as_it_was():
    from torch._dynamo.utils import counters
    model = tiny_model("opt", 300, layers=6)
    ids = torch.arange(1500) * 13 % model.config.vocab_size
    eager = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=128, batch_size=4), progress=False)
    graphs = counters["stats"]["unique_graphs"]
    kernels = CompiledKernels()  # what a run keeps for its evaluations
    for level in ("scoring", "layers", "layers"):  # the second "layers" reuses what the first compiled
        compiled = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=128, batch_size=4,
                                                                compile=level), kernels=kernels, progress=False)
        assert compiled.perplexity == pytest.approx(eager.perplexity, rel=1e-5)
        assert compiled.accuracy == eager.accuracy
    layers = model.model.decoder.layers
    assert all("forward" not in vars(layer) for layer in layers)  # nothing left on the model
    # 11 windows in batches of 4: two shapes of the layer (4 and 3 windows) and of the scoring,
    # once for all layers, not once a layer
    assert counters["stats"]["unique_graphs"] - graphs <= 4 < len(layers) * 2
    with pytest.raises(ValueError, match="compile must be one of"):
        evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=128, compile="model"))


def test_linear_relu_fusion_pass_moves_bias_and_relu_into_the_matmul_and_keeps_the_values():
    from torch.fx.experimental.proxy_tensor import make_fx

    from utils.eval_utils import FuseLinearReLU
    aten = torch.ops.aten
    fc, other = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def block(x):  # OPT's fc1 (2-D), a 3-D linear, and an addmm whose output is used twice (left alone)
        flat = torch.relu(fc(x.reshape(-1, 8)))
        deep = torch.relu(fc(x))
        shared = fc(x.reshape(-1, 8))
        return other(flat).sum() + other(deep).sum() + torch.relu(shared).sum() + shared.sum()

    x = torch.randn(2, 5, 8)
    graph = make_fx(block)(x)
    targets = [node.target for node in graph.graph.nodes]
    assert targets.count(aten.relu.default) == 3 and aten._addmm_activation.default not in targets
    FuseLinearReLU()(graph.graph)
    graph.recompile()
    targets = [node.target for node in graph.graph.nodes]
    assert targets.count(aten._addmm_activation.default) == 2 and targets.count(aten.relu.default) == 1
    torch.testing.assert_close(graph(x), block(x))


def test_a_failing_compiler_falls_back_to_eager_evaluation():
    model = tiny_model("llama", 300)
    ids = torch.arange(700) * 13 % 300
    eager = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=128, batch_size=2), progress=False)
    with broken_cpp_compiler(), pytest.warns(UserWarning) as warned:
        result = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=128, batch_size=2, compile="layers"), progress=False)
    messages = " ".join(str(w.message) for w in warned)
    assert "compiled decoder layers failed" in messages and "compiled scoring failed" in messages
    assert result.perplexity == pytest.approx(eager.perplexity, rel=1e-6)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    import torch._inductor.config as inductor
    assert inductor.fx_graph_cache is not False and inductor.cpp.cxx != ("no-such-compiler-here",)  # restored


def test_two_gloo_processes_equal_one(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.arange(2000) * 7 % model.config.vocab_size
    single = evaluate_perplexity(model, ids, EvalProtocol(token_length=128, stride=96, batch_size=3), progress=False)
    out = tmp_path / "two.json"
    mp.spawn(distributed_eval_worker, args=(2, str(tmp_path / "store"), str(tiny_llama_dir), str(out)), nprocs=2)
    two = json.loads(out.read_text())
    assert two["scored"] == single.scored_tokens
    assert two["perplexity"] == pytest.approx(single.perplexity, rel=1e-5)
    assert two["accuracy"] == pytest.approx(single.accuracy, abs=1e-9)


def test_history_trend_and_summary():
    history = PerplexityHistory(baseline=27.44, dense=20.0)
    history.add(1, 25.82)
    history.add(2, 26.50)
    lines = history.trend_lines()
    assert "Epoch 1: 25.82 (↓5.9%)" in lines
    assert "Epoch 2: 26.50 (↓3.4%)" in lines
    assert history.best == (1, 25.82)
    summary = "\n".join(history.summary_lines())
    assert "Best perplexity:     25.8200 (epoch 1)" in summary
    assert "Final perplexity:    26.5000" in summary
    assert "Total improvement:   ↓3.4%" in summary
    again = PerplexityHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert again.trend_lines() == lines
    worse = PerplexityHistory(baseline=10.0)
    worse.add(1, 12.0)
    assert worse.trend_lines()[-1] == "Epoch 1: 12.00 (↑20.0%)" and worse.best == (0, 10.0)



def test_a_schedule_stopped_before_its_first_evaluation_has_no_final_perplexity():
    """A gradual run out of memory at its first evaluation printed the baseline at density 0.5 as the
    final perplexity of a model at 0.1 ("Since the baseline: ↓0.0%")."""
    stopped = PerplexityHistory(baseline=39.89, dense=21.61, densities=(0.5, 0.1))
    summary = "\n".join(stopped.summary_lines())
    assert stopped.final is None and stopped.to_dict()["final"] is None
    assert "Final perplexity" not in summary and "Since the baseline" not in summary and "Baseline perplexity" in summary
    one_shot = PerplexityHistory(baseline=39.89)  # the baseline is the model's own density: it stands until an epoch
    assert one_shot.final == 39.89
    stopped.add(1, 45.0)
    assert stopped.final == 45.0 and "Final perplexity:    45.0000" in "\n".join(stopped.summary_lines())


def _plain_perplexity(model, ids: torch.Tensor, windows: int, length: int) -> float:
    """An independent implementation: one window at a time, log-softmax by hand."""
    means = []
    with torch.no_grad():
        for i in range(windows):
            chunk = ids[i * length:(i + 1) * length].unsqueeze(0)
            logits = model(chunk).logits[0, :-1].double()
            logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            means.append(-logprobs.gather(1, chunk[0, 1:].unsqueeze(1)).mean())
    return math.exp(torch.stack(means).mean().item())


def test_smollm2_wikitext2_protocol_and_first_windows():
    """The real model and data: the paper protocol's counts, and the first 4 windows against
    an independent implementation to 4 significant digits."""
    from utils.models.loading import load_model, resolve_model
    data, gguf = wikitext_dir(), smollm2_gguf()
    model, tokenizer = load_model(resolve_model(str(gguf)), dtype=torch.float32)
    tokens = tokenize_source(str(data), tokenizer, split="test")
    assert tokens.ids.numel() == 304_986
    assert len(plan_windows(tokens.ids.numel(), 2048, 2048)) == 148
    first = tokens.ids[: 4 * 2048]
    share = TokenizedText(first, round(tokens.num_bytes * first.numel() / tokens.ids.numel()), "first windows")
    ours = evaluate_perplexity(model, share, EvalProtocol(token_length=2048, stride=2048, batch_size=2), progress=False)
    reference = _plain_perplexity(model, first, 4, 2048)
    assert ours.windows == 4
    assert f"{ours.perplexity:.4g}" == f"{reference:.4g}"
    assert 0 < ours.accuracy < 1 and 0 < ours.bits_per_byte < 8
