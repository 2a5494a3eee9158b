"""Window lengths default to what the model can take (512 tokens, or its positions if fewer), longer windows are
refused with the limit named, the record says what calibration really used, and a model is compressed with
the head it was saved with."""

import json

import pytest
import torch
import transformers
from architectures import SMALL
from helpers import VOCAB, read_safetensors, token_windows

from hfcompress.commands.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def test_calibration_and_evaluation_windows_default_to_the_models_positions(model_dir, text_file, tmp_path):
    out = tmp_path / "gptq"
    # the tiny model has 128 positions: the 512-token default would not fit it
    code = run("quantize", "gptq", model_dir, out, "--dataset", text_file, "--num-samples", 1000, "--group-size", 32,
               "--eval-dataset", text_file, "--eval-max-windows", 2, "-q")  # fmt: skip
    assert code == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    data = record["steps"][0]["data"]
    assert data["seq_len"] == 128
    assert data["num_samples"] == data["windows_available"] < 1000  # the windows there were, not the ones asked for
    assert record["evaluation"]["seq_len"] == 128


def test_windows_longer_than_the_model_are_refused_with_the_limit(model_dir, text_file, tmp_path, capsys):
    code = run(
        "quantize",
        "gptq",
        model_dir,
        tmp_path / "o",
        "--dataset",
        text_file,
        "--seq-len",
        4096,
        "--group-size",
        32,
        "-q",
    )
    assert code == 2
    assert "`seq_len` 4096 exceeds the 128 positions of the model; use at most 128" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = run("evaluate", model_dir, "--dataset", text_file, "--seq-len", 4096, "--latency-runs", 0, "-q")
    assert code == 2
    assert "exceeds the 128 positions" in capsys.readouterr().err


def test_a_model_folder_without_tokenizer_is_fine_where_no_text_is_read(model_dir, text_file, tmp_path, capsys):
    bare = tmp_path / "bare"  # a training checkpoint or a model built from a config: weights and config only
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    assert run("quantize", "rtn", bare, tmp_path / "rtn", "--group-size", 32, "-q") == 0
    assert (tmp_path / "rtn" / "model.safetensors").is_file()
    code = run("quantize", "gptq", bare, tmp_path / "gptq", "--dataset", text_file, "--group-size", 32, "-q")
    assert code == 2
    assert "the calibration data is text, and model folder" in capsys.readouterr().err
    assert not (tmp_path / "gptq").exists()


def test_the_record_and_card_keep_the_runs_peak_memory(model_dir, tmp_path):
    import resource

    out = tmp_path / "rtn"
    assert run("quantize", "rtn", model_dir, out, "--group-size", 32, "-q") == 0
    memory = json.loads((out / "hfcompress_record.json").read_text())["steps"][0]["memory"]
    # this process: at least what torch and the model take, at most what the kernel says it peaked at
    assert 50 * 2**20 < memory["peak_rss_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert "Step 1 peak memory (the whole run: loading, compressing, evaluating): " in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "build, auto",
    [
        (
            lambda config: transformers.BertForSequenceClassification(config),
            transformers.AutoModelForSequenceClassification,
        ),
        (lambda config: transformers.BertModel(config), transformers.AutoModel),
    ],
    ids=["classifier", "base"],
)
def test_a_model_is_compressed_with_the_head_it_was_saved_with(tmp_path, build, auto):
    """A classifier (or a model saved without a head) is loaded as one, in memory and streamed, not as a causal
    LM, which would have dropped its trained head and saved a random language-modelling one."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=3, **SMALL)
    model = build(config).eval()
    model.save_pretrained(tmp_path / "model")
    ids = token_windows(2, 16)
    written = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert run("quantize", "rtn", tmp_path / "model", out, "--group-size", 32, "--offload", offload, "-q") == 0
        assert json.loads((out / "config.json").read_text())["architectures"] == [type(model).__name__]
        with torch.no_grad():
            quantized, original = auto.from_pretrained(out)(ids), model(ids)
        name = "logits" if "logits" in original else "last_hidden_state"
        torch.testing.assert_close(quantized[name], original[name], rtol=0, atol=0.05)
        written[offload] = read_safetensors(out)
    assert all(torch.equal(written["disk"][k], v) for k, v in written["none"].items())


def test_perplexity_of_a_classifier_is_refused_before_any_work(tmp_path, capsys):
    transformers.BertForSequenceClassification(
        transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=3, **SMALL)
    ).save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("some text " * 200)
    argv = ("quantize", "rtn", tmp_path / "model", tmp_path / "out", "--eval-dataset", tmp_path / "text.txt", "-q")
    assert run(*argv) == 2
    assert "is loaded as a sequence-classification model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run("evaluate", tmp_path / "model", "--dataset", tmp_path / "text.txt", "-q") == 2
    assert "perplexity and lm-eval tasks measure a causal language model" in capsys.readouterr().err
