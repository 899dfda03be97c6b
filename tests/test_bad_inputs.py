"""Every bad input exits 2 with one line naming the problem, and no traceback (a table of them)."""
import argparse
from pathlib import Path

import pytest

from conftest import save_tiny
from extreme_compression_experiment import main
from helpers import StopAfter

# Found while parsing: nothing is loaded.  (arguments, what the one line must say)
PARSED = [
    (["--sparsity", "0"], "outside (0, 1]"), (["--sparsity", "1.5"], "outside (0, 1]"),
    (["--sparsity", "-1"], "outside (0, 1]"), (["--sparsity", "abc"], "'abc' is not a number"),
    (["--sparsity", "nan"], "outside (0, 1]"), (["--batch-size", "0"], "must be at least 1"),
    (["--batch-size", "-3"], "must be at least 1"), (["--batch-size", "2.5"], "not a whole number"),
    (["--pattern", "4:2"], "0 < N < M"), (["--pattern", "2-4"], "N:M"), (["--pattern", "0:4"], "0 < N < M"),
    (["--micro-batch-size", "3", "--batch-size", "8"], "does not divide"),
    (["--max-grad-norm", "-1"], "--max-grad-norm: -1"), (["--max-grad-norm", "nan"], "--max-grad-norm: nan"),
    (["--max-grad-norm", "inf"], "--max-grad-norm: inf"), (["--min-delta", "nan"], "--min-delta: nan"),
    (["--min-delta", "1"], "--min-delta: 1 is not a fraction"), (["--min-delta", "-0.1"], "--min-delta: -0.1"),
    (["--weight-decay", "-0.01"], "--weight-decay: -0.01"), (["--weight-decay", "nan"], "--weight-decay: nan"),
    (["--warmup-steps", "-5"], "--warmup-steps: must be 0 or more"),
    (["--cooldown-steps", "-1"], "--cooldown-steps: must be 0 or more"),
    (["--cooldown-steps", "5"], "add --patience N"),
    (["--patience", "2", "--patience-on", "holdout", "--holdout", "0"], "--patience-on perplexity"), (["--lr", "0"], "must be a positive number"),
    (["--lr", "-1"], "must be a positive number"), (["--lr", "nan"], "must be a positive number"),
    (["--base-lr", "inf"], "must be a positive number"), (["--epochs", "0"], "must be at least 1"),
    (["--max-step", "0"], "must be at least 1"), (["--block-size", "0"], "must be at least 1"),
    (["--token-length", "0"], "must be at least 1"), (["--stride", "4096"], "larger than --token-length"),
    (["--eval-batch-size", "0"], "must be at least 1"), (["--nsamples", "0"], "must be at least 1"),
    (["--calibration-length", "-1"], "must be at least 1"), (["--holdout", "0.5"], "--holdout: 0.5"),
    (["--holdout", "-0.1"], "--holdout: -0.1"), (["--kd-temperature", "0"], "--kd-temperature: 0"),
    (["--kd-temperature", "-1"], "--kd-temperature: -1"), (["--kd-weight", "-1"], "--kd-weight: -1"),
    (["--ce-weight", "nan"], "--ce-weight: nan"),
    (["--loss", "ce+kd", "--ce-weight", "0", "--kd-weight", "0"], "nothing would be trained"),
    (["--loss", "mse"], "invalid choice: 'mse'"), (["--method", "foo"], "invalid choice: 'foo'"),
    (["--report-to", "wandb"], "the wandb package is not installed"),
    (["--resume", "--overwrite"], "choose one"), (["--seed", "-1"], "--seed: -1"),
    (["--eval-compile", "everything"], "invalid choice"), (["--dtype", "float8"], "invalid choice"),
    (["--max-grad-norm", "-1", "--seed", "-2"], "--seed: -2"),  # several problems: all in the one line
    (["--schedule", "iterative", "--sparsity", "0.6"], "give the densities with --density-steps"),
    (["--schedule", "gradual", "--density-steps", "0.5,0.3,0.1"], "takes two, START,FINAL"),
    (["--schedule", "gradual", "--prune-every", "9", "--max-step", "6", "--epochs", "2"], "leave no update"),
    (["--schedule", "gradual", "--prune-only"], "needs a training run"),
    (["--ramp-end", "0.4"], "only --schedule gradual ramps"),
    (["--schedule", "gradual", "--ramp-end", "0"], "--ramp-end: 0 is not a fraction in (0, 1]"),
    (["--schedule", "gradual", "--ramp-end", "1.5"], "--ramp-end: 1.5 is not a fraction in (0, 1]"),
    (["--layer-density", "outlier"], "invalid choice"),
    (["--schedule", "iterative", "--density-steps", "0.5,0.6,0.1"], "must be decreasing"),
    (["--schedule", "iterative", "--density-steps", "0.5,0.2"], "ending at --sparsity 0.1"),
    (["--schedule", "iterative", "--prune-stages", "9", "--max-step", "2", "--epochs", "2"], "do not fit in 4"),
    (["--schedule", "iterative", "--pattern", "2:4"], "works with unstructured densities"),
    (["--schedule", "iterative", "--eval-only"], "needs a training run"),
    (["--layer-density", "owl", "--pattern", "2:4"], "drop one of them"),
    (["--owl-lambda", "0"], "--owl-lambda: 0"), (["--owl-m", "-1"], "--owl-m: -1"),
    (["--bos-per-window", "always"], "invalid choice"),
    (["--kd-hidden-weight", "-1"], "--kd-hidden-weight: -1"), (["--tasks", ","], "names no task"), (["--task-dir", "/no/such/folder"], "is not a folder"),
    (["--export-only", "--export", "none"], "nothing to do"), (["--export-dtype", "int8"], "invalid choice"),
    (["--export-only", "--tasks", "piqa"], "evaluates nothing"),
    (["--export-only", "--prune-only"], "not allowed with argument"),
    # values that parse but break the arithmetic later (each was a traceback on dd0f19c)
    (["--seed", "99999999999999999999"], "is larger than 4294967295"), (["--seed", "4294967296"], "is larger than"),
    (["--lr", "1e300"], "--lr: 1e+300 is no learning rate"), (["--base-lr", "1e300"], "--base-lr: 1e+300 is no"),
    (["--kd-temperature", "1e300"], "--kd-temperature: 1e+300 is not a temperature"),
    (["--kd-temperature", "1e-300"], "--kd-temperature: 1e-300 is not a temperature"),
    (["--gen-temperature", "1e-300"], "--gen-temperature: 1e-300 is not a temperature"),
    (["--gen-temperature", "1e300"], "--gen-temperature: 1e+300"), (["--gen-temperature", "nan"], "--gen-temperature: nan"),
    (["--token-length", "1"], "--token-length: 1 is too short"), (["--block-size", "1"], "--block-size: 1 is too short"),
    (["--calibration-length", "1"], "--calibration-length: 1 is too short"),
    (["--gen-length", "1000000000"], "tokens per sampled row is more than any model's positions"),
    (["--schedule", "gradual", "--prune-every", "1", "--max-step", "1000000000"], "mask updates over"),
    # what was silently ignored, or accepted inconsistently
    (["--density-steps", "0.5,0.1"], "a one-shot prune has one density"),
    (["--train-source", "generated:1.5"], "is 1.5 tokens, not a whole number"),
    (["--train-source", "generated:0.4"], "give how many tokens"), (["--train-source", "generated:-3"], "how many"),
    (["--loss", "kd", "--kd-weight", "0"], "the loss --loss kd would be 0"),
    (["--loss", "ce", "--ce-weight", "0"], "the loss --loss ce would be 0"),
    (["--sparsity", "0.5", "--ce-weight", "0", "--kd-weight", "0"], "--loss ce+kd would be 0"),  # auto's loss
    # more of each kind
    (["--kd-hidden-weight", "nan"], "--kd-hidden-weight: nan"), (["--gen-top-p", "0"], "--gen-top-p: 0"),
    (["--gen-top-p", "1.5"], "--gen-top-p: 1.5"), (["--owl-lambda", "0.9"], "--owl-lambda: 0.9"),
    (["--min-delta", "inf"], "--min-delta: inf"), (["--holdout", "nan"], "--holdout: nan"),
    (["--kd-weight", "inf"], "--kd-weight: inf"), (["--ce-weight", "-1"], "--ce-weight: -1"),
    (["--weight-decay", "inf"], "--weight-decay: inf"), (["--max-grad-norm", "-0.5"], "--max-grad-norm: -0.5"),
    (["--lr", "inf"], "must be a positive number"), (["--pattern", "2:3:4"], "N:M"), (["--pattern", "a:b"], "N:M"),
    (["--stride", "0"], "must be at least 1"), (["--gen-batch-size", "0"], "must be at least 1"),
    (["--task-limit", "0"], "must be at least 1"), (["--patience", "0"], "must be at least 1"),
    (["--prune-stages", "0"], "must be at least 1"), (["--prune-every", "0"], "must be at least 1"),
    (["--density-steps", "0.5,x"], "is not a list of densities"),
    (["--schedule", "iterative", "--density-steps", "0,0"], "must be decreasing"),
    (["--sparsity", "1e-400"], "outside (0, 1]"), (["--epochs", "1e3"], "not a whole number"),
    (["--gen-length", "0"], "must be at least 1"), (["--nsamples", "-5"], "must be at least 1"),
]


