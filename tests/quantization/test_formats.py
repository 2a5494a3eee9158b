"""What other programs see: compressed-tensors checkpoints in plain transformers, and hfcompress checkpoints
loaded without hfcompress. Loading runs in a fresh interpreter that never imports hfcompress."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_model, token_windows
from safetensors.torch import load_file

import hfcompress
from hfcompress.quantization.save import save_quantized
from hfcompress.steps.recording import loading_needs

pytest.importorskip("compressed_tensors")

LOAD_WITHOUT_HFCOMPRESS = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    results = {}
    for folder in sys.argv[1:]:
        ids = torch.load(folder + "/../ids.pt")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            torch.save(model(input_ids=ids).logits, folder + "/../got.pt")
            results[folder] = "loaded"
        except Exception as e:
            results[folder] = f"{type(e).__name__}: {e}"
    assert "hfcompress" not in sys.modules
    print(json.dumps(results))
    """
)


def _load_elsewhere(folders):
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HFCOMPRESS, *map(str, folders)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


CT_SETTINGS = [
    ("llama", hfcompress.GPTQConfig(bits=4, group_size=32, sym=True)),
    ("llama", hfcompress.GPTQConfig(bits=4, group_size=-1, sym=True)),
    ("llama", hfcompress.GPTQConfig(bits=3, group_size=32, sym=True, act_order=True, static_groups=True)),
    ("llama", hfcompress.GPTQConfig(bits=2, group_size=16, sym=True)),
    ("llama", hfcompress.GPTQConfig(bits=8, group_size=-1, sym=True)),
    # quantized experts, written per expert under the original checkpoint's names (Mixtral's w1/w3 split from
    # gate_up, under block_sparse_moe), which transformers decompresses and fuses while loading
    ("mixtral", hfcompress.GPTQConfig(bits=4, group_size=32, sym=True)),
    ("qwen2_moe", hfcompress.RTNConfig(bits=8, group_size=-1, sym=True)),
    # mixed precision: one config group per grid, each naming its layers (last: read below)
    ("llama", hfcompress.RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*mlp.*": 8, "re:.*o_proj": 2})),
]


def test_compressed_tensors_checkpoints_load_in_plain_transformers(tmp_path):
    ids = token_windows(8, 32)
    folders, expected = [], {}
    for i, (arch, config) in enumerate(CT_SETTINGS):
        config.dataset = ids
        model = hfcompress.quantize(tiny_model(arch), config)
        case = tmp_path / f"case{i}"
        case.mkdir()
        torch.save(ids[:2], case / "ids.pt")
        save_quantized(model, case / "model", format="compressed-tensors")
        expected[str(case / "model")] = model(input_ids=ids[:2]).logits
        folders.append(case / "model")
    results = _load_elsewhere(folders)
    for folder in folders:
        assert results[str(folder)] == "loaded", results[str(folder)]
        got = torch.load(folder.parent / "got.pt")
        torch.testing.assert_close(got, expected[str(folder)], rtol=1e-4, atol=1e-4)
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    experts = load_file(folders[5] / "model.safetensors")
    mixtral = json.loads((folders[5] / "config.json").read_text())
    up = [mixtral["intermediate_size"], mixtral["hidden_size"]]  # the rows of gate_up_proj that were up's
    assert experts["model.layers.1.block_sparse_moe.experts.7.w3.weight_shape"].tolist() == up
    assert not [key for key in experts if "gate_up_proj" in key or ".mlp." in key]
    mixed = json.loads((folders[-1] / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in mixed.values()) == [2, 4, 8]
    assert "model.layers.1.mlp.up_proj" in next(g["targets"] for g in mixed.values() if g["weights"]["num_bits"] == 8)


def test_w8a8_exports_int8_weights_and_dynamic_token_activations(tmp_path):
    from safetensors.torch import load_file

    ids = token_windows(8, 32)
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.W8A8Config(dataset=ids))
    torch.save(ids[:2], tmp_path / "ids.pt")
    save_quantized(model, tmp_path / "model", format="compressed-tensors")
    config = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    (group,) = config["config_groups"].values()
    assert (
        group["input_activations"] | {"num_bits": 8, "strategy": "token", "dynamic": True} == group["input_activations"]
    )
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    layer = model.model.layers[0].mlp.down_proj
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.weight"], layer.int8_weight())
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (layer.out_features, 1)
    assert _load_elsewhere([tmp_path / "model"])[str(tmp_path / "model")] == "loaded"
    # transformers runs the same int8 weights with its own per-token fake quantization (scale max/127.5, ours
    # max/127, vLLM's max/127): close, not identical
    got, want = torch.load(tmp_path / "got.pt").detach(), model(input_ids=ids[:2]).logits.detach()
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())


