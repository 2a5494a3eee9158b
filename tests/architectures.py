"""The architecture matrix: every architecture users bring, built tiny from its config, against every technique
that compresses layer by layer. A cell compresses the model, saves it, reloads it and compares the outputs with
the compressed model's in memory (to float rounding). `tests/test_architecture_matrix.py` runs every cell; `scripts/
architecture_matrix.py` prints the table the README shows. A cell that cannot work says why in `GAPS`; nothing
else may fail."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from helpers import MOE_ARCHITECTURES, VOCAB, tiny_model

import hfcompress
from hfcompress.core.registry import compress
from hfcompress.core.samples import CaptionedImages
from hfcompress.quantization.save import save_quantized

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
DECODER = dict(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=128, **SMALL)
IMAGE = 32  # pixels a side


def _clip_vision():
    return dict(model_type="clip_vision_model", image_size=IMAGE, patch_size=8, **SMALL)


BUILDERS: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "Llama": ("decoder", lambda: tiny_model("llama")),
    "Mistral": ("decoder", lambda: tiny_model("mistral")),
    "Qwen2": ("decoder", lambda: tiny_model("qwen2")),
    "Qwen3": ("decoder", lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **DECODER))),
    "Gemma 2": ("decoder", lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=16, **DECODER))),
    "Gemma 3 (text)": ("decoder", lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **DECODER))),
    "Phi-3": ("decoder", lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, **DECODER))),
    "GPT-2": ("decoder", lambda: tiny_model("gpt2")),
    "OPT": ("decoder", lambda: tiny_model("opt")),
    "Falcon": (
        "decoder",
        lambda: T.FalconForCausalLM(
            T.FalconConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                new_decoder_architecture=True,
                num_kv_heads=2,
            )
        ),
    ),
    "GPT-NeoX": (
        "decoder",
        lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=128, **SMALL)),
    ),
    "Mixtral": ("moe", MOE_ARCHITECTURES["mixtral"]),
    "Qwen2-MoE (shared expert)": ("moe", MOE_ARCHITECTURES["qwen2_moe"]),
    "Qwen3-MoE": (
        "moe",
        lambda: T.Qwen3MoeForCausalLM(
            T.Qwen3MoeConfig(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16, **DECODER)
        ),
    ),
    "OLMoE": ("moe", MOE_ARCHITECTURES["olmoe"]),
    "DeepSeek-V3 (shared experts)": ("moe", MOE_ARCHITECTURES["deepseek_v3"]),
    "GPT-OSS": ("moe", MOE_ARCHITECTURES["gpt_oss"]),
    "BERT (masked LM)": ("encoder", lambda: tiny_model("bert")),
    "BERT (classification)": (
        "encoder",
        lambda: T.BertForSequenceClassification(
            T.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=2, **SMALL)
        ),
    ),
    "RoBERTa (masked LM)": (
        "encoder",
        lambda: T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=130, **SMALL)),
    ),
    "DeBERTa-v2 (classification)": (
        "encoder",
        lambda: T.DebertaV2ForSequenceClassification(
            T.DebertaV2Config(vocab_size=VOCAB, max_position_embeddings=128, num_labels=3, **SMALL)
        ),
    ),
    "ModernBERT (masked LM)": (
        "encoder",
        lambda: T.ModernBertForMaskedLM(
            T.ModernBertConfig(
                vocab_size=VOCAB,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                cls_token_id=1,
                sep_token_id=2,
                **SMALL,
            )
        ),
    ),
    "T5": (
        "encoder-decoder",
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
    ),
    "BART": (
        "encoder-decoder",
        lambda: T.BartForConditionalGeneration(
            T.BartConfig(
                vocab_size=VOCAB,
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                max_position_embeddings=128,
            )
        ),
    ),
    "Whisper": (
        "audio",
        lambda: T.WhisperForConditionalGeneration(
            T.WhisperConfig(
                vocab_size=VOCAB,
                d_model=64,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=128,
                decoder_ffn_dim=128,
                num_mel_bins=16,
                max_source_positions=16,
                max_target_positions=64,
                decoder_start_token_id=1,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
        ),
    ),
    "ViT": (
        "vision",
        lambda: T.ViTForImageClassification(T.ViTConfig(image_size=IMAGE, patch_size=8, num_labels=3, **SMALL)),
    ),
    "CLIP": (
        "dual",
        lambda: T.CLIPModel(
            T.CLIPConfig(
                text_config=dict(vocab_size=VOCAB, max_position_embeddings=64, **SMALL),
                vision_config=_clip_vision(),
                projection_dim=32,
            )
        ),
    ),
    "LLaVA (language model)": (
        "vlm",
        lambda: T.LlavaForConditionalGeneration(
            T.LlavaConfig(
                vision_config=_clip_vision(),
                text_config=dict(model_type="llama", **DECODER),
                image_token_id=VOCAB - 1,
                vision_feature_layer=-1,
            )
        ),
    ),
}


def _ids(n: int, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB - 1, (n, length), generator=torch.Generator().manual_seed(seed))


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def model_inputs(family: str, model) -> dict:
    """What a cell feeds the model to compare its outputs before and after the reload."""
    ids = _ids(2, 16, seed=7)
    if family == "encoder-decoder":
        return {"input_ids": ids, "decoder_input_ids": ids}
    if family == "audio":
        return {
            "input_features": torch.rand(2, 16, 32, generator=torch.Generator().manual_seed(7)),
            "decoder_input_ids": ids,
        }
    if family == "vision":
        return {"pixel_values": _images(2, seed=7)}
    if family == "dual":
        return {"input_ids": ids, "pixel_values": _images(2, seed=7)}
    return {"input_ids": ids}


def calibration(family: str) -> torch.Tensor:
    """Calibration data: token ids, images for a model that reads images, log-mel features [n, mel bins, frames]
    for one that reads speech (its decoder reads what it transcribes from them), captioned images for a dual
    encoder."""
    if family == "audio":
        return torch.rand(8, 16, 32, generator=torch.Generator().manual_seed(1))
    if family == "dual":  # captions of 5 to 12 tokens, padded at the end, with their images
        mask = (torch.arange(12) < torch.arange(5, 13)[:, None]).long()
        return CaptionedImages(_ids(8, 12) * mask, mask, _images(8))
    return _images(8) if family == "vision" else _ids(8)


COMPRESSED_TENSORS = "rtn → compressed-tensors"
TECHNIQUES: dict[str, Callable[[torch.Tensor], object]] = {
    "rtn": lambda data: hfcompress.RTNConfig(bits=4, group_size=32),
    "gptq": lambda data: hfcompress.GPTQConfig(bits=4, group_size=32, dataset=data),
    "awq": lambda data: hfcompress.AWQConfig(bits=4, group_size=32, dataset=data),
    "kmeans": lambda data: hfcompress.KMeansConfig(bits=3, dataset=data),
    "vq": lambda data: hfcompress.VQConfig(dataset=data),
    "prune oneshot (wanda)": lambda data: hfcompress.OneShotPruningConfig(method="wanda", sparsity=0.5, dataset=data),
    "prune structured": lambda data: hfcompress.StructuredPruningConfig(heads=0.25, ffn=0.25),
    "factorize (svd)": lambda data: hfcompress.LowRankConfig(method="svd", param_ratio=0.5, allocation="uniform"),
    # saved as compressed-tensors and loaded by plain transformers (the compressed-tensors package)
    COMPRESSED_TENSORS: lambda data: hfcompress.RTNConfig(bits=4, group_size=32, sym=True),
}

_CALIBRATED = ("gptq", "awq", "kmeans", "vq", "prune oneshot (wanda)")
_NO_FFN = ("finds no MLP it can remove neurons from", "finds no ffn to prune")
_NO_HEADS = ("finds no attention it can remove heads from", "finds no heads to prune")
_CT_EXPERTS = ("its checkpoints store the experts fused: no per-expert names to write them under", "no per-expert")
_CT_INIT = (
    "transformers' weight initialization of this model reads weights compressed-tensors replaces",
    "cannot load",
)
_CT_CLASS = ("compressed-tensors quantizes layers of class Linear only (not Conv1D, FalconLinear)", "class Linear")
# (architecture, technique): (the reason the README's matrix gives, what the error says)
GAPS: dict[tuple[str, str], tuple[str, str]] = {
    **{(a, "prune structured"): _NO_HEADS for a in ("Phi-3", "DeBERTa-v2 (classification)")},
    **{
        (a, "prune structured"): _NO_FFN
        for a, (family, _) in BUILDERS.items()
        if family in ("moe", "encoder-decoder", "audio", "vision", "dual")
        or a in ("GPT-2", "OPT", "Falcon", "GPT-NeoX", "ModernBERT (masked LM)")
    },
    (("GPT-OSS", COMPRESSED_TENSORS)): _CT_EXPERTS,
    **{(a, COMPRESSED_TENSORS): _CT_INIT for a in ("T5", "ModernBERT (masked LM)")},
    **{(a, COMPRESSED_TENSORS): _CT_CLASS for a in ("GPT-2", "Falcon")},
}


def outputs_of(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def run_cell(architecture: str, technique: str, folder) -> None:
    """Compress, save, reload, compare: an AssertionError or the technique's own error when the cell fails."""
    family, build = BUILDERS[architecture]
    torch.manual_seed(0)
    model = build().eval()
    compress(model, TECHNIQUES[technique](calibration(family)))
    inputs = model_inputs(family, model)
    expected = outputs_of(model, inputs)
    if technique == COMPRESSED_TENSORS:
        save_quantized(model, folder, format="compressed-tensors")
    else:
        model.save_pretrained(folder)
    # the tiny MoE models run transformers' eager experts (the reference); a reload would pick the default
    options = {"experts_implementation": "eager"} if family == "moe" else {}
    reloaded = type(model).from_pretrained(folder, **options).eval()
    # equal up to float rounding: a reloaded tensor may sit at another alignment, which changes the BLAS kernel
    # (and compressed-tensors dequantizes in an order of its own)
    tolerance = dict(rtol=1e-4, atol=1e-5) if technique == COMPRESSED_TENSORS else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs_of(reloaded, inputs), expected, **tolerance)
