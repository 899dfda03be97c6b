"""What the tool reads back is verified before use: a damaged export, a damaged or implausible
saved state, a folder that holds results.  Each case is one row; each row failed on dd0f19c
(it loaded random weights, resumed wrongly, overwrote results, or raised a traceback)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from extreme_compression_experiment import main
from helpers import StopAfter, tiny_model
from test_cli import job_args
from utils.export.compressed import export_compressed, load_compressed
from utils.models.hub import ModelError
from utils.pruning.driver import prune_model


@pytest.fixture(scope="module")
def export(tmp_path_factory, tokenizer) -> Path:
    model = tiny_model("llama", len(tokenizer))
    prune_model(model, "magnitude", 0.2, progress=False)
    folder = tmp_path_factory.mktemp("export") / "compressed"
    export_compressed(model, tokenizer, folder, torch.bfloat16)
    return folder


Q = "model.layers.0.self_attn.q_proj.weight"


def _weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "extreme-compression/sparse-bitmask"})


def _manifest(folder: Path, change) -> None:
    path = folder / "compression.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def _config(folder: Path, change) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _rename_compressed(m):
    m["compressed"] = [name.replace("q_proj", "qq_proj") for name in m["compressed"]]
    return m


DAMAGED = [  # (what to do to the export, what the refusal says)
    (lambda f: _manifest(f, _rename_compressed), "the manifest compresses model.layers.0.self_attn.qq_proj.weight, whose"),
    (lambda f: _manifest(f, lambda m: {**m, "compressed": [n for n in m["compressed"] if n != Q]}),
     f"names {Q}.bitmask, which this architecture has no tensor of"),
    (lambda f: _weights(f, lambda t: t.pop("model.norm.weight")), "no weights for model.norm.weight"),
    (lambda f: _weights(f, lambda t: t.pop(f"{Q}.bitmask")), f"whose {Q}.bitmask is not in model.safetensors"),
    (lambda f: _config(f, lambda c: {**c, "model_type": "opt", "architectures": ["OPTForCausalLM"]}),
     "which this architecture has no tensor of"),
    (lambda f: _weights(f, lambda t: t.update({f"{Q}.compressed": t[f"{Q}.compressed"].float()})),
     "holds F32 "),
    (lambda f: _weights(f, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].double()})),
     "model.norm.weight is stored in float64, but the manifest says bfloat16"),
    (lambda f: _weights(f, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].float()})),
     "is stored in float32, but the manifest says bfloat16"),
    (lambda f: _weights(f, lambda t: t.update({"extra.weight": torch.zeros(2)})), "names extra.weight"),
    (lambda f: _weights(f, lambda t: t.update({"model.norm.weight": torch.zeros(7, dtype=torch.bfloat16)})),
     "model.norm.weight is stored as (7,)"),
    (lambda f: _weights(f, lambda t: t.update({f"{Q}.shape": torch.tensor([10 ** 9, 10 ** 9])})),
     f"{Q}.bitmask is"),  # a declared shape of 10^18 weights: refused from the header, nothing allocated
    (lambda f: _weights(f, lambda t: t.update({f"{Q}.shape": torch.tensor([64.0, 64.0])})), "not two int64 sizes"),
    (lambda f: _manifest(f, lambda m: [m]), "holds a list, not an object"),
    (lambda f: _manifest(f, lambda m: {**m, "dtype": "int3"}), "dtype 'int3' is none of"),
    (lambda f: _manifest(f, lambda m: {**m, "tied": {"lm_head.weight": "no.such.tensor"}}),
     "no weights for lm_head.weight"),
    (lambda f: _manifest(f, lambda m: {**m, "tied": ["lm_head.weight"]}), "'tied' is not an object"),
    (lambda f: _manifest(f, lambda m: {**m, "compressed": "model.norm.weight"}), "'compressed' is not a list"),
    (lambda f: _manifest(f, lambda m: {**m, "format": "other"}), "describes format 'other'"),
    (lambda f: (f / "compression.json").write_text("{not json"), "cannot be read"),
    (lambda f: (f / "config.json").write_text("{}"), "config.json cannot be read"),
]


@pytest.mark.parametrize("damage, message", DAMAGED, ids=[m for _, m in DAMAGED])
def test_a_damaged_export_is_refused_naming_what_is_wrong(export, tmp_path, damage, message):
    folder = tmp_path / "compressed"
    shutil.copytree(export, folder)
    load_compressed(folder)  # whole, it loads
    damage(folder)
    with pytest.raises(ModelError) as refused:
        load_compressed(folder)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_damaged_export_is_one_line_and_exit_2_on_the_command_line(export, tmp_path, text_file, capsys):
    folder = tmp_path / "compressed"
    shutil.copytree(export, folder)
    _manifest(folder, _rename_compressed)
    assert main(["--eval-only", "--model", str(folder), "--eval-source", str(text_file), "--token-length", "64",
                 "--output-dir", str(tmp_path / "e")]) == 2
    assert "the manifest compresses model.layers.0.self_attn.qq_proj.weight" in capsys.readouterr().err


# --------------------------------------------------------------------------- saved state


def _state(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


STATES = [  # (what to do to train_state.json, what the refusal says)
    (lambda m: m.pop("train_state"), "has no 'train_state'"),
    (lambda m: m.pop("optimizer"), "has no 'optimizer'"),
    (lambda m: m.pop("identity"), "has no 'identity'"),
    (lambda m: m["train_state"].pop("global_step"), "has no 'global_step'"),
    (lambda m: m["train_state"].pop("history"), "has no 'history'"),
    (lambda m: m["train_state"].update(global_step="8"), "'global_step' is '8', not int"),
    (lambda m: m["train_state"].update(epoch=1.5), "'epoch' is 1.5, not int"),
    (lambda m: m["train_state"].update(finished="no"), "'finished' is 'no', not bool"),
    (lambda m: m["train_state"].update(history=[]), "'history' is [], not dict"),
    (lambda m: m["optimizer"].update(param_groups={}), "'param_groups' is {}, not list"),
    (lambda m: m["train_state"].update(global_step=10 ** 9), "optimizer step 1000000000 in epoch 2"),
    (lambda m: m["train_state"].update(epoch=1), "optimizer step 8 in epoch 1"),
    (lambda m: m["train_state"].update(global_step=-1), "optimizer step -1"),
    (lambda m: m.update(train_state=True), "'train_state' is True, not dict"),
]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_llama_dir, text_file) -> Path:
    """A run stopped at optimizer step 8 (epoch 2 of 2 × 6 steps)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(8)]) == 130
    return out


