"""The manifest: one merge function for every technique, and the rebuild registry loading consults."""

import json

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

import hfcompress
from hfcompress.checkpoint import (
    FORMAT_VERSION,
    HfcompressQuantizationConfig,
    manifest_of,
    register_rebuilder,
    update_manifest,
)


def test_a_manifest_round_trips_with_every_section():
    config = HfcompressQuantizationConfig(
        bits=3, group_size=64, sym=True, act_order=True, modules=["a.b.up"], method="gptq", recipe={"damp_percent": 0.02},
        lowrank={"a.b": 8}, lowrank_recipe={"method": "whiten"}, convolutions={"c": {"kind": "separable"}},
        sparse={"d.e": 12}, resized={"linears": {"f.g": [2, 4]}, "attributes": {"f": {"num_attention_heads": 1}}},
        overrides={"a.b.up": {"bits": 8, "group_size": -1}}, layers={"toy": {"h": {"clip": 1.0}}},
        experts={"x.experts": {"experts": 8}},
    )  # fmt: skip
    data = config.to_dict()
    assert data["version"] == FORMAT_VERSION == 8
    assert HfcompressQuantizationConfig.from_dict(data) == config
    assert config.sections_in_use() == ["experts", "convolutions", "resized", "lowrank", "sparse", "modules", "toy"]
    assert config.section("toy") == {"h": {"clip": 1.0}} and config.section("nothing") == {}


def test_update_manifest_merges_what_each_step_recorded():
    model = tiny_model("llama")
    update_manifest(model, "sparse", sparse={"model.layers.0.mlp.up_proj": 10})
    update_manifest(model, "none", lowrank={"model.layers.1.mlp.up_proj": 4}, layers={"toy": {"a": {}}})
    manifest = update_manifest(model, "none", sparse={"model.layers.1.mlp.down_proj": 7}, layers={"toy": {"b": {}}})
    assert manifest.method == "sparse"  # the first step named it
    assert manifest.sparse == {"model.layers.0.mlp.up_proj": 10, "model.layers.1.mlp.down_proj": 7}
    assert manifest.lowrank == {"model.layers.1.mlp.up_proj": 4}
    assert manifest.layers == {"toy": {"a": {}, "b": {}}}
    assert model.config.quantization_config is manifest and model.hf_quantizer.quantization_config is manifest
    with pytest.raises(TypeError, match="no fields"):
        update_manifest(model, "none", not_a_field=1)


def test_factorizing_a_structured_pruned_model_keeps_its_removed_heads(tmp_path):
    """Factorization adds its ranks to the manifest of a BERT whose removed heads it records (`resized`), where it
    used to refuse any model with a manifest, and the checkpoint loads with both."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = BertForSequenceClassification(config).eval()
    hfcompress.prune_structured(model, heads=0.5)
    hfcompress.factorize(model, hfcompress.LowRankConfig(method="svd", rank=4, modules_to_not_convert=["classifier"]))
    assert model.config.quantization_config.resized and model.config.quantization_config.lowrank
    ids = token_windows(2, 12)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(ids).logits, expected)


def test_two_techniques_cannot_claim_one_section():
    def rebuild(model, manifest):
        pass

    with pytest.raises(ValueError, match="already has a rebuilder"):
        register_rebuilder("lowrank", rebuild, order=99)


def test_a_model_quantized_by_another_method_is_refused():
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(ValueError, match=r"quantized by another method \(gptq\)"):
        update_manifest(model, "sparse", sparse={"x": 1})


def test_the_manifest_lives_where_loading_needs_it(tmp_path):
    """A student loads in plain transformers: its manifest is `config.json["hfcompress"]`. Quantizing it moves the
    manifest, student layers and all, into `quantization_config`, where loading needs it."""
    student = hfcompress.make_student(tiny_model("llama"), num_layers=1)
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["hfcompress"]["student_layers"] == [0]
    assert manifest_of(AutoModelForCausalLM.from_pretrained(tmp_path / "student")).student_layers == [0]

    pruned = hfcompress.prune_oneshot(student, hfcompress.OneShotPruningConfig(method="magnitude", sparsity=0.5))
    assert manifest_of(pruned).pruning["sparsity"] == 0.5 and not manifest_of(pruned).needs_hfcompress()
    hfcompress.quantize(pruned, hfcompress.RTNConfig(bits=4, group_size=32))
    pruned.save_pretrained(tmp_path / "quantized")
    saved = json.loads((tmp_path / "quantized" / "config.json").read_text())
    assert "hfcompress" not in saved and saved["quantization_config"]["student_layers"] == [0]
    reloaded = manifest_of(AutoModelForCausalLM.from_pretrained(tmp_path / "quantized"))
    assert reloaded.student_layers == [0] and reloaded.pruning["method"] == "magnitude" and reloaded.sparse