@pytest.mark.parametrize(
    "config,match",
    [
        (hfcompress.RTNConfig(bits=3, group_size=32, sym=False), "asymmetric 3-bit grid: no program reads"),
        (hfcompress.RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*o_proj": 3}), None),  # symmetric: yes
        (
            hfcompress.RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*k_proj": 8}),
            "servers fuse .*q_proj, .*k_proj, .*v_proj into one matmul",
        ),
        (
            hfcompress.GPTQConfig(bits=4, group_size=32, sym=True, act_order=True, static_groups=False),
            "act-order with dynamic groups",
        ),
    ],
)
def test_compressed_tensors_refuses_what_it_cannot_hold(config, match, tmp_path):
    if isinstance(config, hfcompress.GPTQConfig):
        config.dataset = token_windows()
    model = hfcompress.quantize(tiny_model("llama"), config)
    if match is None:
        save_quantized(model, tmp_path / "out", format="compressed-tensors")
        return
    with pytest.raises(ValueError, match=match):
        save_quantized(model, tmp_path / "out", format="compressed-tensors")
    assert not (tmp_path / "out").exists()


def test_asymmetric_grids_export_zero_points_compressed_tensors_reads(tmp_path, caplog):
    """Asymmetric 4- and 8-bit grids are written with their zero points packed as compressed-tensors defines them
    (vLLM serves them: test_vllm_serving); compressed-tensors' own decompressor reads back our weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    config = hfcompress.GPTQConfig(
        bits=4, group_size=32, sym=False, layer_bits={"re:.*mlp.*": 8}, dataset=token_windows()
    )
    model = hfcompress.quantize(tiny_model("llama"), config)
    with caplog.at_level("WARNING"):
        save_quantized(model, tmp_path / "model", format="compressed-tensors")
    assert "on asymmetric grids" in caplog.text and "compressed-tensors==0.17.0" in caplog.text
    groups = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["symmetric"]) for g in groups.values()) == [
        (4, False),
        (8, False),
    ]
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        group = next(g for g in groups.values() if g["weights"]["num_bits"] == layer.bits)
        stored = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(name + ".")}
        zero_point = stored["weight_zero_point"]
        assert zero_point.dtype == torch.int32 and zero_point.shape == (
            layer.out_features * layer.bits // 32,
            layer.in_features // 32,
        )
        weight = PackedQuantizationCompressor.decompress(stored, QuantizationScheme(**group))["weight"]
        torch.testing.assert_close(weight.float(), layer.dequantize_weight(torch.float16).float(), rtol=0, atol=1e-3)
    # hfcompress reads it back with any compressed-tensors: the same layers, the same logits
    loaded = hfcompress.load_compressed_tensors(tmp_path / "model")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, hfcompress.QuantLinear)
    assert loaded.model.layers[1].mlp.down_proj.bits == 8 and not loaded.model.layers[0].self_attn.q_proj.sym
    ids = token_windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def _reads_back_as(folder, model):
    """hfcompress's reader of the compressed-tensors `folder` gives `model`'s logits."""
    ids = token_windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            hfcompress.load_compressed_tensors(folder)(input_ids=ids).logits,
            model(input_ids=ids).logits,
            rtol=0,
            atol=1e-5,
        )


def test_experts_left_plain_are_named_in_ignore_as_the_checkpoint_stores_them(tmp_path, caplog):
    """W8A8 attention beside unquantized experts: vLLM serves the experts as plain only when `ignore` names them
    as it does (Mixtral's `block_sparse_moe.experts.0.w1`; tests/quantization/test_vllm_serving.py serves it)."""
    from hfcompress.quantization.ct_preflight import check_model_for_format

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "float")
    config = hfcompress.W8A8Config(dataset=token_windows(), modules_to_not_convert=["re:.*experts.*", "lm_head"])
    check_model_for_format(tmp_path / "float", config, "compressed-tensors")
    quantized = hfcompress.quantize(model, config)
    save_quantized(quantized, tmp_path / "ct", format="compressed-tensors")
    assert "written unquantized, named in `ignore`" in caplog.text
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    stored = {key.removesuffix(".weight") for key in load_file(tmp_path / "ct" / "model.safetensors")}
    experts = sorted(name for name in stored if ".experts." in name)
    assert experts and experts[0].startswith("model.layers.0.block_sparse_moe.experts.")
    for name in stored:  # every expert linear, as stored, is ignored; nothing else is by a pattern
        assert any(re.match(p[3:], name) for p in ignore if p.startswith("re:")) == (name in experts), name
    _reads_back_as(tmp_path / "ct", quantized)
    # what loads it: hfcompress's reader (the card's code, verify's), not transformers
    assert "stored one per expert" in loading_needs(tmp_path / "ct")["not_in_transformers"]


def test_w8a8_experts_are_written_one_int8_linear_per_expert(tmp_path, caplog):
    """W8A8 experts go under the original checkpoint's per-expert names as int8 weights with per-channel scales,
    which vLLM serves (tests/quantization/test_vllm_serving.py, where the CPU has AMX) and hfcompress reads
    (test_load_compressed_tensors_reads_experts_back_into_expert_linears); transformers does not: the export
    says so, and the check before loading lets them through."""
    from hfcompress.quantization.ct_preflight import check_model_for_format

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "float")
    config = hfcompress.W8A8Config(dataset=token_windows())
    check_model_for_format(tmp_path / "float", config, "compressed-tensors")
    quantized = hfcompress.quantize(model, config)
    with caplog.at_level("WARNING"):
        save_quantized(quantized, tmp_path / "ct", format="compressed-tensors")
    assert "experts are written as W8A8 int8 linears" in caplog.text and "transformers does not load" in caplog.text
    written = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert written["format"] == "int-quantized" and written["ignore"] == ["lm_head"]
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    experts = quantized.model.layers[1].mlp.experts
    down = experts.down_proj[3]
    assert torch.equal(stored["model.layers.1.block_sparse_moe.experts.3.w2.weight"], down.int8_weight())
    assert stored["model.layers.1.block_sparse_moe.experts.3.w2.weight_scale"].shape == (down.out_features, 1)
    assert "W8A8 int8 linears" in loading_needs(tmp_path / "ct")["not_in_transformers"]
    gate, up = experts.gate_up_proj[3].int8_weight().chunk(2)
    assert torch.equal(stored["model.layers.1.block_sparse_moe.experts.3.w1.weight"], gate)
    assert torch.equal(stored["model.layers.1.block_sparse_moe.experts.3.w3.weight"], up)


