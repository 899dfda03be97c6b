"""The training step's precision and compilation options."""
import json

import pytest
import torch

from extreme_compression_experiment import main
from utils.config.sections import TrainCfg
from utils.training.parallel import init_distributed, prepare_model, resolve_compile_mode
from utils.training.state import TrainState
from utils.training.step import LrPlan, Optimization, train_step
from utils.training.stopping import Patience
from helpers import StopAfter, broken_cpp_compiler, tiny_model
from test_cli import TORCHRUN_2, job_args, run_cli


def test_fp16_loss_scaling_skips_overflowing_steps_and_recovers():
    device = torch.device("cpu")
    init_distributed(device)
    prepared = prepare_model(tiny_model("llama", 300), device, "fp16")
    model = prepared.module
    optimization = Optimization.create(model, TrainCfg(mixed_precision="fp16", lr=1e-3, warmup_steps=0), device)
    assert optimization.scaler is not None
    model.train()
    batch = torch.arange(64).reshape(2, 32) * 7 % 300
    optimization.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # fp16 gradients of this overflow
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(prepared, [batch], optimization, None, device, 1.0)
    assert torch.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "an overflowing step was applied"
    assert optimization.scaler.get_scale() < 2.0 ** 40
    for _ in range(40):  # the scale comes down until steps go through
        train_step(prepared, [batch], optimization, None, device, 1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert Optimization.create(model, TrainCfg(mixed_precision="bf16"), device).scaler is None


def test_compile_modes(monkeypatch):
    import importlib.util
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    find_spec = importlib.util.find_spec

    def triton(installed: bool) -> None:  # auto compiles GPU kernels only where Triton is installed
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (find_spec("torch") if installed else None) if name == "triton"
                            else find_spec(name, *a))

    triton(True)
    assert resolve_compile_mode("auto", cpu, 1)[0] is None
    assert resolve_compile_mode("auto", gpu, 1)[0] == "reduce-overhead"
    assert resolve_compile_mode("auto", gpu, 2)[0] == "default"
    assert resolve_compile_mode("auto", gpu, 1, accumulation=2)[0] == "default"  # no CUDA graphs across micro-batches
    assert resolve_compile_mode("reduce-overhead", gpu, 2)[0] == "default"  # no CUDA graphs under FSDP
    assert resolve_compile_mode("max-autotune", gpu, 4)[0] == "max-autotune-no-cudagraphs"
    assert resolve_compile_mode("off", gpu, 1)[0] is None
    assert resolve_compile_mode("default", cpu, 1)[0] == "default"
    triton(False)
    mode, why = resolve_compile_mode("auto", gpu, 1)
    assert mode is None and "Triton" in why


def test_compiled_training_and_evaluation_match_eager(tmp_path, tiny_llama_dir, text_file, capsys):
    results = {}
    for mode in ("off", "default"):
        out = tmp_path / mode
        # 12 steps: the first log window (10 steps) compiles, the rest is the steady rate; 2 micro-batches a
        # step; compiled: the gradient masks in the backward graph, the evaluations' decoder layers compiled
        assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--max-step", "12", "--micro-batch-size",
                             "2", "--compile", mode, "--eval-compile", "layers" if mode == "default" else "off")) == 0
        results[mode] = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert "torch.compile: default" in printed and "after the first 10 steps, which compiled)" in printed
    assert printed.count("Gradient masks: in the compiled backward") == 1
    epoch = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "epoch"][0]
    assert epoch["steady_tokens_per_second"] > epoch["tokens_per_second"]  # compiling is slower than a step
    assert results["default"]["baseline"] == pytest.approx(results["off"]["baseline"], rel=1e-4)
    assert results["default"]["final"] == pytest.approx(results["off"]["final"], rel=1e-3)
    assert results["default"]["final"] != results["default"]["baseline"]  # it trained


