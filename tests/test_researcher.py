"""What a researcher sees: quick looks, pictures, runs compared, progress and summaries that say
what happened, a finished run's disk, the help text, early messages, a dense export, the package."""
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from extreme_compression_experiment import build_parser, main
from helpers import REPO, StopAfter, recorded_figures, tiny_model
from test_cli import job_args
from utils.config.sections import EvalProtocol
from utils.data.sources import TokenizedText
from utils.eval_utils import evaluate_perplexity
from utils.io.events import Progress
from utils.io.report import markdown, read_row
from utils.training.progress import WINDOW_SECONDS, WINDOW_STEPS, LogCadence

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama_dir, text_file):
    """A finished training run (2 epochs × 6 steps) and its console."""
    out = tmp_path_factory.mktemp("finished") / "finished-run"
    stream = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(stream):
        assert main(job_args(tiny_llama_dir, text_file, out)) == 0
    return out, stream.getvalue()


def test_a_quick_look_scores_the_first_windows_exactly_and_says_so(tmp_path, tiny_llama_dir, text_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(text_file.read_text(), return_tensors="pt").input_ids[0]
    text = TokenizedText(ids, num_bytes=10_000, source="t")
    quick = evaluate_perplexity(model, text, EvalProtocol(token_length=64, windows=3, batch_size=2), progress=False)
    cut = evaluate_perplexity(model, ids[:3 * 64], EvalProtocol(token_length=64, batch_size=2), progress=False)
    full = evaluate_perplexity(model, text, EvalProtocol(token_length=64, batch_size=2), progress=False)
    assert quick.windows == 3 and quick.perplexity == cut.perplexity and quick.quick and not full.quick
    assert quick.total_windows == full.windows > 3 and "QUICK LOOK" in quick.summary()
    out = tmp_path / "eval"
    assert cli("--model", tiny_llama_dir, "--eval-only", "--eval-source", text_file, "--token-length", "64",
               "--eval-windows", "2", "--output-dir", out) == 0
    assert "QUICK LOOK" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["windows"] == 2 and results["protocol"]["paper"] is False and "QUICK LOOK" in results["quick_look"]


def test_a_finished_run_leaves_its_pictures_timings_and_no_state(finished, tiny_llama_dir, text_file, capsys):
    out, printed = finished
    assert (out / "curves.png").read_bytes()[:8] == PNG and f"Curves: {out / 'curves.png'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is True and results["mode"] == "train" and results["protocol"]["paper"] is True
    assert results["tokens_trained"] == 2 * 6 * 4 * 32
    timings = results["timings"]
    assert timings["wall_seconds"] >= timings["training_seconds"] > 0 and timings["evaluation_seconds"] > 0
    last = results["epochs"][-1]
    assert results["final_accuracy"] == last["accuracy"] and 0 <= last["accuracy"] <= 1
    assert results["final_holdout_loss"] == last["holdout_loss"] > 0 and last["train_loss"] > 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {e["when"] for e in events if e["event"] == "sparsity" and "when" in e} == {"pruned"}
    assert [e["epoch"] for e in events if e["event"] == "sparsity" and "epoch" in e] == [1, 2]
    # what a person reads: the held-out line names its loss, the time in all, the state removed
    assert "Held-out training text" in printed and "cross-entropy" in printed and "not comparable" in printed
    assert "Time: " in printed and "in all (training" in printed
    assert not (out / "state").exists() and "--keep-state keeps it" in printed
    # --resume of a finished run whose state was removed prints its summary and trains nothing
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume")) == 0
    again = capsys.readouterr().out
    assert "already finished" in again and "Final Summary" in again and "Epoch 1/" not in again
    # ... and a command that would change it is refused as for any resume, its state gone or not
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", "--epochs", "3")) == 2
    assert "--epochs 2 → 3" in capsys.readouterr().err


def test_the_state_stays_when_it_is_the_only_copy_of_the_trained_model(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--no-save-best", "--export", "none")) == 0
    assert (out / "state" / "train_state.json").exists() and "only copy of the trained model" in capsys.readouterr().out


@pytest.mark.parametrize("values, log", [([52.1, 56.6, 21.6, 32.2], False), ([5187.0, 61.2, 21.6], True),
                                         ([21.6, float("nan"), None, 0.0], False)])
def test_perplexity_goes_on_a_log_axis_only_across_more_than_20x_and_its_ticks_read_as_numbers(values, log):
    from utils.io.plots import figure_class, perplexity_axes
    axes = figure_class()().subplots()
    axes.plot([1, 2, 3], [30.0, 300.0, 3000.0] if log else [30.0, 40.0, 50.0])
    perplexity_axes(axes, values)
    assert axes.get_yscale() == ("log" if log else "linear")
    if log:
        labels = [axes.yaxis.get_major_formatter()(tick) for tick in (10.0, 100.0, 1000.0, 1e6)]
        assert labels == ["10", "100", "1,000", "1,000,000"]  # not mathtext's "$\\mathdefault{10^{2}}$"
        assert [axes.yaxis.get_minor_formatter()(tick) for tick in (20.0, 30.0, 500.0)] == ["20", "", "500"]
    assert all(float(tick).is_integer() for tick in axes.get_xticks())  # whole epochs


def test_a_picture_that_fails_never_ends_a_run(tmp_path, tiny_llama_dir, text_file, capsys, monkeypatch):
    from utils.io import plots

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")
    monkeypatch.setattr(plots, "figure_class", lambda: broken)
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("curves.png could not be drawn (RuntimeError: no fonts)") == 3  # 2 epochs + the end
    assert json.loads((out / "results.json").read_text())["finished"] is True


def test_log_every_sets_the_training_lines(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--log-every", "2")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [2, 4, 6]


def test_a_quick_dense_number_is_never_reused_by_a_full_protocol_run(tmp_path, tiny_llama_dir, text_file):
    quick = tmp_path / "quick"
    assert main(job_args(tiny_llama_dir, text_file, quick, "--epochs", "1", "--eval-windows", "1")) == 0
    full = tmp_path / "full"
    assert main(job_args(tiny_llama_dir, text_file, full, "--epochs", "1")) == 0  # the same cached prune
    quick_dense = json.loads((quick / "results.json").read_text())["dense"]
    assert quick_dense > 0 and json.loads((full / "results.json").read_text())["dense"] is None


def test_keep_state_and_save_dtype(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--keep-state", "--save-dtype",
                         "bfloat16")) == 0
    assert (out / "state" / "train_state.json").exists()
    from safetensors import safe_open
    with safe_open(str(out / "best" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in weights.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "best" / "pruning.json").read_text())["saved_dtype"] == "bfloat16"


def test_an_interrupted_summary_says_so_and_how_to_continue(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(8)]) == 130
    printed = capsys.readouterr().out
    assert "Final Summary" not in printed
    assert "INTERRUPTED at optimizer step 8 of 12 (continue with the same command plus --resume)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is False and (out / "state" / "train_state.json").exists()


def test_a_resume_may_not_turn_the_full_protocol_into_a_quick_look(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[StopAfter(4)]) == 130
    capsys.readouterr()
    assert main(job_args(tiny_llama_dir, text_file, out, "--resume", "--eval-windows", "1")) == 2
    assert "--eval-windows None → 1" in capsys.readouterr().err


def test_compare_three_runs_one_table_per_protocol(tmp_path, finished, tiny_llama_dir, text_file, capsys):
    run, _ = finished
    other = tmp_path / "other"
    assert main(job_args(tiny_llama_dir, text_file, other, "--epochs", "1", "--sparsity", "0.5")) == 0
    quick = tmp_path / "quick"
    assert main(job_args(tiny_llama_dir, text_file, quick, "--epochs", "1", "--eval-windows", "2")) == 0
    capsys.readouterr()
    report = tmp_path / "report"
    assert cli("--compare", run, other, quick, "--output-dir", report) == 0
    table = (report / "comparison.md").read_text()
    assert (report / "comparison.png").read_bytes()[:8] == PNG
    paper, quick_part = table.split("QUICK LOOK" if "QUICK LOOK" in table else "quick look", 1)
    assert "| quick |" not in paper and "| quick |" in quick_part  # never mixed with the papers' protocol
    for folder in (run, other, quick):
        results = json.loads((folder / "results.json").read_text())
        line = next(line for line in table.splitlines() if line.startswith(f"| {folder.name} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[4] == f"{results['final']:.2f}"
        assert cells[5] == f"{results['best']['perplexity']:.2f} ({results['best']['epoch']})"
        assert cells[6] == f"{results['best']['perplexity'] / results['dense']:.2f}×"
        assert cells[2] == f"{results['density']:.4g}"
        row = read_row(folder)
        assert row.final == results["final"] and row.export_bytes == results["export"]["file_bytes"]
    assert all(line.endswith("| finished |") for line in table.splitlines() if line.startswith(("| other", "| quick")))
    data = json.loads((report / "comparison.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["finished-run", "other", "quick"]
    # a folder that is not a run is named, exit 2
    assert cli("--compare", run, tmp_path / "nothing") == 2
    assert "nothing has no results.json (not a run folder)" in capsys.readouterr().err
    running = tmp_path / "running"  # a run in its first epoch: run.json and events, no results.json yet
    running.mkdir()
    (running / "run.json").write_text("{}")
    assert cli("--compare", run, running) == 2
    assert "running has no results.json yet: a training run writes it after its first epoch" in capsys.readouterr().err


def test_compare_reports_the_runs_that_differ_only_in_their_seed_as_mean_and_spread(tmp_path, finished, tiny_llama_dir,
                                                                                      text_file, capsys):
    run, _ = finished
    seed1, other = tmp_path / "seed1", tmp_path / "seed2-lr"
    assert main(job_args(tiny_llama_dir, text_file, seed1, "--seed", "1")) == 0
    assert main(job_args(tiny_llama_dir, text_file, other, "--seed", "2", "--lr", "1e-4")) == 0  # another setting
    capsys.readouterr()
    patient = tmp_path / "seed3-patience"  # stops differently (not in the identity: a resume may change it)
    assert main(job_args(tiny_llama_dir, text_file, patient, "--seed", "3", "--patience", "1")) == 0
    running = tmp_path / "seed4-running"  # a seed still training: its best so far is not its result
    shutil.copytree(seed1, running)
    identity = json.loads((running / "run.json").read_text())
    identity["identity"]["seed"] = 4
    (running / "run.json").write_text(json.dumps(identity))
    partial = json.loads((running / "results.json").read_text())
    (running / "results.json").write_text(json.dumps({**partial, "finished": False, "in_progress": True,
                                                      "best": {**partial["best"], "perplexity": 1.0}}))
    capsys.readouterr()
    report = tmp_path / "report"
    assert cli("--compare", run, seed1, other, patient, running, run, "--output-dir", report) == 0  # run twice
    printed = capsys.readouterr().out
    best = [json.loads((folder / "results.json").read_text())["best"]["perplexity"] for folder in (run, seed1)]
    mean, sd = (best[0] + best[1]) / 2, abs(best[0] - best[1]) / 2 ** 0.5  # two values: |a - b| / √2
    group, = json.loads((report / "comparison.json").read_text())["seed_groups"]
    assert group["runs"] == ["finished-run", "seed1"] and group["seeds"] == [0, 1] and group["best"] == best
    assert group["mean"] == pytest.approx(mean) and group["sd"] == pytest.approx(sd)
    section = printed.split("## Seeds of one setting", 1)[1]
    assert f"| finished-run, seed1 | 0, 1 | {mean:.2f} ± {sd:.2f} | {min(best):.2f}–{max(best):.2f} |" in section
    assert next(line for line in printed.splitlines() if line.startswith("| seed3-patience |")).endswith(
        "| finished |")  # left out for its --patience alone
    for alone in ("seed2-lr", "seed3-patience", "seed4-running"):
        assert alone not in section and f"| {alone} |" in printed  # in the table, in no group
    assert cli("--compare", run, other, "--output-dir", tmp_path / "report2") == 0
    assert "Seeds of one setting" not in capsys.readouterr().out  # nothing alike: no section


def test_compare_draws_the_epochs_before_a_run_s_final_density_hollow(tmp_path, monkeypatch):
    import utils.io.report as report
    made = recorded_figures(monkeypatch, report)
    curve = [29.0, 29.5, 30.6, 32.7, 32.0]
    for name, extra in (("iterative", {"final_from": 4}), ("older", {})):  # older: results.json before final_from
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "mode": "train", "density": 0.3, "dense": 21.6, "final": 32.0, "finished": True,
            "best": {"epoch": 5, "perplexity": 32.0}, "protocol": {"source": "wikitext2", "paper": True},
            "epochs": [{"epoch": e, "perplexity": p} for e, p in enumerate(curve, 1)], **extra}))
    rows, _ = report.compare_runs([tmp_path / "iterative", tmp_path / "older"], tmp_path / "cmp")
    assert [row.final_from for row in rows] == [4, 0]
    hollow = [line for line in made[0].axes[0].get_lines() if line.get_markerfacecolor() == "white"]
    assert [list(line.get_xdata()) for line in hollow] == [[1, 2, 3]] and "hollow" in made[0]._suptitle.get_text()
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"][0]["final_from"] == 4


def test_the_markdown_never_puts_a_quick_look_beside_the_paper_protocol(finished):
    row = read_row(finished[0])
    row.protocol = "paper"
    quick = type(row)(**{**row.__dict__, "run": "q", "protocol": "quick look: first 2 windows of x"})
    text = markdown([quick, row])
    assert text.index("the papers' protocol") < text.index("NOT the papers' protocol")
    assert text.index(f"| {row.run} |") < text.index("NOT the papers' protocol") < text.index("| q |")


def test_a_folder_of_any_name_holding_wiki_test_raw_is_the_papers_text_in_a_comparison_made_anywhere(tmp_path):
    from utils.io.report import _protocol
    from utils.pipeline.record import protocol_record
    folder, mine = tmp_path / ".data", tmp_path / "mine.txt"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" = A = \n the text\n")
    mine.write_text("some other text")
    recorded = {name: protocol_record(EvalProtocol(source=str(source)))
                for name, source in (("folder", folder), ("mine", mine), ("hub", "wikitext2"))}
    assert [recorded[name]["wikitext2_test"] for name in ("folder", "mine", "hub")] == [True, False, True]
    from utils.data.sources import is_wikitext2_test
    assert not is_wikitext2_test(f"{mine},{folder}")  # WikiText's test text and more: another text
    raw = "hf:wikitext:wikitext-2-raw-v1"
    assert is_wikitext2_test(raw) and is_wikitext2_test(f"{raw}:test")
    assert not any(is_wikitext2_test(spec) for spec in ("hf:wikitext:wikitext-2-v1", f"{raw}:validation",
                                                        f"{raw}:test:other", str(tmp_path / "missing.txt"),
                                                        "generated:2M"))
    elsewhere = tmp_path / "run"  # read back where the paths mean nothing: the record decides, not the name
    assert _protocol({"protocol": {**recorded["folder"], "source": ".data"}}, elsewhere) == "paper"
    assert _protocol({"protocol": {**recorded["mine"], "source": "x/wikitext-2-raw"}}, elsewhere) == \
        "text x/wikitext-2-raw"
    older = {key: value for key, value in recorded["folder"].items() if key != "wikitext2_test"}
    assert _protocol({"protocol": {**older, "source": ".data"}}, elsewhere) == "text .data"  # by its name, as before
    assert _protocol({"protocol": {**older, "source": "d/wikitext-2-raw"}}, elsewhere) == "paper"


def test_progress_lines_carry_rate_and_eta_and_the_cadence_is_by_time():
    stream = io.StringIO()
    bar = Progress(100, "Epoch 1/1", every=0.0, stream=stream, initial=10, unit="steps")
    bar._started -= 10.0  # 10 s ago
    bar.update(10, loss=1.5)
    line = stream.getvalue().strip()
    assert line.startswith("Epoch 1/1: 20/100 (20%) | ") and "steps/s | ETA 1m" in line and "loss=1.5000" in line
    assert LogCadence(None).due(1, WINDOW_SECONDS) and LogCadence(None).due(WINDOW_STEPS, 0.0)
    assert not LogCadence(None).due(1, 1.0) and not LogCadence(None, world=2).due(1, WINDOW_SECONDS)
    assert LogCadence(3).due(3, 0.0) and not LogCadence(3).due(2, 1000.0)


def test_help_says_each_default_once_and_never_none():
    text = build_parser().format_help()
    assert "default: None" not in text and "default: False" not in text
    for action in build_parser()._actions:
        rendered = build_parser()._get_formatter()._get_help_string(action) or ""
        assert rendered.count("(default:") + rendered.count("(the default)") <= 1, action.option_strings


@pytest.mark.parametrize("args, message", [
    (["--model", "smollm-135m"], "did you mean smollm2-135m?"),
    (["--model", "opt-1.3"], "did you mean opt-1.3b"),
    (["--model", "gone.gguf"], "--model takes an existing .gguf file"),
    (["--train-source", "no/such.txt"], "argument --train-source: text source not found: no/such.txt"),
    (["--eval-only", "--eval-source", "missing/wiki"], "argument --eval-source: text source not found"),
])
def test_a_mistyped_model_or_missing_text_is_named_before_any_library_loads(args, message, tmp_path):
    command = [sys.executable, "-X", "importtime", str(REPO / "extreme_compression_experiment.py"), *args]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert "| transformers" not in done.stderr and "| accelerate" not in done.stderr  # not imported at all


def test_export_dense_writes_a_plain_folder_with_the_same_weights(finished, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "dense-export"
    assert cli("--export-only", "--model", finished[0] / "best", "--export", "dense", "--export-dtype", "float32",
               "--output-dir", out) == 0
    plain = AutoModelForCausalLM.from_pretrained(out / "dense")
    best = AutoModelForCausalLM.from_pretrained(finished[0] / "best")
    for (name, a), (_, b) in zip(plain.state_dict().items(), best.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((out / "results.json").read_text())["export"]["format"] == "dense"


def test_pip_install_gives_a_package_importable_from_anywhere(tmp_path, finished):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "extreme_compression_experiment.py",
                 "fsdp_finetune.py"):
        shutil.copy(REPO / name, source / name)
    for package in ("utils", "extreme_compression"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", target, source], check=True, capture_output=True, timeout=300)
    assert (target / "bin" / "extreme-compression").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys; import extreme_compression as e; assert e.__file__.startswith(sys.argv[1]); "
            "m = e.load_compressed(sys.argv[2]); print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", code, str(target), str(finished[0] / "compressed")], cwd=elsewhere,
                          env={"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "LlamaForCausalLM"


def test_density_per_decoder_layer_groups_linears_by_their_layer_index():
    from utils.io.plots import layer_densities
    assert layer_densities([["model.layers.0", 1, 4], ["model.layers.1.mlp.up_proj", 2, 4],
                            ["model.layers.1.mlp.down_proj", 0, 4], ["model.layers.10", 1, 1]]) == [0.25, 0.25, 1.0]


def test_a_schedule_that_prunes_while_training_labels_each_point_with_its_density(tmp_path, monkeypatch):
    from utils.io import plots
    drawn = recorded_figures(monkeypatch, plots)
    layers = [["model.layers.0.mlp", 1, 4]]
    events = [{"event": "sparsity", "when": "pruned", "density": 0.5, "layers": layers},
              {"event": "sparsity", "epoch": 1, "step": 5, "density": 0.222, "layers": layers},
              {"event": "sparsity", "epoch": 2, "step": 10, "density": 0.1, "layers": layers}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    history = {"baseline": 40.0, "dense": 20.0, "epochs": [{"epoch": 1, "perplexity": 55.5},
                                                           {"epoch": 2, "perplexity": 73.0}]}
    assert plots.write_curves(tmp_path, history).read_bytes()[:8] == PNG
    perplexity = drawn[-1].axes[0]
    assert [t.get_text() for t in perplexity.texts] == ["0.5", "0.222", "0.1"]
    # one-shot: every evaluation at the same density, no labels
    same = [dict(e, density=0.1) for e in events]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in same))
    plots.write_curves(tmp_path, history)
    assert len(drawn) == 2 and len(drawn[-1].axes[0].texts) == 0


def test_without_matplotlib_a_run_says_how_to_get_its_pictures(monkeypatch, tmp_path):
    from utils.io import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plots.write_curves(tmp_path, {"epochs": []}) is None and "pip install matplotlib" in plots.MISSING
    assert not (tmp_path / "curves.png").exists()


def test_the_flag_reference_is_current_and_the_readme_short_with_working_links():
    import re
    from extreme_compression_experiment import flag_reference
    assert (REPO / "docs" / "flags.md").read_text(encoding="utf-8") == flag_reference()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert readme.splitlines()[8].startswith("pip install -r requirements.txt && python extreme_compression_experiment.py")
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#:]+)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / link).exists(), (page.name, link)


def test_every_exporters_folder_and_the_picture_count_as_results_of_a_run():
    from utils.export.registry import EXPORTERS
    from utils.io.run_folder import RESULT_FILES
    assert {exporter.folder for exporter in EXPORTERS.values()} | {"best", "curves.png"} <= set(RESULT_FILES)


def test_compare_marks_interrupted_runs_and_runs_of_other_modes(tmp_path, tiny_llama_dir, text_file, capsys):
    stopped = tmp_path / "stopped"
    assert main(job_args(tiny_llama_dir, text_file, stopped), callbacks=[StopAfter(3)]) == 130
    evaluated = tmp_path / "evaluated"
    assert cli("--model", tiny_llama_dir, "--eval-only", "--eval-source", text_file, "--token-length", "64",
               "--output-dir", evaluated) == 0
    assert cli("--compare", stopped, evaluated, "--output-dir", tmp_path / "report") == 0
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "| stopped |" in table and "| interrupted |" in table.split("| stopped |")[1].splitlines()[0]
    row = next(line for line in table.splitlines() if line.startswith("| evaluated |"))
    evaluation = json.loads((evaluated / "results.json").read_text())
    assert row.endswith("| eval |") and f"| {evaluation['perplexity']:.2f} |" in row


def test_compare_refuses_the_flags_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--compare", "runs/a", "--sparsity", "0.3"])
    assert stop.value.code == 2 and "--compare reads run folders only; drop --sparsity" in capsys.readouterr().err


def test_sparse_kernels_give_the_dense_kernels_perplexity_and_text_on_the_same_export(finished, text_file, tmp_path):
    export = finished[0] / "compressed"
    runs = {}
    for kind, cache in (("dense", "dynamic"), ("sparse", "dynamic"), ("sparse", "static")):
        out = tmp_path / f"{kind}-{cache}"
        assert cli("--eval-only", "--model", export, "--kernels", kind, "--eval-source", text_file, "--token-length",
                   "64", "--generate", "6", "--prompt", "the model", "--generate-cache", cache,
                   "--output-dir", out) == 0
        runs[kind, cache] = json.loads((out / "results.json").read_text())
    dense, sparse = runs["dense", "dynamic"], runs["sparse", "dynamic"]
    assert sparse["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)  # float32 on the CPU
    for (kind, cache), results in runs.items():
        generated = results["generate"]
        assert generated["kernels"] == kind and generated["new_tokens"] == 6 and generated["tokens_per_second"] > 0
        assert generated["cache"] == cache  # transformers compiles the step of a static cache on a GPU only:
        assert generated["compiled"] is (cache == "static" and torch.cuda.is_available())
        assert generated["text"] == dense["generate"]["text"]  # greedy: the same tokens, whichever kernels and cache
    events = [json.loads(line) for line in (tmp_path / "sparse-static" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "kernels" and e["kind"] == "sparse" and e["sparse_linears"] > 0 for e in events)


def test_a_generation_that_fails_keeps_the_perplexity_already_measured(tiny_llama_dir, text_file, tmp_path,
                                                                        monkeypatch, capsys):
    import utils.pipeline.modes as modes

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)")
    monkeypatch.setattr(modes, "generation_benchmark", out_of_memory)
    out = tmp_path / "eval"
    assert cli("--eval-only", "--model", tiny_llama_dir, "--eval-source", text_file, "--token-length", "64",
               "--generate", "4", "--generate-cache", "dynamic", "--output-dir", out) != 0  # (auto: static on a GPU)
    said = capsys.readouterr().out
    assert "error: --generate failed with a dynamic KV cache (OutOfMemoryError: CUDA out of memory" in said
    assert f"The perplexity is saved in {out / 'results.json'}" in said and "fewer --generate tokens" in said
    assert "--generate-cache dynamic" not in said  # the cache that failed is not the way out
    results = json.loads((out / "results.json").read_text())
    assert results["perplexity"] > 1 and "generate" not in results
    assert results["generate_error"]["kind"] == "OutOfMemoryError" and results["generate_error"]["cache"] == "dynamic"


@pytest.mark.parametrize("asked, eager_fails", [("auto", False), ("static", False), ("auto", True)])
def test_a_decode_step_that_does_not_compile_falls_back_to_eager_steps_only_under_auto(
        asked, eager_fails, tiny_llama_dir, text_file, tmp_path, monkeypatch, capsys):
    import utils.pipeline.modes as modes
    from torch._dynamo.exc import TorchDynamoException
    benchmark, caches = modes.generation_benchmark, []

    def static_breaks(model, tokenizer, prompt, tokens, device, cache):
        caches.append(cache)
        if cache == "static":
            model._compiled_call = object()  # as transformers leaves it once it has started compiling
            raise TorchDynamoException("a graph break in the decode step (a stand-in)")
        if eager_fails:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return benchmark(model, tokenizer, prompt, tokens, device, cache)
    monkeypatch.setattr(modes, "generation_benchmark", static_breaks)
    # as on a GPU: auto picks the static cache (generation_cache's own cases are tested above)
    monkeypatch.setattr(modes, "generation_cache", lambda model, device, cache: "static" if cache == "auto" else cache)
    out = tmp_path / asked
    code = cli("--eval-only", "--model", tiny_llama_dir, "--eval-source", text_file, "--token-length", "64",
               "--generate", "4", "--generate-cache", asked, "--output-dir", out)
    said, results = capsys.readouterr().out, json.loads((out / "results.json").read_text())
    if asked == "auto":
        assert caches == ["static", "dynamic"]
        assert "warning: the compiled decode step failed (TorchDynamoException: a graph break" in said
    if asked == "auto" and not eager_fails:
        assert code == 0 and results["generate"]["cache"] == "dynamic" and results["generate"]["new_tokens"] == 4
        assert results["generate"]["compiled"] is False  # the failed try's compiled call is not this one's
        assert results["generate"]["static_error"].startswith("TorchDynamoException: a graph break")
    elif asked == "auto":  # the eager retry failed too: both reasons kept
        assert code == 1 and "generate" not in results and "--generate failed with a dynamic KV cache" in said
        failed = results["generate_error"]
        assert failed["cache"] == "dynamic" and failed["kind"] == "OutOfMemoryError"
        assert failed["static_error"].startswith("TorchDynamoException: a graph break")
    else:  # asked for by name: not replaced, and the way out names the eager steps
        assert code == 1 and caches == ["static"] and "generate" not in results
        assert "--generate failed with a static KV cache (TorchDynamoException" in said
        assert "--generate-cache dynamic (nothing compiled)" in said and results["generate_error"]["cache"] == "static"


@pytest.mark.parametrize("family, device, compiles, asked, used", [
    ("llama", "cuda", None, "auto", "static"), ("opt", "cuda", None, "auto", "static"),  # transformers' own flag
    ("llama", "cuda", False, "auto", "dynamic"), ("llama", "cpu", None, "auto", "dynamic"),
    ("llama", "cuda", None, "dynamic", "dynamic"), ("llama", "cpu", None, "static", "static")])
def test_auto_picks_a_static_cache_on_a_gpu_for_a_model_that_compiles_whole(family, device, compiles, asked, used):
    from utils.pipeline.kernels import generation_cache
    model = tiny_model(family, 64)
    if compiles is not None:
        model._can_compile_fullgraph = compiles  # a family whose forward transformers cannot compile whole
    assert generation_cache(model, torch.device(device), asked) == used


@pytest.mark.parametrize("own, asked, passed, used", [
    (None, "dynamic", None, "dynamic"), ("static", "dynamic", "dynamic", "dynamic"),
    (None, "static", "static", "static"), ("hybrid", "static", "static", "static"),
    (None, "auto", None, "dynamic")])  # the default: dynamic on the CPU
def test_generation_uses_the_cache_asked_for_whatever_the_model_s_own_config_says(tokenizer, own, asked, passed, used):
    from utils.pipeline.kernels import generation_benchmark
    model = tiny_model("llama", len(tokenizer))
    model.generation_config.cache_implementation = own
    calls, generate = [], model.generate
    model.generate = lambda **kwargs: calls.append(kwargs.get("cache_implementation")) or generate(**kwargs)
    record = generation_benchmark(model, tokenizer, "the model", 3, torch.device("cpu"), cache=asked)
    assert calls == [passed, passed] and record["cache"] == used and record["new_tokens"] == 3


def test_a_run_with_sparse_kernels_evaluates_its_export_both_ways(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--kernels", "sparse")) == 0
    compared = json.loads((out / "results.json").read_text())["kernels"]
    assert compared["relative_difference"] < 1e-5 and compared["dense"] > 0
    assert "with sparse kernels (relative difference" in capsys.readouterr().out


def test_sparse_kernels_need_a_compressed_export(tiny_llama_dir, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # found while the arguments are checked
        cli("--eval-only", "--model", tiny_llama_dir, "--kernels", "sparse", "--eval-source", text_file,
            "--token-length", "64", "--output-dir", tmp_path / "out")
    assert stop.value.code == 2 and "is not a compressed export" in capsys.readouterr().err


def test_a_failed_export_is_written_by_the_resume_and_the_state_kept_until_then(tmp_path, tiny_llama_dir, text_file,
                                                                                 capsys, monkeypatch):
    from utils.pipeline import deliver

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(deliver, "export_model", full_disk)
        assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 1
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is False and "export_error" in results and (out / "state").exists()
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--resume")) == 0
    assert "stopped before its results were all written" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is True and (out / "compressed" / "compression.json").exists()
    assert not (out / "state").exists()  # now best/ and the export hold the model


def test_the_first_time_estimate_says_the_held_out_pass_is_not_in_it():
    from utils.training.progress import estimate_line
    line, event = estimate_line(1.5, 20, 2, 57.0, holdout_untimed=True)
    assert "of about 57s and the held-out text, not yet timed = 2m24s and more" in line
    assert event["evaluation_seconds"] == 114.0 and event["holdout_untimed"] is True
    assert "held-out" not in estimate_line(1.5, 20, 2, 57.0)[0]  # later: the time measured includes it


def test_results_json_is_written_after_every_epoch_and_whole_at_the_end(tmp_path, tiny_llama_dir, text_file):
    from utils.io.report import read_row
    out, seen = tmp_path / "run", []

    class Look:  # reads the folder after each epoch, as a person running --compare would
        def on_step_end(self, trainer):
            pass

        def on_epoch_end(self, trainer):
            seen.append((json.loads((out / "results.json").read_text()), read_row(out).status))
    assert main(job_args(tiny_llama_dir, text_file, out), callbacks=[Look()]) == 0
    first, second = seen
    assert first[0]["in_progress"] is True and first[0]["finished"] is False and first[1] == "unfinished, after epoch 1 of 2"
    assert [e["epoch"] for e in first[0]["epochs"]] == [1] and first[0]["timings"]["wall_seconds"] > 0
    assert second[0]["epochs_completed"] == 2 and [e["epoch"] for e in second[0]["epochs"]] == [1, 2]
    assert second[0]["in_progress"] is True  # the last epoch's, before the export and the summary
    final = json.loads((out / "results.json").read_text())
    assert final["finished"] is True and "in_progress" not in final and len(final["epochs"]) == 2
    assert read_row(out).status == "finished"
