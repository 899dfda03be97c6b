"""What the code before the shape change wrote still works: its run folder resumes, its cached prune
is hit, and the resumed run ends where that code's uninterrupted run ended."""
import json
import shutil
from pathlib import Path

import pytest

from extreme_compression_experiment import main
from utils.models.loading import model_identity, resolve_model

FIXTURE = Path(__file__).parent / "fixtures" / "pre_shape"


def _with_this_fingerprint(folder: Path, old: str) -> str:
    """The fixture's files as written, with the model fingerprint of this checkout's copy of the
    model (it names the model's resolved path) in place of the one they were written with."""
    new = model_identity(resolve_model(str(folder / "model")))["fingerprint"]
    cache = next((folder / "pruned").iterdir())
    info = json.loads((cache / "pruning.json").read_text())
    assert info["model_identity"]["fingerprint"] == old
    info["model_identity"]["fingerprint"] = new
    (cache / "pruning.json").write_text(json.dumps(info))
    cache.rename(cache.with_name(cache.name.replace(old[:10], new[:10])))
    state = json.loads((folder / "run" / "state" / "train_state.json").read_text())
    assert state["identity"]["model_fingerprint"] == old
    state["identity"]["model_fingerprint"] = new
    (folder / "run" / "state" / "train_state.json").write_text(json.dumps(state))
    return new


def test_a_run_folder_and_a_cached_prune_from_before_the_move_resume_and_hit(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    expected = json.loads((work / "expected.json").read_text())
    _with_this_fingerprint(work, expected["fingerprint"])
    args = ["--model", "model", "--sparsity", "0.3", "--batch-size", "4", "--max-step", "6", "--epochs", "2",
            "--block-size", "32", "--token-length", "64", "--eval-batch-size", "4", "--nsamples", "4",
            "--calibration-length", "64", "--train-source", "train.txt", "--eval-source", "train.txt",
            "--calibration-source", "train.txt", "--pruned-dir", "pruned", "--export", "none", "--lr", "1e-3",
            "--output-dir", "run", "--resume"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Loading pruned model from pruned/model-0.3-sparsegpt-owl-0.08-5-" in printed  # the old entry's name
    assert "pruning now" not in printed
    assert "Resumed from run/state: epoch 2, optimizer step 8 of 12" in printed
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["epochs_completed"] == 2 and results["interrupted"] is False
    # the old code's uninterrupted run, on this machine bit for bit; elsewhere float sums may round differently
    assert results["final"] == pytest.approx(expected["final"], rel=1e-6)
    assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    before = json.loads((FIXTURE / "run" / "results.json").read_text())  # what the old code recorded
    assert results["loss"] == before["loss"] and results["schedule"] == before["schedule"]
    assert set(before) <= set(results)  # every key it wrote is still written


def test_a_cache_entry_whose_record_names_another_prune_is_refused(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    _with_this_fingerprint(work, json.loads((work / "expected.json").read_text())["fingerprint"])
    cache = next((work / "pruned").iterdir())
    info = json.loads((cache / "pruning.json").read_text())
    info["method"] = "wanda"  # a folder renamed by hand, or written by something else
    (cache / "pruning.json").write_text(json.dumps(info))
    args = ["--model", "model", "--sparsity", "0.3", "--prune-only", "--token-length", "64", "--nsamples", "4",
            "--calibration-length", "64", "--eval-source", "train.txt", "--calibration-source", "train.txt",
            "--pruned-dir", "pruned", "--export", "none", "--output-dir", "p"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "pruning.json records another prune: method wanda (wanted sparsegpt)" in error and "rm -r" in error
