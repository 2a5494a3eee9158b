"""The quantization techniques as the registry and the loader see them. Imports no torch: the code that
quantizes, saves and rebuilds is named by `lazy` references and imported when a command or a load needs it."""

from ..checkpoint.rebuild import register_dequantizer, register_rebuilder
from ..core.registry import StepOption, always, lazy, register_technique
from ..core.stored_formats import register_stored_format
from .bnb_config import BnbConfig
from .codebook_config import KMeansConfig, VQConfig
from .config import FORMATS, AWQConfig, GPTQConfig, RTNConfig, W8A8Config

__all__ = []

FORMAT_HELP = (
    "Checkpoint format. hfcompress: loads with from_pretrained after `import hfcompress`. compressed-tensors: loads "
    "in vLLM and in plain transformers with the compressed-tensors package (act-order only with static groups; mixed "
    "precision as one config group per grid; W8A8 as int-quantized; asymmetric 2/4/8-bit grids with packed zero "
    "points, which transformers reads with compressed-tensors 0.17 only and hfcompress.load_compressed_tensors with "
    "any; asymmetric 3-bit refused; a pruned layer's codes written dense, without the bitmask's saving)."
)
_UNIFORM = dict(
    layer_types=(lazy("hfcompress.quantization.modules:QuantLinear"), lazy("hfcompress.quantization.sparse_quant:SparseQuantLinear")),
    step_options={"format": StepOption(FORMATS, FORMAT_HELP)},
    check=lazy("hfcompress.quantization.save:check_format"),
    check_model=lazy("hfcompress.quantization.ct_preflight:check_model_for_format"),
    save=lazy("hfcompress.quantization.save:write_quantized"),
    stream=lazy("hfcompress.quantization.streaming:quantize_streaming"),
    rewrite=lazy("hfcompress.quantization.ct_export:rewrite_streamed"),
    expert_linears=True,
)  # fmt: skip
quantize_uniform = lazy("hfcompress.quantization.api:quantize_uniform")
register_technique("gptq", GPTQConfig, quantize_uniform, calibrated=always, summary="GPTQ with calibration data.", **_UNIFORM)  # fmt: skip
register_technique("rtn", RTNConfig, quantize_uniform, summary="Round-to-nearest, no data.", **_UNIFORM)
register_technique(
    "awq", AWQConfig, lazy("hfcompress.quantization.awq_blocks:quantize_awq"), calibrated=always,
    summary="Activation-aware scales (AWQ), then round-to-nearest.",
    **{**_UNIFORM, "stream": lazy("hfcompress.quantization.awq_streaming:awq_streaming")},
)  # fmt: skip
register_technique(
    "w8a8", W8A8Config, lazy("hfcompress.quantization.w8a8:quantize_w8a8"), calibrated=always,
    summary="SmoothQuant, then int8 weights and per-token int8 activations run as int8 matmuls.",
    **{
        **_UNIFORM,
        "layer_types": (lazy("hfcompress.quantization.int8_linear:Int8Linear"),),
        "stream": lazy("hfcompress.quantization.w8a8_streaming:w8a8_streaming"),
    },
)  # fmt: skip
register_technique(
    "bnb", BnbConfig, lazy("hfcompress.quantization.bnb:apply_bnb"),
    describe=lambda config: f"bitsandbytes-{config.description}", in_place=False, cast=False,
    summary="bitsandbytes 4-bit (NF4/FP4) or 8-bit; loads with plain transformers.",
)  # fmt: skip
_CODEBOOK = dict(
    layer_types=(lazy("hfcompress.quantization.codebook_linear:CodebookLinear"),),
    calibrated=lambda config: config.dataset is not None,
    expert_linears=True,
    stream=lazy("hfcompress.quantization.codebook_streaming:quantize_codebook_streaming"),
)
quantize_codebook = lazy("hfcompress.quantization.codebook_api:quantize_codebook")
register_technique("kmeans", KMeansConfig, quantize_codebook, summary="Non-uniform levels per channel by weighted k-means.", **_CODEBOOK)  # fmt: skip
register_technique("vq", VQConfig, quantize_codebook, summary="Vector quantization of runs of weights.", **_CODEBOOK)

# once a quantized checkpoint has loaded, its output layer (kept whole) decodes in hfcompress's dense loop
_head = lazy("hfcompress.quantization.decode_linear:use_for_output_layer")
register_rebuilder("codebooks", lazy("hfcompress.quantization.rebuild:rebuild_codebooks"), order=50, finish=_head)
register_rebuilder("compensation", lazy("hfcompress.quantization.rebuild:rebuild_compensated"), order=55, finish=_head)
register_rebuilder("modules", lazy("hfcompress.quantization.rebuild:rebuild_quantized"), order=60, finish=_head)
register_dequantizer(lazy("hfcompress.quantization.export:dequantize_model"))
# compressed-tensors integer checkpoints (ours, llm-compressor's) evaluated streamed, one block at a time
register_stored_format(
    "compressed-tensors",
    lazy("hfcompress.quantization.ct_import:CompressedTensorsLayout"),
    obstacle=lazy("hfcompress.quantization.ct_import:reader_obstacle"),
)