def test_experts_stored_fused_and_left_plain_are_ignored_under_the_names_vllm_looks_up(tmp_path, caplog):
    """GPT-OSS stores its experts fused (`mlp.experts.gate_up_proj`), with no per-expert linears to name; vLLM
    takes them as plain when `ignore` matches expert 0's projections by its own names (`experts.0.gate_proj`).
    transformers loads such a checkpoint (tests/quantization/test_vllm_serving.py serves it too)."""
    from transformers import AutoModelForCausalLM

    from hfcompress.quantization.ct_preflight import check_model_for_format

    model = tiny_model("gpt_oss")
    model.save_pretrained(tmp_path / "float")
    config = hfcompress.W8A8Config(dataset=token_windows(), modules_to_not_convert=["re:.*experts.*", "lm_head"])
    check_model_for_format(tmp_path / "float", config, "compressed-tensors")  # the command's check lets it through
    quantized = hfcompress.quantize(model, config)
    save_quantized(quantized, tmp_path / "ct", format="compressed-tensors")
    assert "written unquantized, named in `ignore`" in caplog.text and "transformers 5.25 does not" not in caplog.text
    patterns = [p[3:] for p in json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
                if p.startswith("re:")]  # fmt: skip
    assert len(patterns) == 2  # one per block
    for projection in ("gate_proj", "up_proj", "down_proj"):  # vLLM's names for a fused experts layer's
        assert any(re.match(p, f"model.layers.1.mlp.experts.0.{projection}") for p in patterns), patterns
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    assert not [key for key in stored if any(re.match(p, key.rsplit(".", 1)[0]) for p in patterns)]
    assert "model.layers.0.mlp.experts.gate_up_proj" in stored
    assert "not_in_transformers" not in loading_needs(tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(
        loaded.model.layers[0].mlp.experts.gate_up_proj, quantized.model.layers[0].mlp.experts.gate_up_proj
    )
    _reads_back_as(tmp_path / "ct", quantized)


def test_config_groups_name_the_experts_as_the_checkpoint_stores_them(tmp_path):
    """Attention on 8 bits, experts on 4: the groups target layers by name, and vLLM matches those names against
    its own, which are the stored ones (Mixtral's `block_sparse_moe.experts.0.w1`, not the model's `mlp.`)."""
    config = hfcompress.RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*self_attn.*": 8})
    model = hfcompress.quantize(tiny_model("mixtral"), config)
    save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    stored = {key.rsplit(".", 1)[0] for key in load_file(tmp_path / "ct" / "model.safetensors")}
    targets = [name for group in groups.values() for name in group["targets"]]
    assert any(".block_sparse_moe.experts.0.w1" in name for name in targets)
    assert set(targets) <= stored, sorted(set(targets) - stored)[:3]
    _reads_back_as(tmp_path / "ct", model)


def test_load_compressed_tensors_reads_w8a8_and_refuses_what_it_does_not_read(tmp_path):
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.W8A8Config(dataset=token_windows()))
    save_quantized(model, tmp_path / "w8a8", format="compressed-tensors")
    loaded = hfcompress.load_compressed_tensors(tmp_path / "w8a8")
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    ids = token_windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    config_file = tmp_path / "w8a8" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not W8A8 with per-channel symmetric weights and dynamic per-token"):
        hfcompress.load_compressed_tensors(tmp_path / "w8a8")
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="is not a compressed-tensors checkpoint"):
        hfcompress.load_compressed_tensors(tmp_path / "dense")


