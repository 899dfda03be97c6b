"""A run never silently uses the wrong model, mixes two runs, or executes a file's code."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import StopAfter

from conftest import save_tiny
from extreme_compression_experiment import main
from test_cli import assert_pruned_weights_stayed_zero, job_args, pruned_folder, run_cli


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value` (replaced where it is given, else added)."""
    if flag in args:
        args = list(args)
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def prune_args(model_dir, text, out, *extra):
    return [str(a) for a in ["--prune-only", "--model", model_dir, "--sparsity", "0.3", "--method", "magnitude",
                             "--eval-source", text, "--token-length", "64", "--output-dir", out,
                             "--pruned-dir", Path(out).parent / "pruned", *extra]]


def test_two_models_in_folders_of_the_same_name_never_share_a_pruned_model(tmp_path, tokenizer, text_file, capsys):
    first = save_tiny(tmp_path / "a" / "model", "llama", tokenizer)
    second = tmp_path / "b" / "model"
    from helpers import tiny_model
    model = tiny_model("llama", len(tokenizer), seed=1)  # same architecture and folder name, other weights
    model.save_pretrained(second)
    tokenizer.save_pretrained(second)
    assert main(prune_args(first, text_file, tmp_path / "run-a")) == 0
    assert main(prune_args(second, text_file, tmp_path / "run-b")) == 0
    printed = capsys.readouterr().out
    assert printed.count("No pruned model at") == 2 and "Loading pruned model" not in printed
    folders = sorted((tmp_path / "pruned").glob("model-0.3-magnitude-*"))
    assert len(folders) == 2
    # Each entry was pruned from its own model.
    infos = [json.loads((f / "pruning.json").read_text()) for f in folders]
    assert {i["model_identity"]["path"] for i in infos} == {str(first.resolve()), str(second.resolve())}


def test_a_cached_pruned_model_of_another_model_is_refused(tmp_path, tokenizer, text_file, capsys):
    model_dir = save_tiny(tmp_path / "m", "llama", tokenizer)
    assert main(prune_args(model_dir, text_file, tmp_path / "one")) == 0
    folder = pruned_folder(tmp_path / "pruned", model_dir, 0.3, "magnitude")
    info = json.loads((folder / "pruning.json").read_text())
    info["model_identity"]["fingerprint"] = "0" * 16  # as if another model had been pruned into this entry
    (folder / "pruning.json").write_text(json.dumps(info))
    assert main(prune_args(model_dir, text_file, tmp_path / "two")) == 2
    assert "was pruned from another model" in capsys.readouterr().err


def test_a_cached_model_of_another_density_is_refused(tmp_path, tokenizer, text_file, capsys):
    model_dir = save_tiny(tmp_path / "m", "llama", tokenizer)
    assert main(prune_args(model_dir, text_file, tmp_path / "half", "--sparsity", "0.5")) == 0
    half = pruned_folder(tmp_path / "pruned", model_dir, 0.5, "magnitude")
    # A folder holding density 0.5 under the name of density 0.3 (copied by hand, or by an older version)
    fake = Path(str(half).replace("-0.5-", "-0.3-"))
    shutil.copytree(half, fake)
    assert main(prune_args(model_dir, text_file, tmp_path / "third")) == 2
    assert "pruning.json records another prune: density 0.5 (wanted 0.3)" in capsys.readouterr().err
    # a record that names the density but weights that hold another are refused by measuring them
    info = json.loads((fake / "pruning.json").read_text())
    (fake / "pruning.json").write_text(json.dumps({**info, "density": 0.3}))
    assert main(prune_args(model_dir, text_file, tmp_path / "fourth")) == 2
    assert "holds density 0.5000, not the requested 0.3" in capsys.readouterr().err
    # The seed lineage's .pt files are checked the same way.
    shutil.rmtree(fake)
    from transformers import AutoModelForCausalLM
    torch.save(AutoModelForCausalLM.from_pretrained(half).state_dict(), tmp_path / "pruned" / "m-0.3.pt")
    assert main(prune_args(model_dir, text_file, tmp_path / "lineage")) == 2
    assert "m-0.3.pt holds density 0.5000" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a file: the proof that a file's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_unpickles_nothing_from_the_run_folder(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(8)]) == 130
    state = out / "state"
    assert not [p for p in state.rglob("*") if p.suffix in (".pt", ".pkl", ".distcp") or p.name == ".metadata"]
    marker = tmp_path / "code-ran"
    for name in (".metadata", "extra.pt", "__0_0.distcp"):  # where a pickle-reading loader would look
        (state / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0
    assert "Resumed from" in capsys.readouterr().out and not marker.exists()


def test_resume_refuses_changed_settings_and_a_finished_run_stays_finished(tmp_path, tiny_llama_dir, text_file,
                                                                           capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(8)]) == 130
    run_json = (out / "run.json").read_text()
    for extra, message in ((["--sparsity", "0.5"], "--sparsity 0.3 → 0.5"),
                           (["--batch-size", "2"], "--batch-size 4 → 2"), (["--epochs", "3"], "--epochs 2 → 3"),
                           (["--loss", "ce"], "--loss kd → ce"), (["--seed", "1"], "--seed 0 → 1")):
        capsys.readouterr()
        assert main(with_flag(job_args(tiny_llama_dir, text_file, out, "--resume"), *extra)) == 2, extra
        error = capsys.readouterr().err
        assert "would mix two runs" in error and message in error, error
    assert (out / "run.json").read_text() == run_json  # refused resumes leave the run untouched
    # What may change: the evaluation batch size and the log file.
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", "--eval-batch-size", "2",
                         "--log-file", tmp_path / "log.txt")) == 0
    assert (out / "run.json").read_text() == run_json
    results = json.loads((out / "results.json").read_text())
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0
    assert "already finished" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results