def test_a_failing_compiler_stops_with_the_way_out_and_keeps_the_results(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    with broken_cpp_compiler(), pytest.warns(UserWarning, match="compiled scoring failed"):  # evaluation: eager
        assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1", "--compile", "default")) == 1
    printed = capsys.readouterr().out
    assert "error: torch.compile failed" in printed and "--compile off" in printed
    results = json.loads((out / "results.json").read_text())
    assert "torch.compile failed" in results["error"] and results["baseline"] > 0


def test_fp16_run_resumes_with_its_loss_scale(tmp_path, tiny_llama_dir, text_file, capsys):
    import shutil
    fp16 = ("--mixed-precision", "fp16", "--compile", "off")
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "straight", *fp16)) == 0
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "resumed", *fp16), callbacks=[StopAfter(8)]) == 130
    def saved_state(run: str) -> dict:
        return json.loads((tmp_path / run / "state" / "train_state.json").read_text())

    extra = saved_state("resumed")
    assert extra["scaler"]["scale"] > 0  # the loss scale is part of the resumable state
    # A copy whose saved scale differs from a fresh scaler's: the resumed run must carry it on.
    shutil.copytree(tmp_path / "resumed", tmp_path / "rescaled")
    (tmp_path / "rescaled" / ".lock").unlink(missing_ok=True)
    extra["scaler"]["scale"] = 1024.0
    (tmp_path / "rescaled" / "state" / "train_state.json").write_text(json.dumps(extra))
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "resumed", *fp16, "--resume")) == 0
    assert "Precision: fp16" in capsys.readouterr().out
    final = [json.loads((tmp_path / name / "results.json").read_text())["final"] for name in ("straight", "resumed")]
    assert final[1] == pytest.approx(final[0], rel=1e-6)
    assert main(job_args(tiny_llama_dir, text_file, tmp_path / "rescaled", *fp16, "--resume", "--keep-state")) == 0
    # 4 more steps without overflow do not grow it (growth waits 2000 clean steps)
    assert saved_state("rescaled")["scaler"]["scale"] == 1024.0


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_processes_compiled_match_eager(tmp_path, tiny_opt_dir, text_file, parallel):
    """fsdp: each decoder layer compiled under FSDP2; ddp: the whole model compiled in each process,
    gradients averaged outside the graph and masked by the compiled multiply."""
    args = ("--epochs", "1", "--batch-size", "4", "--eval-batch-size", "5", "--parallel", parallel)
    finals = {}
    for mode in ("off", "default"):
        result = run_cli(job_args(tiny_opt_dir, text_file, tmp_path / mode, *args, "--compile", mode), tmp_path,
                         launcher=TORCHRUN_2, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[mode] = json.loads((tmp_path / mode / "results.json").read_text())["final"]
    assert "torch.compile: default" in result.stdout and "× 2 processes" in result.stdout
    assert finals["default"] == pytest.approx(finals["off"], rel=1e-5)


@pytest.mark.parametrize("warmup,total", [(0, 18), (5, 40), (100, 3000)])
def test_lr_plan_is_transformers_linear_schedule_and_its_cool_down_survives_a_json_round_trip(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    def lrs(scheduler, optimizer, steps):
        seen = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            seen.append(scheduler.get_last_lr()[0])
        return seen

    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, LrPlan(warmup, total))

    optimizer, ours = fresh()
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference = get_linear_schedule_with_warmup(reference_optimizer, warmup, total)
    assert lrs(ours, optimizer, total) == pytest.approx(lrs(reference, reference_optimizer, total), abs=1e-12)
    # a cool-down from step 2/3 of the way: the lr there, falling linearly to 0 over 4 steps
    optimizer, cooled = fresh()
    start = 2 * total // 3
    lrs(cooled, optimizer, start)
    at_start = cooled.get_last_lr()[0]
    cooled.lr_lambdas[0].cool_from, cooled.lr_lambdas[0].cool_to = start, start + 4
    saved = json.loads(json.dumps(cooled.state_dict()))
    expected = lrs(cooled, optimizer, 4)
    assert expected == pytest.approx([at_start * 3 / 4, at_start / 2, at_start / 4, 0.0])
    optimizer, restored = fresh()
    restored.load_state_dict(saved)
    assert lrs(restored, optimizer, 4) == pytest.approx(expected)


def test_patience_counts_epochs_by_the_held_out_loss_at_the_final_density():
    patience, state = Patience(epochs=2, watch="holdout", min_delta=0.1), TrainState()
    # an epoch before the final density counts for nothing; then 3.0 is the best. --min-delta 0.1 asks the
    # held-out perplexity exp(loss) to fall by 10%: the loss by log(1/0.9) = 0.105
    assert not patience.exhausted(state, eligible=False, perplexity_improved=False, holdout_loss=2.0)
    assert state.best_holdout_loss is None and state.bad_epochs == 0
    assert not patience.exhausted(state, True, False, 3.0) and state.best_holdout_loss == 3.0
    assert not patience.exhausted(state, True, True, 2.9) and state.bad_epochs == 1  # perplexity does not count
    assert not patience.exhausted(state, True, False, 2.89) and state.bad_epochs == 0 and state.best_holdout_loss == 2.89
    assert not patience.exhausted(state, True, False, 2.8) and state.bad_epochs == 1
    assert patience.exhausted(state, True, False, 2.95) and state.bad_epochs == 2
    # no held-out loss in an epoch (nothing held out): that epoch counts by perplexity
    fallback, state = Patience(epochs=1, watch="holdout"), TrainState()
    assert not fallback.exhausted(state, True, True, None) and fallback.exhausted(state, True, False, None)
    by_perplexity, state = Patience(epochs=1, watch="perplexity"), TrainState()
    assert by_perplexity.exhausted(state, True, False, 1.0) and state.best_holdout_loss is None
    assert not Patience(epochs=None).exhausted(TrainState(), True, False, 5.0)
