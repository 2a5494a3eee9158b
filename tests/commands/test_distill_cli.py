"""`hfcompress distill` on tiny model folders with a real tokenizer."""

import json
import tempfile

import pytest
import torch
from helpers import python_text, save_tiny_model, tiny_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from hfcompress.commands.cli import main


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(python_text()[:30_000], encoding="utf-8")
    return path


def test_distill_causal_lm_student_from_teacher_layers(tmp_path, text_file, monkeypatch):
    scratch = tmp_path / "scratch"  # the temporary folder Trainer is given must not outlive the run
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    teacher = tmp_path / "teacher"
    save_tiny_model(teacher)
    out = tmp_path / "student"
    code = run(
        "distill", out, "--teacher", teacher, "--student-layers", 1, "--dataset", text_file, "--seq-len", 32,
        "--max-steps", 4, "--batch-size", 4, "--hidden-states", "2:1", "--eval-dataset", text_file,
        "--eval-max-windows", 2, "--eval-seq-len", 32, "--cpu", "-q",
    )  # fmt: skip
    assert code == 0
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 1
    record = json.loads((out / "hfcompress_record.json").read_text())
    step = record["steps"][0]
    assert step["technique"] == "distillation" and step["config"]["hidden_states"] == [[2, 1]]
    assert "perplexity" in record["metrics"]["after"] and (out / "tokenizer.json").is_file()
    assert not list(scratch.iterdir())


def test_distill_sequence_classification_from_json_lines(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = "<unk>"
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(
        BertConfig(
            vocab_size=256,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=2,
        )
    )
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "train.jsonl"
    lines = [json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(python_text()[:8000].split("\n\n")[:40])]
    data.write_text("\n".join(lines))
    for task in (["--task", "sequence-classification"], []):  # without --task: the teacher's own head
        out = tmp_path / f"student{len(task)}"
        assert run("distill", out, "--teacher", tmp_path / "teacher", "--student-layers", 1, "--dataset", data,
                   *task, "--seq-len", 32, "--max-steps", 3, "--cpu", "-q") == 0  # fmt: skip
        assert AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 1
        assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
        record = json.loads((out / "hfcompress_record.json").read_text())
        assert record["steps"][-1]["data"]["task"] == "sequence-classification"


def test_a_teacher_of_a_head_distill_does_not_train_is_refused(tmp_path, capsys):
    BertForTokenClassification(
        BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path / "teacher")
    (tmp_path / "text.txt").write_text("some text " * 100)
    argv = ("distill", tmp_path / "out", "--teacher", tmp_path / "teacher", "--student-layers", 1)
    assert run(*argv, "--dataset", tmp_path / "text.txt", "--max-steps", 1, "--cpu", "-q") == 2
    assert "is a token-classification model; distill trains a causal LM or a sequence classifier" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--student-layers", "1", "--temperature", "0"], "`temperature` must be > 0, got 0.0"),
        (["--student-layers", "1", "--hidden-states", "2-1"], "layer pairs must look like 'TEACHER:STUDENT"),
        (["--student-layers", "5"], "between 1 and the teacher's 2 layers, got 5"),
        (["--student-layers", "1", "--hidden-states", "9:1"], "out of range"),
    ],
)
def test_bad_distill_settings_fail_clearly_and_write_nothing(tmp_path, text_file, capsys, extra, message):
    teacher = tmp_path / "teacher"
    save_tiny_model(teacher)
    out = tmp_path / "out"
    assert (
        run(
            "distill",
            out,
            "--teacher",
            teacher,
            "--dataset",
            text_file,
            "--seq-len",
            32,
            "--max-steps",
            1,
            *extra,
            "-q",
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_distill_from_an_8bit_teacher(tmp_path, text_file):
    pytest.importorskip("bitsandbytes")
    from helpers import tiny_model

    teacher = tmp_path / "teacher"
    save_tiny_model(teacher)
    student = tmp_path / "small"
    from hfcompress import make_student

    make_student(tiny_model("llama"), num_layers=1).save_pretrained(student)
    out = tmp_path / "student"
    assert run("distill", out, "--teacher", teacher, "--teacher-bits", 8, "--student", student, "--dataset", text_file,
               "--seq-len", 32, "--max-steps", 2, "--batch-size", 4, "--cpu", "-q") == 0  # fmt: skip
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert record["steps"][0]["technique"] == "distillation"
    assert run("distill", tmp_path / "x", "--teacher", teacher, "--teacher-bits", 8, "--student-layers", 1,
               "--dataset", text_file, "-q") == 2  # fmt: skip