@pytest.mark.parametrize("args,message", PARSED, ids=[" ".join(a) for a, _ in PARSED])
def test_bad_values_are_refused_while_parsing(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and message in error, error


def test_training_or_calibrating_on_wikitexts_test_text_is_refused(tmp_path, capsys):
    (tmp_path / "wiki.test.raw").write_text(" = A = \n text \n")
    (tmp_path / "wiki.valid.raw").write_text(" = B = \n text \n")
    test, valid = tmp_path / "wiki.test.raw", tmp_path / "wiki.valid.raw"
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "my-text.txt").symlink_to(test)  # by another name
    for args, message, way_out in (
            (["--train-source", test], "--train-source: " + str(test), valid),
            (["--train-source", f"{valid},{test}"], "training on it makes that perplexity meaningless", valid),
            (["--prune-only", "--calibration-source", test], "--calibration-source: " + str(test), valid),
            (["--train-source", tmp_path / "texts"], "my-text.txt is WikiText-2's test text", valid),
            (["--train-source", "hf:wikitext:wikitext-2-raw-v1:test"], "hf:wikitext:wikitext-2-raw-v1:test is",
             "wiki.valid.raw (the validation split)")):
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in ["--eval-source", tmp_path, "--train-source", valid, *args]])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and f"e.g. {way_out}" in error, error
    # the same file for training and evaluation, by another name, is a smoke run's right
    from utils.config.validate import validate
    from extreme_compression_experiment import build_parser
    config = validate(build_parser().parse_args([str(a) for a in ["--train-source", valid, "--eval-source", valid]]))
    assert config.train.train_source == str(valid)


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Model folders damaged the ways a user's copies get damaged."""
    root = tmp_path_factory.mktemp("broken")
    made = {}
    for name in ("corrupt-config", "truncated-weights", "no-tokenizer", "ok"):
        made[name] = save_tiny(root / name, "llama", tokenizer)
    (made["corrupt-config"] / "config.json").write_text('{"model_type": "llama", ')
    weights = made["truncated-weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    for path in made["no-tokenizer"].iterdir():
        if "token" in path.name:
            path.unlink()
    made["no-config"] = root / "no-config"
    made["no-config"].mkdir()
    (root / "a-file").write_text("x")
    made["a-file"] = root / "a-file"
    (root / "empty.txt").write_text("")
    made["empty-text"] = root / "empty.txt"
    (root / "short.txt").write_text("only a few words here")
    made["short-text"] = root / "short.txt"
    wiki = root / "wiki-without-train"
    wiki.mkdir()
    (wiki / "wiki.test.raw").write_text(" = Test = \n")
    made["wiki-without-train"] = wiki
    from utils.export.compressed import export_compressed
    from utils.models.loading import load_model, resolve_model
    model, _ = load_model(resolve_model(str(made["ok"])))
    export_compressed(model, tokenizer, root / "damaged-export")
    packed = root / "damaged-export" / "model.safetensors"
    packed.write_bytes(packed.read_bytes()[:3000])
    made["damaged-export"] = root / "damaged-export"
    return made


# (case id, how to build the arguments from (models, text file, tmp_path), what the error line must say)
LATER = [
    ("unknown model", lambda m, t, p: ["--eval-only", "--model", "not-a-model"], "unknown model 'not-a-model'"),
    ("folder without config", lambda m, t, p: ["--eval-only", "--model", m["no-config"]], "has no config.json"),
    ("corrupt config.json", lambda m, t, p: ["--eval-only", "--model", m["corrupt-config"]],
     "cannot read the model config"),
    ("truncated weights", lambda m, t, p: ["--eval-only", "--model", m["truncated-weights"], "--token-length", "64",
                                           "--eval-source", t], "truncated or damaged"),
    ("no tokenizer", lambda m, t, p: ["--eval-only", "--model", m["no-tokenizer"]], "cannot load a tokenizer"),
    ("missing gguf", lambda m, t, p: ["--eval-only", "--model", p / "missing.gguf"], "GGUF file not found"),
    ("missing eval text", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--token-length", "64",
                                           "--eval-source", p / "nope" / "text.txt"], "text source not found"),
    ("empty eval text", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--token-length", "64",
                                         "--eval-source", m["empty-text"]], "is empty"),
    ("window longer than the model", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--token-length", "4096"],
     "--token-length 4096 is longer than the 512 positions"),
    ("block longer than the model", lambda m, t, p: ["--model", m["ok"], "--token-length", "64", "--block-size",
                                                     "1024"], "--block-size 1024 is longer than the 512 positions"),
    ("output dir is a file", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--output-dir", m["a-file"]],
     "exists and is not a folder"),
    ("log file is a folder", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--log-file", p,
                                              "--output-dir", p / "out"], "is a folder; give a file name"),
    ("pruned dir is a file", lambda m, t, p: ["--prune-only", "--model", m["ok"], "--pruned-dir", m["a-file"],
                                              "--output-dir", p / "out"], "--pruned-dir"),
    ("density keeps no weight", lambda m, t, p: ["--prune-only", "--model", m["ok"], "--sparsity", "0.0001",
                                                 "--method", "magnitude", "--token-length", "64", "--eval-source", t,
                                                 "--pruned-dir", p / "pr", "--output-dir", p / "out",
                                                 "--skip-dense-eval"], "keeps no weight of"),
    ("pattern wider than the inputs", lambda m, t, p: ["--prune-only", "--model", m["ok"], "--pattern", "3:7",
                                                       "--method", "magnitude", "--token-length", "64",
                                                       "--eval-source", t, "--pruned-dir", p / "pr",
                                                       "--output-dir", p / "out", "--skip-dense-eval"],
     "needs input widths that are multiples of 7"),
    ("calibration text too short", lambda m, t, p: ["--prune-only", "--model", m["ok"], "--token-length", "64",
                                                    "--eval-source", t, "--calibration-source", m["short-text"],
                                                    "--calibration-length", "64", "--pruned-dir", p / "pr",
                                                    "--output-dir", p / "out", "--skip-dense-eval"],
     "fewer than one window"),
    ("no train split", lambda m, t, p: ["--model", m["ok"], "--token-length", "64", "--eval-source", t,
                                        "--train-source", m["wiki-without-train"], "--method", "magnitude",
                                        "--pruned-dir", p / "pr", "--output-dir", p / "out", "--skip-dense-eval",
                                        "--max-step", "1", "--epochs", "1", "--block-size", "32"],
     "has no wiki.train.raw"),
    ("offline hub dataset", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--token-length", "64",
                                             "--eval-source", "hf:no-such-user/no-such-data"], "could not load dataset"),
    ("unknown task", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--tasks", "no_such_task",
                                      "--task-dir", Path(t).parent], "unknown task(s) no_such_task"),
    ("offline hub task", lambda m, t, p: ["--eval-only", "--model", m["ok"], "--tasks", "arc_easy"],
     "hub tasks need a network"),
    ("damaged compressed export", lambda m, t, p: ["--eval-only", "--model", m["damaged-export"],
                                                   "--eval-source", t], "cannot read the compressed weights"),
    ("resume of damaged state", None, "train_state.json is damaged"),
    ("a model path longer than the file system allows", lambda m, t, p: ["--eval-only", "--model", "m" * 300,
                                                                         "--output-dir", p / "out"],
     "File name too long"),
    ("an output path longer than the file system allows", lambda m, t, p: ["--eval-only", "--model", m["ok"],
                                                                           "--output-dir", p / ("o" * 300)],
     "File name too long"),
    ("more calibration windows than the text holds", lambda m, t, p: [
        "--prune-only", "--model", m["ok"], "--token-length", "64", "--eval-source", t, "--calibration-source", t,
        "--nsamples", "100000000", "--calibration-length", "64", "--pruned-dir", p / "pr", "--output-dir", p / "out",
        "--skip-dense-eval"], "--nsamples 100,000,000 windows of 64 tokens"),
    ("sampled rows longer than the model", lambda m, t, p: [
        "--model", m["ok"], "--train-source", "generated:1k", "--gen-length", "600", "--eval-source", t],
     "--gen-length 601 is longer than the 512 positions"),
]