def test_a_refused_resume_names_values_that_can_be_given_back_as_they_are():
    import math
    from dataclasses import replace

    from utils.pipeline.identity import RunIdentity, changed_flags
    saved = RunIdentity.from_json({"lr": 5e-5 / math.sqrt(8) * 2, "epochs": 5})  # a √batch-rule lr at batch 4
    doubled = 1e-4 / math.sqrt(8) * 2
    said = changed_flags(saved, replace(saved, lr=doubled, epochs=2))
    assert said == ["--epochs 5 → 2", f"--lr 3.535533905932738e-05 → {doubled!r}"], said
    assert float(said[1].split()[1]) == saved.lr  # `--lr 3.53553e-05` would be refused again
    assert changed_flags(saved, replace(saved, lr=0.002)) == ["--lr 3.535533905932738e-05 → 0.002"]


def test_a_run_stopped_while_exporting_after_its_last_epoch_writes_its_results_on_resume(
        tmp_path, tiny_llama_dir, text_file, capsys, monkeypatch):
    """As measured on the H200: SIGTERM came while a finished run exported its model, after its
    last state was saved; --resume then said "already finished" and left results.json missing."""
    import utils.pipeline.deliver as delivery
    out = tmp_path / "run"
    export = delivery.export_model

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGTERM raises outside the training loop
    monkeypatch.setattr(delivery, "export_model", stopped)
    assert main(job_args(tiny_llama_dir, text_file, out)) == 130
    assert json.loads((out / "state" / "train_state.json").read_text())["train_state"]["finished"]
    left = json.loads((out / "results.json").read_text())  # the last epoch's: in progress, not delivered
    assert left["in_progress"] is True and left["finished"] is False and not (out / "compressed").exists()
    saved = json.loads((out / "state" / "train_state.json").read_text())["train_state"]["history"]
    monkeypatch.setattr(delivery, "export_model", export)
    assert "with --resume" in capsys.readouterr().err  # the way on names the flag it needs
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "finished training but stopped before its results were all written" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] is False and results["epochs_completed"] == 2 and not results["stopped_early"]
    assert results["finished"] is True and "in_progress" not in results
    assert [e["perplexity"] for e in results["epochs"]] == [e["perplexity"] for e in saved["epochs"]]
    assert results["export"]["folder"] and (out / "compressed" / "config.json").exists()
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0  # now delivered: nothing is redone
    assert "already finished" in capsys.readouterr().out


