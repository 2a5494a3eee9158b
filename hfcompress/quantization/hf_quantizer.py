"""The transformers side of loading: `from_pretrained` rebuilds `QuantLinear` layers after `import hfcompress`."""

from __future__ import annotations

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..lowrank.modules import FactorizedLinear
from ..pruning.sparse import SparseLinear
from .codebook_linear import CodebookLinear
from .config import HfcompressQuantizationConfig
from .modules import QuantLinear
from .sparse_quant import SparseQuantLinear
from .structure import LINEAR_TYPES, linear_weight, set_submodule

__all__ = ["HfcompressHfQuantizer", "attach_config", "register"]

QUANT_METHOD = "hfcompress"
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class HfcompressHfQuantizer(HfQuantizer):
    """Swaps the layers listed in the checkpoint's `quantization_config` for what the checkpoint holds before
    the weights load: `FactorizedLinear` for those in `lowrank`, then `QuantLinear` for those in `modules`."""

    requires_calibration = True
    quantization_config: HfcompressQuantizationConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        from ..lowrank.conv import rebuild_convolution

        config = self.quantization_config
        for name, record in config.convolutions.items():
            rebuild_convolution(model, name, record)
        _apply_resized(model, config.resized)
        for name, rank in config.lowrank.items():
            module = _linear_to_replace(model, name, "factorizes")
            out_features, in_features = linear_weight(module).shape
            factorized = FactorizedLinear(
                in_features,
                out_features,
                rank,
                bias=module.bias is not None,
                dtype=module.weight.dtype,
                device=module.weight.device,
            )
            set_submodule(model, name, factorized)
        for name, nnz in config.sparse.items():
            if name in config.modules:
                continue  # pruned and quantized: a SparseQuantLinear, below
            module = _linear_to_replace(model, name, "stores sparse")
            out_features, in_features = linear_weight(module).shape
            layer = SparseLinear(
                in_features, out_features, nnz, module.bias is not None, module.weight.dtype, module.weight.device
            )
            set_submodule(model, name, layer)
        for name, spec in config.codebooks.items():
            module = _linear_to_replace(model, name, "stores as codebooks")
            out_features, in_features = linear_weight(module).shape
            layer = CodebookLinear(
                in_features, out_features, spec["bits"], spec["dim"], spec["books"], module.bias is not None,
                dtype=module.weight.dtype, device=module.weight.device,
            )  # fmt: skip
            set_submodule(model, name, layer)
        scale_dtype = _SCALE_DTYPES[config.scale_dtype]
        for name in config.modules:
            module = _linear_to_replace(model, name, "quantizes")
            out_features, in_features = linear_weight(module).shape
            bits, group_size = config.grid_of(name)
            kwargs = dict(
                act_order=config.act_order,
                bias=module.bias is not None,
                scale_dtype=scale_dtype,
                dtype=module.weight.dtype,
                device=module.weight.device,
            )
            if name in config.sparse:
                layer = SparseQuantLinear(in_features, out_features, config.sparse[name], bits, group_size, config.sym, **kwargs)
            else:
                layer = QuantLinear(in_features, out_features, bits, group_size, config.sym, **kwargs)
            set_submodule(model, name, layer)
        return model

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        # packed or bitmask weights take no gradients; factorized and resized layers are ordinary linears
        config = self.quantization_config
        return not config.modules and not config.sparse and not config.codebooks

    @property
    def is_qat_trainable(self) -> bool:
        return self.is_trainable

    def _dequantize(self, model, dtype=None):
        from .export import dequantize_model

        return dequantize_model(model, dtype)


def attach_config(model, qconfig: HfcompressQuantizationConfig) -> None:
    """Mark `model` as an hfcompress checkpoint, as `from_pretrained` would have: its config records `qconfig`
    (so `save_pretrained` writes it) and the quantizer that reloads it is attached."""
    model.config.quantization_config = qconfig
    model.hf_quantizer = HfcompressHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method


def _apply_resized(model, resized: dict) -> None:
    """Shrink the linears (and attention attributes) that structured pruning made smaller than the config."""
    for name, (out_features, in_features) in resized.get("linears", {}).items():
        module = _linear_to_replace(model, name, "resizes")
        layer = torch.nn.Linear(
            in_features, out_features, module.bias is not None, dtype=module.weight.dtype, device=module.weight.device
        )
        set_submodule(model, name, layer)
    for name, attributes in resized.get("attributes", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the checkpoint resizes {name!r}, which {type(model).__name__} does not have") from e
        for attribute, value in attributes.items():
            if not hasattr(module, attribute):
                raise ValueError(f"the checkpoint sets {name}.{attribute}, which {type(module).__name__} lacks")
            setattr(module, attribute, value)


def _linear_to_replace(model, name: str, verb: str):
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"the checkpoint {verb} {name!r}, which {type(model).__name__} does not have") from e
    if not isinstance(module, LINEAR_TYPES):
        raise ValueError(f"the checkpoint {verb} {name!r}, a {type(module).__name__}, not a linear layer")
    return module


def register() -> None:
    """Make `from_pretrained` understand `quant_method: "hfcompress"`. Idempotent."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(HfcompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(HfcompressHfQuantizer)
