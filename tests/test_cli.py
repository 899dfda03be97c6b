"""The command line: validation, the main job end to end, resume, early stopping, FSDP on 2 processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.config.validate import derive_schedule
from extreme_compression_experiment import main
from helpers import REPO, StopAfter

CLI = str(REPO / "extreme_compression_experiment.py")
STOPPING_RUN = str(REPO / "tests" / "stopping_run.py")
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]  # 2 CPU processes (gloo)


def run_cli(args, cwd, env=None, timeout=300, launcher=None, stop_after: tuple[int, str] | None = None):
    """The command line in a process of its own; `stop_after` (step, "int" | "term") interrupts its
    training after that optimizer step (tests/stopping_run.py)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    entry = [CLI] if stop_after is None else [STOPPING_RUN, *map(str, stop_after)]
    command = (launcher or [sys.executable]) + [*entry, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def job_args(model_dir, text, out, *extra):
    return [str(a) for a in ["--model", model_dir, "--sparsity", "0.3", "--batch-size", "4", "--max-step", "6", "--epochs", "2",
            "--block-size", "32", "--token-length", "64", "--eval-batch-size", "4", "--nsamples", "4",
            "--calibration-length", "64", "--train-source", text, "--eval-source", text,
            "--calibration-source", text, "--output-dir", out, "--pruned-dir", str(Path(out).parent / "pruned"),
            *extra]]


def pruned_folder(root: Path, model_dir, density: float = 0.3, method: str = "sparsegpt") -> Path:
    """The one cache folder of (model, density, method) under `root` (its name ends in the model's fingerprint)."""
    found = sorted(Path(root).glob(f"{Path(model_dir).name}-{density:g}-{method}-*"))
    assert len(found) == 1, found
    return found[0]


def assert_pruned_weights_stayed_zero(best_dir: Path, pruned_dir: Path) -> int:
    """Every weight zero in the pruned checkpoint is zero in the trained one; returns how many
    decoder weights changed in training."""
    from transformers import AutoModelForCausalLM
    best = AutoModelForCausalLM.from_pretrained(best_dir)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    changed = 0
    for (name, a), (_, b) in zip(best.named_parameters(), pruned.named_parameters()):
        if (".layers." in name or ".h." in name) and a.ndim == 2:
            assert torch.all(a[b == 0] == 0), name
            changed += int((a != b).sum())
    return changed


def test_schedule_table():
    assert derive_schedule(1) == (10000, 5e-6)
    assert derive_schedule(4) == (2500, pytest.approx(1e-5))
    max_step, lr = derive_schedule(8)
    assert max_step == 1250 and f"{lr:.3g}" == "1.41e-05"


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "0"], "outside (0, 1]"), (["--sparsity", "1.5"], "outside (0, 1]"),
    (["--sparsity", "-1"], "outside (0, 1]"), (["--sparsity", "abc"], "'abc' is not a number"),
    (["--batch-size", "0"], "must be at least 1"), (["--pattern", "4:2"], "0 < N < M"),
    (["--micro-batch-size", "3", "--batch-size", "8"], "does not divide"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    result = run_cli(args, tmp_path, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_inputs_found_later_exit_2_with_one_line(tmp_path, tiny_llama_dir):
    missing = run_cli(["--eval-only", "--model", tiny_llama_dir, "--eval-source", tmp_path / "nope" / "text.txt",
                       "--token-length", "64"], tmp_path)
    unknown = run_cli(["--eval-only", "--model", "not-a-model"], tmp_path)
    for result, message in ((missing, "text source not found"), (unknown, "unknown model 'not-a-model'")):
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_unreachable_hub_is_explained_without_waiting_on_the_network(tmp_path):
    # HF_HUB_OFFLINE (set by run_cli) makes the check answer from the cache alone: no retries to time out.
    result = run_cli(["--eval-only", "--model", "opt-125m"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "facebook/opt-125m" in result.stderr and "Offline? Run with a local model" in result.stderr


def test_eval_only_with_compiled_layers_equals_eager(tmp_path, tiny_llama_dir, text_file, capsys):
    perplexity = {}
    for level in ("off", "layers"):
        out = tmp_path / level
        assert main(["--eval-only", "--model", str(tiny_llama_dir), "--eval-source", str(text_file),
                     "--token-length", "64", "--eval-compile", level, "--output-dir", str(out)]) == 0
        perplexity[level] = json.loads((out / "results.json").read_text())["perplexity"]
    assert perplexity["layers"] == pytest.approx(perplexity["off"], rel=1e-5)
    assert "Perplexity: " in capsys.readouterr().out


def test_main_job_end_to_end(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--log-file", tmp_path / "log.txt")) == 0
    printed = capsys.readouterr().out
    for line in ("density 30% · 70% of weights pruned", "Schedule: batch size 4 → max_step 6 per epoch",
                 "No pruned model at", "Dense Model Evaluation", "Baseline Evaluation (Before Training)",
                 "Evaluation After Epoch 1", "Evaluation After Epoch 2", "Epoch 2 done: average loss",
                 "6 batches processed", "Memory before training", "Peak memory consumed", "Perplexity trend:",
                 "Final Summary", "Best perplexity:", "Total improvement:", "Non-zero ratio per layer"):
        assert line in printed, line
    assert (tmp_path / "log.txt").read_text(encoding="utf-8").count("Final Summary") == 1
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["prune"]["density"] == 0.3 and run["versions"]["torch"] == torch.__version__
    assert run["config"]["prune"]["options"] == {"type": "SparseGPTOptions", "batch_size": 8, "blocksize": 128,
                                                 "percdamp": 0.01, "cuda_graphs": True}
    assert run["identity"]["density"] == 0.3 and run["identity"]["loss"] == "kd"  # its keys as runs always saved them
    results = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in results["epochs"]] == [1, 2] and results["baseline"] > 0
    assert results["best"]["perplexity"] == min([results["baseline"]] + [e["perplexity"] for e in results["epochs"]])
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"pruning", "evaluation", "train", "epoch"} <= set(events)
    assert (out / "best" / "model.safetensors").exists() and (out / "curves.png").exists()
    assert not (out / "state").exists() and "--keep-state keeps it" in printed  # a finished run's state is removed
    # pruned weights are still exactly zero
    assert_pruned_weights_stayed_zero(out / "best", pruned_folder(tmp_path / "pruned", tiny_llama_dir))
    # a second run finds the cached pruned model instead of pruning again
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "again", "--epochs", "1")) == 0
    assert "Loading pruned model from" in capsys.readouterr().out


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir, text_file, capsys):
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "straight")) == 0
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "resumed"), callbacks=[StopAfter(8)]) == 130
    printed = capsys.readouterr().out
    assert "Interrupted at optimizer step 8" in printed and "--resume" in printed
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "resumed", "--resume")) == 0
    assert "Resumed from" in capsys.readouterr().out

    def epochs(folder):
        return {e["epoch"]: e for e in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if e["event"] == "epoch"}

    straight, resumed = epochs(tmp_path / "straight"), epochs(tmp_path / "resumed")
    assert resumed[2]["average_loss"] == pytest.approx(straight[2]["average_loss"], rel=1e-6)
    assert resumed[2]["batches"] == straight[2]["batches"] == 6
    final = [json.loads((tmp_path / name / "results.json").read_text())["final"] for name in ("straight", "resumed")]
    assert final[1] == pytest.approx(final[0], rel=1e-6)


