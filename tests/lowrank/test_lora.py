"""Merging peft LoRA adapters into factorized models, against peft's own forward and `merge_and_unload`."""

import copy

import pytest
import torch
from helpers import tiny_model, token_windows

from hfcompress import FactorizedLinear, LowRankConfig, factorize, merge_lora
from hfcompress.lowrank.lora import adapt_factorized_layers

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402  (after the skip without peft)


def _factorized_model():
    return factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=8))


def _adapter(model, target_modules, path, r=4, **kwargs):
    """A peft adapter with random (non-zero) A and B, saved to `path`; returns the adapted model."""
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=target_modules,
        init_lora_weights=False,
        **kwargs,
    )
    if any(isinstance(m, FactorizedLinear) for m in model.modules()):
        adapt_factorized_layers(config)
    adapted = get_peft_model(model, config)
    adapted.save_pretrained(path)
    return adapted


@pytest.mark.parametrize("use_rslora", [False, True])
def test_an_adapter_on_whole_factorized_layers_merges_exactly_at_rank_r_plus_k(tmp_path, use_rslora):
    ids = token_windows(4, 16)
    adapted = _adapter(
        _factorized_model(),
        ["q_proj", "v_proj", "down_proj"],
        tmp_path,
        use_rslora=use_rslora,
    )
    expected = adapted(ids).logits
    merged = merge_lora(_factorized_model(), tmp_path, rank="exact")
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FactorizedLinear) and layer.rank == 8 + 4
    assert merged.config.quantization_config.lowrank["model.layers.0.self_attn.q_proj"] == 12
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_truncating_back_to_the_original_rank_keeps_the_best_approximation(tmp_path):
    ids = token_windows(4, 16)
    adapted = _adapter(_factorized_model(), ["q_proj"], tmp_path)
    expected = adapted(ids).logits
    original = merge_lora(_factorized_model(), tmp_path)
    assert original.model.layers[0].self_attn.q_proj.rank == 8
    assert not torch.allclose(original(ids).logits, expected, atol=1e-4)  # the truncation costs something...
    exact_dense = (
        merge_lora(_factorized_model(), tmp_path, rank="exact").model.layers[0].self_attn.q_proj.dense_weight()
    )
    truncated = original.model.layers[0].self_attn.q_proj.dense_weight()
    best = torch.linalg.svdvals(exact_dense.double())[8:].square().sum()
    # ...and is the best rank-8 approximation of the exact sum
    assert (exact_dense - truncated).double().square().sum().item() == pytest.approx(best.item(), rel=1e-3)


def test_an_adapter_on_the_factors_merges_into_them_exactly_without_raising_the_rank(
    tmp_path,
):
    ids = token_windows(4, 16)
    adapted = _adapter(_factorized_model(), ["q_proj.up", "q_proj.down", "gate_proj.up"], tmp_path)
    expected = adapted(ids).logits
    merged = merge_lora(_factorized_model(), tmp_path)
    assert merged.model.layers[0].self_attn.q_proj.rank == 8
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_dense_model_adapter_matches_peft_merge_and_unload(tmp_path):
    """An adapter trained on the dense original, merged at rank r + k into the factorized model, equals peft's
    own merge into the factorized model's dense equivalent."""
    ids = token_windows(4, 16)
    factorized = _factorized_model()
    dense = tiny_model("llama")
    for name, module in factorized.named_modules():  # the dense equivalent: W = U V
        if isinstance(module, FactorizedLinear):
            dense.get_submodule(name).weight.data.copy_(module.dense_weight())
    _adapter(copy.deepcopy(dense), ["q_proj", "o_proj", "up_proj"], tmp_path)
    untouched = copy.deepcopy(dense)
    reference = peft.PeftModel.from_pretrained(dense, tmp_path).merge_and_unload()
    merged = merge_lora(factorized, tmp_path, rank="exact")
    torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    # and into a dense model it is peft's merge itself
    plain = merge_lora(untouched, tmp_path)
    torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_lora_trained_with_trainer_on_a_factorized_model_merges(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = token_windows(16, 16)
    model = _factorized_model()
    config = adapt_factorized_layers(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapted = get_peft_model(model, config)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=adapted, args=args, train_dataset=data).train()
    adapted.eval()
    expected = adapted(ids[:2]).logits
    adapted.save_pretrained(tmp_path / "adapter")
    merged = merge_lora(_factorized_model(), tmp_path / "adapter", rank="exact")
    torch.testing.assert_close(merged(ids[:2]).logits, expected, rtol=1e-4, atol=1e-4)


def test_mismatched_adapters_are_refused(tmp_path):
    _adapter(tiny_model("llama"), ["q_proj"], tmp_path / "llama")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="does not have"):
        merge_lora(gpt2, tmp_path / "llama")
    wide = tiny_model("llama")
    _adapter(tiny_model("qwen2"), ["k_proj"], tmp_path / "qwen")  # same names, same shapes: fits
    merge_lora(wide, tmp_path / "qwen")
    other = tiny_model("opt")
    _adapter(other, ["fc1"], tmp_path / "opt")
    with pytest.raises(ValueError, match="does not have"):
        merge_lora(_factorized_model(), tmp_path / "opt")
    with pytest.raises(FileNotFoundError, match="not a peft adapter"):
        merge_lora(_factorized_model(), tmp_path)
    with pytest.raises(ValueError, match="`rank`"):
        merge_lora(_factorized_model(), tmp_path / "llama", rank=0)
