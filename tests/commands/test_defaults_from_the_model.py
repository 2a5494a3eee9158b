"""Window lengths default to what the model can take (512 tokens, or its positions if fewer), longer windows are
refused with the limit named, the record says what calibration really used, and a model is compressed with
the head it was saved with."""

import json

import pytest
import torch
import transformers
from architectures import BUILDERS, SMALL
from helpers import VOCAB, read_safetensors, tiny_tokenizer, token_windows

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


T5_SMALL = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)


PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
    "AutoModelForSeq2SeqLM": "text2text-generation",
}


def _bert(head):
    return lambda: head(transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=2, **SMALL))


@pytest.mark.parametrize(
    "build, auto",
    [
        (_bert(transformers.BertForSequenceClassification), transformers.AutoModelForSequenceClassification),
        (_bert(transformers.BertForTokenClassification), transformers.AutoModelForTokenClassification),
        (_bert(transformers.BertForQuestionAnswering), transformers.AutoModelForQuestionAnswering),
        (_bert(transformers.BertModel), transformers.AutoModel),
        (BUILDERS["BART"][1], transformers.AutoModelForSeq2SeqLM),
    ],
    ids=["classifier", "token-classifier", "question-answering", "base", "seq2seq"],
)
def test_a_model_is_compressed_with_the_head_it_was_saved_with(tmp_path, build, auto):
    """A classifier, a model saved without a head, a seq2seq model is loaded as one, in memory and streamed, not as
    a causal LM, which dropped its trained head (or BART's encoder) and saved a random language-modelling one."""
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "model")
    ids = token_windows(2, 16)
    written = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert run("quantize", "rtn", tmp_path / "model", out, "--group-size", 32, "--offload", offload, "-q") == 0
        assert json.loads((out / "config.json").read_text())["architectures"] == [type(model).__name__]
        with torch.no_grad():
            quantized, original = auto.from_pretrained(out)(ids), model(ids)
        name = next(iter(original.keys()))  # logits, start_logits, last_hidden_state
        torch.testing.assert_close(quantized[name], original[name], rtol=0, atol=0.05)
        # the card loads it with its own head, and the Hub files it under its task
        card = (out / "README.md").read_text()
        assert f"from transformers import {auto.__name__}\n" in card
        assert f"pipeline_tag: {PIPELINE_TAGS[auto.__name__]}\n" in card
        written[offload] = read_safetensors(out)
    assert written["disk"].keys() == written["none"].keys()
    assert all(torch.equal(written["disk"][k], v) for k, v in written["none"].items())


def test_a_seq2seq_model_is_calibrated_whole_in_memory_and_refused_streamed(tmp_path, text_file, capsys):
    BUILDERS["T5"][1]().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    argv = ["quantize", "gptq", tmp_path / "model", tmp_path / "out", "--dataset", text_file, "--num-samples", 4]
    assert run(*argv, "--seq-len", 32, "--group-size", 32, "-q") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]
    scales = [k for k in read_safetensors(tmp_path / "out") if k.endswith(".weight_scale")]
    assert {k.split(".")[0] for k in scales} == {"encoder", "decoder"}  # both stacks quantized, the encoder kept
    argv[3] = tmp_path / "streamed"
    assert run(*argv, "--seq-len", 32, "--group-size", 32, "--offload", "disk", "-q") == 2
    assert "has 2 holding layers GPTQ changes (encoder.block, decoder.block)" in capsys.readouterr().err
    assert not (tmp_path / "streamed").exists()


def test_structured_pruning_keeps_the_head_and_refuses_its_loss_on_another(tmp_path, text_file, capsys):
    model = _bert(transformers.BertForTokenClassification)()
    model.save_pretrained(tmp_path / "model")
    assert run("prune", "structured", tmp_path / "model", tmp_path / "out", "--heads", 0.5, "-q") == 0
    pruned = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "out")
    assert type(pruned) is type(model)  # before: a BertLMHeadModel, the token classifier's head lost
    assert torch.equal(pruned.classifier.weight, model.classifier.weight)
    argv = ("prune", "structured", tmp_path / "model", tmp_path / "taylor", "--heads", 0.5, "--dataset", text_file)
    assert run(*argv, "-q") == 2
    assert "is a token-classification model; prune it by weight norms" in capsys.readouterr().err
    assert not (tmp_path / "taylor").exists()


def test_a_t5_encoder_calibrates_streamed_as_in_memory(tmp_path, text_file):
    """T5's encoder alone (a text encoder of diffusion pipelines): loaded as itself, and streamed through its
    embeddings, which are tied to its shared ones (before: the streamed run met them on the meta device)."""
    transformers.T5EncoderModel(T5_SMALL).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    for offload in ("none", "disk"):
        argv = ("quantize", "gptq", tmp_path / "model", tmp_path / offload, "--dataset", text_file, "--num-samples", 4)
        assert run(*argv, "--seq-len", 32, "--group-size", 32, "--offload", offload, "-q") == 0
        assert json.loads((tmp_path / offload / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    written, streamed = read_safetensors(tmp_path / "none"), read_safetensors(tmp_path / "disk")
    assert written.keys() == streamed.keys()
    assert all(torch.equal(streamed[k], v) for k, v in written.items())


def test_a_head_no_task_loads_is_refused_before_any_work(tmp_path, capsys):
    _bert(transformers.BertForNextSentencePrediction)().save_pretrained(tmp_path / "model")
    assert run("quantize", "rtn", tmp_path / "model", tmp_path / "out", "--group-size", 32, "-q") == 2
    assert "is a BertForNextSentencePrediction, a head hfcompress does not load" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


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
