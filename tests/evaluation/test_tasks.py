"""lm-evaluation-harness tasks on a model in memory, with a task over local data (offline): lm-eval's accuracy
equals the one computed here from the same model's log-likelihoods, so the harness really scored this model."""

import json
import random

import pytest
import torch
from helpers import python_text, save_tiny_model

pytest.importorskip("lm_eval")

from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress.commands.cli import main

TASK = """task: next_word_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A two-choice task from Python's help text: the next word, or a word from elsewhere."""
    folder = tmp_path_factory.mktemp("tasks")
    words = python_text().split()
    rng = random.Random(0)
    rows = []
    for start in range(0, 40 * 50, 50):
        context, right, wrong = " ".join(words[start : start + 12]), words[start + 12], rng.choice(words)
        if right != wrong:
            gold = rng.randrange(2)
            choices = [wrong, right] if gold else [right, wrong]
            rows.append({"context": context, "choices": choices, "gold": gold})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "next_word.yaml").write_text(TASK.format(data=folder / "data.jsonl"))
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_model(folder)
    return folder


def _our_accuracy(model, tokenizer, rows) -> float:
    """The task scored by hand: the choice whose tokens (after the context's) have the larger log-likelihood."""
    correct = 0
    for row in rows:
        context = tokenizer(row["context"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["context"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return correct / len(rows)


def test_a_local_task_scores_the_compressed_model_in_memory(task_dir, model_folder):
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=32))
    results = hfcompress.evaluation.evaluate_tasks(model, tokenizer, "next_word_local", tasks_dir=task_dir, quiet=True)
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    assert results["next_word_local"]["acc"] == pytest.approx(_our_accuracy(model, tokenizer, rows))


def test_evaluate_command_with_tasks(task_dir, model_folder, capsys):
    code = main(["evaluate", str(model_folder), "--tasks", "next_word_local", "--tasks-dir", str(task_dir),
                 "--limit", "8", "--json", "-q"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["tasks"]["next_word_local"]["acc"] <= 1 and "perplexity" not in result


def test_unknown_tasks_and_nothing_to_do_are_refused(task_dir, model_folder, capsys):
    assert main(["evaluate", str(model_folder), "--tasks", "no_such_task", "--tasks-dir", str(task_dir), "-q"]) == 2
    assert "unknown lm-eval tasks ['no_such_task']" in capsys.readouterr().err
    assert main(["evaluate", str(model_folder), "-q"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_a_writing_command_records_task_scores_before_and_after_and_the_card_shows_them(
    task_dir, model_folder, tmp_path
):
    out = tmp_path / "rtn"
    code = main(["quantize", "rtn", str(model_folder), str(out), "--group-size", "32", "--eval-tasks", "next_word_local",
                 "--eval-tasks-dir", str(task_dir), "-q"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    before, after = (record["metrics"][k]["tasks"]["next_word_local"]["acc"] for k in ("before", "after"))
    assert 0 <= before <= 1 and 0 <= after <= 1
    assert record["evaluation"]["tasks"] == "next_word_local"
    assert f"| next_word_local acc | {before:.4f} | {after:.4f} |" in (out / "README.md").read_text()