@pytest.mark.parametrize("case,make,message", LATER, ids=[case for case, _, _ in LATER])
def test_bad_inputs_found_later_exit_2_with_one_line(case, make, message, broken_models, text_file, tmp_path,
                                                     capsys, tiny_llama_dir):
    if make is None:  # a run folder whose saved state was damaged after an interruption
        from test_cli import job_args
        out = tmp_path / "run"
        assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(3)]) == 130
        (out / "state" / "train_state.json").write_text("{ not json")
        args = job_args(tiny_llama_dir, text_file, out, "--resume")
    else:
        args = [str(a) for a in make(broken_models, text_file, tmp_path)]
        for flag, value in (("--output-dir", tmp_path / "out"), ("--token-length", "64")):
            if flag not in args:  # only the flag under test is out of range
                args += [flag, str(value)]
    capsys.readouterr()
    try:
        status = main(args)
    except SystemExit as stop:  # found while the arguments are checked, before any library loads
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if "error: " in line]
    assert len(lines) == 1 and message in lines[0], error
    assert "Traceback" not in error


def test_help_prints_every_option(capsys):
    """argparse formats help strings with %: a bare % in one of them breaks --help for every user."""
    from extreme_compression_experiment import build_parser
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    flags = [flag for action in build_parser()._actions if action.help != argparse.SUPPRESS
             for flag in action.option_strings]
    assert len(flags) > 60 and "--prune-every" in flags and "--gen-top-p" in flags
    for flag in flags:  # every documented flag (testing hooks are hidden)
        assert flag in printed, flag


def test_overwrite_is_refused_where_it_would_empty_the_folder_the_model_is_in(broken_models, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--export-only", "--model", str(broken_models["ok"]), "--output-dir", str(broken_models["ok"].parent),
              "--overwrite"])
    assert stop.value.code == 2 and "lies inside --output-dir" in capsys.readouterr().err
    assert (broken_models["ok"] / "config.json").exists()
