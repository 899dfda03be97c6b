"""A new capability is one entry in its table: a loss term, a model-family quirk, an exporter.
(A pruning method with a knob of its own: tests/test_prune.py.)"""
import pytest
import torch

from extreme_compression_experiment import build_parser
from helpers import tiny_model
from utils.config.validate import validate
from utils.pipeline.identity import RunIdentity
from utils.pruning.schedule import SparsitySchedule


def test_a_new_loss_term_is_one_entry_of_the_terms_table(monkeypatch):
    """Its weight flag, the config's terms, the objective and the run identity follow from the entry."""
    from utils.training.losses import TERMS, Term, TrainingObjective, describe
    calls = []

    def logit_norm(outputs, temperature):
        calls.append(outputs.logits.shape)
        return outputs.logits.float().pow(2).mean()

    monkeypatch.setitem(TERMS, "norm", Term(logit_norm, False, False, 4, "logit norm", flag="--norm-weight",
                                            help="weight of the logits' mean square"))
    parser = build_parser()
    config = validate(parser.parse_args(["--sparsity", "0.5", "--loss", "ce", "--norm-weight", "0.5"]))
    assert [(term.name, term.weight) for term in config.loss.terms] == [("ce", 1.0), ("norm", 0.5)]
    assert describe(config.loss) == "cross-entropy on the training text + 0.5 × logit norm"
    model = tiny_model("llama", 96)
    batch = torch.randint(0, 96, (2, 16))
    with_norm = TrainingObjective(model, None, config.loss)(batch)
    plain = validate(parser.parse_args(["--sparsity", "0.5", "--loss", "ce"]))
    without = TrainingObjective(model, None, plain.loss)(batch)
    assert calls and float(with_norm) > float(without)
    identity = RunIdentity.of(config, "0" * 16, SparsitySchedule.oneshot(0.5), None)
    assert identity.loss_terms == {"norm": 0.5}
    assert RunIdentity.of(plain, "0" * 16, SparsitySchedule.oneshot(0.5), None).to_json()["loss_terms"] is None


def test_a_family_quirk_is_a_row_of_the_families_table(monkeypatch, tokenizer):
    from utils.models.families import FAMILIES, Family, bos_per_window
    model = tiny_model("llama", len(tokenizer))
    tokenizer_with_bos = type("T", (), {"bos_token_id": 5})()
    assert bos_per_window("auto", model.config, tokenizer_with_bos) is None  # Llama: the papers' protocol
    monkeypatch.setitem(FAMILIES, "llama", Family(bos_per_window=True))
    assert bos_per_window("auto", model.config, tokenizer_with_bos) == 5


def test_an_exporter_is_a_row_of_the_registry_and_the_cli_offers_it(monkeypatch, tmp_path):
    from utils.export.compressed import ExportReport
    from utils.export.registry import EXPORTERS, Exporter, export_model, reader_for
    written = []

    def write(model, tokenizer, folder, dtype, info):
        folder.mkdir(parents=True)
        (folder / "plain.json").write_text("{}")
        written.append(folder)
        return ExportReport(str(folder), "plain", "float32", 1, 1)

    plain = Exporter("plain", "plain-export", write, lambda folder: (folder / "plain.json").is_file(),
                     lambda folder, dtype=None: None, "a test format")
    monkeypatch.setitem(EXPORTERS, "plain", plain)
    choices = next(a.choices for a in build_parser()._actions if "--export" in a.option_strings)
    assert "plain" in choices and "none" in choices
    config = validate(build_parser().parse_args(["--export", "plain"]))
    assert config.output.export == "plain"
    export_model("plain", tiny_model("llama", 96), None, tmp_path, torch.float32)
    assert written == [tmp_path / "plain-export"] and reader_for(tmp_path / "plain-export") is plain
    assert reader_for(tmp_path) is None


@pytest.mark.parametrize("argv, problem", [
    (["--loss", "kd", "--kd-weight", "0"], "argument --kd-weight: the loss --loss kd would be 0"),
    (["--loss", "ce", "--ce-weight", "0"], "argument --ce-weight: the loss --loss ce would be 0"),
    (["--loss", "ce+kd", "--ce-weight", "0", "--kd-weight", "0"], "arguments --ce-weight and --kd-weight")])
def test_a_loss_that_is_zero_is_refused_at_the_edge(argv, problem):
    from utils.config.validate import ConfigError
    with pytest.raises(ConfigError) as refused:
        validate(build_parser().parse_args(argv))
    assert problem in str(refused.value)
    # a weighted optional term keeps the loss non-zero: no refusal
    assert validate(build_parser().parse_args([*argv, "--kd-hidden-weight", "0.5"])).loss.weight("hidden") == 0.5