@pytest.mark.parametrize("change, message", STATES, ids=[m for _, m in STATES])
def test_a_damaged_or_implausible_saved_state_is_refused_on_resume(interrupted, tmp_path, tiny_llama_dir, text_file,
                                                                    capsys, change, message):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    _state(out / "state" / "train_state.json", change)
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error


def test_a_crash_inside_the_state_swap_resumes_from_state_old(interrupted, tmp_path, tiny_llama_dir, text_file,
                                                              capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    os.replace(out / "state", out / "state.old")  # the moment between moving the old state away and the new in
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", "--keep-state")) == 0
    assert "Resumed from" in capsys.readouterr().out and (out / "state" / "train_state.json").exists()


@pytest.mark.parametrize("mode", [["--eval-only"], ["--export-only", "--model", "BEST"], ["--prune-only"]])
def test_a_folder_with_results_is_never_overwritten_by_another_mode(interrupted, tmp_path, tiny_llama_dir, text_file,
                                                                     capsys, mode):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    shutil.copytree(out / "best", tmp_path / "best")  # a model from elsewhere: --overwrite empties the folder
    args = [a if a != "BEST" else str(tmp_path / "best") for a in mode]
    argv = job_args(tiny_llama_dir, text_file, out)
    if "--model" in args:  # --export-only of the run's own best model into the run's folder
        argv[argv.index("--model") + 1] = args.pop(args.index("--model") + 1)
        args.remove("--model")
    assert main([*argv, *args]) == 2
    assert "already holds the results of a training run" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert main([*argv, *args, "--overwrite"]) == 0  # the way out it names


def test_a_start_that_failed_before_any_work_blocks_nothing(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    short = tmp_path / "short.txt"
    short.write_text("too short for one window", encoding="utf-8")
    args = job_args(tiny_llama_dir, text_file, out)
    args[args.index("--eval-source") + 1] = str(short)
    assert main(args) == 2  # fails on the text, after run.json was written
    assert (out / "run.json").exists()
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 0
    assert "already holds" not in capsys.readouterr().err


def test_an_empty_lock_left_by_a_crashed_writer_is_taken_over(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    old = os.path.getmtime(out / ".lock") - 60
    os.utime(out / ".lock", (old, old))
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 0


def test_a_seed_sweep_prunes_anew_and_a_model_edited_in_place_is_pruned_again(tmp_path, tokenizer, text_file, capsys):
    """The cache key holds the calibration; the whole weight files' digest (remembered per file
    version) catches an edit where the sampled fingerprint does not read."""
    from conftest import save_tiny
    model_dir = save_tiny(tmp_path / "model", "llama", tokenizer, layers=2, hidden=192)  # > 2 MiB: sampled
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size
    short = tmp_path / "short.txt"  # a few evaluation windows: what is measured here is the cache
    short.write_text(text_file.read_text()[:3000])
    assert size > 32 * 65536

    def prune(out, *extra):
        capsys.readouterr()
        assert main(["--prune-only", "--model", str(model_dir), "--sparsity", "0.3", "--method", "wanda",
                     "--token-length", "64", "--eval-source", str(short), "--calibration-source", str(text_file),
                     "--nsamples", "4", "--calibration-length", "64", "--pruned-dir", str(tmp_path / "pr"),
                     "--export", "none", "--skip-dense-eval", "--output-dir", str(tmp_path / out), *extra]) == 0
        return capsys.readouterr().out

    assert "pruning now" in prune("a")
    assert "Loading pruned model" in prune("b")
    assert "pruning now" in prune("c", "--seed", "1")  # another calibration: another entry
    assert len(list((tmp_path / "pr").iterdir())) == 2
    data = bytearray(weights.read_bytes())
    between = (size - 65536) // 31 // 2 + 32768  # between the first two slices the fingerprint samples
    data[between] ^= 0xFF
    weights.write_bytes(bytes(data))
    printed = prune("d")
    assert "was made from other weights than --model has now" in printed and "pruning again" in printed
    assert "Loading pruned model" in prune("e")  # the entry made again is the model's now


@pytest.mark.parametrize("changed, flag", [(("--token-length", "32"), "--token-length 64 → 32"),
                                           (("--stride", "32"), "--stride 64 → 32"),
                                           (("--dtype", "bfloat16"), "--dtype auto → bfloat16")])
def test_resume_refuses_another_evaluation_protocol(interrupted, tmp_path, tiny_llama_dir, text_file, capsys,
                                                   changed, flag):
    """One history never compares numbers measured two ways."""
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", *changed)) == 2
    assert flag in capsys.readouterr().err


def test_resume_refuses_other_sampling_settings_for_a_generated_text(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    args = ["--train-source", "generated:2k", "--gen-length", "31", "--loss", "kd"]
    assert main(job_args(tiny_llama_dir, text_file, out, *args), callbacks=[StopAfter(3)]) == 130
    assert main(job_args(tiny_llama_dir, text_file, out, *args, "--gen-temperature", "0.5", "--resume")) == 2
    assert "--gen-temperature/--gen-top-p/--gen-length/--gen-batch-size" in capsys.readouterr().err


def test_a_full_disk_while_caching_tokens_is_not_fatal(tmp_path, tokenizer, text_file, monkeypatch):
    import utils.data.sources as sources

    def full(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(sources.torch, "save", full)
    with pytest.warns(UserWarning, match="could not cache the token ids"):
        tokens = sources.tokenize_source(str(text_file), tokenizer, cache_dir=tmp_path / "cache")
    assert tokens.ids.numel() > 0 and not list((tmp_path / "cache").glob("*.tmp"))


def test_a_safetensors_error_while_saving_state_keeps_the_results(tmp_path, tiny_llama_dir, text_file, capsys,
                                                                 monkeypatch):
    from safetensors import SafetensorError

    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 1
    results = json.loads((out / "results.json").read_text())
    assert "StorageFull" in results["error"] and results["epochs"] and "Free space" in results["error"]


def test_a_schedule_s_summary_says_its_baseline_held_another_density():
    from utils.io.history import PerplexityHistory
    history = PerplexityHistory(baseline=26.6, dense=21.6, densities=(0.5, 0.1))
    history.add(1, 40.0)
    history.add(2, 46.0)
    summary = "\n".join(history.summary_lines())
    assert "Total improvement" not in summary
    assert "Since the baseline:  ↑72.9% (19.4000 higher than the baseline, which held density 50%" in summary
    assert "Against dense:       2.13× the dense perplexity" in summary
    assert "Epoch 2: 46.00 (↑72.9% against the baseline at density 50%)" in history.trend_lines()
    assert PerplexityHistory.from_dict(history.to_dict()).densities == (0.5, 0.1)
    oneshot = PerplexityHistory(baseline=300.0, dense=21.6)
    oneshot.add(1, 60.0)
    assert "Total improvement:   ↓80.0%" in "\n".join(oneshot.summary_lines())


def test_a_tokenizer_that_reads_nothing_names_the_missing_tokenizer_files():
    """A model folder without its tokenizer files can give a tokenizer with no vocabulary: it made
    '0 tokens' of the evaluation text, and the message blamed the text."""
    from utils.data.sources import DataError, tokenize_text

    class Empty:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text):
            return {"input_ids": [1]}
    with pytest.raises(DataError, match="does the model folder hold its tokenizer files"):
        tokenize_text("The tower is 324 metres tall.", Empty(), "wiki.test.raw")
