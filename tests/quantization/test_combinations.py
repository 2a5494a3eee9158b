"""Quantization on top of other techniques: mixed precision, factorized layers (GPTQ on the factors) and pruned
weights (the sparsity survives and the checkpoint shows both savings)."""

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM

from hfcompress import AWQConfig, GPTQConfig, LowRankConfig, RTNConfig, factorize, quantize
from hfcompress.evaluation import bits_per_weight, weights_size_bytes
from hfcompress.pruning import OneShotPruningConfig, compress_sparse, prune_oneshot
from hfcompress.pruning.sparse import SparseLinear
from hfcompress.quantization import QuantLinear
from hfcompress.quantization.gptq import gptq_quantize
from hfcompress.quantization.sparse_quant import SparseQuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _reload_matches(model, folder, ids):
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    return reloaded


def test_mixed_precision_gptq_reloads_with_each_layers_bits(tmp_path):
    ids = token_windows(2)
    config = GPTQConfig(
        bits=4, group_size=32, dataset=token_windows(), layer_bits={"mlp.down_proj": 8, "re:.*layers\\.0\\..*q_proj": 2}
    )
    model = quantize(tiny_model("llama"), config)
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert bits["model.layers.0.self_attn.q_proj"] == 2 and bits["model.layers.1.self_attn.q_proj"] == 4
    assert bits["model.layers.0.mlp.down_proj"] == bits["model.layers.1.mlp.down_proj"] == 8
    assert model.config.quantization_config.overrides["model.layers.1.mlp.down_proj"] == {"bits": 8, "group_size": 32}
    uniform = quantize(tiny_model("llama"), GPTQConfig(bits=4, group_size=32, dataset=token_windows()))
    assert bits_per_weight(model) > bits_per_weight(uniform)
    reloaded = _reload_matches(model, tmp_path / "mixed", ids)
    assert reloaded.get_submodule("model.layers.0.self_attn.q_proj").bits == 2


def test_layer_bits_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="match none"):
        quantize(tiny_model("llama"), RTNConfig(group_size=32, layer_bits={"not_a_layer": 8}))
    with pytest.raises(ValueError, match=r"layer_bits\['q_proj'\]"):
        RTNConfig(layer_bits={"q_proj": 5})


def test_gptq_quantizes_the_factors_of_a_factorized_model(tmp_path):
    ids = token_windows(2)
    factorized = factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=24))
    factorized.save_pretrained(tmp_path / "factorized")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "factorized")
    model = quantize(loaded, GPTQConfig(bits=4, group_size=32, dataset=token_windows()))
    qconfig = model.config.quantization_config
    up, down = "model.layers.0.self_attn.q_proj.up", "model.layers.0.self_attn.q_proj.down"
    assert {up, down} <= set(qconfig.modules) and qconfig.lowrank["model.layers.0.self_attn.q_proj"] == 24
    assert qconfig.overrides[up] == {"bits": 4, "group_size": -1}  # 32 does not divide the rank 24
    assert model.get_submodule(down).group_size == 32
    reloaded = _reload_matches(model, tmp_path / "both", ids)
    assert isinstance(reloaded.get_submodule(up), QuantLinear)
    assert weights_size_bytes(tmp_path / "both") < weights_size_bytes(tmp_path / "factorized")
    dense_gptq = quantize(tiny_model("llama"), GPTQConfig(bits=4, group_size=32, dataset=token_windows()))
    dense_gptq.save_pretrained(tmp_path / "gptq")
    assert weights_size_bytes(tmp_path / "both") < weights_size_bytes(tmp_path / "gptq")


def test_awq_scales_and_quantizes_the_factors_of_a_factorized_model(tmp_path):
    """AWQ searches the `up` factor's scales (its input is the `down` factor's output, which folds them) on the grid
    it is quantized with: one group per row where the group size does not divide the rank (it once failed there)."""
    ids = token_windows(2)
    factorized = factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=24))
    factorized.save_pretrained(tmp_path / "factorized")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "factorized")
    config = AWQConfig(bits=4, group_size=32, dataset=token_windows(), clip=True)
    model = quantize(loaded, config)
    up = "model.layers.0.mlp.down_proj.up"
    assert model.config.quantization_config.overrides[up] == {"bits": 4, "group_size": -1}
    assert model.config.quantization_config.method == "awq"
    _reload_matches(model, tmp_path / "both", ids)


def test_masked_gptq_keeps_pruned_weights_at_exactly_zero():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8 + torch.eye(64))
    H = 2 * X.T @ X / 256
    W = torch.randn(16, 64, generator=g)
    mask = torch.rand(16, 64, generator=g) > 0.5
    for sym in (False, True):
        for act_order in (False, True):
            q, _ = gptq_quantize(W, H, bits=3, group_size=16, sym=sym, act_order=act_order, mask=mask)
            w = q.dequantize()
            assert torch.all(w[~mask] == 0)
            # the kept weights compensate: better than rounding the pruned weight (GPTQ with H = I)
            plain, _ = gptq_quantize(W * mask, torch.eye(64), bits=3, group_size=16, sym=sym, mask=mask)
            assert (X @ (w - W * mask).T).pow(2).mean() < (X @ (plain.dequantize() - W * mask).T).pow(2).mean()


@pytest.mark.parametrize("storage", ["dense", "bitmask"])
def test_pruned_then_quantized_keeps_its_sparsity_and_both_savings(tmp_path, storage):
    ids = token_windows(2)
    pruned = prune_oneshot(tiny_model("llama"), OneShotPruningConfig(method="magnitude", sparsity=0.5))
    if storage == "bitmask":
        compress_sparse(pruned)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    dense_before = {
        n: m.weight.detach().clone() for n, m in tiny_model("llama").named_modules() if isinstance(m, torch.nn.Linear)
    }
    zeros_before = {
        n: (m.dense_weight() if isinstance(m, SparseLinear) else m.weight) == 0
        for n, m in loaded.named_modules()
        if n in dense_before and n != "lm_head"
    }
    model = quantize(loaded, GPTQConfig(bits=4, group_size=32, dataset=token_windows()))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseQuantLinear)}
    assert set(layers) == set(zeros_before)
    for name, layer in layers.items():
        w = layer.dequantize_weight(torch.float32)
        assert torch.all(w[zeros_before[name]] == 0)  # every pruned weight is still exactly 0
        assert layer.nnz == int((~zeros_before[name]).sum())
    assert set(model.config.quantization_config.sparse) == set(layers)
    _reload_matches(model, tmp_path / "both", ids)
    gptq = quantize(tiny_model("llama"), GPTQConfig(bits=4, group_size=32, dataset=token_windows()))
    gptq.save_pretrained(tmp_path / "gptq")
    assert weights_size_bytes(tmp_path / "both") < weights_size_bytes(tmp_path / "gptq")
    assert bits_per_weight(model) < bits_per_weight(gptq)


def test_a_quantized_model_is_not_quantized_again(tmp_path):
    model = quantize(tiny_model("llama"), RTNConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, RTNConfig(group_size=32))


def test_a_refused_quantization_leaves_a_bitmask_model_as_it_was(tmp_path):
    pruned = prune_oneshot(tiny_model("llama"), OneShotPruningConfig(method="magnitude", sparsity=0.5))
    compress_sparse(pruned)
    before = dict(pruned.config.quantization_config.sparse)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(pruned, RTNConfig(group_size=48))
    assert pruned.config.quantization_config.sparse == before
    assert all(isinstance(pruned.get_submodule(n), SparseLinear) for n in before)  # back to bitmask storage
