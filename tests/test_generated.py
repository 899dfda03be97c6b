"""Data-free recovery: `--train-source generated:N` samples the training text from the dense model."""
import json

import pytest
import torch

from extreme_compression_experiment import main
from helpers import tiny_model
from test_cli import job_args
from utils.data.sources import DataError
from utils.data.generated import GenerationSpec, generated_text, sample_rows, split_sources

SETTINGS = dict(temperature=1.0, top_p=0.95, length=12, batch_size=3, seed=0)


def test_the_spec_reads_counts_and_the_source_list_splits_off_the_generated_part():
    assert GenerationSpec.parse("generated:2M", **SETTINGS).tokens == 2_000_000
    assert GenerationSpec.parse("generated:500k", **SETTINGS).tokens == 500_000
    spec = GenerationSpec.parse("generated:100", **SETTINGS)
    assert spec.tokens == 100 and spec.rows == 9  # ceil(100 / 12)
    for bad in ("generated:", "generated:abc", "generated:0", "generated:-5"):
        with pytest.raises(DataError, match="how many tokens"):
            GenerationSpec.parse(bad, **SETTINGS)
    assert split_sources("a.txt,generated:1k,b/") == ("a.txt,b/", "generated:1k")
    assert split_sources("a.txt") == ("a.txt", None)
    with pytest.raises(DataError, match="give one"):
        split_sources("generated:1k,generated:2k")


def test_sampling_is_seeded_row_by_row_and_a_tiny_top_p_is_greedy_decoding(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    spec = GenerationSpec.parse("generated:60", **SETTINGS)  # 5 rows in batches of 3 and 2
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    first = sample_rows(model, spec, start, torch.device("cpu"))
    assert first.shape == (5, 13) and (first[:, 0] == start).all()
    assert torch.equal(first, sample_rows(model, spec, start, torch.device("cpu")))  # same seed, same text
    other = sample_rows(model, GenerationSpec.parse("generated:60", **{**SETTINGS, "seed": 1}), start,
                        torch.device("cpu"))
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) == 5  # rows differ from each other: really sampled
    # top-p so small that only the most likely token survives: each row is the model's own greedy text
    greedy = sample_rows(model, GenerationSpec.parse("generated:12", **{**SETTINGS, "top_p": 1e-9}), start,
                         torch.device("cpu"))
    ids = torch.tensor([[start]])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy[0], ids[0])


def test_generated_text_is_cached_with_its_settings(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    loads = []

    def load():
        loads.append(1)
        return model
    spec = GenerationSpec.parse("generated:30", **{**SETTINGS, "seed": 7})
    text = generated_text(spec, load, tokenizer, "fingerprint-a", torch.device("cpu"))
    again = generated_text(spec, load, tokenizer, "fingerprint-a", torch.device("cpu"))
    assert len(loads) == 1 and torch.equal(text.ids, again.ids) and text.ids.numel() == 3 * 13
    assert text.num_bytes > 0
    generated_text(spec, load, tokenizer, "fingerprint-b", torch.device("cpu"))  # another model: sampled anew
    generated_text(GenerationSpec.parse("generated:30", **{**SETTINGS, "seed": 7, "top_p": 0.5}), load, tokenizer,
                   "fingerprint-a", torch.device("cpu"))  # another setting: sampled anew
    assert len(loads) == 3


def test_a_run_trains_on_text_the_dense_model_samples(tmp_path, tiny_llama_dir, text_file, capsys, monkeypatch):
    import utils.pipeline.train as training_mode
    loads = []
    dense_model = training_mode.dense_model
    monkeypatch.setattr(training_mode, "dense_model", lambda *a: loads.append(1) or dense_model(*a))
    args = ["--train-source", "generated:3k", "--gen-length", "31", "--gen-batch-size", "16", "--loss", "kd",
            "--holdout", "0.05"]
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, *args)) == 0
    assert len(loads) == 1  # the model that sampled the text is the teacher: loaded once
    printed = capsys.readouterr().out
    assert "Generated text: sampling 97 rows of 31 tokens from the dense model" in printed  # ceil(3000 / 31)
    assert "Training text: 3,104 tokens" in printed  # 97 rows × (BOS + 31)
    budget = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "budget")
    assert budget["train_tokens"] + budget["holdout_tokens"] == 3104  # 97 blocks of --block-size 32
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] and results["final"] is not None
    # the same settings again: read back, not sampled; another --seed samples anew
    again = tmp_path / "again"
    assert main(job_args(tiny_llama_dir, text_file, again, *args)) == 0
    assert "read back from" in capsys.readouterr().out and len(loads) == 2  # the teacher only
    assert json.loads((again / "results.json").read_text())["final"] == results["final"]
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "seed", *args, "--seed", "3")) == 0
    assert "Generated text: sampling" in capsys.readouterr().out


@pytest.mark.parametrize("source,message", [("generated:lots", "how many tokens"),
                                            ("generated:1k,generated:2k", "give one")])
def test_a_bad_generated_source_is_refused_while_parsing(source, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--train-source", source])
    assert stop.value.code == 2 and message in capsys.readouterr().err
