"""Recovery: the losses (cross-entropy, distillation), the frozen teacher, held-out text and the
memorization warning, the learning-rate schedule, the measured recipes and --loss auto."""
import json
import math

import pytest
import torch

from utils.data.training_text import split_holdout
from extreme_compression_experiment import main
from utils.config.sections import LossCfg, TrainCfg
from utils.training.parallel import init_distributed, prepare_model
from utils.training.step import Optimization, make_scheduler, train_step
from helpers import REPO, SAMPLE_TEXT, tiny_model
from test_cli import job_args
from test_schedules import events_of
from utils.training.losses import TrainingObjective, cross_entropy, hidden_mse, kd_divergence, needs_teacher


def test_kd_divergence_is_the_hand_computed_kl():
    # One position, three tokens.  teacher p = softmax([0, ln 2, ln 3]) = (1/6, 2/6, 3/6); student uniform.
    teacher = torch.tensor([[[0.0, math.log(2), math.log(3)]]])
    student = torch.zeros(1, 1, 3)
    p = [1 / 6, 2 / 6, 3 / 6]
    by_hand = sum(pi * math.log(pi / (1 / 3)) for pi in p)  # KL(p ‖ uniform)
    assert kd_divergence(student, teacher).item() == pytest.approx(by_hand, rel=1e-6)
    # Temperature 2: both softened, the result scaled by T² = 4.
    soft = [w / sum(math.sqrt(x) for x in (1, 2, 3)) for w in (math.sqrt(x) for x in (1, 2, 3))]
    by_hand_t2 = 4 * sum(pi * math.log(pi / (1 / 3)) for pi in soft)
    assert kd_divergence(student, teacher, temperature=2.0).item() == pytest.approx(by_hand_t2, rel=1e-6)
    assert kd_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_cross_entropy_objective_equals_the_model_s_own_loss():
    model = tiny_model("llama", 300)
    batch = torch.arange(64).reshape(2, 32) * 7 % 300
    ours = TrainingObjective(model, None, LossCfg.of("ce"))(batch)
    theirs = model(input_ids=batch, labels=batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    logits = model(input_ids=batch).logits[:, :-1]
    assert cross_entropy(logits, batch[:, 1:]).item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["kd", "ce+kd"])
