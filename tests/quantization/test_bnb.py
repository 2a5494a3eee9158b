"""bitsandbytes 4/8-bit through transformers: round trips, one warning, QLoRA with Trainer, bad input."""

import logging
import subprocess
import sys

import pytest
import torch
import transformers
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import BnbConfig
from hfcompress.evaluation import bits_per_weight
from hfcompress.quantization.bnb import quiet_bitsandbytes, require_bitsandbytes

bnb = pytest.importorskip("bitsandbytes")

SETTINGS = {
    "int8": BnbConfig(bits=8),
    "nf4": BnbConfig(bits=4, quant_type="nf4"),
    "nf4-double": BnbConfig(bits=4, quant_type="nf4", double_quant=True),
    "fp4": BnbConfig(bits=4, quant_type="fp4"),
    "fp4-double-bf16": BnbConfig(bits=4, quant_type="fp4", double_quant=True, compute_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_round_trip_gives_the_same_logits_in_plain_transformers(tmp_path, name):
    model = tiny_model("llama")
    quantized = hfcompress.quantize(model, SETTINGS[name])
    assert quantized is not model and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert "bitsandbytes" in type(quantized.model.layers[0].mlp.down_proj).__module__
    assert type(quantized.lm_head) is torch.nn.Linear  # skipped by default
    x = token_windows(2, 16)
    expected = quantized(x).logits
    quantized.save_pretrained(tmp_path)
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); assert 'hfcompress' not in sys.modules; "
        f"x = torch.tensor({x.tolist()}); e = torch.load({str(tmp_path / 'expected.pt')!r}); "
        "print(float((m(x).logits - e).abs().max()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0


def test_a_classifier_keeps_its_head_by_default():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    quantized = hfcompress.quantize(transformers.BertForSequenceClassification(config), BnbConfig(bits=4))
    assert "bitsandbytes" in type(quantized.bert.encoder.layer[0].output.dense).__module__
    assert type(quantized.classifier) is torch.nn.Linear


def test_int8_on_cpu_warns_once_not_on_every_forward(caplog):
    quantized = hfcompress.quantize(tiny_model("llama"), BnbConfig(bits=8))
    quiet_bitsandbytes()
    x = token_windows(2, 8)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            quantized(x)
    assert caplog.text.count("MatMul8bitLt") <= 1


def test_qlora_adapter_trains_on_the_4bit_model_and_saves(tmp_path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    quantized = hfcompress.quantize(tiny_model("llama"), BnbConfig(bits=4, double_quant=True))
    model = get_peft_model(
        prepare_model_for_kbit_training(quantized), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    windows = token_windows(8, 16)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path / "run"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            logging_steps=1,
        ),
        train_dataset=[{"input_ids": w, "labels": w} for w in windows],
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    trainer.train()
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_settings_and_a_missing_package(monkeypatch):
    for bad, message in [
        (dict(bits=3), "`bits` must be 4 or 8 for bitsandbytes, got 3"),
        (dict(quant_type="int4"), "`quant_type` must be 'nf4' or 'fp4', got 'int4'"),
        (dict(compute_dtype="float64"), "`compute_dtype` must be one of float32, bfloat16, float16, got 'float64'"),
        (dict(bits=8, double_quant=True), "apply to 4-bit only"),
    ]:
        with pytest.raises(ValueError, match=message):
            BnbConfig(**bad)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'hfcompress\[bnb\]'"):
        require_bitsandbytes()


def test_quantize_bnb_command_and_evaluate(model_dir, tmp_path, capsys):
    import json

    from hfcompress.commands.cli import main

    out = tmp_path / "nf4"
    assert main(["quantize", "bnb", str(model_dir), str(out), "--bits", "4", "--double-quant", "-q"]) == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert record["steps"][0]["method"] == "bitsandbytes-nf4+double-quant"
    assert record["metrics"]["after"]["size_bytes"] < record["metrics"]["before"]["size_bytes"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "bitsandbytes" in type(model.model.layers[0].self_attn.q_proj).__module__
    assert main(["quantize", "bnb", str(model_dir), str(out), "--bits", "8", "-q"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # 4-bit codes plus block statistics; tiny layers also carry a fixed code book and nested statistics
    assert 4.0 < bits_per_weight(model) < 8.0