@pytest.mark.parametrize(
    "arch, config",
    [("mixtral", hfcompress.GPTQConfig(bits=4, group_size=32, sym=True)), ("qwen2_moe", hfcompress.RTNConfig(bits=8, group_size=-1, sym=True)),
     ("mixtral", hfcompress.W8A8Config())],
    ids=["mixtral-gptq-w4", "qwen2_moe-rtn-w8", "mixtral-w8a8"],
)  # fmt: skip
def test_load_compressed_tensors_reads_experts_back_into_expert_linears(tmp_path, arch, config):
    """Experts exported one linear each under the checkpoint's own names (gate and up apart) come back as the
    packed layers of an `ExpertLinears`, gate and up rows together: the logits of the model that was exported."""
    if isinstance(config, (hfcompress.GPTQConfig, hfcompress.W8A8Config)):
        config.dataset = token_windows()
    model = hfcompress.quantize(tiny_model(arch), config)
    save_quantized(model, tmp_path / "moe", format="compressed-tensors")
    loaded = hfcompress.load_compressed_tensors(tmp_path / "moe")
    experts = loaded.model.layers[0].mlp.experts
    assert type(experts).__name__ == "ExpertLinears" and isinstance(experts.down_proj[1], hfcompress.QuantLinear)
    assert experts.gate_up_proj[1].out_features == 2 * experts.down_proj[1].in_features
    ids = token_windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_compressed_tensors_refuses_conv1d_models(tmp_path):
    model = hfcompress.quantize(tiny_model("gpt2"), hfcompress.RTNConfig(bits=4, group_size=32, sym=True))
    with pytest.raises(ValueError, match="Conv1D"):
        save_quantized(model, tmp_path / "out", format="compressed-tensors")


def test_hfcompress_checkpoint_without_hfcompress_fails_loudly(tmp_path):
    """Documented behaviour: without `import hfcompress` transformers skips the unknown quant_method, then
    refuses the packed int32 `weight` tensors by shape instead of loading random weights."""
    ids = token_windows(2, 16)
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.RTNConfig(bits=4, group_size=32))
    case = tmp_path / "case"
    case.mkdir()
    torch.save(ids, case / "ids.pt")
    model.save_pretrained(case / "model")
    result = _load_elsewhere([case / "model"])[str(case / "model")]
    assert result.startswith("RuntimeError") and "mismatched" in result