def test_early_stopping(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "3", "--patience", "1", "--patience-on",
                         "perplexity", "--min-delta", "0.5")) == 0
    printed = capsys.readouterr().out
    assert "Early stopping" in printed and "Final Summary: stopped early by --patience at optimizer step 6 of 18" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_early"] and results["epochs_completed"] == 1


def two_processes_straight_and_resumed(model_dir, text_file, tmp_path: Path, args,
                                       cached_density: float = 0.3) -> tuple[str, float, float]:
    """Run the job in 2 gloo processes, and again interrupted after step 3 then resumed: (the
    straight run's stdout, its final perplexity, the resumed run's).  `cached_density`: the
    density of the cached prune the run started from (a schedule's first)."""
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    result = run_cli(job_args(model_dir, text_file, out, *args), tmp_path, launcher=TORCHRUN_2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first = run_cli(job_args(model_dir, text_file, resumed, *args), tmp_path, stop_after=(3, "int"),
                    launcher=TORCHRUN_2, timeout=600)
    assert first.returncode != 0 and "Saved. Continue with the same command plus --resume" in first.stdout
    second = run_cli(job_args(model_dir, text_file, resumed, *args, "--resume"), tmp_path, launcher=TORCHRUN_2,
                     timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    straight, again = (json.loads((folder / "results.json").read_text())["final"] for folder in (out, resumed))
    changed = assert_pruned_weights_stayed_zero(out / "best", pruned_folder(tmp_path / "pruned", model_dir,
                                                                              cached_density))
    assert changed > 0  # it did train
    return result.stdout, straight, again


def test_two_process_fsdp_on_cpu_keeps_pruned_weights_zero_and_resumes(tmp_path, tiny_opt_dir, text_file):
    # 5 windows a batch: an odd number of evaluation batches, so one rank pads with a zero-weight batch
    args = ("--epochs", "1", "--batch-size", "4", "--eval-batch-size", "5")
    stdout, straight, resumed = two_processes_straight_and_resumed(tiny_opt_dir, text_file, tmp_path, args)
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert "cpu:0 × 2" in stdout and "2 per micro-batch × 1 accumulation × 2 processes" in stdout


def test_two_process_ddp_equals_one_process_keeps_pruned_weights_zero_and_resumes(tmp_path, tiny_llama_dir,
                                                                                     text_file):
    args = ("--epochs", "1", "--batch-size", "4", "--eval-batch-size", "5", "--parallel", "ddp", "--loss", "ce")
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "one", *args)) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())["final"]
    stdout, straight, resumed = two_processes_straight_and_resumed(tiny_llama_dir, text_file, tmp_path, args)
    assert "parallel: ddp × 2 processes" in stdout
    assert straight == pytest.approx(one, rel=1e-5)  # averaged gradients of 2 × 2 blocks = the gradient of 4
    assert resumed == pytest.approx(straight, rel=1e-6)


