"""Checkpoints that would load silently wrong are refused, naming the layer and the tensor: a manifest edited by
hand, a tensor deleted, a non-finite scale, a truncated file. `hfcompress verify` runs the same checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfcompress.checkpoint import CheckpointError
from hfcompress.commands.cli import main
from hfcompress.steps import verify_folder

GPTQ = Path(__file__).parent / "legacy" / "gptq"  # 4-bit, group 16, asymmetric, no act-order
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture()
def folder(tmp_path):
    target = tmp_path / "gptq"
    shutil.copytree(GPTQ, target)
    return target


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _refused(folder: Path, match: str, capsys) -> None:
    with pytest.raises(CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)
    assert main(["verify", str(folder), "-q"]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_intact_checkpoint_verifies(folder, capsys):
    assert verify_folder(folder)["compressed_layers"] == 14
    assert main(["verify", str(folder), "-q"]) == 0
    assert "OK (LlamaForCausalLM" in capsys.readouterr().out


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"sym": True}, r"holds \['weight_zero_point'\] for layer 'model.layers.0.self_attn.q_proj'"),
        ({"act_order": True}, r"needs tensor\(s\) \['weight_g_idx'\]"),
        ({"bits": 3}, r"model.layers.0.self_attn.q_proj.weight .* is \[32, 4\] torch.int32 in model.safetensors, the manifest expects \[32, 3\]"),
        ({"group_size": 32}, r"weight_scale .* the manifest expects \[32, 1\]"),
    ],
)  # fmt: skip
def test_a_manifest_edited_by_hand_is_refused(folder, capsys, changes, match):
    _edit_config(folder, **changes)
    _refused(folder, match, capsys)


@pytest.mark.parametrize("tensor", ["weight_scale", "weight", "weight_zero_point"])
def test_a_missing_tensor_is_refused(folder, capsys, tensor):
    _edit_weights(folder, lambda tensors: tensors.pop(f"{LAYER}.{tensor}"))
    _refused(folder, rf"layer '{LAYER}' \(QuantLinear\) needs tensor\(s\) \['{tensor}'\]", capsys)


def test_a_non_finite_scale_is_refused(folder, capsys):
    def poison(tensors):
        tensors[f"{LAYER}.weight_scale"][0, 0] = float("nan")

    _edit_weights(folder, poison)
    _refused(folder, rf"{LAYER}.weight_scale holds 1 NaN or infinite value", capsys)


def test_a_truncated_weight_file_is_named(folder, capsys):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert main(["verify", str(folder), "-q"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_evaluate_never_passes_a_non_finite_result(tmp_path, capsys):
    from helpers import save_tiny_model

    save_tiny_model(tmp_path / "model")
    _edit_weights(tmp_path / "model", lambda t: t["model.norm.weight"].fill_(float("inf")))
    (tmp_path / "text.txt").write_text("some text to score " * 200)
    code = main(["evaluate", str(tmp_path / "model"), "--dataset", str(tmp_path / "text.txt"), "--seq-len", "16",
                 "--max-windows", "2", "--latency-runs", "0", "--json", "-q"])  # fmt: skip
    assert code == 2 and "not finite" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "model"), "-q"]) == 2
    assert "model.norm.weight holds NaN or infinite values" in capsys.readouterr().err
    assert torch.isinf(load_file(tmp_path / "model" / "model.safetensors")["model.norm.weight"]).all()


def test_verify_catches_a_weight_file_changed_after_it_was_written(tmp_path, capsys):
    """A flipped byte inside a tensor loads without complaint (headers intact): only the record's digest sees it."""
    from helpers import save_tiny_model

    save_tiny_model(tmp_path / "model")
    out = tmp_path / "rtn"
    assert main(["quantize", "rtn", str(tmp_path / "model"), str(out), "--group-size", "32", "-q"]) == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert set(record["files"]) == {"model.safetensors"} and len(record["files"]["model.safetensors"]["sha256"]) == 64
    assert main(["verify", str(out), "-q"]) == 0
    assert "weight files as recorded" in capsys.readouterr().out
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    (out / "model.safetensors").write_bytes(bytes(data))
    AutoModelForCausalLM.from_pretrained(out)  # loads: nothing in the file itself says it changed
    assert main(["verify", str(out), "-q"]) == 2
    assert "is not the file hfcompress wrote (size or SHA-256 differs" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_half_precision_bitmask_checkpoint_loads_in_another_dtype(tmp_path, dtype):
    """A pruned model saved in float16 stores its bitmask values in float16; loading it in float32 (as the search
    and `evaluate` do) casts them like any weight instead of calling the checkpoint inconsistent."""
    from helpers import tiny_model, token_windows

    from hfcompress.pruning import OneShotPruningConfig, compress_sparse, prune_oneshot

    model = tiny_model()
    prune_oneshot(model, OneShotPruningConfig(method="magnitude", sparsity=0.5))
    compress_sparse(model.to(torch.float16))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    windows = token_windows(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=windows).logits.float(), reference(input_ids=windows).logits.float(), rtol=0.05, atol=0.05
        )


def test_a_quantized_layers_bias_loads_in_another_dtype(tmp_path):
    """A quantized layer keeps its scales' dtype, but its bias is a plain weight: a float16 checkpoint of a model
    with biased linears (Qwen2's q/k/v) loads in float32, the bias cast, the scales as stored."""
    from helpers import tiny_model, token_windows

    import hfcompress

    model = hfcompress.quantize(tiny_model("qwen2").half(), hfcompress.RTNConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.bias.dtype == torch.float32 and layer.weight_scale.dtype == torch.float16
    assert torch.equal(layer.bias, model.model.layers[0].self_attn.q_proj.bias.float())
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=token_windows(1, 16)).logits).all()


def test_a_layer_saved_under_another_name_is_checked_too(tmp_path):
    """LLaVA's language model layers are saved as `language_model.model.` (what `save_pretrained` writes): they are
    held to the manifest as any layer is."""
    from architectures import BUILDERS
    from helpers import tiny_tokenizer
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model, out = tmp_path / "llava", tmp_path / "quantized"
    BUILDERS["LLaVA (language model)"][1]().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    assert main(["quantize", "rtn", str(model), str(out), "--group-size", "32", "--offload", "none", "-q"]) == 0
    layer = "model.language_model.layers.0.self_attn.q_proj"
    assert any(
        k.startswith("language_model.model.layers.0.self_attn.q_proj.") for k in load_file(out / "model.safetensors")
    )
    _edit_config(out, sym=True)  # transformers alone would load it with the zero points left out: silently wrong
    with pytest.raises(CheckpointError, match=rf"holds \['weight_zero_point'\] for layer '{layer}'"):
        AutoModelForImageTextToText.from_pretrained(out)
