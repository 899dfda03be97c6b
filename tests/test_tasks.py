"""--tasks: zero-shot accuracy through lm-eval on a local task, checked against a hand count."""
import importlib.util
import json

import pytest
import torch

from extreme_compression_experiment import main

# A multiple-choice task in lm-eval's own YAML, reading local JSON lines (no hub, no network).
TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [{"question": question, "choices": choices, "answer": answer} for question, choices, answer in [
    ("The tower is 324 metres", ["tall", "short", "red"], 0), ("Its base is", ["square", "round"], 0),
    ("the tower surpassed the Washington", ["Monument", "Building", "river"], 0),
    ("It was the first structure to reach a", ["height", "width"], 0), ("Excluding", ["transmitters", "the"], 1),
    ("in the world , a title it held for 41", ["years", "metres", "days"], 0),
    ("the Chrysler", ["Building", "Viaduct"], 0), ("free @-@ standing structure in", ["France", "Spain"], 0),
]]


@pytest.fixture()
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    (folder / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return folder


@torch.no_grad()
def hand_count(model_dir) -> int:
    """How many documents the model gets right, counted without lm-eval: each choice's summed
    log-probability after the question (a space between them), the highest one is the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for doc in DOCS:
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(logprobs[position - 1, whole[position]].item()
                              for position in range(len(context), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right


def test_eval_only_tasks_report_the_hand_counted_accuracy(tmp_path, tiny_llama_dir, text_file, task_dir, capsys):
    out = tmp_path / "run"
    assert main([str(a) for a in ["--eval-only", "--model", tiny_llama_dir, "--token-length", "64",
                                  "--eval-source", text_file, "--tasks", "tiny_choice", "--task-dir", task_dir,
                                  "--output-dir", out]]) == 0
    accuracy = json.loads((out / "results.json").read_text())["tasks"]["tiny_choice"]["acc"]
    assert accuracy == hand_count(tiny_llama_dir) / len(DOCS)
    assert f"tiny_choice acc {accuracy:.1%}" in capsys.readouterr().out


def test_a_training_run_scores_and_exports_its_best_model(tmp_path, tiny_llama_dir, text_file, task_dir, capsys):
    from test_cli import job_args
    from utils.export.compressed import load_compressed
    out = tmp_path / "run"
    assert main(job_args(tiny_llama_dir, text_file, out, "--loss", "ce", "--kd-hidden-weight", "0.5",
                         "--tasks", "tiny_choice", "--task-dir", task_dir)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["loss"]["hidden_weight"] == 0.5  # SquareHead beside cross-entropy: the teacher was loaded
    assert results["tasks"]["tiny_choice"]["acc"] == hand_count(out / "best") / len(DOCS)
    lines = capsys.readouterr().out.splitlines()
    summary = lines[[i for i, line in enumerate(lines) if line.startswith("Baseline perplexity")][-1]:]
    assert any(line.startswith("Zero-shot tasks (best model): tiny_choice acc") for line in summary)
    from transformers import AutoModelForCausalLM
    best = AutoModelForCausalLM.from_pretrained(out / "best", dtype=torch.bfloat16).state_dict()
    exported = load_compressed(out / "compressed").state_dict()
    assert all(torch.equal(exported[name], value) for name, value in best.items())
    assert results["export"]["ratio"] < 0.9


def test_tasks_without_lm_eval_name_the_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        main(["--tasks", "piqa"])
    assert stop.value.code == 2
    assert "needs the lm-eval package, which is not installed (pip install lm-eval)" in capsys.readouterr().err
