import importlib
import math

import pytest
import torch
from helpers import tiny_model, token_windows

import hfcompress
from hfcompress.evaluation import bits_per_weight, forward_latency, perplexity, weights_size_bytes


def test_perplexity_is_exp_of_the_mean_token_loss():
    model = tiny_model("llama")
    windows = token_windows(6, 24)
    expected = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=4) == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-5)


def test_perplexity_scores_smaller_batches_where_the_logits_would_be_large(monkeypatch):
    module = importlib.import_module("hfcompress.evaluation.perplexity")  # the package's name is the function
    model, windows = tiny_model("llama"), token_windows(6, 24)
    whole = perplexity(model, windows, batch_size=4)
    sizes = []
    model.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(len(kwargs["input_ids"])), with_kwargs=True)
    window_logits = 4 * 24 * model.config.vocab_size
    monkeypatch.setattr(module, "LOGITS_BYTES", 2 * window_logits + 1)  # two windows' logits fit, not three
    assert perplexity(model, windows, batch_size=4) == pytest.approx(whole, rel=1e-6)
    monkeypatch.setattr(module, "LOGITS_BYTES", 1)  # not even one: one window at a time
    assert perplexity(model, windows, batch_size=4) == pytest.approx(whole, rel=1e-6)
    assert sizes == [2, 2, 2] + [1] * 6


def test_perplexity_refuses_one_token_windows():
    with pytest.raises(ValueError, match="seq_len >= 2"):
        perplexity(tiny_model("llama"), torch.zeros(3, 1, dtype=torch.long))


@pytest.mark.parametrize(
    "bits,group_size,sym,expected",
    [(4, 32, True, 4 + 16 / 32), (4, 32, False, 4 + 16 / 32 + 4 / 32), (8, -1, True, 8 + 16 / 64)],
)
def test_bits_per_weight_counts_codes_scales_and_zero_points(bits, group_size, sym, expected):
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.RTNConfig(bits=bits, group_size=group_size, sym=sym))
    # down_proj has 128 inputs, the others 64: per-channel scale overhead is per-layer, so only check groups exactly
    if group_size != -1:
        assert bits_per_weight(model) == pytest.approx(expected, rel=0.02)
    else:
        assert bits + 16 / 128 < bits_per_weight(model) <= expected


def test_bits_per_weight_of_a_dense_model():
    assert bits_per_weight(tiny_model("llama")) == 32
    assert bits_per_weight(tiny_model("llama").half()) == 16


def test_weights_size_counts_weight_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    (tmp_path / "steps" / "01-quantize-gptq").mkdir(parents=True)  # a recipe's intermediate models
    (tmp_path / "steps" / "01-quantize-gptq" / "model.safetensors").write_bytes(b"x" * 500)
    assert weights_size_bytes(tmp_path) == 100


def test_forward_latency_is_positive():
    assert forward_latency(tiny_model("llama"), token_windows(1, 16), runs=3) > 0
