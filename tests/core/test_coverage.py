"""Nothing is skipped silently: every weight matrix is compressed or listed with its reason, and a run that
leaves a large share of the linear-like weights in full precision is refused unless asked for."""

import copy
import json

import pytest
import torch
import transformers
from helpers import tiny_model, tiny_tokenizer
from transformers import DbrxConfig, DbrxForCausalLM

import hfcompress
from hfcompress.commands.cli import main
from hfcompress.core.coverage import coverage


def tiny_dbrx():
    """DBRX stores its experts as 2-D parameters stacked expert after expert (`ffn.experts.mlp.w1`
    [experts x ffn, hidden]) in a module that declares no layout, which no technique handles yet (the fused 3-D
    experts of Mixtral and the others are held as one linear per expert: tests/core/test_experts.py)."""
    config = DbrxConfig(
        vocab_size=len(tiny_tokenizer()), d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 8, "moe_top_k": 2},
    )  # fmt: skip
    return DbrxForCausalLM(config).eval()


def test_a_dense_model_is_covered_but_for_what_stays_full_precision_by_design():
    model = hfcompress.quantize(tiny_model(), hfcompress.RTNConfig(bits=4, group_size=32))
    summary = model.hfcompress_coverage
    assert summary["compressed"] == {
        "QuantLinear": {"layers": 14, "weights": 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)}
    }
    assert set(summary["left_out"]) == {"embedding", "output embedding (lm_head)"}


def test_layers_excluded_by_name_are_listed_as_such():
    config = hfcompress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head", "down_proj"])
    model = hfcompress.quantize(tiny_model(), config)
    assert model.hfcompress_coverage["left_out"]["modules_to_not_convert"]["tensors"] == 2


def test_expert_weights_no_technique_handles_are_refused_then_listed_when_allowed():
    with pytest.raises(ValueError, match=r"9\d% of the model's linear-like weights were left in full precision .*"
                       r"DbrxExpertGLU.*allow_partial=True"):  # fmt: skip
        hfcompress.quantize(tiny_dbrx(), hfcompress.RTNConfig(bits=4, group_size=32))
    model = hfcompress.quantize(tiny_dbrx(), hfcompress.RTNConfig(bits=4, group_size=32, allow_partial=True))
    left_out = model.hfcompress_coverage["left_out"]
    assert left_out["router (kept in full precision)"]["tensors"] == 2
    assert left_out["unsupported: DbrxExpertGLU.w1 (2-D)"]["weights"] == 2 * 8 * 128 * 64
    assert model.hfcompress_coverage["compressed"]["QuantLinear"]["layers"] == 4  # the attention projections


def test_the_command_refuses_and_records_coverage(tmp_path, capsys):
    folder = tmp_path / "dbrx"
    tiny_dbrx().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert main(["quantize", "rtn", str(folder), str(tmp_path / "o"), "--group-size", "32", "-q"]) == 2
    assert "--allow-partial" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert (
        main(["quantize", "rtn", str(folder), str(tmp_path / "o"), "--group-size", "32", "--allow-partial", "-q"]) == 0
    )
    record = json.loads((tmp_path / "o" / "hfcompress_record.json").read_text())
    assert "unsupported: DbrxExpertGLU.w2 (2-D)" in record["steps"][0]["config"]["coverage"]["left_out"]


def test_coverage_of_an_untouched_model_lists_every_linear():
    result = coverage(tiny_model())
    assert not result.compressed and result.unintended_share == 1.0
    assert sum(1 for *_, reason in result.left_out if reason == "linear layer not compressed") == 14


def test_the_card_says_what_was_left_out(tmp_path):
    folder = tmp_path / "dbrx"
    tiny_dbrx().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert (
        main(["quantize", "rtn", str(folder), str(tmp_path / "o"), "--group-size", "32", "--allow-partial", "-q"]) == 0
    )
    card = (tmp_path / "o" / "README.md").read_text()
    assert "Step 1 compressed 4 QuantLinear layers; left in full precision: " in card
    assert "unsupported: DbrxExpertGLU.v1 (2-D): 2" in card and "coverage=" not in card


def tiny_bert(model_class):
    config = transformers.BertConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize(
    "model_class, head",
    [
        ("BertForSequenceClassification", {"classifier"}),
        ("BertForQuestionAnswering", {"qa_outputs"}),
        ("RobertaForSequenceClassification", {"classifier.dense", "classifier.out_proj"}),
        ("BertForMaskedLM", {"cls.predictions.transform.dense"}),  # its decoder is the output embedding
    ],
)
def test_a_task_head_stays_full_precision_unless_modules_to_not_convert_is_given(model_class, head):
    if model_class.startswith("Roberta"):
        config = transformers.RobertaConfig(**tiny_bert("BertModel").config.to_diff_dict() | {"pad_token_id": 1})
        model = transformers.RobertaForSequenceClassification(config).eval()
    else:
        model = tiny_bert(model_class)
    kept = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = hfcompress.quantize(copy.deepcopy(model), hfcompress.RTNConfig(bits=4, group_size=32))
    kept &= {name for name, module in quantized.named_modules() if type(module) is torch.nn.Linear}
    output = [name for name, module in quantized.named_modules() if module is quantized.get_output_embeddings()]
    assert kept - set(output) == head
    reasons = coverage(quantized).left_out
    assert {name.rpartition(".")[0] for name, _, reason in reasons if reason.startswith("task head")} == head
    # named, only what is named stays (a tied output embedding cannot be quantized)
    everything = hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=32, modules_to_not_convert=output))
    assert not any(type(everything.get_submodule(name)) is torch.nn.Linear for name in head)
