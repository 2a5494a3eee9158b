"""`hfcompress export gguf`: Q4_0 / Q8_0 blocks code for code, read back with the gguf package's own reader and
dequantizer, and every grid llama.cpp cannot express refused with the reason."""

import json
import os
import subprocess
from pathlib import Path

import numpy
import pytest
import torch
from helpers import python_text, tiny_model, token_windows

import hfcompress
from hfcompress.commands.cli import main
from hfcompress.quantization.gguf_blocks import q4_0_blocks, q8_0_blocks, rope_row_order
from hfcompress.quantization.modules import QuantLinear

gguf = pytest.importorskip("gguf")


def _byte_level_tokenizer(vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator([python_text()[:50_000]], vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


VOCAB = 320  # a byte-level BPE needs the 256 bytes and more


def _tiny_model():
    model = tiny_model()
    model.resize_token_embeddings(VOCAB)
    return model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / "model"
    model = _tiny_model()
    model.config.bos_token_id = model.config.eos_token_id = 0
    config = hfcompress.GPTQConfig(
        bits=4, group_size=32, sym=True, dataset=token_windows(8, 32), layer_bits={"mlp.down_proj": 8}
    )
    hfcompress.quantize(model, config)
    model.save_pretrained(folder)
    _byte_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def test_blocks_dequantize_to_the_grid_with_the_gguf_package():
    g = torch.Generator().manual_seed(0)
    scales = (torch.rand(3, 4, generator=g) + 0.1).half()
    for bits, blocks, qtype in ((4, q4_0_blocks, gguf.GGMLQuantizationType.Q4_0), (8, q8_0_blocks, gguf.GGMLQuantizationType.Q8_0)):  # fmt: skip
        codes = torch.randint(0, 2**bits, (3, 128), generator=g)
        expected = (codes.float() - 2 ** (bits - 1)) * scales.float().repeat_interleave(32, dim=1)
        ours = gguf.quants.dequantize(blocks(codes, scales).numpy(), qtype)
        assert torch.equal(torch.from_numpy(ours), expected)


def test_rope_row_order_is_llama_cpps_permutation():
    rows, heads = 24, 3
    w = torch.arange(rows * 2).reshape(rows, 2)
    # llama.cpp's convert_hf_to_gguf: reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2).reshape(shape)
    expected = w.reshape(heads, 2, rows // heads // 2, 2).transpose(1, 2).reshape(rows, 2)
    assert torch.equal(w[rope_row_order(rows, heads)], expected)


def test_export_round_trips_every_weight_through_gguf(quantized, tmp_path):
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(quantized), str(out), "-q"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    for index, layer in enumerate(model.model.layers):
        for path, short in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                            ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                            ("mlp.down_proj", "ffn_down")):  # fmt: skip
            module = layer.get_submodule(path)
            assert isinstance(module, QuantLinear)
            tensor = tensors[f"blk.{index}.{short}.weight"]
            expected_type = gguf.GGMLQuantizationType.Q8_0 if short == "ffn_down" else gguf.GGMLQuantizationType.Q4_0
            assert tensor.tensor_type == expected_type
            weights = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            expected = module.dequantize_weight(torch.float32)
            if short in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
                expected = expected[rope_row_order(module.out_features, heads)]
            assert torch.equal(weights.reshape(expected.shape), expected), (index, short)
        norm = torch.from_numpy(tensors[f"blk.{index}.attn_norm.weight"].data.copy())
        assert torch.equal(norm, layer.input_layernorm.weight.detach())
    embedding = torch.from_numpy(tensors["token_embd.weight"].data.copy()).float()
    assert torch.equal(
        embedding.reshape(config.vocab_size, -1), model.model.embed_tokens.weight.detach().half().float()
    )
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == config.num_hidden_layers
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == config.num_key_value_heads
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    assert main(["export", "gguf", str(quantized), str(out), "-q"]) == 2  # exists: refused, left as it was
    assert reader.tensors[0].data.size and out.stat().st_size > 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bits": 4, "group_size": 64, "sym": True}, "group size 64, symmetric; llama.cpp expresses exactly only"),
        ({"bits": 4, "group_size": 32, "sym": False}, "asymmetric; llama.cpp expresses exactly only"),
        ({"bits": 3, "group_size": 32, "sym": True}, "3-bit"),
    ],
)
def test_grids_llama_cpp_cannot_express_are_refused_with_the_reason(tmp_path, capsys, settings, message):
    folder = tmp_path / "model"
    model = hfcompress.quantize(_tiny_model(), hfcompress.RTNConfig(**settings))
    model.save_pretrained(folder)
    _byte_level_tokenizer(model.config.vocab_size).save_pretrained(folder)
    assert main(["export", "gguf", str(folder), str(tmp_path / "x.gguf"), "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.skipif(
    not os.environ.get("HFCOMPRESS_LLAMA_PYTHON"),
    reason="set HFCOMPRESS_LLAMA_PYTHON to a Python with llama-cpp-python (it has no wheel for most machines)",
)
def test_llama_cpp_runs_the_file_to_transformers_logits(tmp_path):
    """llama.cpp itself reads the exported file and scores the same token ids as transformers. Attention is
    sharpened (q/k weights x8) so that a wrong rotary row order moves the logits by most of their range, not by
    less than llama.cpp's own rounding (it was 0.58 of 0.73 against 0.011 here)."""
    folder = tmp_path / "model"
    model = _tiny_model()
    model.config.bos_token_id = model.config.eos_token_id = 0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
        model.model.embed_tokens.weight.mul_(4)
    hfcompress.quantize(model, hfcompress.GPTQConfig(bits=4, group_size=32, sym=True, dataset=token_windows(8, 32)))
    model.save_pretrained(folder)
    _byte_level_tokenizer(VOCAB).save_pretrained(folder)
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(folder), str(out), "-q"]) == 0

    windows = torch.randint(1, VOCAB, (2, 64), generator=torch.Generator().manual_seed(0))
    (tmp_path / "windows.json").write_text(json.dumps(windows.tolist()))
    script = Path(__file__).parents[2] / "scripts" / "llamacpp_ppl.py"
    run = subprocess.run(
        [os.environ["HFCOMPRESS_LLAMA_PYTHON"], str(script), str(out), str(tmp_path / "windows.json"),
         "--decode-tokens", "4", "--logits", str(tmp_path / "logits.npy")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    theirs = json.loads(run.stdout.strip().splitlines()[-1])["perplexity"]
    from transformers import AutoModelForCausalLM

    from hfcompress.evaluation import perplexity

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = perplexity(loaded, windows)
        logits = loaded(input_ids=windows[:1]).logits[0]
    llama_logits = torch.from_numpy(numpy.load(tmp_path / "logits.npy", allow_pickle=False))
    assert (llama_logits - logits).abs().max() < 0.05 * logits.abs().max()
    assert theirs == pytest.approx(ours, rel=0.01)