def test_output_survives_an_ascii_console_and_a_pipe(tmp_path, tiny_llama_dir, text_file):
    result = run_cli(["--prune-only", "--model", tiny_llama_dir, "--sparsity", "0.3", "--method", "magnitude",
                      "--eval-source", text_file, "--token-length", "64", "--output-dir", tmp_path / "run"],
                     tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "density 30% - 70% of weights pruned" in result.stdout
    assert "\r" not in result.stdout
    assert any(line.startswith("Computing perplexity: ") for line in result.stdout.splitlines())


def test_tensorboard_tracker_receives_the_metrics(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--report-to", "tensorboard")) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for path in out.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    # every metric the run logged, under its event's name: not only the hyperparameter record
    assert {"train/loss", "train/lr", "evaluation/perplexity", "epoch/perplexity", "epoch/average_loss",
            "holdout/loss"} <= tags, sorted(tags)


def test_a_diverging_run_stops_with_a_message_and_keeps_its_results(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--lr", "1e30",
                         "--max-grad-norm", "0")) == 1
    assert "error: the training loss became nan" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert "loss became nan" in results["error"] and results["baseline"] > 0


def test_each_mode_has_a_default_folder_of_its_own():
    """A folder with results is never overwritten: an --eval-only in the training run's folder would block it."""
    from extreme_compression_experiment import build_parser
    from utils.config.validate import validate
    parser = build_parser()
    folders = {mode: validate(parser.parse_args(["--model", "smollm2-135m", *flags])).output.dir
               for mode, flags in (("train", []), ("eval", ["--eval-only"]), ("prune", ["--prune-only"]),
                                   ("export", ["--export-only"]))}
    assert folders == {"train": "runs/smollm2-135m-0.1-sparsegpt", "eval": "runs/smollm2-135m-eval",
                       "prune": "runs/smollm2-135m-0.1-sparsegpt-pruned", "export": "runs/smollm2-135m-export"}


def _train_lrs(folder: Path) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "train"}


def test_patience_on_the_held_out_loss_cools_the_lr_to_zero_then_stops_and_resumes_exactly(
        tmp_path, tiny_llama_dir, text_file, capsys):
    """--patience watches the held-out loss by default; --cooldown-steps trains that many steps more with the
    lr falling linearly to 0 (the schedule ends where the run stops); a resume inside the cool-down continues it."""
    args = ("--epochs", "3", "--patience", "1", "--min-delta", "0.5", "--cooldown-steps", "3", "--log-every", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(job_args(tiny_llama_dir, text_file, straight, *args, "--keep-state")) == 0
    printed = capsys.readouterr().out
    assert "Patience ran out: the held-out loss has not improved for 1 epoch(s) (--patience 1); cooling down: the " \
           "lr falls to 0 over 3 more steps" in printed
    results = json.loads((straight / "results.json").read_text())
    # epoch 1 sets the best held-out loss, epoch 2 misses a 50% drop: 3 steps of epoch 3, then the end
    assert [e["epoch"] for e in results["epochs"]] == [1, 2, 3] and all("holdout_loss" in e for e in results["epochs"])
    assert results["stopped_early"] and results["tokens_trained"] == (2 * 6 + 3) * 4 * 32
    lrs = _train_lrs(straight)
    assert max(lrs) == 15 and lrs[15] == 0.0
    # the planned decay (18 steps, no warmup) until step 12, then a straight line from there to 0 at 15
    assert lrs[12] == pytest.approx(lrs[1] * 6 / 17)
    assert [lrs[13] / lrs[12], lrs[14] / lrs[12]] == pytest.approx([2 / 3, 1 / 3])
    # the finished run's state (stopped inside epoch 3) is one --resume accepts: it prints the summary again,
    # from the state and, once the state is gone, from results.json
    for _ in range(2):
        assert main(job_args(tiny_llama_dir, text_file, straight, *args, "--resume")) == 0
        assert "Final Summary: stopped early by --patience at optimizer step 15 of 18" in capsys.readouterr().out
        shutil.rmtree(straight / "state", ignore_errors=True)
    assert json.loads((straight / "results.json").read_text())["stopped_early"]
    assert main(job_args(tiny_llama_dir, text_file, resumed, *args), callbacks=[StopAfter(13)]) == 130
    assert main(job_args(tiny_llama_dir, text_file, resumed, *args, "--resume")) == 0
    again = json.loads((resumed / "results.json").read_text())
    assert _train_lrs(resumed) == pytest.approx(lrs) and again["tokens_trained"] == results["tokens_trained"]
    assert again["final"] == pytest.approx(results["final"], rel=1e-6)
