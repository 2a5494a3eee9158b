"""`export_gguf`: an hfcompress checkpoint of a Llama model as one GGUF file that llama.cpp reads.

Quantized layers whose grid llama.cpp expresses exactly go over code for code: symmetric 4-bit with groups of 32
and float16 scales as Q4_0, symmetric 8-bit as Q8_0 (`gguf_blocks.py`). Any other grid (asymmetric, other
group sizes, 2/3 bits, act-order with reordered groups, k-means codebooks, sparse or factorized layers) is
refused with the reason, never re-quantized. Embeddings and a dense output layer are written in float16, norms
in float32. The tokenizer must be a byte-level BPE `tokenizer.json` (GPT-2 style, llama.cpp's "gpt2" model).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..core.structure import is_plain_linear
from .gguf_blocks import BLOCK, q4_0_blocks, q8_0_blocks, rope_row_order
from .modules import QuantLinear

__all__ = ["export_gguf"]

logger = logging.getLogger(__name__)

_LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def export_gguf(model_folder: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the hfcompress checkpoint in `model_folder` (a Llama model) to the GGUF file `output`, which must
    not exist unless `overwrite`; it is written beside it under a temporary name first. Returns its path."""
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'hfcompress[gguf]'") from None
    output = Path(output)
    if output.exists() and (output.is_dir() or not overwrite):
        raise FileExistsError(f"{os.fspath(output)!r} exists: pass --overwrite to replace it")
    folder = Path(model_folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ValueError(
            f"GGUF export writes Llama models (llama.cpp's 'llama' architecture); {folder} is {config.get('model_type')!r}"
        )
    tokenizer = _byte_level_bpe(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tensors = _tensors(model, gguf)
    writer = gguf.GGUFWriter(None, "llama")
    _metadata(writer, model.config, folder.name, tensors, gguf)
    _tokenizer(writer, tokenizer, model.config, gguf)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    partial = output.with_name(f".{output.name}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (%d tensors)", output, len(tensors))
    return output


def _tensors(model: nn.Module, gguf) -> dict:
    """GGUF name -> (numpy array, raw dtype or None) for every tensor llama.cpp reads."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors = {"token_embd.weight": (model.model.embed_tokens.weight.detach().half().numpy(), None)}
    for index, layer in enumerate(model.model.layers):
        for path, short in _LINEARS.items():
            module = layer.get_submodule(path)
            order = None
            if short in ("attn_q", "attn_k"):
                order = rope_row_order(module.out_features, heads if short == "attn_q" else kv_heads)
            tensors[f"blk.{index}.{short}.weight"] = _linear(f"model.layers.{index}.{path}", module, order, gguf)
        for path, short in _NORMS.items():
            tensors[f"blk.{index}.{short}.weight"] = (layer.get_submodule(path).weight.detach().float().numpy(), None)
    tensors["output_norm.weight"] = (model.model.norm.weight.detach().float().numpy(), None)
    if not getattr(config, "tie_word_embeddings", False):
        tensors["output.weight"] = _linear("lm_head", model.get_output_embeddings(), None, gguf)
    return tensors


def _linear(name: str, module: nn.Module, order: torch.Tensor | None, gguf):
    if is_plain_linear(module):
        if module.bias is not None:
            raise ValueError(f"{name} has a bias, which llama.cpp's llama architecture does not read")
        weight = module.weight.detach()
        return (weight[order] if order is not None else weight).half().numpy(), None
    if type(module) is not QuantLinear:
        raise ValueError(
            f"{name} is a {type(module).__name__}; GGUF export writes plain or uniformly quantized (QuantLinear) layers"
        )
    grid = f"{module.bits}-bit, group size {module.group_size}, {'symmetric' if module.sym else 'asymmetric'}"
    if not module.sym or module.group_size != BLOCK or module.bits not in (4, 8) or module.bias is not None:
        raise ValueError(
            f"{name} is quantized {grid}{' with a bias' if module.bias is not None else ''}; llama.cpp expresses "
            f"exactly only symmetric 4-bit (Q4_0) or 8-bit (Q8_0) with groups of {BLOCK}: quantize with "
            f"--sym --group-size {BLOCK} --bits 4 or 8"
        )
    if module.weight_g_idx is not None:
        expected = torch.arange(module.in_features) // BLOCK
        if not torch.equal(module.weight_g_idx.long(), expected):
            raise ValueError(
                f"{name} was quantized with act-order groups that are not runs of {BLOCK} consecutive columns, which "
                "llama.cpp's blocks are; quantize with --static-groups or without --act-order"
            )
    codes, scales = module.codes(), module.weight_scale.detach()
    if scales.dtype != torch.float16:
        half = scales.half()
        if not torch.equal(half.to(scales.dtype), scales):
            raise ValueError(
                f"{name} has {scales.dtype} scales that float16 (llama.cpp's block scale) cannot hold exactly"
            )
        scales = half
    if order is not None:
        codes, scales = codes[order], scales[order]
    if module.bits == 4:
        return q4_0_blocks(codes, scales).numpy(), gguf.GGMLQuantizationType.Q4_0
    return q8_0_blocks(codes, scales).numpy(), gguf.GGMLQuantizationType.Q8_0


def _metadata(writer, config, name: str, tensors: dict, gguf) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF yet; only default rotary")
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    kinds = {raw for _, raw in tensors.values() if raw is not None}
    file_type = (
        gguf.LlamaFileType.MOSTLY_Q4_0 if gguf.GGMLQuantizationType.Q4_0 in kinds else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_file_type(file_type if kinds else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _byte_level_bpe(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; llama.cpp needs the tokenizer inside the GGUF file")
    data = json.loads(path.read_text(encoding="utf-8"))
    model, pre = data.get("model", {}), data.get("pre_tokenizer") or {}
    pre_types = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
        raise ValueError(
            f"{path} is a {model.get('type')} tokenizer with {sorted(t for t in pre_types if t)} pre-tokenization; GGUF "
            "export writes byte-level BPE tokenizers (GPT-2 style) only"
        )
    return data


def _tokenizer(writer, data: dict, config, gguf) -> None:
    vocab = dict(data["model"]["vocab"])
    for token in data.get("added_tokens", []):
        vocab[token["content"]] = token["id"]
    size = config.vocab_size
    beyond = sorted(t for t, i in vocab.items() if i >= size)[:5]
    if beyond:
        raise ValueError(f"the tokenizer has ids beyond the model's {size} embeddings (e.g. {beyond})")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for token in data.get("added_tokens", []):
        types[token["id"]] = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(config, key, None)
        if isinstance(value, int):
            setter(value)