def test_a_new_run_into_a_folder_holding_one_is_refused_unless_overwritten(tmp_path, tiny_llama_dir, text_file,
                                                                          capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 0
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 2
    assert "already holds the results of a training run" in capsys.readouterr().err
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--overwrite")) == 0
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 1  # the old run's lines are gone, not mixed in


def test_one_writer_per_folder_and_stale_locks_are_taken_over(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 2
        assert f"in use by another run (pid {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its process is gone now: the lock is stale and the run proceeds (and removes its own lock).
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 0
    assert not (out / ".lock").exists()


def test_sigterm_saves_state_and_the_resumed_run_equals_the_straight_one(tmp_path, tiny_opt_dir, text_file):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    dropout = ("--compile", "off")
    assert main(job_args(tiny_opt_dir, text_file, straight, *dropout)) == 0
    result = run_cli(job_args(tiny_opt_dir, text_file, resumed, *dropout), tmp_path, stop_after=(5, "term"))
    assert result.returncode == 130, result.stderr[-2000:]
    assert "Interrupted at optimizer step 5" in result.stdout
    assert main(job_args(tiny_opt_dir, text_file, resumed, *dropout, "--resume")) == 0
    finals = [json.loads((folder / "results.json").read_text())["final"] for folder in (straight, resumed)]
    assert finals[1] == finals[0]  # bit for bit
    assert_pruned_weights_stayed_zero(resumed / "best", pruned_folder(tmp_path / "pruned", tiny_opt_dir))


def test_resume_with_dropout_continues_the_random_stream(tmp_path, tokenizer, text_file):
    from helpers import tiny_model
    model = tiny_model("opt", len(tokenizer))
    model.config.dropout = 0.3  # OPT trains with dropout: the resumed run must draw the same masks
    folder = tmp_path / "dropout-opt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ("--compile", "off", "--loss", "ce")
    assert main(job_args(folder, text_file, tmp_path / "straight", *args)) == 0
    assert main(job_args(folder, text_file, tmp_path / "resumed", *args), callbacks=[StopAfter(3)]) == 130
    assert main(job_args(folder, text_file, tmp_path / "resumed", *args, "--resume")) == 0
    finals = [json.loads((tmp_path / name / "results.json").read_text())["final"] for name in ("straight", "resumed")]
    assert finals[1] == finals[0]


def test_a_resume_after_a_crash_records_each_step_once(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(8)]) == 130
    # What a kill -9 after the save leaves behind: lines of steps the saved state does not hold.
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": "train", "step": 10, "epoch": 2, "loss": 1.0}) + "\n")
        handle.write(json.dumps({"event": "evaluation", "epoch": 2, "perplexity": 1.0}) + "\n")
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert len(steps) == len(set(steps)) and max(steps) == 12
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert len([e for e in events if e["event"] == "evaluation" and e.get("epoch") == 2]) == 1


def test_a_full_disk_while_saving_stops_with_the_results_kept(tmp_path, tiny_llama_dir, text_file, capsys,
                                                              monkeypatch):
    import errno

    import utils.training.state as state_utils

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "state/weights-rank0.safetensors")

    monkeypatch.setattr(state_utils, "save_file", full, raising=False)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 1
    assert "No space left on device" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert "No space left on device" in results["error"] and results["epochs"]


def test_a_second_interrupt_during_a_save_waits_for_the_folder_to_be_whole():
    from utils.training.state import signals_deferred
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the block finished")
    assert done == ["the block finished"]


def test_a_closed_stdout_pipe_does_not_stop_the_run(tmp_path, tiny_llama_dir, text_file):
    from test_cli import CLI
    out = tmp_path / "run"
    command = [sys.executable, CLI, *job_args(tiny_llama_dir, text_file, out, "--epochs", "1")]
    reader = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    reader.stdout.readline()
    reader.stdout.close()  # `| head -1`
    _, stderr = reader.communicate(timeout=300)
    assert reader.returncode == 0, stderr[-2000:]
    assert b"Traceback" not in stderr and json.loads((out / "results.json").read_text())["epochs"]


def test_mixture_of_experts_with_fused_expert_tensors_is_refused_not_pruned_in_part():
    from helpers import tiny_model

    from utils.models.hub import ModelError
    from utils.models.structure import check_prunable
    fused = tiny_model("llama", 64)
    for layer in fused.model.layers:  # transformers 5's fused experts: one 3-D parameter per layer
        layer.mlp.experts = torch.nn.Parameter(torch.zeros(4, 8, 8))
    with pytest.raises(ModelError, match="fused .* tensors"):
        check_prunable(fused)


