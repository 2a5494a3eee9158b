"""One-shot pruning (magnitude, Wanda, SparseGPT), structured removal and the bitmask checkpoint."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the loader of bitmask and resized checkpoints)
from hfcompress.checkpoint import manifest_of
from hfcompress.pruning import OneShotPruningConfig, compress_sparse, decompress_sparse, prune_oneshot, prune_structured
from hfcompress.pruning.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune


def _layer_problem(seed=0, rows=32, cols=64, n=256):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.linspace(0.1, 3, cols)[torch.randperm(cols, generator=g)]
    X = torch.randn(n, cols, generator=g) @ mixing * scales  # correlated inputs of uneven size
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.T @ X / n


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_sparsegpt_beats_wanda_beats_magnitude_on_the_output_error(n, m):
    W, X, H = _layer_problem()
    errors = {}
    for name, pruned in [
        ("magnitude", magnitude_prune(W, 0.5, n, m)),
        ("wanda", wanda_prune(W, H, 0.5, n, m)),
        ("sparsegpt", sparsegpt_prune(W, H, 0.5, n, m, block_size=16)),
    ]:
        assert float((pruned == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        if m:
            assert torch.all((pruned != 0).reshape(32, -1, 4).sum(-1) <= 2)
        errors[name] = float((X @ (pruned - W).T).pow(2).mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_oneshot_on_a_model_prunes_every_block_linear(tmp_path):
    model = tiny_model("llama")
    windows = token_windows(8, 32)
    reference = model(windows).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        config = OneShotPruningConfig(
            method=method, sparsity=0.5, pattern="2:4", dataset=windows, num_samples=8, seq_len=32
        )
        pruned = prune_oneshot(copy.deepcopy(model), config)
        for layer in pruned.model.layers:
            w = layer.mlp.down_proj.weight
            assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)
        assert not (pruned.lm_head.weight == 0).any()
        errors[method] = float((pruned(windows).logits - reference).detach().pow(2).mean())
        assert manifest_of(pruned).pruning["method"] == method
    assert errors["sparsegpt"] < errors["magnitude"] and errors["wanda"] < errors["magnitude"]


def test_oneshot_bad_input():
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1\.0"):
        OneShotPruningConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="`pattern` must look like '2:4'"):
        OneShotPruningConfig(pattern="4:2")
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_oneshot(tiny_model("llama"), OneShotPruningConfig(method="wanda"))


def test_bitmask_checkpoint_is_smaller_and_reloads_identically(tmp_path):
    model = tiny_model("llama")
    prune_oneshot(model, OneShotPruningConfig(method="magnitude", sparsity=0.9))
    x = token_windows(2, 16)
    expected = model(x).logits
    model.save_pretrained(tmp_path / "dense")
    stored = compress_sparse(model)
    assert len(stored) == 14 and all(isinstance(n, int) for n in stored.values())
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "sparse")
    size = {k: os.path.getsize(tmp_path / k / "model.safetensors") for k in ("dense", "sparse")}
    linear = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "weight_bitmask"))
    assert size["dense"] - size["sparse"] > 0.8 * linear * 4  # 4 bytes -> 0.4 + 0.125 per weight
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)
    dense = decompress_sparse(reloaded)
    assert not dense.config.quantization_config.sparse
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for (name, a), (_, b) in zip(
        sorted(dense.state_dict().items()), sorted(reference.state_dict().items()), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_structured_llama_style_loads_in_plain_transformers(tmp_path, arch):
    model = tiny_model(arch)  # 4 query heads sharing 2 key/value heads, 128 FFN neurons
    windows = token_windows(4, 32)
    prune_structured(model, heads=0.5, ffn=0.5, batches=list(windows.split(2)))
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (
        2,
        1,
        16,
        64,
    )
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    expected = model(windows).logits
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
        "assert 'hfcompress' not in sys.modules; "
        "ids = torch.arange(8)[None] + 4; print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1])"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "12"
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(windows).logits, expected)


def test_structured_bert_heads_reload_through_hfcompress(tmp_path):
    from transformers import AutoModelForMaskedLM

    model = tiny_model("bert")
    windows = token_windows(4, 16)
    prune_structured(model, heads=0.5, ffn=0.25, batches=[{"input_ids": windows, "labels": windows}])
    attention = model.bert.encoder.layer[1].attention.self
    assert (attention.num_attention_heads, attention.query.out_features) == (2, 32)
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 96 and model.config.intermediate_size == 96
    expected = model(windows).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(windows).logits, expected)


def test_structured_keeps_the_most_important_units():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, :10] *= 50  # ten neurons that matter far more than the rest
    prune_structured(model, ffn=0.9)  # magnitude importance: keeps 13 of 128
    kept = model.model.layers[0].mlp.down_proj.weight
    assert kept.shape[1] == 13 and int((kept.abs().amax(0) > 1).sum()) >= 10
    with pytest.raises(ValueError, match=r"`heads` must be a fraction in \[0, 1\), got 1\.5"):
        prune_structured(tiny_model("llama"), heads=1.5)


def test_finalize_removes_neurons_that_pruning_emptied():
    from hfcompress.pruning import Pruner, finalize_pruning
    from hfcompress.pruning.config import MagnitudePruningConfig

    model = tiny_model("llama")
    x = token_windows(2, 16)
    pruner = Pruner.attach(model, MagnitudePruningConfig(granularity="column", target_modules=["down_proj"]))
    pruner.update(0.25)  # a quarter of each down_proj's input columns: 32 whole FFN neurons per block
    expected = model(x).logits
    finalize_pruning(model)
    assert model.config.intermediate_size == 96
    assert model.model.layers[1].mlp.gate_proj.out_features == 96
    torch.testing.assert_close(model(x).logits, expected)