def test_distillation_trains_the_student_and_never_the_teacher(kind):
    device = torch.device("cpu")
    init_distributed(device)
    student, teacher = tiny_model("llama", 300), tiny_model("llama", 300, seed=1)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_student = {k: v.clone() for k, v in student.state_dict().items()}
    prepared = prepare_model(student, device, "no", teacher=teacher, loss=LossCfg.of(kind))
    optimization = Optimization.create(student, TrainCfg(lr=1e-2, warmup_steps=0, max_step=5, epochs=1), device)
    student.train()
    batch = torch.arange(64).reshape(2, 32) * 7 % 300
    losses = [float(train_step(prepared, [batch], optimization, None, device, 1.0)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    assert any(not torch.equal(before_student[k], v) for k, v in student.state_dict().items())


def test_kd_alone_ignores_the_text_s_labels_and_ce_plus_kd_weighs_both():
    student, teacher = tiny_model("llama", 300), tiny_model("llama", 300, seed=1)
    batch = torch.arange(64).reshape(2, 32) * 7 % 300
    kd = TrainingObjective(student, teacher, LossCfg.of("kd"))(batch)
    ce = TrainingObjective(student, None, LossCfg.of("ce"))(batch)
    both = TrainingObjective(student, teacher, LossCfg.of("ce+kd", ce=0.25, kd=2.0))(batch)
    assert both.item() == pytest.approx(0.25 * ce.item() + 2.0 * kd.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainingObjective(student, None, LossCfg.of("kd"))


def test_squarehead_is_the_hand_computed_normalized_mse_and_adds_to_any_loss():
    # Two layers of one value each: student (1, 3), teacher (2, 1) → ((1-2)²/2² + (3-1)²/1²) / 2
    student = (torch.tensor([[[1.0]]]), torch.tensor([[[3.0]]]))
    teacher = (torch.tensor([[[2.0]]]), torch.tensor([[[1.0]]]))
    assert hidden_mse(student, teacher).item() == pytest.approx((1 / 4 + 4 / 1) / 2)
    assert hidden_mse(teacher, teacher).item() == 0
    model, dense = tiny_model("llama", 300), tiny_model("llama", 300, seed=1)
    batch = torch.arange(64).reshape(2, 32) * 7 % 300
    with torch.no_grad():
        by_hand = hidden_mse(model(batch, output_hidden_states=True).hidden_states[1:],
                             dense(batch, output_hidden_states=True).hidden_states[1:]).item()
    assert by_hand > 0
    for kind in ("ce", "kd"):  # beside cross-entropy it needs the teacher too
        plain = TrainingObjective(model, dense, LossCfg.of(kind))(batch).item()
        with_hidden = TrainingObjective(model, dense, LossCfg.of(kind, hidden=0.5))(batch).item()
        assert with_hidden == pytest.approx(plain + 0.5 * by_hand, rel=1e-5)
    assert needs_teacher(LossCfg.of("ce", hidden=0.5)) and not needs_teacher(LossCfg.of("ce"))


def test_warmup_then_linear_decay_values():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = make_scheduler(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


def test_holdout_is_the_tail_of_the_text_and_never_trained_on():
    blocks = torch.arange(100).reshape(20, 5)
    train, held = split_holdout(blocks, 0.1)
    assert train.shape[0] == 18 and torch.equal(held, blocks[18:])
    assert split_holdout(blocks, 0.0) == (blocks, None)
    train, held = split_holdout(blocks[:3], 0.05)  # a tiny text still holds one block out
    assert train.shape[0] == 2 and held.shape[0] == 1


def test_a_long_schedule_on_little_text_warns_and_the_holdout_is_reported(tmp_path, tiny_llama_dir, capsys):
    small = tmp_path / "small.txt"
    small.write_text(SAMPLE_TEXT * 3, encoding="utf-8")
    out = tmp_path / "run"
    args = job_args(tiny_llama_dir, small, out, "--max-step", "20", "--epochs", "2", "--holdout", "0.2",
                    "--loss", "ce")
    args[args.index("--eval-source") + 1] = str(small)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Warning: " in printed and "passes over" in printed and "memorize" in printed
    assert "Held-out training text" in printed
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    budget = next(e for e in events if e["event"] == "budget")
    assert budget["passes"] > 4 and budget["holdout_tokens"] > 0
    holdout = [e for e in events if e["event"] == "holdout"]
    assert [e["epoch"] for e in holdout] == [1, 2] and holdout[1]["passes"] == pytest.approx(2 * holdout[0]["passes"])
    # with plenty of text: no warning
    capsys.readouterr()
    big = tmp_path / "big.txt"
    big.write_text(SAMPLE_TEXT * 200, encoding="utf-8")
    args = job_args(tiny_llama_dir, big, tmp_path / "quiet", "--max-step", "2", "--epochs", "1", "--loss", "ce")
    assert main(args) == 0
    assert "Warning: " not in capsys.readouterr().out


class _Printed:
    def __init__(self):
        self.lines, self.events = [], []

    def info(self, line):
        self.lines.append(line)

    def log(self, event, **_):
        self.events.append(event)


@pytest.mark.parametrize("steps, loss, warns", [(10, "ce", True), (10, "ce+kd", True), (10, "kd", False),
                                                (30, "kd", True), (4, "ce", False)])
def test_the_memorization_warning_allows_distillation_more_passes(steps, loss, warns):
    from utils.config.sections import LossCfg, TrainCfg
    from utils.data.sources import TokenizedText
    from utils.data.training_text import report_budget
    from utils.training.losses import memorization_passes
    blocks = torch.zeros(10, 8, dtype=torch.long)  # 10 blocks; batch 8: `steps` × 0.8 passes
    printed = _Printed()
    train = TrainCfg(epochs=1, max_step=steps, batch_size=8, holdout=0.0)
    passes = report_budget(TokenizedText(blocks.reshape(-1), 80, "t"), blocks, None, train,
                           memorization_passes(LossCfg.of(loss)), printed)
    assert passes == pytest.approx(steps * 0.8) and printed.events[0]["passes"] == pytest.approx(passes)
    warning = [line for line in printed.lines if line.startswith("Warning: ")]
    assert bool(warning) == warns
    if warning:  # a distilling run is not told to distill
        assert ("--loss kd" in warning[0]) == (loss != "kd") and "held-out loss" in warning[0]


def test_the_default_loss_distills_from_the_dense_model(tmp_path, tiny_llama_dir, text_file, capsys):
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--epochs", "1")) == 0
    printed = capsys.readouterr().out
    assert "Loss: distillation from the dense model" in printed and "Teacher: the dense" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["loss"]["kind"] == "kd" and results["final"] != results["baseline"]


@pytest.mark.parametrize("extra, density, names", [
    ((), "0.1", ("--schedule gradual", "--schedule oneshot")),
    ((), "0.3", ("--schedule iterative --layer-density owl", "--schedule oneshot")),
    ((), "0.5", ()), (("--loss", "kd"), "0.5", ("--loss ce+kd", "--loss kd")),
    (("--schedule", "gradual"), "0.1", ()), ((), "0.7", None), (("--lr", "6e-4"), "0.1", None),
    (("--base-lr", "2e-4"), "0.1", None)])
def test_the_recipe_note_names_the_measured_recipe_and_where_a_run_at_the_brief_s_lr_differs(extra, density, names):
    from extreme_compression_experiment import build_parser
    from utils.config.validate import validate
    from utils.config.recipes import MEASURED_BATCH, measured_recipe, recipe_note
    parser = build_parser()
    config = validate(parser.parse_args(["--sparsity", density, "--batch-size", "4", *extra]))
    note = recipe_note(config)
    assert (note is None) == (names is None)
    if note is None:
        return
    recipe = measured_recipe(config.prune.density)
    assert f"is {recipe.at(recipe.batch)} with" in note and f" with --loss {recipe.loss}" in note
    seeds = dict(recipe.measured)[recipe.batch]  # the headline is the mean of the seeds at the row's batch
    assert f"is {sum(seeds) / len(seeds):.2f} (" in note and f"at batch {recipe.batch} (" in note
    assert "lr 1.0e-5 (derived: 5.0e-6 × √batch)" in note and config.train.lr == pytest.approx(5e-6 * 2)
    for name in names:  # the recipe's flag, then this run's value that differs
        assert name in note
    assert ("This run has --schedule" in note) == ("--schedule oneshot" in names)
    # the way out it names: --recipe measured, whose lr at batch 4 is the measured one under the √batch rule
    assert f"--recipe measured trains with it ({recipe.flags()}, lr " in note
    lr = float(note.split("--recipe measured trains with it")[1].split(", lr ")[1].split()[0])
    assert lr == pytest.approx(recipe.lr * math.sqrt(4 / MEASURED_BATCH), rel=0.03) and "at batch 4" in note
    measured = validate(parser.parse_args(["--sparsity", density, "--batch-size", "4", "--recipe", "measured"]))
    assert measured.train.lr == pytest.approx(lr, rel=0.03)


@pytest.mark.parametrize("density", ["0.05", "0.1", "0.3", "0.5"])
def test_recipe_measured_trains_with_the_measured_row_and_an_explicit_flag_wins(density):
    from extreme_compression_experiment import build_parser
    from utils.config.recipes import MEASURED_BATCH, measured_recipe, recipe_note
    from utils.config.validate import validate
    parser = build_parser()
    recipe = measured_recipe(float(density))

    def config(*extra):
        return validate(parser.parse_args(["--sparsity", density, "--batch-size", "4", *extra]))

    measured = config("--recipe", "measured")
    assert (measured.loss.kind, measured.schedule.kind) == (recipe.loss, recipe.schedule)
    assert not measured.train.lr_derived
    assert measured.train.lr == pytest.approx(recipe.lr * math.sqrt(4 / MEASURED_BATCH))  # √batch, from the measured batch
    # the same run with the row's flags spelled out is the same run: each resumes the other
    spelled = config(*recipe.flags().split(), "--lr", repr(measured.train.lr))
    assert measured.prune.layer_density == spelled.prune.layer_density
    assert identity(measured) == identity(spelled)
    assert recipe_note(measured).startswith(f"Recipe: measured near density {recipe.density:g}, ")
    assert "trained here at lr" in recipe_note(measured)
    # what the recipe measured at the user's batch 4 is quoted at batch 4 (its headline where it was measured
    # there), and only there
    assert recipe.at(4) and recipe_note(measured).endswith(
        f"; the recipe measured {recipe.at(4)} at batch 4" if recipe.batch != 4 else "(batch 4, the √batch rule)")
    assert recipe.at(4) in recipe_note(measured)
    for batch in (8, 16):  # another batch: quoted where the row has seeds there, and only there
        note = recipe_note(config("--recipe", "measured", "--batch-size", str(batch)))
        assert ("the recipe measured" in note) == (recipe.seeds(batch) is not None and batch != recipe.batch)
        assert recipe.seeds(batch) is None or note.endswith(f"the recipe measured {recipe.at(batch)} at batch {batch}")
    # a flag given explicitly wins over the row, and the line says so
    schedule, steps = ("oneshot", ()) if recipe.schedule != "oneshot" else ("iterative", ("--density-steps", "0.8,0.5"))
    mixed = config("--recipe", "measured", "--schedule", schedule, *steps, "--loss", "ce", "--lr", "1e-4")
    assert (mixed.schedule.kind, mixed.loss.kind, mixed.train.lr) == (schedule, "ce", 1e-4)
    assert f"overridden here: --loss ce, --schedule {schedule}, lr 1.0e-4" in recipe_note(mixed)
    assert "the recipe measured" not in recipe_note(mixed)  # not this run's recipe: its number is not quoted
    # auto, given or by default, is the tool's choice, which under a recipe is the row's (the help says so);
    # another value wins
    spelled_auto = config("--recipe", "measured", "--layer-density", "auto", "--loss", "auto")
    assert (spelled_auto.prune.layer_density, spelled_auto.loss.kind) == (measured.prune.layer_density, recipe.loss)
    assert "(auto, as given or by default, takes the row's)" in " ".join(parser.format_help().split())
    other = "uniform" if measured.prune.layer_density != "uniform" else "owl"
    assert config("--recipe", "measured", "--layer-density", other).prune.layer_density == other
    # without it: the brief's lr, one-shot
    brief = config()
    assert brief.train.lr == pytest.approx(5e-6 * 2) and brief.schedule.kind == "oneshot" and brief.train.lr_derived


def test_a_pruning_schedule_under_fsdp_processes_is_refused_before_any_work(monkeypatch):
    from extreme_compression_experiment import build_parser
    from utils.config.validate import ConfigError, validate, world_size_from_launcher
    parser = build_parser()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch sets it in each process
    assert world_size_from_launcher() == 2
    for extra, said in ((("--recipe", "measured"), "gradual (--recipe measured): needs the whole model in each of "
                                                   "the 2 processes"),
                        (("--schedule", "iterative"), "iterative: needs the whole model in each of the 2")):
        with pytest.raises(ConfigError) as refused:
            validate(parser.parse_args(["--sparsity", "0.1", *extra]), world_size=2)
        assert said in str(refused.value)
    # the way out it names: one-shot keeps the rest of the recipe, and runs
    kept = validate(parser.parse_args(["--sparsity", "0.1", "--recipe", "measured", "--schedule", "oneshot"]),
                    world_size=2)
    assert kept.schedule.kind == "oneshot" and kept.loss.kind == "kd" and not kept.train.lr_derived
    ddp = validate(parser.parse_args(["--sparsity", "0.1", "--recipe", "measured", "--parallel", "ddp"]), world_size=2)
    assert ddp.schedule.kind == "gradual"  # whole copies: each process can prune its own
    assert validate(parser.parse_args(["--sparsity", "0.1", "--recipe", "measured"])).schedule.kind == "gradual"


def test_the_job_with_recipe_measured_trains_the_row_it_prints(tmp_path, tiny_llama_dir, text_file, capsys):
    from utils.config.recipes import measured_recipe
    recipe = measured_recipe(0.3)  # job_args' density
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--recipe", "measured")) == 0
    printed = capsys.readouterr().out
    assert f"Recipe: measured near density 0.3, {recipe.at(recipe.batch)} with {recipe.flags()}" in printed
    assert f"Sparsity schedule: {recipe.schedule}: 0.5 (step 0)" in printed and "Loss: distillation" in printed
    assert f"lr {recipe.lr / 2 ** 0.5:.3g}" in printed  # batch 4: the measured lr at batch 8 under √batch
    stages = [e for e in events_of(out) if e["event"] == "stage"]
    assert stages and stages[-1]["measured_density"] == pytest.approx(0.3, abs=1 / 64)
    profile = [e for e in events_of(out) if e["event"] == "pruning"][0]["layer_density_profile"]
    assert (profile is not None) == (recipe.layer_density == "owl")


@pytest.mark.parametrize("extra, problem", [
    (("--sparsity", "0.8"), "no recovery was measured near density 0.8"),
    (("--pattern", "2:4"), "the measured recipes are unstructured"),
    (("--sparsity", "0.1", "--prune-only"), "a recovery recipe needs a training run")])
def test_recipe_measured_refuses_what_no_row_covers_with_the_way_out(extra, problem):
    from extreme_compression_experiment import build_parser
    from utils.config.validate import ConfigError, validate
    parser = build_parser()
    with pytest.raises(ConfigError) as refused:
        validate(parser.parse_args(["--recipe", "measured", *extra]))
    assert problem in str(refused.value)


@pytest.mark.parametrize("density, loss", [("0.1", "kd"), ("0.3", "kd"), ("0.4", "kd"), ("0.5", "ce+kd"),
                                           ("1.0", "ce+kd")])
def test_loss_auto_trains_with_the_loss_measured_best_near_the_density_and_an_explicit_loss_wins(density, loss):
    from extreme_compression_experiment import build_parser
    from utils.config.validate import validate
    parser = build_parser()
    config = validate(parser.parse_args(["--sparsity", density]))
    assert config.loss.kind == loss and config.loss.auto
    from utils.config.recipes import auto_loss_rule
    assert auto_loss_rule() == "kd at density ≤ 0.4, ce+kd above"  # what --help says of this table
    assert f"({auto_loss_rule()}: utils/config/recipes.py)" in " ".join(parser.format_help().split())
    explicit = validate(parser.parse_args(["--sparsity", density, "--loss", "ce"]))
    assert explicit.loss.kind == "ce" and not explicit.loss.auto
    # a run's identity holds the loss it trains with: --loss auto and the same loss named resume each other
    named = validate(parser.parse_args(["--sparsity", density, "--loss", loss]))
    assert identity(config) == identity(named) and identity(config)["loss"] == loss


def test_a_recipe_measured_at_another_batch_reports_the_mean_of_its_seeds():
    from utils.config.recipes import MeasuredRecipe
    row = MeasuredRecipe(0.1, 0.2, "kd", "gradual", "auto", 6e-4, "", ((4, (68.79, 68.52)), (2, (70.0,))), batch=4)
    assert row.at(4) == "68.66 (mean of 2 seeds: 68.79, 68.52)"  # (68.79 + 68.52) / 2 = 68.655
    assert row.at(2) == "70.00 (one seed)" and row.at(16) is None and row.seeds(2) == (70.0,)
    cut = MeasuredRecipe(0.1, 0.2, "kd", "gradual", "auto", 6e-4, "", ((4, (68.79, 68.52)), (2, (70.0,))), batch=4,
                         caveat="after epoch 4 of 5")  # runs stopped short say so beside their headline only
    assert cut.at(4) == "68.66 (mean of 2 seeds: 68.79, 68.52; after epoch 4 of 5)" and cut.at(2) == "70.00 (one seed)"
    with pytest.raises(ValueError, match="no measurement at its batch 8"):  # a headline is a measurement
        MeasuredRecipe(0.1, 0.2, "kd", "gradual", "auto", 6e-4, "", ((4, (68.79, 68.52)),))


def test_a_recipe_measured_over_fewer_epochs_trains_them_and_an_explicit_epochs_wins():
    from extreme_compression_experiment import build_parser
    from utils.config.recipes import measured_recipe, recipe_note
    from utils.config.sections import DEFAULT_EPOCHS
    from utils.config.validate import validate
    parser = build_parser()

    def config(density, *extra):
        return validate(parser.parse_args(["--sparsity", density, "--batch-size", "4", *extra]))

    short, full = measured_recipe(0.5), measured_recipe(0.1)
    assert short.epochs is not None and short.epochs < DEFAULT_EPOCHS and full.epochs is None
    assert config("0.5", "--recipe", "measured").train.epochs == short.epochs
    assert config("0.1", "--recipe", "measured").train.epochs == DEFAULT_EPOCHS  # the row keeps the budget
    assert config("0.5").train.epochs == DEFAULT_EPOCHS  # without the recipe: the brief's budget
    tokens = f"{short.epochs * 10_000 * 512 / 1e6:.4g}M training tokens"  # 2 epochs: 10.24M, not 25.6M
    assert tokens in recipe_note(config("0.5", "--recipe", "measured")) and "25.6M" in recipe_note(config("0.1"))
    assert f"--epochs {short.epochs}" in short.flags() and "--epochs" not in full.flags()
    explicit = config("0.5", "--recipe", "measured", "--epochs", str(DEFAULT_EPOCHS))
    assert explicit.train.epochs == DEFAULT_EPOCHS
    assert recipe_note(explicit).endswith(f"overridden here: --epochs {DEFAULT_EPOCHS}")
    # the brief's plain run at 0.5 is told it trains longer than the measured recipe
    assert f"This run has --epochs {DEFAULT_EPOCHS}, lr" in recipe_note(config("0.5"))
    # a row at the budget is overridden by an explicit --epochs too (a 1-epoch screen), and says so
    screen = config("0.1", "--recipe", "measured", "--epochs", "1")
    assert screen.train.epochs == 1 and recipe_note(screen).endswith("overridden here: --epochs 1")


def test_the_readme_and_benchmarks_quote_each_recipe_s_headline():
    from utils.config.recipes import RECIPES
    pages = [(REPO / name).read_text(encoding="utf-8") for name in ("README.md", "BENCHMARKS.md")]
    for row in RECIPES:  # the mean of its seeds at its batch, as `--recipe measured` prints it
        headline = f"**{row.at(row.batch).split()[0]}**"
        assert all(headline in page for page in pages), (row.density, headline)


def test_measured_recipes_cover_their_bands_in_order():
    from utils.config.recipes import RECIPES, measured_recipe
    assert [r.density for r in RECIPES] == sorted(r.density for r in RECIPES)
    assert all(r.density <= r.up_to for r in RECIPES)
    assert measured_recipe(0.05).density == 0.05 and measured_recipe(0.08).density == 0.1
    assert measured_recipe(0.2).density == 0.1 and measured_recipe(0.01).density == 0.05
    assert measured_recipe(0.25).density == 0.3 and measured_recipe(0.6).density == 0.5
    assert measured_recipe(0.61) is None and measured_recipe(1.0) is None


def identity(config) -> dict:
    """The run identity of `config` for a model of fingerprint 0…0."""
    from utils.pipeline.identity import RunIdentity
    from utils.pipeline.prune_step import sparsity_schedule
    return RunIdentity.of(config, "0" * 16, sparsity_schedule(config), None).to_json()