@pytest.mark.parametrize("method,pattern", [("sparsegpt", None), ("wanda", (2, 4)), ("magnitude", None)])
def test_gpt2_conv1d_layers_are_pruned_along_their_inputs(method, pattern):
    from helpers import tiny_model

    from utils.models.structure import find_decoder_layers, prunable_linears, weight_matrix
    from utils.pruning.driver import prune_model
    model = tiny_model("gpt2", 300, hidden=64)
    assert find_decoder_layers(model)[0] == "transformer.h"
    linears = prunable_linears(model)
    assert {name.split(".")[-1] for name in linears} == {"c_attn", "c_proj", "c_fc"}
    calibration = torch.arange(4 * 64).reshape(4, 64) * 7 % 300
    prune_model(model, method, 0.25, pattern, calibration=calibration, progress=False)
    for name, linear in linears.items():
        matrix = weight_matrix(linear)  # (out, in)
        assert matrix.shape == (linear.weight.shape[1], linear.weight.shape[0])
        kept = (matrix != 0).float()
        if pattern:  # 2 of every 4 consecutive inputs of each output row
            assert torch.all(kept.reshape(matrix.shape[0], -1, 4).sum(-1) == 2), name
        else:
            assert kept.mean().item() == pytest.approx(0.25, abs=1e-3), name


