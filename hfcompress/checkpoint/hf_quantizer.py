"""The transformers side of loading: after `import hfcompress`, `from_pretrained` rebuilds the compressed layers
a checkpoint's manifest lists, through the rebuild registry."""

from __future__ import annotations

from transformers.core_model_loading import WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from .manifest import FORMAT_VERSION, HfcompressQuantizationConfig
from .rebuild import dequantizers, ordinary_weights, rebuilder_for, rebuilders
from .verify import check_finite, check_tensors

__all__ = ["QUANT_METHOD", "HfcompressHfQuantizer", "attach_config", "register"]

QUANT_METHOD = "hfcompress"


class HfcompressHfQuantizer(HfQuantizer):
    """Swaps the layers listed in the checkpoint's manifest for what the checkpoint holds before the weights
    load, one registered rebuilder per kind of layer, in their order."""

    requires_calibration = True
    quantization_config: HfcompressQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        used = config.sections_in_use()
        for section in used:
            rebuilder_for(section)  # an unknown kind fails before anything changes
        for rebuilder in rebuilders():
            if rebuilder.section in used:
                rebuilder.rebuild(model, config)
        if checkpoint_files:  # every rebuilt layer finds its tensors, shaped as it expects
            check_tensors(model, checkpoint_files)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """transformers merges a mixture-of-experts checkpoint's per-expert tensors into its fused 3-D parameters
        while loading; a checkpoint whose experts hfcompress holds as one linear each stores them under the
        model's own names (`core.experts`), which nothing must merge."""
        if not self.quantization_config.experts:
            return super().update_weight_conversions(weight_conversions, model)
        return [c for c in weight_conversions if not isinstance(c, WeightConverter)]

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_finite(model)
        config = self.quantization_config
        used = config.sections_in_use()
        for rebuilder in rebuilders():
            if rebuilder.section in used and rebuilder.finish is not None:
                rebuilder.finish(model, config)
        config.version = max(config.version, FORMAT_VERSION)  # what is in memory now saves in the current format
        return model

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        # packed or bitmask weights take no gradients; factorized and resized layers are ordinary linears
        return ordinary_weights(self.quantization_config.sections_in_use())

    @property
    def is_qat_trainable(self) -> bool:
        return self.is_trainable

    def _dequantize(self, model, dtype=None):
        for dequantize in dequantizers():
            model = dequantize(model, dtype)
        return model


def attach_config(model, qconfig: HfcompressQuantizationConfig) -> None:
    """Mark `model` as an hfcompress checkpoint, as `from_pretrained` would have: its config records `qconfig`
    (so `save_pretrained` writes it) and the quantizer that reloads it is attached."""
    model.config.quantization_config = qconfig
    model.hf_quantizer = HfcompressHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method


def register() -> None:
    """Make `from_pretrained` understand `quant_method: "hfcompress"`. Idempotent."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfcompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfcompressHfQuantizer)


register()  # importing this module first also imports transformers' registry: the hook leaves it to us