def test_gpt2_trains_end_to_end_with_its_pruned_weights_held_at_zero(tmp_path, tokenizer, text_file):
    from helpers import tiny_model
    model = tiny_model("gpt2", len(tokenizer))
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(job_args(folder, text_file, out, "--epochs", "1", "--loss", "ce", "--lr", "1e-3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["final"] < results["baseline"]
    assert assert_pruned_weights_stayed_zero(out / "best", pruned_folder(tmp_path / "pruned", folder)) > 0


def test_decoder_layers_come_from_the_model_s_own_block_class():
    from helpers import tiny_model

    from utils.models.structure import find_decoder_layers
    model = tiny_model("llama", 64, layers=2)
    # A longer ModuleList of linear-holding blocks (a mixture-of-experts layer's experts) must not win.
    model.model.layers[0].mlp.experts = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(8))
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and len(layers) == 2


def test_the_missing_train_split_never_suggests_the_test_file(tmp_path):
    from utils.data.sources import DataError, load_text
    (tmp_path / "wiki.test.raw").write_text("test text\n")
    (tmp_path / "wiki.valid.raw").write_text("valid text\n")
    with pytest.raises(DataError) as error:
        load_text(str(tmp_path), split="train")
    assert "e.g. " + str(tmp_path / "wiki.valid.raw") in str(error.value)
    assert "never wiki.test.raw" in str(error.value)


def test_a_damaged_gguf_conversion_is_rebuilt(tmp_path, tokenizer):
    from utils.models.loading import readable_checkpoint
    folder = save_tiny(tmp_path / "converted", "llama", tokenizer)
    assert readable_checkpoint(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a crash or a full disk while it was written
    assert not readable_checkpoint(folder)
    (folder / "config.json").write_text("{")
    assert not readable_checkpoint(folder)


class _Probe(torch.nn.Module):
    """Uniform logits; remembers every row it was given."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.rows = vocab_size, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace
        self.rows += [row.tolist() for row in input_ids]
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size) + self.anchor)


def test_a_bos_starts_every_window_where_the_family_needs_it():
    from utils.config.sections import EvalProtocol
    from utils.eval_utils import evaluate_perplexity
    bos, vocab = 1, 50
    text = torch.cat([torch.tensor([bos]), torch.arange(2, 2 + 40) % vocab])  # the tokenizer's one leading BOS
    papers, per_window = _Probe(vocab), _Probe(vocab)
    plain = evaluate_perplexity(papers, text, EvalProtocol(token_length=8, stride=8, batch_size=2), progress=False)
    with_bos = evaluate_perplexity(per_window, text, EvalProtocol(token_length=8, stride=8, batch_size=2, bos_id=bos), progress=False)
    assert papers.rows[0][0] == bos and all(row[0] != bos for row in papers.rows[1:])  # one BOS for the text
    assert all(row[0] == bos and len(row) == 8 and bos not in row[1:] for row in per_window.rows)
    assert plain.scored_tokens == 5 * 7  # 41 tokens → 5 windows of 8, the first token of each unscored
    assert with_bos.scored_tokens == 40 // 7 * 7  # 40 text tokens → 5 windows of 7, every one scored
    assert with_bos.perplexity == pytest.approx(vocab)  # uniform logits: perplexity is the vocabulary size


def test_bos_per_window_is_detected_for_the_families_that_need_it(tokenizer):
    from transformers import GemmaConfig, LlamaConfig

    from utils.models.families import bos_per_window
    from utils.models.hub import ModelError
    with_bos = type("Tokenizer", (), {"bos_token_id": 7})()
    assert bos_per_window("auto", GemmaConfig(), with_bos) == 7
    assert bos_per_window("auto", LlamaConfig(), with_bos) is None  # the papers' protocol for Llama and OPT
    assert bos_per_window("off", GemmaConfig(), with_bos) is None
    assert bos_per_window("on", LlamaConfig(), with_bos) == 7
    with pytest.raises(ModelError, match="has no BOS token"):
        bos_per_window("on", LlamaConfig(), type("Tokenizer", (), {"bos_token_id": None})())


def test_a_run_with_a_bos_per_window_records_it(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    from test_cli import job_args as args_of
    assert main(args_of(tiny_llama_dir, text_file, out, "--epochs", "1", "--bos-per-window", "on",
                        "--loss", "ce")) == 2  # the test tokenizer has no BOS: refused in one line
    from transformers import AutoTokenizer
    folder = tmp_path / "with-bos"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = "<eos>"
    tokenizer.save_pretrained(folder)
    assert main(args_of(folder, text_file, out, "--epochs", "1", "--bos-per-window", "on", "--loss", "ce")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bos_per_window"] is True and results["final"] != results["baseline"]
    # the cache key names BOS; at density 0.3 the default layer rule is OWL (λ 0.08, M 5)
    assert pruned_folder(tmp_path / "pruned", folder.name, 0.3, "sparsegpt-owl-0.08-5-bos").exists()


def test_a_finished_run_whose_results_json_is_not_an_object_writes_it_again_on_resume(tmp_path, tiny_llama_dir,
                                                                                       text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--keep-state")) == 0
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text("[]")  # valid JSON, not a results file: not delivered
    capsys.readouterr()
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", "--keep-state")) == 0
    assert "finished training but stopped before its results were all written" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["finished"] is True and [e["perplexity"] for e in again["epochs"]] == \
        [e["perplexity"] for e in results["epochs"]]


def test_a_run_folder_file_missing_damaged_or_not_an_object_reads_as_nothing(tmp_path):
    from utils.io.files import read_json_object
    path = tmp_path / "results.json"
    assert read_json_object(path) is None  # missing
    for text in ("{", "[]", "3", '"finished"', "\xff"):  # cut short, not an object, not text
        path.write_bytes(text.encode("latin-1"))
        assert read_json_object(path) is None, text
    path.write_text('{"finished": true}')
    assert read_json_object(path) == {"finished": True}


def test_out_of_memory_in_an_epochs_evaluation_keeps_its_training_for_resume(tmp_path, tiny_llama_dir, text_file,
                                                                             capsys, monkeypatch):
    """Seven runs on one GPU: one ran out of memory evaluating after its epoch and lost the epoch. Its
    training is saved now; --resume evaluates it without training it again, to the straight run's numbers."""
    import fsdp_finetune
    args = ("--compile", "off")
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "straight", *args)) == 0
    real = fsdp_finetune.evaluate_and_log

    def out_of_memory_after_epoch_2(model, tokens, logger, heading, *rest, **kwargs):
        if heading.title == "Evaluation After Epoch 2":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 768.00 MiB")
        return real(model, tokens, logger, heading, *rest, **kwargs)

    monkeypatch.setattr(fsdp_finetune, "evaluate_and_log", out_of_memory_after_epoch_2)
    out = tmp_path / "resumed"
    assert main(job_args(tiny_llama_dir, text_file, out, *args)) == 1
    printed = capsys.readouterr().out
    assert "Epoch 2's training is saved: the same command plus --resume" in printed
    assert "out of memory" in json.loads((out / "results.json").read_text())["error"]
    monkeypatch.setattr(fsdp_finetune, "evaluate_and_log", real)
    assert main(job_args(tiny_llama_dir, text_file, out, *args, "--resume", "--eval-batch-size", "2")) == 0
    assert "Resumed from" in capsys.readouterr().out
    straight, resumed = (json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "straight", out))
    assert [e["perplexity"] for e in resumed["epochs"]] == pytest.approx([e["perplexity"] for e in straight["epochs"]],
                                                                        rel=1e-5)
    assert len(resumed["epochs"]) == 2 and resumed["error"] is None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert len(steps) == len(set(steps)) and max(steps) == 12  # no step trained twice
